"""DVC directory manifests (`.dir` objects) as compact, validated, sorted tables.

A `.dir` object is `json.dumps(entries, sort_keys=True)`: a list of `{"md5": ..., "relpath":
...}`, ASCII-escaped, sorted by relpath. Real datasets reach millions of entries, so a manifest
here is not a list of dicts (≈ 400 bytes per entry in CPython) but three flat buffers:

* `_paths`: every relpath as UTF-8, NUL-separated (NUL cannot occur in a valid relpath);
* `_offsets`: where each relpath starts in `_paths` (`array('Q')`, 8 bytes per entry);
* `_md5s`: every md5 as 16 raw bytes.

That is ~25 bytes plus the path length per entry: a 1,000,000-entry manifest with 40-byte paths
fits in ~70 MB. Parsing matches DVC's exact byte format with one compiled regex over the raw
bytes (no per-entry dict); anything else falls back to the general JSON parser, so hand-written
or reformatted manifests still load, at a higher memory cost.

Order is UTF-8 byte order, which equals the code-point order DVC sorts by. Validation runs in
the same single pass over the sorted paths: every relpath must be relative, free of NUL, `.`,
`..` and empty segments, unique, and never both a file and a parent directory (`a` and `a/b`).
Lengths are bounded too, because a manifest comes from a bucket anyone with push rights fills:
a segment over `MAX_SEGMENT_BYTES` (the file name limit of XFS and ext4), a relpath over
`MAX_RELPATH_BYTES` (Linux's PATH_MAX) or deeper than `MAX_DEPTH` directories is refused
here, with the entry named, instead of failing later as ENAMETOOLONG or a RecursionError
while the tree is built. Paths of at most `MAX_SEGMENT_BYTES` bytes cannot break any of these
rules, so the C-speed scan only looks closer at the (rare) longer ones.
Because entries sharing a prefix are contiguous in sorted order, a stack of the files that are
prefixes of the current path finds such clashes in O(n) without a set of all directories.

`diff` plans a switch between two manifests by a merge walk (the dvc-data shape: plan, then
apply), yielding index arrays rather than objects.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Final, NamedTuple

from datapin_sidecar.errors import ManifestError

_MD5_HEX: Final = re.compile(r"[0-9a-f]{32}")
#: Longest file or directory name (NAME_MAX of XFS and ext4), in bytes of UTF-8.
MAX_SEGMENT_BYTES: Final = 255
#: Longest relpath, in bytes of UTF-8 (PATH_MAX; the tree's own directory comes on top).
MAX_RELPATH_BYTES: Final = 4096
#: Most directories a relpath may descend through (far above any real dataset; keeps every
#: per-directory walk, recursive or holding a descriptor per level, within its limits).
MAX_DEPTH: Final = 256
# DVC's exact output: `[{"md5": "<32 hex>", "relpath": "<json string>"}, ...]`.
_CANONICAL: Final = re.compile(
    # The relpath is a JSON string, written as an unrolled loop (runs of plain characters
    # between escapes), which the regex engine matches twice as fast as an alternation.
    rb'\{"md5": "([0-9a-f]{32})", "relpath": "([^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*)"\}'
)


class Entry(NamedTuple):
    """One file of a revision: where it goes and which object holds its bytes."""

    relpath: str
    md5: str


class Manifest:
    """An immutable, sorted, validated `.dir` manifest stored in flat buffers."""

    __slots__ = ("_md5s", "_offsets", "_paths", "source")

    def __init__(self, *, paths: bytes, offsets: array[int], md5s: bytes, source: str) -> None:
        self._paths = paths
        self._offsets = offsets
        self._md5s = md5s
        self.source = source

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes, *, source: str) -> Manifest:
        """Parse and validate the bytes of a `.dir` object; `source` names it in errors."""
        builder = _Builder(source)
        stripped = data.strip()
        if not stripped.startswith(b"[") or not stripped.endswith(b"]"):
            raise ManifestError(manifest=source, problem="not a JSON list of entries")
        if not _parse_canonical(stripped, builder):
            builder = _Builder(source)
            _parse_general(data, builder)
        return builder.build()

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, str]], *, source: str) -> Manifest:
        """Build from `(relpath, md5)` pairs in any order (fixtures, benchmarks, DVC files)."""
        builder = _Builder(source)
        for relpath, md5 in entries:
            builder.add(relpath.encode("utf-8", "surrogatepass"), md5)
        return builder.build()

    # -- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offsets)

    def relpath_bytes(self, i: int) -> bytes:
        start = self._offsets[i]
        end = self._paths.index(b"\0", start)
        return self._paths[start:end]

    def relpath(self, i: int) -> str:
        return self.relpath_bytes(i).decode("utf-8")

    def md5(self, i: int) -> str:
        return self._md5s[16 * i : 16 * i + 16].hex()

    def md5_raw(self, i: int) -> bytes:
        return self._md5s[16 * i : 16 * i + 16]

    def __iter__(self) -> Iterator[Entry]:
        for i in range(len(self)):
            yield Entry(self.relpath(i), self.md5(i))

    def iter_raw(self) -> Iterator[tuple[bytes, bytes]]:
        """`(relpath as UTF-8 bytes, md5 as 16 raw bytes)` per entry, in order; the hot path."""
        paths = self._paths
        md5s = self._md5s
        start = 0
        for i in range(len(self._offsets)):
            end = paths.index(b"\0", start)
            yield paths[start:end], md5s[16 * i : 16 * i + 16]
            start = end + 1

    def dumps(self) -> bytes:
        """The `.dir` bytes DVC would write for these entries (its md5 is the revision)."""
        parts = [
            '{"md5": "%s", "relpath": %s}' % (md5.hex(), json.dumps(relpath.decode("utf-8")))  # noqa: UP031
            for relpath, md5 in self.iter_raw()
        ]
        return ("[" + ", ".join(parts) + "]").encode("ascii")

    def entry_raw(self, i: int) -> tuple[bytes, bytes]:
        """`(relpath bytes, md5 raw)` of entry `i` (random access)."""
        return self.relpath_bytes(i), self._md5s[16 * i : 16 * i + 16]

    # -- the parsed form, cached beside the cache's objects ----------------------------------

    def to_bytes(self) -> bytes:
        """The flat buffers as one blob (see `from_bytes`), ~1000x faster to load than JSON."""
        return b"".join(self.blob_parts())

    def blob_parts(self) -> list[bytes | memoryview]:
        """`to_bytes()` in pieces, to write without first copying every buffer into one."""
        body: list[bytes | memoryview] = [
            struct.pack("<QQ", len(self._offsets), len(self._paths)),
            memoryview(self._offsets).cast("B"),
            self._paths,
            self._md5s,
        ]
        crc = 0
        for part in body:
            crc = zlib.crc32(part, crc)
        return [_BLOB_MAGIC, *body, struct.pack("<I", crc)]

    @classmethod
    def from_bytes(cls, blob: bytes, *, source: str) -> Manifest | None:
        """Load what `to_bytes` wrote; None if it is damaged in any way (caller re-parses).

        The blob was written from a manifest that had been md5-checked and validated, and is
        checked here by its CRC, so validation is not repeated.
        """
        if not blob.startswith(_BLOB_MAGIC) or len(blob) < len(_BLOB_MAGIC) + 20:
            return None
        body = memoryview(blob)[len(_BLOB_MAGIC) : -4]
        if zlib.crc32(body) != struct.unpack("<I", blob[-4:])[0]:
            return None
        n, npaths = struct.unpack_from("<QQ", body)
        offsets = array("Q")
        start = 16
        if len(body) != start + 8 * n + npaths + 16 * n:
            return None
        offsets.frombytes(body[start : start + 8 * n])
        paths = bytes(body[start + 8 * n : start + 8 * n + npaths])
        md5s = bytes(body[start + 8 * n + npaths :])
        return cls(paths=paths, offsets=offsets, md5s=md5s, source=source)

    def buffers(self) -> tuple[bytes, array[int], bytes]:
        """The flat buffers (paths, offsets, md5s), read-only by contract (`part.select`)."""
        return self._paths, self._offsets, self._md5s

    def nbytes(self) -> int:
        """Memory held by the buffers (for the scale benchmark's accounting)."""
        return len(self._paths) + self._offsets.itemsize * len(self._offsets) + len(self._md5s)


_BLOB_MAGIC: Final = b"datapin-manifest-1\n"


class _Builder:
    """Accumulates entries into flat buffers, then sorts if needed and validates."""

    __slots__ = ("_md5s", "_offsets", "_paths", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self._paths = bytearray()
        self._offsets = array("Q")
        self._md5s = bytearray()

    def add(self, relpath: bytes, md5: str) -> None:
        if not _MD5_HEX.fullmatch(md5):
            raise ManifestError(
                manifest=self.source,
                entry=_show(relpath),
                problem=f"md5 {md5!r} is not 32 lowercase hex digits",
            )
        if b"\0" in relpath:
            raise ManifestError(
                manifest=self.source, entry=_show(relpath), problem="relpath contains NUL"
            )
        self._offsets.append(len(self._paths))
        self._paths += relpath
        self._paths += b"\0"
        self._md5s += bytes.fromhex(md5)

    def build(self) -> Manifest:
        manifest = Manifest(
            paths=bytes(self._paths),
            offsets=self._offsets,
            md5s=bytes(self._md5s),
            source=self.source,
        )
        self._paths = bytearray()
        if not _validate(manifest):
            manifest = _sorted(manifest)
            _validate(manifest)
        return manifest


#: How much of a relpath an error quotes (a hostile one may be megabytes).
_SHOWN_PATH: Final = 160


def _show(relpath: bytes) -> str:
    if len(relpath) > _SHOWN_PATH:
        head = relpath[:_SHOWN_PATH].decode("utf-8", "backslashreplace")
        return f"{head!r}... ({len(relpath)} bytes)"
    return repr(relpath.decode("utf-8", "backslashreplace"))


#: Per entry, DVC's format adds `{"md5": "`, 32 hex, `", "relpath": "`, `"}` to the relpath.
_ENTRY_OVERHEAD: Final = 58
#: Between two entries; cannot occur inside a JSON string, whose quotes are escaped.
_BOUNDARY: Final = b'"}, {"md5": "'
#: Work in slices of about this many bytes: C-speed scans with bounded transient memory.
_CHUNK: Final = 1 << 22


def _spans(blob: bytes, sep: bytes, keep: int) -> Iterator[tuple[int, int]]:
    """`(start, end)` slices of `blob` of about `_CHUNK` bytes, cut `keep` bytes into a `sep`."""
    start = 0
    while start < len(blob):
        cut = blob.find(sep, start + _CHUNK)
        end = len(blob) if cut < 0 else cut + keep
        yield start, end
        start = end


def _parse_canonical(data: bytes, builder: _Builder) -> bool:
    """Parse DVC's exact format; False if the bytes are in any other (valid or not) shape.

    Entries are found with `findall` per slice, then checked to tile the document exactly:
    n - 1 boundaries (which no JSON string can contain) and a total length that leaves room
    for nothing but `[`, `]` and the `, ` separators.
    """
    if data == b"[]":
        return True
    if not data.startswith(b'[{"md5": "') or not data.endswith(b'"}]'):
        return False
    expected = data.count(_BOUNDARY) + 1
    count = length = 0
    paths, offsets, md5s = builder._paths, builder._offsets, builder._md5s
    for start, end in _spans(data, _BOUNDARY, 2):
        found = _CANONICAL.findall(data, start, end)
        raws = [raw for _, raw in found]
        count += len(raws)
        length += sum(map(len, raws))
        if b"\\" in data[start:end]:
            try:
                raws = [
                    json.loads(b'"' + r + b'"').encode("utf-8", "surrogatepass")
                    if b"\\" in r
                    else r
                    for r in raws
                ]
            except ValueError:
                return False
            if any(b"\0" in r for r in raws):
                return False  # the general parser names the entry
        md5s += bytes.fromhex(b"".join(md5 for md5, _ in found).decode("ascii"))
        offsets.extend(accumulate((len(r) + 1 for r in raws[:-1]), initial=len(paths)))
        paths += b"\0".join(raws)
        paths += b"\0"
    return count == expected and len(data) == 2 + 2 * (count - 1) + _ENTRY_OVERHEAD * count + length


def _parse_general(data: bytes, builder: _Builder) -> None:
    source = builder.source

    def entry(pairs: list[tuple[str, object]]) -> tuple[str, str]:
        fields = dict(pairs)
        md5, relpath = fields.get("md5"), fields.get("relpath")
        if not isinstance(md5, str) or not isinstance(relpath, str):
            raise ManifestError(
                manifest=source,
                entry=repr(relpath) if isinstance(relpath, str) else None,
                problem="an entry needs string fields 'md5' and 'relpath'",
            )
        return relpath, md5

    try:
        entries = json.loads(data, object_pairs_hook=entry)
    except ManifestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(manifest=source, problem=f"not valid JSON ({exc})") from None
    if not isinstance(entries, list):
        raise ManifestError(manifest=source, problem="not a JSON list of entries")
    for item in entries:
        if not isinstance(item, tuple):
            raise ManifestError(manifest=source, problem="every entry must be a JSON object")
        builder.add(item[0].encode("utf-8", "surrogatepass"), item[1])


def _sorted(m: Manifest) -> Manifest:
    order = sorted(range(len(m)), key=m.relpath_bytes)
    builder = _Builder(m.source)
    for i in order:
        builder.add(m.relpath_bytes(i), m.md5(i))
    # Sorted now; build() re-checks cheaply and validates.
    return builder.build()


def _validate(m: Manifest) -> bool:
    """Check every path; False if the order is not sorted (the caller sorts and retries).

    The common manifest is checked with C-speed operations on slices of the path buffer:
    pattern scans for every unsafe-segment rule, `sorted` for order, sets for duplicates and
    for paths that are also directories. Anything a scan flags goes to `_validate_exact`,
    which walks the entries one by one and names the offending one.
    """
    blob = m._paths
    if not blob:
        return True
    if not blob.isascii() or blob.startswith((b"/", b".", b"\0")):
        return _validate_exact(m)
    if any(bad in blob for bad in (b"\0/", b"/\0", b"//", b"/.", b"\0.", b"\0\0")):
        return _validate_exact(m)
    dirs: set[bytes] = set()
    last = b""
    for start, end in _spans(blob, b"\0", 1):
        chunk = blob[start : end - 1].split(b"\0")
        if (
            chunk[0] <= last
            or chunk != sorted(chunk)
            or len(set(chunk)) != len(chunk)
            or (max(map(len, chunk)) > MAX_SEGMENT_BYTES and _any_too_long(chunk))
        ):
            return _validate_exact(m)
        dirs.update(path.rpartition(b"/")[0] for path in chunk)
        last = chunk[-1]
    for parent in list(dirs):
        ancestor = parent
        while b"/" in ancestor:
            ancestor = ancestor.rpartition(b"/")[0]
            if ancestor in dirs:
                break
            dirs.add(ancestor)
    dirs.discard(b"")
    for start, end in _spans(blob, b"\0", 1):
        if not dirs.isdisjoint(blob[start : end - 1].split(b"\0")):
            return _validate_exact(m)
    return True


def _validate_exact(m: Manifest) -> bool:
    """Entry by entry: False if unsorted, else raise naming the first bad entry, or True."""
    source = m.source
    files: list[bytes] = []  # files that are prefixes of the current path, nested
    prev = b""
    for path, _ in m.iter_raw():
        if path < prev:
            return False
        prev = path
        problem = path_problem(path)
        if problem:
            raise ManifestError(manifest=source, entry=_show(path), problem=problem)
        while files and not path.startswith(files[-1]):
            files.pop()
        if files:
            top = files[-1]
            if path == top:
                raise ManifestError(manifest=source, entry=_show(path), problem="duplicate path")
            if path[len(top) : len(top) + 1] == b"/":
                raise ManifestError(
                    manifest=source,
                    entry=_show(path),
                    problem=f"{_show(top)} is both a file and a parent directory of it",
                )
        files.append(path)
    return True


def path_problem(path: bytes) -> str | None:  # noqa: PLR0911 - one return per rule
    """Why `path` cannot be a relpath of a tree (the rules in the module doc), or None."""
    # Fast path for the usual clean ASCII path: no segment can be empty, '.' or '..'.
    if (
        path
        and path[0] not in b"/."
        and path[-1] != 0x2F
        and b"//" not in path
        and b"/." not in path
        and path.isascii()
        and len(path) <= MAX_SEGMENT_BYTES
    ):
        return None
    if not path:
        return "empty relpath"
    if path.startswith(b"/"):
        return "absolute path"
    too_long = _length_problem(path)
    if too_long:
        return too_long
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return "relpath is not valid UTF-8"
    for segment in path.split(b"/"):
        if not segment:
            return "empty path segment ('//' or a trailing '/')"
        if segment == b"..":
            return "'..' segment escapes the tree"
        if segment == b".":
            return "'.' segment (paths must be normalised)"
    return None


def _any_too_long(paths: list[bytes]) -> bool:
    return any(_length_problem(path) for path in paths if len(path) > MAX_SEGMENT_BYTES)


def _length_problem(path: bytes) -> str | None:
    """Why `path` is too long or too deep to be built on Linux, or None."""
    if len(path) > MAX_RELPATH_BYTES:
        return (
            f"relpath is {len(path)} bytes long; paths longer than {MAX_RELPATH_BYTES} bytes "
            "cannot be created on Linux"
        )
    if path.count(b"/") >= MAX_DEPTH:
        return f"relpath is more than {MAX_DEPTH} directories deep"
    longest = max(map(len, path.split(b"/")))
    if longest > MAX_SEGMENT_BYTES:
        return (
            f"a path segment is {longest} bytes long; file and directory names are limited "
            f"to {MAX_SEGMENT_BYTES} bytes"
        )
    return None


# -- planning a switch ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What turns tree `old` into tree `new`: indices into the respective manifests.

    `remove` indexes `old` (paths gone or whose object changed); `add` indexes `new` (paths new
    or whose object changed). Everything else is unchanged and is kept as it is.
    """

    remove: array[int]
    add: array[int]
    unchanged: int

    @property
    def changes(self) -> int:
        return len(self.remove) + len(self.add)


def diff(old: Manifest, new: Manifest) -> Plan:
    """Merge-walk two sorted manifests into a `Plan`; O(len(old) + len(new))."""
    if old._paths == new._paths:
        return _diff_same_paths(old, new)
    remove = array("Q")
    add = array("Q")
    unchanged = 0
    old_it = iter(old.iter_raw())
    new_it = iter(new.iter_raw())
    i = j = 0
    a = next(old_it, None)
    b = next(new_it, None)
    while a is not None and b is not None:
        if a[0] == b[0]:
            if a[1] == b[1]:
                unchanged += 1
            else:
                remove.append(i)
                add.append(j)
            i += 1
            j += 1
            a = next(old_it, None)
            b = next(new_it, None)
        elif a[0] < b[0]:
            remove.append(i)
            i += 1
            a = next(old_it, None)
        else:
            add.append(j)
            j += 1
            b = next(new_it, None)
    while a is not None:
        remove.append(i)
        i += 1
        a = next(old_it, None)
    while b is not None:
        add.append(j)
        j += 1
        b = next(new_it, None)
    return Plan(remove=remove, add=add, unchanged=unchanged)


def _diff_same_paths(old: Manifest, new: Manifest) -> Plan:
    """Same relpaths in the same order (a content-only change): compare md5s in blocks.

    Comparing 16-entry blocks with one `==` each, then entries only inside blocks that differ,
    keeps the Python-level work proportional to the changes, not to the manifest.
    """
    a, b = old._md5s, new._md5s
    changed = array("Q")
    block = 16 * 16
    for start in range(0, len(a), block):
        if a[start : start + block] != b[start : start + block]:
            for pos in range(start, min(start + block, len(a)), 16):
                if a[pos : pos + 16] != b[pos : pos + 16]:
                    changed.append(pos // 16)
    return Plan(remove=changed, add=array("Q", changed), unchanged=len(old) - len(changed))
