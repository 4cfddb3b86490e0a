"""`datapin`: the command line.

    datapin materialize --cache DIR --rev MD5.dir --dest DIR
                        [--link auto|reflink|hardlink|copy] [--remote DIR]

Exit codes (also in the README; scripts and the sidecar's termination message rely on them):

    0  the revision is published (or already was)
    1  an unexpected error (a bug: please report it with the message)
    2  bad usage: an unknown option or a value that cannot be right
    3  the revision or one of its DVC files cannot be read (malformed, unsafe paths)
    4  objects are missing from the node cache and the remote
    5  objects are corrupt and no remote has a good copy
    6  the destination cannot take the tree (not datapin's, read-only, full)
    7  the requested link strategy is impossible between cache and destination
    8  the remote cannot be read
  130  interrupted

The summary goes to stdout (or JSON with `--json`, for scripts); progress and errors go to
stderr, so `datapin ... --json | jq` works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .cache import NodeCache
from .errors import DatapinError, UsageError
from .hashing import Layout
from .linker import Strategy
from .materialize import Request, Result, materialize
from .progress import Reporter
from .remote import DirectoryRemote
from .revision import Revision


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datapin",
        description="Pinned DVC dataset revisions, materialised from a node cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "materialize",
        aliases=["materialise"],
        help="publish a revision's tree under a destination, atomically",
        description="Build the tree of a DVC revision from the node cache (fetching what is "
        "missing from --remote) and publish it as DEST/<link-name> -> .revs/<md5>.",
    )
    m.add_argument("--cache", required=True, type=Path, help="node cache (a DVC cache dir)")
    m.add_argument(
        "--rev", required=True, help="DVC object id: <md5>.dir (directory) or <md5> (file)"
    )
    m.add_argument("--dest", required=True, type=Path, help="destination directory")
    m.add_argument(
        "--link",
        default="auto",
        choices=[s.value for s in Strategy],
        help="how files are made from cache objects (default: auto = reflink, hardlink, copy)",
    )
    m.add_argument("--remote", type=Path, help="a DVC directory remote to fetch missing objects")
    m.add_argument(
        "--layout",
        default="auto",
        choices=["auto", *(layout.value for layout in Layout)],
        help="cache layout of the revision: dvc3 (`hash: md5` in its .dvc file), legacy "
        "(DVC 2), or auto (dvc3 if present, else legacy)",
    )
    m.add_argument(
        "--link-name", default="current", help="name of the published symlink (default: current)"
    )
    m.add_argument("--file-name", help="file name for a single-file revision (default: the md5)")
    m.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every object before linking; quarantine and re-fetch bad ones",
    )
    m.add_argument(
        "--no-spare",
        action="store_true",
        help="delete the previous tree after a switch instead of keeping it for recycling",
    )
    m.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    m.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `datapin` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _materialize(args, sys.stdout, sys.stderr)
    except DatapinError as exc:
        print(f"datapin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("datapin: interrupted", file=sys.stderr)
        return 130


def _materialize(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    revision = Revision.parse(args.rev)
    if args.file_name is not None and revision.is_dir:
        raise UsageError("--file-name is only for single-file revisions (an md5 without .dir)")
    request = Request(
        cache=NodeCache(args.cache),
        revision=revision,
        dest=args.dest,
        strategy=Strategy(args.link),
        remote=DirectoryRemote(args.remote) if args.remote else None,
        link_name=args.link_name,
        verify=args.verify,
        keep_spare=not args.no_spare,
        file_name=args.file_name,
        layout=None if args.layout == "auto" else Layout(args.layout),
    )
    reporter = None if args.quiet else Reporter(err, tty=err.isatty())
    try:
        result = materialize(request, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    if args.json:
        out.write(json.dumps(result_dict(result), sort_keys=True) + "\n")
    else:
        out.write(summary(result))
    return 0


def result_dict(result: Result) -> dict[str, object]:
    """The result as plain JSON-able data (for `--json`, tests and benchmarks)."""
    data = dataclasses.asdict(result)
    data["quarantined"] = list(result.quarantined)
    data["recovered"] = list(result.recovered)
    data["mode"] = result.mode
    data["noop"] = result.noop
    return data


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def summary(r: Result) -> str:
    """The human summary printed at the end of a run."""
    if r.noop:
        head = f"datapin: {r.revision} is already published at {r.path} (nothing to do)"
    else:
        head = f"datapin: published {r.revision} at {r.path}"
    mix = ", ".join(f"{n} {m}" for m, n in sorted(r.modes.items()))
    ro = "yes (hardlinks into the cache: mount it readOnly)" if r.read_only else "no"
    lines = [
        head,
        f"  files       {r.files} ({_size(r.bytes)})",
        f"  link mode   {r.mode} ({mix})" if mix else "  link mode   nothing linked this run",
        f"  read-only   {ro}",
        f"  cache       {r.hits} hits ({_size(r.hit_bytes)}), {r.misses} misses, "
        f"{r.fetched_objects} objects fetched ({_size(r.fetched_bytes)})",
        f"  built from  {r.base} (reused {r.reused}, removed {r.removed})",
        f"  seconds     {r.seconds:.3f}",
    ]
    if r.quarantined:
        lines.append(f"  quarantined {len(r.quarantined)}: {', '.join(r.quarantined[:5])}")
    if r.recovered:
        lines.append(f"  recovered   {'; '.join(r.recovered[:5])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
