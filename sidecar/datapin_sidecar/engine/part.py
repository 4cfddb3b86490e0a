"""A part of a revision: the folders of a `.dir` a Job asked for, and nothing else.

DVC users pull part of a tracked directory all the time (`dvc pull data/images/train`): a
training Job wants the train split, an evaluation Job the val split. A `Part` names those
folders, relative to the revision's root (the `.dir`'s relpaths), and `select` cuts a manifest
down to the entries beneath them. Everything downstream works on the selected manifest as if
it were the revision: the plan (`manifest.diff`), the fetch (only the part's objects), the
build (entries keep their paths, so `current/images/train/...`), the GC's roots.

**Value.** `Part.parse` normalises what a user wrote (a trailing `/`, a leading `./`,
duplicates, a folder inside another one named too) to a sorted tuple of folders, so one part
has one spelling and one key. Each path is checked with the manifest's own rules
(`manifest.path_problem`: relative, no `.`/`..`/empty segments, UTF-8, the length and depth
caps), so nothing a pod's annotation or a volume attribute says can reach outside the tree.
At most `MAX_PATHS` folders, each at most `MAX_RELPATH_BYTES`.

**Identity.** The whole revision is `WHOLE` (no paths). A part's trees are keyed by the
revision's key plus `-p<16 hex>` (`suffix`: the first 64 bits of the SHA-256 of the
normalised paths), so a part and the whole revision never share a tree, and the records
(`TreeInfo.paths`) say which folders a tree holds. Ser/de is `to_list`/`from_list` for JSON
and `label` (`a,b`) for annotations, attributes and the metrics' `revision_info`.

**Selection** is O(k log n) for k folders: entries are sorted by UTF-8 bytes, so the entries
beneath `p` are the contiguous run from `p/` up to `p0` (`0` follows `/`), found by binary
search; the runs are copied out of the flat buffers without re-validation (a subset of a
valid, sorted manifest is one). A folder the revision does not hold, or a path naming a file,
is a `PathNotInRevisionError` listing the folders next to where it was looked for and the
revision's top-level folders, found by skipping from one folder's run to the next, never by a
walk over every entry.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final

from datapin_sidecar.engine.manifest import MAX_RELPATH_BYTES, Manifest, path_problem
from datapin_sidecar.errors import PathNotInRevisionError, UsageError

#: Most folders one part may name (a comma list in an annotation; far above real use).
MAX_PATHS: Final = 64
#: How many folder names a hint lists before "and N more".
_HINT: Final = 20


@dataclass(frozen=True, slots=True)
class Part:
    """Folders of a revision, normalised and sorted; `WHOLE` (none) is the whole revision."""

    paths: tuple[str, ...] = ()

    WHOLE: ClassVar[Part]

    @classmethod
    def parse(cls, values: Iterable[str], *, what: str = "path", split: bool = True) -> Part:
        """Normalise and check what a user wrote; `what` names the source in errors.

        With `split` (the text forms: annotations, volume attributes, `rev:folders`), each
        value is a comma list and each item is stripped of blanks, so such a form cannot name
        a folder with a comma or with blanks at either end. Without (the JSON lists of pins,
        settings and records, and `--path`), each value is one folder, taken exactly.
        """
        found: list[str] = []
        for raw in values:
            for item in raw.split(",") if split else (raw,):
                path = item.strip() if split else item
                if not path:
                    continue
                found.append(_normal(path, what))
        if len(found) > MAX_PATHS:
            raise UsageError(
                f"{what} names {len(found)} folders; at most {MAX_PATHS} are allowed. Fix: "
                "name their common parent folder instead"
            )
        return cls(paths=_outermost(found))

    @classmethod
    def from_list(cls, values: object, *, what: str = "paths") -> Part:
        """From JSON (a record, a pin): a list of strings, or None/absent for the whole."""
        if values is None:
            return cls.WHOLE
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UsageError(f"{what} must be a list of folder paths, got {type(values).__name__}")
        return cls.parse(values, what=what, split=False)

    @property
    def whole(self) -> bool:
        return not self.paths

    def to_list(self) -> list[str]:
        return list(self.paths)

    @property
    def label(self) -> str:
        """`a,b` (empty for the whole revision): annotations, attributes, `revision_info`."""
        return ",".join(self.paths)

    @property
    def suffix(self) -> str:
        """What a part adds to a tree key: `-p<16 hex>`, or nothing for the whole revision."""
        if not self.paths:
            return ""
        digest = hashlib.sha256("\n".join(self.paths).encode("utf-8")).hexdigest()
        return f"-p{digest[:16]}"

    def __str__(self) -> str:
        return self.label or "(whole revision)"

    def select(self, manifest: Manifest, *, revision: str) -> Manifest:
        """The entries of `manifest` beneath this part's folders (all of it for `WHOLE`)."""
        if not self.paths:
            return manifest
        runs: list[tuple[int, int]] = []
        for path in self.paths:
            prefix = path.encode("utf-8")
            lo = _lower_bound(manifest, prefix + b"/")
            hi = _lower_bound(manifest, prefix + b"0", lo)
            if lo == hi:
                raise _not_in_revision(manifest, path, revision)
            runs.append((lo, hi))
        # Folder order is not entry order: `a-b/` sorts before `a/`, though `a` < `a-b`.
        return _take(manifest, sorted(runs))


