"""The LRU clock: when each revision, and each part of one, was last used on this node.

A revision's clock is the mtime of its used-file, `.datapin/used/<layout>-<oid>` (`touch_used`,
written whenever the whole revision is materialised or prefetched), or of its `.dir` object
when it has none. The GC (`inventory.plan`) reads them all (`used_clocks`) to order eviction:
least recently used first.

**Parts** (`engine.part`). A use of a part of a revision does not touch the revision's clock:
it touches the part's own, `.datapin/used/<layout>-<oid>-p<16 hex>` (the tree key's part
suffix), whose content is the part's folders as a JSON list, so the GC can tell which objects
it dates. The part's objects take the newer of the part's and the revision's clocks; the rest
of the revision keeps the revision's clock (the last use of all of it, or the `.dir`'s mtime),
so a node that serves only `images/train` of a revision lets the revision's other folders age
out, however busy the part. The `.dir` takes the newest of them all: every part needs it.
Part used-files are read bounded (`META_LIMIT`) and only believed if their folders hash to
their name; a damaged or planted one is ignored (its part's objects fall back to the
revision's clock, an earlier eviction at worst).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import META_LIMIT

log = logging.getLogger(__name__)

#: `<layout>-<md5>.dir-p<16 hex>`: the used-file of a part of a revision.
_PART_USED: Final = re.compile(r"((?:dvc3|legacy)-[0-9a-f]{32}\.dir)(-p[0-9a-f]{16})")


def used_dir(cache: NodeCache) -> Path:
    return cache.used_dir


def used_name(revision: Revision | str, layout: Layout, part: Part = Part.WHOLE) -> str:
    """The used-file of `revision` (of `part` of it) in `layout`."""
    oid = revision.oid if isinstance(revision, Revision) else revision
    return f"{layout}-{oid}{part.suffix}"


def touch_used(
    cache: NodeCache,
    revision: Revision,
    layout: Layout,
    *,
    part: Part = Part.WHOLE,
    now: float | None = None,
) -> None:
    """Record that `revision` (`part` of it) was just materialised or prefetched (best effort).

    A failure is swallowed: the used-file is only an LRU hint, and a materialise must never
    fail because the hint could not be written (without it the `.dir`'s mtime is the clock).
    """
    path = used_dir(cache) / used_name(revision, layout, part)
    times = None if now is None else (now, now)
    try:
        try:
            # Never through a symlink someone planted: that would touch a file elsewhere.
            os.utime(path, times, follow_symlinks=False)  # the usual case: one syscall
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            if part.whole:
                os.close(safefs.open_regular(path, os.O_WRONLY | os.O_CREAT))
            else:
                _write_part(path, part)
            os.utime(path, times, follow_symlinks=False)
    except OSError as exc:
        log.debug(
            "could not mark revision %s (%s) as used: %s",
            revision.oid,
            part,
            exc,
            extra={"revision": revision.oid, "layout": str(layout), "path": part.label},
        )


def _write_part(path: Path, part: Part) -> None:
    """A part's used-file, complete or absent (a temp file renamed): the GC never reads half
    of one. Two writers write the same bytes, so whichever rename lands last is right."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = safefs.open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            os.write(fd, json.dumps(part.to_list()).encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def used_clocks(cache: NodeCache) -> dict[str, float]:
    """`{"<layout>-<oid>[-p<16 hex>]": mtime}` of every used-file; empty if there are none."""
    used: dict[str, float] = {}
    with contextlib.suppress(OSError):  # no used-files (or not a directory of ours): no hints
        ufd = safefs.open_dir(used_dir(cache))
        try:
            with os.scandir(ufd) as it:
                for entry in it:
                    with contextlib.suppress(FileNotFoundError):
                        used[entry.name] = entry.stat(follow_symlinks=False).st_mtime
        finally:
            os.close(ufd)
    return used


def part_clock_names(used: Iterable[str]) -> dict[str, list[str]]:
    """The part used-files among `used` names, by their revision's used-file name."""
    found: dict[str, list[str]] = {}
    for name in used:
        m = _PART_USED.fullmatch(name)
        if m is not None:
            found.setdefault(m.group(1), []).append(name)
    return found


def read_parts(cache: NodeCache, names: Iterable[str]) -> dict[str, Part]:
    """The part each of the used-files `names` dates; a file that is missing, not a small
    regular file, not a list of folders, or whose folders do not hash to its name is left out
    (see the module doc)."""
    parts: dict[str, Part] = {}
    wanted = list(names)
    if not wanted:
        return parts
    try:
        ufd = safefs.open_dir(used_dir(cache))
    except OSError:
        return parts
    try:
        for name in wanted:
            m = _PART_USED.fullmatch(name)
            if m is None:
                continue
            try:
                raw = safefs.read_regular(name, limit=META_LIMIT, dir_fd=ufd)
                part = Part.from_list(json.loads(raw), what=f"used-file {name}")
            except Exception as exc:  # anything: the hint is ignored
                log.debug("ignoring used-file %s: %s", name, exc)
                continue
            if part.whole or part.suffix != m.group(2):
                log.debug("ignoring used-file %s: its folders do not match its name", name)
                continue
            parts[name] = part
    finally:
        os.close(ufd)
    return parts
