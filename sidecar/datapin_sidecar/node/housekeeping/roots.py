"""The roots of the GC: every revision, or part of one, in use on the node.

The roots are the revision, layout and part named by every meta file of every workspace on the
node (both places: `.state/<dataset>/.meta/` and older sidecars' `<dataset>/.revs/.meta/`; a
meta file exists for the published and the spare tree of each; `TreeInfo.part`), plus the
agent's prefetch list (an entry's `paths`) and the CSI plugin's shared trees in use (their
records); the GC adds every build in progress (`evict`), always whole: a build registers its
revision, not its part. A root of a whole revision protects its `.dir` and every object its
manifest names. A root of a part (`engine.part`) protects the `.dir` and the objects beneath
the part's folders only: the rest of the revision's cached objects are not in use and age out
by the LRU clock like any other (`clock`). A revision that is a root whole and as a part is
protected whole.

A root is `(oid, layout)` for a whole revision, as it was before parts, and `(oid, layout,
part)` for a part of one (`Root`; `make_root` builds the right one, `root_part` reads the part
back), so every caller that names whole revisions is unchanged.

Workspace roots are read without taking workspace locks: a race with a sidecar is benign,
because a tree never depends on the cache entry it came from (trees are reflinks, hardlinks or
copies, so unlinking the cache's name leaves the tree's bytes alone). Evicting an object a
published tree still uses costs a re-download at worst, never a broken tree. Trees need their
revision's `.dir` only to be recycled by the next switch, and a materialise without it falls
back to a fresh build.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import META_LIMIT, TreeInfo, is_part_key, is_tree_key
from datapin_sidecar.errors import UnsafeFileError
from datapin_sidecar.node.housekeeping.tasks import (
    STATE,
    OnError,
    Task,
    log_item_error,
    sorted_names,
)

#: Meta files read per workspace meta directory (a workspace has two or three trees).
MAX_META_FILES: Final = 256

#: A GC root: `(oid, layout)`, a whole revision; `(oid, layout, part)`, a part of one.
Root = tuple[str, Layout] | tuple[str, Layout, Part]
#: What callers name roots by: the same with a `Revision`.
RevisionRoot = tuple[Revision, Layout] | tuple[Revision, Layout, Part]


def make_root(oid: str, layout: Layout, part: Part = Part.WHOLE) -> Root:
    """The root of `oid` in `layout`, of `part` of it (the 2-tuple for the whole revision, so
    that one revision has one spelling and roots compare as sets)."""
    return (oid, layout) if part.whole else (oid, layout, part)


def root_part(root: Root | RevisionRoot) -> Part:
    """The part a root protects (`Part.WHOLE`: all of its revision)."""
    rest = root[2:]
    return rest[0] if rest else Part.WHOLE


def roots(
    root: Path,
    prefetch: Iterable[RevisionRoot] = (),
    *,
    on_error: OnError | None = None,
) -> set[Root]:
    """Every revision, or part of one, in use on the node (`Root`s): see the module doc.

    A read-only scan of every meta file under `root/workspaces/<uid>/`, in both places (the
    current `.state/<dataset>/.meta/` and older sidecars' `<dataset>/.revs/.meta/`); no
    workspace lock is taken. Everything under `workspaces/` is opened without following
    symlinks or blocking, and meta files are read bounded (`META_LIMIT`), because a pod may
    control them; an unreadable one is reported to `on_error` and skipped, and so is one whose
    part is not the one its name (`<tree key>.json`) says.
    """
    report = on_error or log_item_error
    found = {make_root(r[0].oid, r[1], root_part(r)) for r in prefetch}
    workspaces = Path(root) / "workspaces"
    try:
        wfd = safefs.open_dir(workspaces)
    except FileNotFoundError:
        return found
    except OSError as exc:
        report(Task.ROOTS, str(workspaces), exc)
        return found
    try:
        for pod in sorted_names(wfd):
            if pod.startswith("."):
                continue  # a workspace being deleted (`.trash-`)
            try:
                pfd = safefs.open_dir(pod, dir_fd=wfd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report(Task.ROOTS, str(workspaces / pod), exc)
                continue
            try:
                found |= _pod_roots(pfd, workspaces / pod, report)
            except Exception as exc:
                report(Task.ROOTS, str(workspaces / pod), exc)
            finally:
                os.close(pfd)
    finally:
        os.close(wfd)
    return found


def _meta_dirs(pfd: int) -> Iterator[str]:
    """Relative paths of the meta directories of one pod's workspaces (both layouts).

    A dataset with records in `.state/` is managed in the current layout, where its
    `DEST/.revs/` belongs to the pod: a `.meta/` there is not ours and pins nothing.
    """
    names = sorted_names(pfd)
    current: list[str] = []
    if STATE in names:
        try:
            sfd = safefs.open_dir(STATE, dir_fd=pfd)
        except (FileNotFoundError, UnsafeFileError):
            pass
        else:
            try:
                current = sorted_names(sfd)
            finally:
                os.close(sfd)
    yield from (f"{STATE}/{d}/.meta" for d in current)
    yield from (f"{n}/.revs/.meta" for n in names if not n.startswith(".") and n not in current)


def _pod_roots(pfd: int, where: Path, report: OnError) -> set[Root]:
    found: set[Root] = set()
    for rel in _meta_dirs(pfd):
        try:
            mfd = safefs.open_dir_beneath(pfd, rel)
        except (FileNotFoundError, NotADirectoryError):
            continue  # not a workspace (yet), or a file a pod put there
        except OSError as exc:
            report(Task.ROOTS, str(where / rel), exc)
            continue
        try:
            names = [n for n in sorted_names(mfd) if n.endswith(".json")]
            if len(names) > MAX_META_FILES:
                report(
                    Task.ROOTS,
                    str(where / rel),
                    UnsafeFileError(
                        str(where / rel),
                        f"holds {len(names)} meta files; read the first {MAX_META_FILES}",
                    ),
                )
                names = names[:MAX_META_FILES]
            for name in names:
                try:
                    data = safefs.read_regular(name, limit=META_LIMIT, dir_fd=mfd)
                    found.add(_record_root(name, TreeInfo.from_json(data.decode())))
                except FileNotFoundError:
                    continue
                except Exception as exc:
                    # Its objects stay unprotected: evicting them costs a re-download, never
                    # the tree.
                    report(Task.ROOTS, str(where / rel / name), exc)
        finally:
            os.close(mfd)
    return found


def _record_root(name: str, info: TreeInfo) -> Root:
    """The root a workspace record names. A record named by a tree key (`<key>.json`) must
    say the part its key says: one that does not is damaged or forged, and is not believed."""
    part = info.part
    key = name.removesuffix(".json")
    if is_tree_key(key):
        agrees = key.endswith(part.suffix) if not part.whole else not is_part_key(key)
        if not agrees:
            raise UnsafeFileError(name, f"is the record of a tree of {part}, not of key {key}")
    return make_root(Revision.parse(info.revision).oid, Layout(info.layout), part)
