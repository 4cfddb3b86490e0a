"""Reading the pin a DVC file names at a git commit.

**Targets** follow `datapin_sidecar.engine.revision.resolve_target`: `data.dvc`, `data.dvc:OUT`,
`dvc.lock:OUT`, or `OUT` (its `OUT.dvc` if that exists at the commit, else the `.dvc` of the
nearest folder it is inside, else `dvc.lock`). A folder inside a directory out
(`data.dvc:data/images/train`, `data/images/train`) gives that out with `within` set: the
resolver turns it into the part the revision stands for. The file
is found with `git ls-tree` (trees only) and read with `git cat-file`, which fetches just that
blob from a partial clone's promisor remote. It is parsed by the sidecar's own
`read_dvc_file`/`read_dvc_lock`/`find_out`, so the pin and its layout (dvc3 or legacy) are
exactly what the materialiser will read. Only directory outs are pins.

git runs through the caller's `GitRunner` (`GitSource` binds its repository and session), so
this module knows what to read, not how git is run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from datapin_sidecar.engine.revision import Out, find_out, read_dvc_file, read_dvc_lock
from datapin_sidecar.errors import ManifestError, RevisionError

from datapin_operator.errors import GitError, PinReadError
from datapin_operator.resolve.gitrun import GitResult, redact_url, remote_error, tail

#: `git <args...>` in one repository and session.
GitRunner = Callable[..., Awaitable[GitResult]]


def clean_target(target: str) -> str:
    """`target` without surrounding whitespace and leading `./` or `/`."""
    cleaned = target.strip()
    while cleaned.startswith("./"):
        cleaned = cleaned[2:]
    return cleaned.lstrip("/")


async def read_out(
    git: GitRunner, *, url: str, repo: Path, commit: str, target: str, tmp: Path
) -> Out:
    """The directory out `target` names at `commit` of `url` (cached in `repo`; `tmp`: where
    the DVC file is parsed).

    Raises `PinReadError` when the DVC file or the out is not there or not a directory, and
    `GitError` when git cannot read the commit.
    """
    shown = redact_url(url)
    at = f"commit {commit[:12]} of {shown}"
    file_part, sep, out_part = target.partition(":")
    out: str | None
    if sep and file_part.endswith("dvc.lock"):
        file, out, lock = file_part, out_part, True
    elif file_part.endswith(".dvc"):
        file, out, lock = file_part, (out_part if sep else None), False
    elif sep:
        raise PinReadError(
            f"DVC target {target!r} names neither a .dvc file nor dvc.lock before ':'. "
            "Fix: set spec.source.path to data.dvc, data.dvc:OUT, dvc.lock:OUT or OUT"
        )
    else:
        # A folder inside a tracked directory (`data/images/train` beside `data.dvc`) is
        # that out with `within` set, as `dvc pull data/images/train` takes it: the nearest
        # ancestor's .dvc file, looked up in the same ls-tree.
        ancestors = _ancestors(target)
        found = await _ls_tree(
            git, url, repo, commit, f"{target}.dvc", *(f"{a}.dvc" for a in ancestors), "dvc.lock"
        )
        parent = next((a for a in ancestors if f"{a}.dvc" in found), None)
        if f"{target}.dvc" in found:
            file, out, lock = f"{target}.dvc", None, False
        elif parent is not None:
            # Outs are relative to their .dvc file's directory.
            base = parent.rpartition("/")[0]
            file, out, lock = (
                f"{parent}.dvc",
                target.removeprefix(f"{base}/" if base else ""),
                False,
            )
        elif "dvc.lock" in found:
            file, out, lock = "dvc.lock", target, True
        else:
            raise PinReadError(
                f"DVC target {target!r} not found at {at}: no {target}.dvc and no dvc.lock. "
                "Fix: set spec.source.path to a .dvc file or a dvc.lock output that exists "
                "at that revision (and commit it)"
            )
    entries = await _ls_tree(git, url, repo, commit, file)
    entry = entries.get(file)
    if entry is None or entry[0] != "blob":
        problem = "does not exist" if entry is None else "is not a file"
        raise PinReadError(
            f"{file} {problem} at {at}. Fix: set spec.source.path to a .dvc file or "
            "dvc.lock:OUT that exists at that revision (is it committed?)"
        )
    blob = await git("cat-file", "blob", entry[1])
    if blob.returncode != 0:
        raise remote_error(url, blob.stderr, doing=f"read {file} from")
    label = f"{file} at {at}"
    result = await asyncio.to_thread(
        _parse_out, blob.stdout, tmp=tmp, file=file, out=out, lock=lock, label=label
    )
    if not result.revision.is_dir:
        raise PinReadError(
            f"out {result.path!r} of {label} is a single file ({result.revision.md5}), not "
            "a directory; datapin pins directories. Fix: point spec.source.path at a "
            "directory out (dvc add <dir>), or use a named revision"
        )
    return result


def _ancestors(target: str) -> list[str]:
    """The folders `target` is inside, nearest first (`a/b/c` -> `a/b`, `a`)."""
    found = []
    parent = target.strip("/")
    while "/" in parent:
        parent = parent.rpartition("/")[0]
        found.append(parent)
    return found


async def _ls_tree(
    git: GitRunner, url: str, repo: Path, commit: str, *paths: str
) -> dict[str, tuple[str, str]]:
    """path -> (type, oid) of those of `paths` that exist at `commit` (trees only: no
    blob is fetched)."""
    result = await git("ls-tree", "-z", commit, "--", *paths)
    if result.returncode != 0:
        raise GitError(
            f"cannot list commit {commit[:12]} of {redact_url(url)}: "
            f"{tail(result.stderr)}. Fix: retry; if it persists, delete the git cache "
            f"{repo}"
        )
    found: dict[str, tuple[str, str]] = {}
    for record in result.stdout.decode("utf-8", "replace").split("\0"):
        meta, tab, path = record.partition("\t")
        parts = meta.split()
        if tab and len(parts) == 3:
            found[path] = (parts[1], parts[2])
    return found


def _parse_out(
    data: bytes, *, tmp: Path, file: str, out: str | None, lock: bool, label: str
) -> Out:
    """Parse a DVC file's bytes with the sidecar's own readers (they take a path)."""
    directory = Path(tempfile.mkdtemp(dir=tmp, prefix="dvcfile-"))
    path = directory / Path(file).name
    try:
        path.write_bytes(data)
        if lock:
            outs = [o for stage in read_dvc_lock(path).values() for o in stage]
        else:
            outs = read_dvc_file(path)
        if out is not None:
            try:
                return find_out(outs, out, source=label)
            except ManifestError:
                raise
            except RevisionError as exc:
                raise PinReadError(
                    f"{exc}. Fix: set spec.source.path to {file}:<one of those outs>"
                ) from None
        if len(outs) > 1:
            names = ", ".join(o.path for o in outs)
            raise PinReadError(
                f"{label} has {len(outs)} outs ({names}). Fix: pick one in spec.source.path "
                f"as {file}:<path>"
            )
        return outs[0]
    except RevisionError as exc:
        # The readers name the temporary file; users know it as `file` at that commit.
        raise PinReadError(str(exc).replace(str(path), label)) from None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