Part.WHOLE = Part()


def _normal(path: str, what: str) -> str:
    text = path.removeprefix("./").rstrip("/")
    if not text or text == ".":
        raise UsageError(
            f"{what} {path!r} names the revision's root. Fix: leave the path out to get the "
            "whole revision"
        )
    raw = text.encode("utf-8", "surrogatepass")
    problem = path_problem(raw)
    if problem is not None or len(raw) > MAX_RELPATH_BYTES:
        shown = path if len(path) <= 80 else f"{path[:80]}..."
        raise UsageError(
            f"{what} {shown!r} is not a folder inside the revision: {problem or 'too long'}. "
            "Fix: name a folder relative to the dataset's root, like images/train"
        )
    return text


def _outermost(paths: list[str]) -> tuple[str, ...]:
    """Sorted, without duplicates and without folders inside another named folder."""
    unique = set(paths)

    def inside_another(path: str) -> bool:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in unique:
                return True
            parent = parent.rpartition("/")[0]
        return False

    return tuple(sorted((p for p in unique if not inside_another(p)), key=_utf8))


def _utf8(path: str) -> bytes:
    return path.encode("utf-8", "surrogatepass")


def _lower_bound(manifest: Manifest, key: bytes, lo: int = 0) -> int:
    """The first entry whose relpath is >= `key` (UTF-8 byte order, the manifest's order)."""
    hi = len(manifest)
    while lo < hi:
        mid = (lo + hi) // 2
        if manifest.relpath_bytes(mid) < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _take(manifest: Manifest, runs: list[tuple[int, int]]) -> Manifest:
    """A manifest of the entries in `runs` (sorted, disjoint): copied, not re-validated."""
    paths, offsets, md5s = manifest.buffers()
    out_paths = bytearray()
    out_offsets = array("Q")
    out_md5s = bytearray()
    for lo, hi in runs:
        start = offsets[lo]
        end = offsets[hi] if hi < len(offsets) else len(paths)
        base = len(out_paths) - start
        out_offsets.extend(o + base for o in offsets[lo:hi])
        out_paths += paths[start:end]
        out_md5s += md5s[16 * lo : 16 * hi]
    return Manifest(
        paths=bytes(out_paths), offsets=out_offsets, md5s=bytes(out_md5s), source=manifest.source
    )


def folders(manifest: Manifest, parent: str = "") -> list[str]:
    """The folders directly inside `parent` ("" = the root), by skipping over each one's run."""
    prefix = (parent + "/").encode("utf-8") if parent else b""
    end = _lower_bound(manifest, parent.encode("utf-8") + b"0") if parent else len(manifest)
    i = _lower_bound(manifest, prefix) if parent else 0
    found: list[str] = []
    while i < end:
        rest = manifest.relpath_bytes(i)[len(prefix) :]
        name, slash, _ = rest.partition(b"/")
        if not slash:
            i += 1  # a file directly inside `parent`
            continue
        found.append(name.decode("utf-8"))
        i = _lower_bound(manifest, prefix + name + b"0", i + 1)
    return sorted(found, key=_utf8)


def _not_in_revision(manifest: Manifest, path: str, revision: str) -> PathNotInRevisionError:
    raw = path.encode("utf-8")
    i = _lower_bound(manifest, raw)
    is_file = i < len(manifest) and manifest.relpath_bytes(i) == raw
    parent = path
    while True:
        parent = parent.rpartition("/")[0]
        if not parent:
            break
        lo = _lower_bound(manifest, parent.encode("utf-8") + b"/")
        if lo < len(manifest) and manifest.relpath_bytes(lo).startswith(
            parent.encode("utf-8") + b"/"
        ):
            break
    return PathNotInRevisionError(
        revision=revision,
        path=path,
        is_file=is_file,
        parent=parent,
        siblings=_some(folders(manifest, parent)) if parent else (),
        top=_some(folders(manifest)),
    )


def _some(names: list[str]) -> tuple[str, ...]:
    if len(names) <= _HINT:
        return tuple(names)
    return (*names[:_HINT], f"and {len(names) - _HINT} more")
