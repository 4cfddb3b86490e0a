"""`datapin`: the command line.

    datapin materialize --cache DIR --dest DIR (--rev MD5.dir | --dvc-repo PATH --target T)
                        [--path FOLDER ...] [--link auto|reflink|hardlink|copy]
                        [--remote DIR | --remote s3://BUCKET/PREFIX [--endpoint-url URL]
                         [--region R] [--credentials-dir DIR | --env-file FILE]]

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

Remotes: a DVC directory remote (a path), or S3 / Backblaze B2 (`s3://bucket/prefix` with
`--endpoint-url`, the name the AWS CLI and s5cmd use). With `--dvc-repo`, the remote, its
endpoint and the revision come from the repository itself (`.dvc/config`, `.dvc/config.local`,
the target's `.dvc` file or `dvc.lock`), so a user who followed the DVC + B2 tutorial passes
nothing else. Keys come from `--credentials-dir` (a mounted Secret, re-read when it rotates),
`--env-file` (the tutorial's `.env`), `.dvc/config.local`, or the environment
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, or B2's `B2_APPLICATION_KEY_ID`/
`B2_APPLICATION_KEY`), first found wins. Keys are never accepted as arguments: those show in
`ps` and shell history.

Every option is checked before any work starts and a bad one exits 2 naming the option and the
fix: an empty value is refused (it never silently means the working directory), `--jobs` is
capped at `MAX_JOBS`, the cache and destination must be directories (or not exist yet) with
paths of at most `MAX_DIR_PATH_BYTES` bytes, and names (`--link-name`, `--file-name`) are
single file names. Messages never quote a key: values read from key files, `.env` files or
`config.local` are masked in everything printed (`redaction.redact`), whichever file they were
pasted into.

The summary goes to stdout (or JSON with `--json`, for scripts); progress and errors go to
stderr, so `datapin ... --json | jq` works.

Start-up is part of the interface (a no-op run is what an init container on a warm node does):
this module imports only what parsing the arguments needs, and a run imports what its path
uses, when it gets there (only the redacting excepthook, `logs`, is loaded up front: it guards
even the parsing). `--help` and a bad option never load the engine; a run without an
s3:// remote never loads asyncio or aiohttp, and calls the materialiser in a worker thread of
its own (as `asyncio.to_thread` would: Ctrl-C waits for it to unwind, then exits 130). The
choices of `--link`, `--layout` and `--addressing` are spelled out here for that reason, and
tests/test_startup.py holds them equal to the engine's enums and guards what `--help` and a
no-op import.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple, TextIO, TypeVar

from datapin_sidecar.limits import MAX_DIR_PATH_BYTES, MAX_JOBS, NAME_MAX, PATH_MAX
from datapin_sidecar.logs import redacting_excepthook

if TYPE_CHECKING:  # imported where a run needs them: see the module doc
    from datapin_sidecar.engine.materialize import ProgressFn, Request, Result
    from datapin_sidecar.engine.remote import Remote
    from datapin_sidecar.remotes.credentials import CredentialSource
    from datapin_sidecar.remotes.endpoint import RemoteConfig

#: `engine.linker.Strategy`, `engine.hashing.LayoutChoice` and `remotes.endpoint.Addressing`
#: (tests/test_startup.py checks they agree), so that parsing loads none of those modules.
LINKS: Final = ("auto", "reflink", "hardlink", "copy")
LAYOUTS: Final = ("auto", "dvc3", "legacy")
ADDRESSINGS: Final = ("auto", "path", "virtual")
_T = TypeVar("_T")

_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _text(value: str) -> str:
    """argparse type: any text but the empty string."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _length_problem(value: str) -> str | None:
    """Why Linux cannot open path `value` (too long), or None."""
    raw = os.fsencode(value)
    if len(raw) >= PATH_MAX:
        return f"is {len(raw)} bytes long; Linux paths are shorter than {PATH_MAX} bytes"
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        return f"has a name longer than {NAME_MAX} bytes, the most a file system allows"
    return None


