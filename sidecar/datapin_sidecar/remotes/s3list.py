"""ListObjectsV2 answers, parsed as what they are: untrusted XML from a tenant's endpoint.

The proof of access (`csi.access`, through `S3Remote.prove`) lists the key prefixes that hold
a revision's objects (`<prefix>/files/md5/ab/`) and reads each object's ETag and size from the
answer. The endpoint is named by a tenant's Dataset, so the answer may be anything a hostile
server can send. The rules:

* **Bounded.** The client reads at most `MAX_LIST_BODY` bytes of a page (`S3Client.list_page`);
  a page may hold at most `MAX_KEYS` objects (what we ask for), at most `MAX_DEPTH` nested
  elements, text values of at most `MAX_TEXT` characters; `S3Remote` follows at most
  `MAX_PAGES` pages per prefix and refuses a continuation token it has seen before (a server
  that loops).
* **No DTD.** A `<!DOCTYPE` (and with it every entity declaration: the "billion laughs"
  expansion, external entities) is refused by the parser's own handler before any entity is
  declared; undeclared entity references are parse errors. Python's expat never fetches
  external resources, and we never ask it to.
* **Only what we asked for.** Every key must lie under the prefix we listed; a key elsewhere
  means the server answers for something else (or tries to make us believe in objects under
  another prefix), and the whole answer is refused.

Anything that breaks a rule is a `RemoteError` (`RemoteCause.REMOTE`) naming the remote and
the prefix: the answer is not a listing we can believe, so nothing in it is believed.

Parsing is expat's event interface, not a tree: only the few elements we use are collected.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from dataclasses import dataclass
from typing import Final, NoReturn

from datapin_sidecar.errors import RemoteCause, RemoteError

#: Objects per page we ask for (S3's maximum); a page with more is refused.
MAX_KEYS: Final = 1000
#: The largest page body read (1000 keys with owner and class are about 400 KB).
MAX_LIST_BODY: Final = 2 * 1024 * 1024
#: Pages followed per prefix: 10 million keys under one shard is beyond any real bucket.
MAX_PAGES: Final = 10_000
#: Element nesting accepted (a real answer nests 3 deep).
MAX_DEPTH: Final = 8
#: Characters of one text value kept (S3 keys are at most 1024 bytes; tokens are short).
MAX_TEXT: Final = 4096

_PLAIN_MD5: Final = re.compile(r"[0-9a-f]{32}")
_ROOT: Final = "ListBucketResult"
#: Where the values we use sit: (parent, element).
_WANTED: Final = frozenset(
    {
        ("Contents", "Key"),
        ("Contents", "ETag"),
        ("Contents", "Size"),
        (_ROOT, "IsTruncated"),
        (_ROOT, "NextContinuationToken"),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Listed:
    """One object of a listing."""

    key: str
    etag: str  # as the server wrote it, quotes included
    size: int

    @property
    def md5(self) -> str | None:
        """The md5 of the bytes, when the ETag is one (a single-part upload without SSE-KMS
        or SSE-C); None for a multipart ETag (`<hex>-N`) or anything else."""
        etag = self.etag.strip().strip('"').lower()
        return etag if _PLAIN_MD5.fullmatch(etag) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ListPage:
    """One page of a ListObjectsV2 answer."""

    objects: tuple[Listed, ...]
    #: The token of the next page; None on the last one.
    next_token: str | None


def parse_page(body: bytes, *, prefix: str, remote: str) -> ListPage:
    """Parse one ListObjectsV2 page listed under `prefix`; `RemoteError` if it breaks a rule."""
    return _Parser(prefix=prefix, remote=remote).parse(body)


class _Parser:
    """expat callbacks collecting a page (see the module doc)."""

    def __init__(self, *, prefix: str, remote: str) -> None:
        self.prefix = prefix
        self.remote = remote
        self.stack: list[str] = []
        self.text: list[str] = []
        self.text_len = 0
        self.current: dict[str, str] = {}
        self.objects: list[Listed] = []
        self.truncated: str | None = None
        self.token: str | None = None

    def refuse(self, problem: str) -> NoReturn:
        raise RemoteError(
            remote=self.remote,
            problem=f"the listing of {self.prefix!r} is not a ListObjectsV2 answer we can "
            f"believe: {problem}",
            fix="check that the endpoint is the S3 service that holds the remote (not a proxy "
            "or another server answering for it)",
            cause=RemoteCause.REMOTE,
        )

    def parse(self, body: bytes) -> ListPage:
        if len(body) > MAX_LIST_BODY:
            self.refuse(f"the page is over {MAX_LIST_BODY} bytes")
        parser = xml.parsers.expat.ParserCreate()
        parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.StartDoctypeDeclHandler = self._doctype
        parser.EntityDeclHandler = self._entity
        parser.ExternalEntityRefHandler = self._external
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._data
        try:
            parser.Parse(body, True)
        except xml.parsers.expat.ExpatError as exc:
            self.refuse(f"malformed XML ({xml.parsers.expat.errors.messages[exc.code]})")
        if self.truncated not in ("true", "false"):
            self.refuse("no IsTruncated")
        if self.truncated == "true" and not self.token:
            self.refuse("IsTruncated without a NextContinuationToken")
        return ListPage(
            objects=tuple(self.objects), next_token=self.token if self.truncated == "true" else None
        )

    def _doctype(self, *_: object) -> None:
        self.refuse("it has a DOCTYPE (entity declarations are never accepted)")

    def _entity(self, *_: object) -> None:
        self.refuse("it declares an entity")

    def _external(self, *_: object) -> int:
        self.refuse("it references an external entity")

    def _start(self, name: str, _attrs: dict[str, str]) -> None:
        if not self.stack and name != _ROOT:
            self.refuse(f"the root element is {name[:40]!r}")
        if len(self.stack) >= MAX_DEPTH:
            self.refuse(f"elements nest deeper than {MAX_DEPTH}")
        if self.stack == [_ROOT] and name == "Contents":
            self.current = {}
        self.stack.append(name)
        self.text, self.text_len = [], 0

    def _data(self, data: str) -> None:
        if len(self.stack) >= 2 and (self.stack[-2], self.stack[-1]) in _WANTED:
            self.text_len += len(data)
            if self.text_len > MAX_TEXT:
                self.refuse(f"a {self.stack[-1]} value is over {MAX_TEXT} characters")
            self.text.append(data)

    def _end(self, name: str) -> None:
        parent = self.stack[-2] if len(self.stack) >= 2 else ""
        self.stack.pop()
        value = "".join(self.text)
        self.text, self.text_len = [], 0
        if parent == "Contents" and (parent, name) in _WANTED:
            if name in self.current:
                self.refuse(f"an object has two {name} elements")
            self.current[name] = value
        elif parent == _ROOT and name == "IsTruncated":
            self.truncated = value.strip().lower()
        elif parent == _ROOT and name == "NextContinuationToken":
            self.token = value
        elif parent == _ROOT and name == "Contents":
            self._contents()

    def _contents(self) -> None:
        if len(self.objects) >= MAX_KEYS:
            self.refuse(f"a page holds more than the {MAX_KEYS} objects asked for")
        key, etag, size = (self.current.get(k) for k in ("Key", "ETag", "Size"))
        if key is None or etag is None or size is None:
            self.refuse("an object lacks its Key, ETag or Size")
        if not key.startswith(self.prefix):
            self.refuse(f"key {key[:120]!r} is not under the prefix asked for")
        size = size.strip()
        if not size.isdigit() or len(size) > 20:
            self.refuse(f"object {key[:120]!r} has size {size[:30]!r}")
        self.objects.append(Listed(key=key, etag=etag, size=int(size)))
