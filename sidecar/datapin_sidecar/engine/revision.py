"""What a user can name as a revision, and the DVC files that name one.

A revision is a DVC object id: `<md5>.dir` for a directory (the md5 of its `.dir` manifest) or
`<md5>` for a single file. That id is content-addressed, so it *is* the pin: git tags and
branches are resolved to one by the operator (issue 5), never by the materialiser.

`.dvc` files and `dvc.lock` name revisions through their `outs`. Whether an out uses the DVC 3
layout or the legacy one is recorded per out: DVC 3 writes `hash: md5`, DVC 2 wrote nothing,
and DVC 3 keeps reading and pushing legacy outs in the legacy layout. `Out.layout` carries that
through so the cache looks in the right place without guessing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.errors import ManifestError, RevisionError, UnsafeFileError
from datapin_sidecar.safefs import read_regular

_REV: Final = re.compile(r"([0-9a-f]{32})(\.dir)?")
#: A `.dvc` file or `dvc.lock` larger than this is not one (the largest real locks are a few MB).
MAX_DVC_FILE: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Revision:
    """A DVC object id naming a tree (`is_dir`) or a single file."""

    md5: str
    is_dir: bool

    @classmethod
    def parse(cls, text: str) -> Revision:
        m = _REV.fullmatch(text.strip().lower())
        if m is None:
            shown = repr(text) if len(text) <= 80 else f"{text[:80]!r}..."
            raise RevisionError(
                f"revision {shown} is not a DVC object id. Fix: pass `<32 hex>.dir` for a "
                "directory (the `md5:` of its .dvc file or dvc.lock out) or `<32 hex>` for a "
                "single file"
            )
        return cls(md5=m.group(1), is_dir=m.group(2) is not None)

    @property
    def oid(self) -> str:
        """The name of the object in a cache: `<md5>.dir` or `<md5>`."""
        return self.md5 + (".dir" if self.is_dir else "")

    def __str__(self) -> str:
        return self.oid


@dataclass(frozen=True, slots=True, kw_only=True)
class Out:
    """One output of a `.dvc` file or `dvc.lock` stage."""

    path: str
    revision: Revision
    layout: Layout
    size: int | None = None
    nfiles: int | None = None
    #: The folder inside a directory out that a target named (`data.dvc:data/images/train`
    #: -> `images/train`, as `dvc pull data/images/train` takes it); "" for the whole out.
    within: str = ""


def read_dvc_file(path: str | Path) -> list[Out]:
    """The outs of a `.dvc` file."""
    doc = _load_yaml(Path(path))
    outs = doc.get("outs") if isinstance(doc, dict) else None
    if not isinstance(outs, list) or not outs:
        raise ManifestError(manifest=str(path), problem="no `outs:` list (is it a .dvc file?)")
    return [_out(str(path), item, index) for index, item in enumerate(outs)]


def read_dvc_lock(path: str | Path) -> dict[str, list[Out]]:
    """The outs of every stage in a `dvc.lock` (schema 2.0), by stage name."""
    doc = _load_yaml(Path(path))
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict):
        raise ManifestError(manifest=str(path), problem="no `stages:` mapping (is it dvc.lock?)")
    result: dict[str, list[Out]] = {}
    for name, stage in stages.items():
        outs = stage.get("outs", []) if isinstance(stage, dict) else None
        if not isinstance(outs, list):
            raise ManifestError(
                manifest=str(path), entry=f"stage {name!r}", problem="`outs` is not a list"
            )
        result[str(name)] = [_out(f"{path} stage {name!r}", o, i) for i, o in enumerate(outs)]
    return result


def find_out(outs: list[Out], target: str, *, source: str) -> Out:
    """The out whose path is `target` (normalised), or the directory out `target` is inside
    (with `within` set: DVC's granular form), or a clear error listing the choices."""
    wanted = target.strip("/")
    for out in outs:
        if out.path.strip("/") == wanted:
            return out
    for out in outs:
        inside = out.path.strip("/") + "/"
        if wanted.startswith(inside) and out.revision.is_dir:
            return replace(out, within=wanted.removeprefix(inside))
    names = ", ".join(sorted(o.path for o in outs)) or "none"
    raise RevisionError(f"{source} has no out {target!r}; its outs are: {names}")


def _load_yaml(path: Path) -> Any:
    # Imported here: only DVC files need YAML, and every CLI start would pay ~11 ms for it.
    import yaml  # noqa: PLC0415

    try:
        # A symlink the user made is followed; a FIFO, device or huge file is not read.
        data = read_regular(os.path.realpath(path), limit=MAX_DVC_FILE)
        return yaml.safe_load(data)
    except FileNotFoundError:
        raise RevisionError(f"DVC file {path} does not exist. Fix: check the path") from None
    except UnsafeFileError as exc:
        raise ManifestError(
            manifest=str(path),
            problem=f"is larger than {MAX_DVC_FILE} bytes"
            if exc.problem.startswith("is larger")
            else "is not a regular file (a directory, FIFO or device)",
        ) from None
    except OSError as exc:
        raise RevisionError(
            f"DVC file {path} cannot be read ({exc.strerror}). Fix: make it readable by the "
            "user datapin runs as"
        ) from None
    except yaml.YAMLError as exc:
        raise ManifestError(manifest=str(path), problem=f"not valid YAML ({exc})") from None


def _out(source: str, item: Any, index: int) -> Out:
    if not isinstance(item, dict):
        raise ManifestError(manifest=source, entry=f"outs[{index}]", problem="not a mapping")
    path, md5 = item.get("path"), item.get("md5")
    if not isinstance(path, str) or not isinstance(md5, str):
        raise ManifestError(
            manifest=source, entry=f"outs[{index}]", problem="an out needs `path` and `md5`"
        )
    hash_name = item.get("hash")
    if hash_name not in (None, "md5"):
        raise ManifestError(
            manifest=source,
            entry=f"outs[{index}] {path!r}",
            problem=f"hash {hash_name!r} is not supported (only md5)",
        )
    try:
        revision = Revision.parse(md5)
    except RevisionError as exc:
        raise ManifestError(
            manifest=source, entry=f"outs[{index}] {path!r}", problem=str(exc)
        ) from None
    size, nfiles = item.get("size"), item.get("nfiles")
    return Out(
        path=path,
        revision=revision,
        layout=Layout.DVC3 if hash_name == "md5" else Layout.LEGACY,
        size=size if isinstance(size, int) else None,
        nfiles=nfiles if isinstance(nfiles, int) else None,
    )


def resolve_target(repo: str | Path, target: str) -> Out:
    """The out a DVC target names in `repo`, as `dvc pull TARGET` would find it.

    `data.dvc` (a `.dvc` file with one out, or `data.dvc:path` to pick one of several), `data`
    (its `data.dvc`), or an output of a pipeline stage: `path` or `dvc.lock:path`. A folder
    inside a directory out (`data.dvc:data/images/train`, `data/images/train`) gives that out
    with `within` set to the folder (`images/train`): the part to publish (`engine.part`).
    """
    root = Path(repo)
    if not (root / ".dvc").is_dir():
        raise RevisionError(
            f"{root} is not a DVC repository (no .dvc directory). Fix: pass --dvc-repo with "
            "the root of the repository that ran `dvc add`/`dvc push`"
        )
    file_part, sep, out_part = target.partition(":")
    if sep and file_part.endswith("dvc.lock"):
        return _lock_out(root / file_part, out_part)
    if file_part.endswith(".dvc"):
        return _dvc_file_out(root / file_part, out_part if sep else None)
    if (root / f"{target}.dvc").is_file():
        return _dvc_file_out(root / f"{target}.dvc", None)
    parent = target.strip("/")
    while "/" in parent:  # a folder inside a tracked directory: `data/images/train`
        parent = parent.rpartition("/")[0]
        if (root / f"{parent}.dvc").is_file():
            return _dvc_file_out(root / f"{parent}.dvc", target)
    if (root / "dvc.lock").is_file():
        return _lock_out(root / "dvc.lock", target)
    raise RevisionError(
        f"DVC target {target!r} not found in {root}: no {target}.dvc and no dvc.lock. "
        "Fix: name a .dvc file (data.dvc) or a stage output listed in dvc.lock"
    )


def _dvc_file_out(path: Path, out: str | None) -> Out:
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise RevisionError(f"{path} {what}. Fix: check the path of the .dvc file")
    outs = read_dvc_file(path)
    if out is not None:
        return find_out(outs, out, source=str(path))
    if len(outs) > 1:
        names = ", ".join(o.path for o in outs)
        raise RevisionError(
            f"{path} has {len(outs)} outs ({names}). Fix: pick one as {path.name}:<path>"
        )
    return outs[0]


def _lock_out(path: Path, out: str) -> Out:
    if not path.is_file():
        raise RevisionError(f"{path} does not exist. Fix: run `dvc repro` and commit dvc.lock")
    outs = [o for stage in read_dvc_lock(path).values() for o in stage]
    return find_out(outs, out, source=str(path))