def _path(value: str) -> Path:
    """argparse type: a non-empty path (`Path("")` would silently be the working directory)
    that Linux can open at all."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty (an empty path would mean the working directory; write . for that)"
        )
    problem = _length_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{value[:60]}... {problem}")
    return Path(value)


def _target(value: str) -> str:
    """argparse type of `--target` and `--remote`: non-empty text, and if it is a path, one
    Linux can open."""
    value = _text(value)
    problem = None if "://" in value else _length_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{value[:60]}... {problem}")
    return value


def _jobs(value: str) -> int:
    try:
        jobs = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a whole number") from None
    if not 1 <= jobs <= MAX_JOBS:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {MAX_JOBS} (got {jobs}); 32, the default, keeps a remote busy"
        )
    return jobs


def _name(value: str) -> str:
    """argparse type: one plain file name (no '/', not '.' or '..', at most 255 bytes)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    if len(value.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {NAME_MAX} bytes (a file name)")
    if not _NAME.fullmatch(value) or value == ".revs":
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a plain file name: use letters, digits, '_', '.' and '-', "
            "starting with a letter, digit or '_' (and not .revs)"
        )
    return value


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
    m.add_argument("--cache", required=True, type=_path, help="node cache (a DVC cache dir)")
    m.add_argument("--rev", type=_text, help="DVC object id: <md5>.dir (directory) or <md5> (file)")
    m.add_argument("--dest", required=True, type=_path, help="destination directory")
    m.add_argument(
        "--link",
        default="auto",
        choices=LINKS,
        help="how files are made from cache objects (default: auto = reflink, hardlink, copy)",
    )
    m.add_argument(
        "--remote",
        type=_target,
        help="where missing objects come from: s3://BUCKET/PREFIX (S3, Backblaze B2) or the "
        "path of a DVC directory remote (default with --dvc-repo: the repo's default remote)",
    )
    m.add_argument(
        "--path",
        action="append",
        type=_text,
        default=[],
        metavar="FOLDER",
        help="publish only this folder of the revision (repeatable; relative to the "
        "revision's root, e.g. images/train): only its objects are fetched",
    )
    dvc = m.add_argument_group("taking the revision and remote from a DVC repository")
    dvc.add_argument("--dvc-repo", type=_path, help="root of the DVC repository")
    dvc.add_argument(
        "--target",
        type=_target,
        help="data.dvc, data.dvc:PATH, a stage output PATH or dvc.lock:PATH (needs --dvc-repo); "
        "a folder inside a tracked directory (data.dvc:data/images/train, data/images/train) "
        "publishes only that folder, like `dvc pull data/images/train`",
    )
    dvc.add_argument(
        "--remote-name", type=_text, help="which DVC remote (default: the repo's default)"
    )
    s3 = m.add_argument_group("S3 / Backblaze B2")
    s3.add_argument(
        "--endpoint-url", type=_text, help="e.g. https://s3.us-west-002.backblazeb2.com"
    )
    s3.add_argument(
        "--region", type=_text, help="SigV4 region (default: from a B2 endpoint, else us-east-1)"
    )
    s3.add_argument(
        "--addressing",
        default="auto",
        choices=ADDRESSINGS,
        help="path-style or virtual-host bucket addressing (default: auto)",
    )
    s3.add_argument("--ca-bundle", type=_path, help="CA certificates to verify the endpoint")
    s3.add_argument(
        "--no-verify-tls", action="store_true", help="do not verify the endpoint's certificate"
    )
    s3.add_argument(
        "--credentials-dir",
        type=_path,
        help="a mounted Secret: files AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or B2's keyID/"
        "applicationKey), re-read when the Secret rotates",
    )
    s3.add_argument("--env-file", type=_path, help="a .env file with the keys")
    s3.add_argument(
        "--jobs",
        type=_jobs,
        default=32,
        help=f"requests in flight (default: 32, at most {MAX_JOBS})",
    )
    m.add_argument(
        "--layout",
        default="auto",
        choices=LAYOUTS,
        help="cache layout of the revision: dvc3 (`hash: md5` in its .dvc file), legacy "
        "(DVC 2), or auto (dvc3 if present, else legacy)",
    )
    m.add_argument(
        "--link-name",
        type=_name,
        default="current",
        help="name of the published symlink (default: current)",
    )
    m.add_argument(
        "--file-name", type=_name, help="file name for a single-file revision (default: the md5)"
    )
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
    sys.excepthook = redacting_excepthook
    args = _parser().parse_args(argv)  # --help and bad usage exit here: no engine loaded
    from datapin_sidecar.errors import DatapinError  # noqa: PLC0415 - see the module doc
    from datapin_sidecar.redaction import redact  # noqa: PLC0415

    try:
        return _materialize(args, sys.stdout, sys.stderr, os.environ)
    except DatapinError as exc:
        print(f"datapin: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("datapin: interrupted", file=sys.stderr)
        return 130


class _S3(NamedTuple):
    """An s3:// remote to open (on an event loop) for the run: where, and whose keys. (A
    NamedTuple: `dataclasses` would add `inspect` to what `--help` loads.)"""

    config: RemoteConfig
    credentials: CredentialSource


def _materialize(
    args: argparse.Namespace, out: TextIO, err: TextIO, environ: Mapping[str, str]
) -> int:
    from datapin_sidecar.engine.hashing import LayoutChoice  # noqa: PLC0415 - see the module doc
    from datapin_sidecar.engine.part import Part  # noqa: PLC0415
    from datapin_sidecar.engine.revision import Revision, resolve_target  # noqa: PLC0415
    from datapin_sidecar.errors import UsageError  # noqa: PLC0415
    from datapin_sidecar.progress import Reporter  # noqa: PLC0415

    _check_dir("--cache", args.cache)
    _check_dir("--dest", args.dest)
    layout = LayoutChoice(args.layout).pinned
    file_name = args.file_name
    paths: list[str] = list(args.path)
    if args.target is not None:
        if args.dvc_repo is None:
            raise UsageError("--target needs --dvc-repo (the repository it is in)")
        if args.rev is not None:
            raise UsageError("pass --rev or --target, not both")
        target = resolve_target(args.dvc_repo, args.target)
        revision = target.revision
        layout = layout or target.layout
        if target.within:
            paths.append(target.within)
        if not revision.is_dir and file_name is None:
            file_name = Path(target.path).name
    elif args.rev is not None:
        revision = Revision.parse(args.rev)
    else:
        raise UsageError("name a revision: --rev MD5[.dir], or --dvc-repo PATH --target T")
    if file_name is not None and revision.is_dir:
        raise UsageError("--file-name is only for single-file revisions (an md5 without .dir)")
    part = Part.parse(paths, what="--path", split=False)  # one folder per flag, exactly
    if not part.whole and not revision.is_dir:
        raise UsageError(
            f"--path {part}: revision {revision.oid} is a single file, which has no folders. "
            "Fix: leave --path out"
        )
    reporter = None if args.quiet else Reporter(err, tty=err.isatty())
    try:
        remote = _remote(args, environ)

        def request(opened: Remote | None) -> Request:
            from datapin_sidecar.engine.cache import NodeCache  # noqa: PLC0415
            from datapin_sidecar.engine.linker import Strategy  # noqa: PLC0415
            from datapin_sidecar.engine.materialize import Request  # noqa: PLC0415

            return Request(
                cache=NodeCache(args.cache),
                revision=revision,
                dest=args.dest,
                strategy=Strategy(args.link),
                remote=opened,
                link_name=args.link_name,
                verify=args.verify,
                keep_spare=not args.no_spare,
                file_name=file_name,
                layout=layout,
                part=part,
            )

        if isinstance(remote, _S3):
            from datapin_sidecar import eventloop  # noqa: PLC0415 - only S3 needs a loop

            result = eventloop.run(_materialize_s3(remote, args.jobs, request, reporter))
        else:
            result = _in_thread(_run_materialize, request(remote), reporter)
    finally:
        if reporter is not None:
            reporter.close()
    if args.json:
        import json  # noqa: PLC0415

        out.write(json.dumps(result_dict(result), sort_keys=True) + "\n")
    else:
        out.write(summary(result))
    return 0


def _run_materialize(request: Request, progress: ProgressFn | None) -> Result:
    from datapin_sidecar.engine.materialize import materialize  # noqa: PLC0415

    return materialize(request, progress=progress)


async def _materialize_s3(
    remote: _S3,
    jobs: int,
    request: Callable[[Remote | None], Request],
    progress: ProgressFn | None,
) -> Result:
    """The run with an S3 remote: its requests run on this loop, the filesystem work (which is
    synchronous) in a worker thread."""
    import asyncio  # noqa: PLC0415 - see the module doc

    from datapin_sidecar.remotes.opening import open_s3_remote  # noqa: PLC0415

    async with open_s3_remote(remote.config, remote.credentials, jobs=jobs) as opened:
        return await asyncio.to_thread(_run_materialize, request(opened), progress)


def _in_thread(fn: Callable[..., _T], *args: object) -> _T:
    """`fn(*args)` in a worker thread, as `asyncio.to_thread` ran it before (see the module
    doc): the main thread only waits, so Ctrl-C lands there, and the work is left to finish
    (the materialiser publishes or unwinds; it is never cut short between two syscalls).

    The wait is on an Event, not `Thread.join`: on Python 3.11 a join interrupted by Ctrl-C
    marks the still-running thread as stopped, and the interpreter would then exit under it.
    """
    outcome: list[_T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            outcome.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, name="materialize").start()
    try:
        done.wait()
    except KeyboardInterrupt:
        done.wait()  # a second Ctrl-C exits now; the interpreter still waits for the thread
        raise
    if failure:
        raise failure[0]
    return outcome[0]


def _check_dir(flag: str, path: Path) -> None:
    """`path` can be a directory datapin creates or uses: not a file, not too long."""
    from datapin_sidecar.errors import UsageError  # noqa: PLC0415 - see the module doc

    if len(os.fsencode(path)) > MAX_DIR_PATH_BYTES:
        raise UsageError(
            f"{flag} is {len(os.fsencode(path))} bytes long; datapin accepts at most "
            f"{MAX_DIR_PATH_BYTES} so that what it creates beneath fits in Linux's 4096-byte "
            f"path limit. Fix: use a shorter path (a symlink to it works)"
        )
    try:
        st = path.stat()
    except FileNotFoundError:
        return  # created when needed
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(
                f"{flag} {str(path)[:80]}...: a name in it is longer than {NAME_MAX} bytes. "
                "Fix: use a path with shorter names"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise UsageError(
                f"{flag} {path}: a component of the path is a file, not a directory. Fix: "
                "name a directory"
            ) from None
        raise UsageError(
            f"{flag} {path} cannot be used: {exc.strerror}. Fix: name a directory datapin may "
            "read and write"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"{flag} {path} is a file, not a directory. Fix: name a directory (it is created "
            "if it does not exist)"
        )


def _remote(args: argparse.Namespace, environ: Mapping[str, str]) -> Remote | _S3 | None:
    """The remote the options name (see the module doc): a directory remote, an S3 remote to
    open, or none."""
    from datapin_sidecar.errors import UsageError  # noqa: PLC0415 - see the module doc
    from datapin_sidecar.remotes.directory import DirectoryRemote  # noqa: PLC0415

    s3_flags = [
        flag
        for flag, value in (
            ("--endpoint-url", args.endpoint_url),
            ("--region", args.region),
            ("--ca-bundle", args.ca_bundle),
            ("--credentials-dir", args.credentials_dir),
            ("--env-file", args.env_file),
        )
        if value is not None
    ]
    config: RemoteConfig | None = None
    repo_sources: list[CredentialSource] = []
    if args.remote is not None and not args.remote.startswith("s3://"):
        if "://" in args.remote:
            raise UsageError(
                f"--remote {args.remote}: datapin reads s3:// remotes (S3, Backblaze B2) and "
                "DVC directory remotes (a path)"
            )
        if s3_flags:
            raise UsageError(f"{', '.join(s3_flags)} only apply to an s3:// --remote")
        return DirectoryRemote(args.remote)
    from datapin_sidecar.remotes.endpoint import Addressing, RemoteConfig  # noqa: PLC0415

    if args.remote is not None:
        config = RemoteConfig.from_url(
            args.remote,
            endpoint_url=args.endpoint_url,
            region=args.region,
            addressing=Addressing(args.addressing),
            verify_tls=not args.no_verify_tls,
            ca_bundle=args.ca_bundle,
        )
    elif args.dvc_repo is not None:
        from datapin_sidecar.remotes.dvcconfig import read_dvc_remote  # noqa: PLC0415

        dvc = read_dvc_remote(args.dvc_repo, args.remote_name)
        if dvc.directory is not None:
            return DirectoryRemote(dvc.directory)
        assert dvc.config is not None  # noqa: S101 - read_dvc_remote returns one or the other
        config = dvc.config
        if args.endpoint_url or args.region or args.ca_bundle or args.no_verify_tls:
            config = RemoteConfig.from_url(
                config.url,
                endpoint_url=args.endpoint_url or config.endpoint_url,
                region=args.region or (None if args.endpoint_url else config.region),
                addressing=Addressing(args.addressing),
                verify_tls=config.verify_tls and not args.no_verify_tls,
                ca_bundle=None if args.no_verify_tls else (args.ca_bundle or config.ca_bundle),
            )
        if dvc.credentials is not None:
            from datapin_sidecar.remotes.credentials import StaticCredentials  # noqa: PLC0415

            repo_sources.append(
                StaticCredentials(dvc.credentials, source=f"{args.dvc_repo}/.dvc/config.local")
            )
    elif s3_flags:
        raise UsageError(f"{', '.join(s3_flags)} need --remote s3://... or --dvc-repo")
    if config is None:
        return None
    from datapin_sidecar.remotes.credentials import (  # noqa: PLC0415
        ChainCredentials,
        EnvCredentials,
        SecretDirCredentials,
        credentials_from_env_file,
    )

    sources: list[CredentialSource] = []
    if args.credentials_dir is not None:
        sources.append(SecretDirCredentials(args.credentials_dir))
    if args.env_file is not None:
        sources.append(credentials_from_env_file(args.env_file))
    # DVC's own order: keys in the repo's config win over the environment.
    sources += [*repo_sources, EnvCredentials(environ)]
    return _S3(config, ChainCredentials(sources))


def result_dict(result: Result) -> dict[str, object]:
    """The result as plain JSON-able data (for `--json`, tests and benchmarks)."""
    import dataclasses  # noqa: PLC0415 - see the module doc

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
    if r.paths:
        head += f" (only {', '.join(r.paths)})"
    mix = ", ".join(f"{n} {m}" for m, n in sorted(r.modes.items()))
    ro = "yes (hardlinks into the cache: mount it readOnly)" if r.read_only else "no"
    lines = [
        head,
        f"  files       {r.files} ({_size(r.bytes)})",
        f"  link mode   {r.mode} ({mix})" if mix else "  link mode   nothing linked this run",
        f"  read-only   {ro}",
        f"  cache       {r.hits} hits ({_size(r.hit_bytes)}), {r.misses} misses, "
        f"{r.fetched_objects} objects fetched ({_size(r.fetched_bytes)})"
        + (f", {r.waited_objects} fetched by another process" if r.waited_objects else ""),
        f"  built from  {r.base} (reused {r.reused}, removed {r.removed})",
        f"  seconds     {r.seconds:.3f}",
    ]
    if r.quarantined:
        lines.append(f"  quarantined {len(r.quarantined)}: {', '.join(r.quarantined[:5])}")
    if r.retries:
        tries = ", ".join(f"{n} {why}" for why, n in sorted(r.retries.items()))
        lines.append(f"  retries     {tries}")
    if r.recovered:
        lines.append(f"  recovered   {'; '.join(r.recovered[:5])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
