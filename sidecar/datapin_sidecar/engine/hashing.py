"""Object hashing, exactly as DVC names objects.

DVC 3 names an object by the plain md5 of its bytes. DVC 2 (the "legacy" layout, hash name
`md5-dos2unix`) first decides from the file's first 512 bytes whether it is text (no NUL and at
most 30% of bytes outside printable ASCII and `\\n\\r\\t\\f\\b`) and, if so, hashes it with every
CRLF replaced by LF, one 1 MiB read at a time, while the object keeps the raw bytes. So for
legacy text objects `md5(bytes) != name`: checking one with the plain md5 would quarantine a
perfectly good object. `ObjectHasher` reproduces DVC 2's reads chunk for chunk (a CRLF split
across a 1 MiB boundary is not folded by DVC either), so our verdict matches DVC's.

`Layout` is one of the two layouts; `LayoutChoice` is what users name (`auto`, `dvc3`,
`legacy`), with the candidates `auto` stands for: the one definition of that vocabulary.

`ObjectHasher` is incremental so that a download can hash while it writes (issue 3), and the
same class checks an object already on disk.
"""

from __future__ import annotations

import hashlib
import os
from enum import StrEnum
from typing import Final

#: DVC 2 hashed text in reads of this size; CRLF folding happens within each read.
DVC2_CHUNK: Final = 1024 * 1024
#: DVC 2 judged text from this many leading bytes.
_TEXT_SAMPLE: Final = 512
_TEXT_CHARS: Final = bytes(range(32, 127)) + b"\n\r\t\f\b"


class Layout(StrEnum):
    """Where objects live and how they are named.

    `dvc3`: `files/md5/ab/cdef...`, plain md5. `legacy`: `ab/cdef...`, md5-dos2unix (DVC 2).
    """

    DVC3 = "dvc3"
    LEGACY = "legacy"

    def prefix(self) -> str:
        """The directory under a cache or remote root that holds this layout's objects."""
        return "files/md5/" if self is Layout.DVC3 else ""


class LayoutChoice(StrEnum):
    """A layout as users and settings name it: one of the two, or `auto` (find out).

    The one vocabulary of the CLI's `--layout`, the sidecar's and agent's `layout` setting,
    the Dataset's `spec.remote.layout` and the `layout` of a `datapin.dev/pins` entry. `auto`
    means the objects are looked for in dvc3, then legacy, and the first layout that holds the
    revision is used.
    """

    AUTO = "auto"
    DVC3 = "dvc3"
    LEGACY = "legacy"

    @property
    def candidates(self) -> tuple[Layout, ...]:
        """The layouts to look in, in order."""
        if self is LayoutChoice.AUTO:
            return (Layout.DVC3, Layout.LEGACY)
        return (Layout(self.value),)

    @property
    def pinned(self) -> Layout | None:
        """The one layout this choice names; None for `auto` (to be found out)."""
        return None if self is LayoutChoice.AUTO else Layout(self.value)

    @classmethod
    def of(cls, layout: Layout | None) -> LayoutChoice:
        """The choice that pins `layout` (None: `auto`)."""
        return cls.AUTO if layout is None else cls(layout.value)


def is_text_block(block: bytes) -> bool:
    """DVC 2's text heuristic on a file's leading bytes (an empty file counts as text)."""
    if not block:
        return True
    if b"\x00" in block:
        return False
    nontext = block.translate(None, _TEXT_CHARS)
    return len(nontext) / len(block) <= 0.30


class ObjectHasher:
    """Incremental md5 of an object the way its layout names it.

    Feed raw bytes with `update` in any chunking; `hexdigest` gives the object name. For the
    legacy layout the bytes are re-cut into DVC 2's 1 MiB reads before CRLF folding.
    """

    __slots__ = ("_buf", "_layout", "_md5", "_text")

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._text: bool | None = None if layout is Layout.LEGACY else False
        self._buf = bytearray()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._layout is Layout.DVC3:
            self._md5.update(data)
            return
        self._buf += data
        if self._text is None:
            if len(self._buf) < _TEXT_SAMPLE:
                return
            self._text = is_text_block(bytes(self._buf[:_TEXT_SAMPLE]))
        if not self._text:
            self._md5.update(self._buf)
            self._buf.clear()
            return
        while len(self._buf) >= DVC2_CHUNK:
            self._md5.update(bytes(self._buf[:DVC2_CHUNK]).replace(b"\r\n", b"\n"))
            del self._buf[:DVC2_CHUNK]

    def hexdigest(self) -> str:
        if self._buf:
            if self._text is None:
                self._text = is_text_block(bytes(self._buf[:_TEXT_SAMPLE]))
            tail = bytes(self._buf)
            self._md5.update(tail.replace(b"\r\n", b"\n") if self._text else tail)
            self._buf.clear()
        return self._md5.hexdigest()


def hash_file(path: str | os.PathLike[str], layout: Layout) -> str:
    """The name `layout` gives the object stored at `path`."""
    hasher = ObjectHasher(layout)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(DVC2_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
