"""Git refs of a Dataset's DVC repository, resolved to the pin its `.dvc`/`dvc.lock` names.

`GitSource.resolve(repo=, ref=, target=)` answers "which `<md5>.dir` did `data.dvc` name at tag
v2?" with the git CLI, because git is the one client that speaks every transport users host DVC
repositories on (https with tokens, ssh with deploy keys, file://), and the operator image ships
it anyway.

Design, and why:

* **One bare, partial, mostly shallow repository per URL** under `cache_dir/<sha256(url)[:16]>`.
  A revision needs one commit, its trees and one small blob, so commits are fetched with
  `--depth=1 --filter=blob:none` and the `.dvc` blob is read with `git cat-file`, which fetches
  just that blob from the promisor remote (servers without filter support send the commit's
  blobs instead; either way the answer is the same). The repository's remote `origin` is the
  URL, configured as the partial-clone promisor; nothing else is kept in it.
* **An `asyncio.Lock` per URL** serialises git on one bare repository (git's own lock files
  would make concurrent fetches fail rather than wait), and makes N concurrent resolves of one
  revision cost one fetch: the later ones find the answer in the caches below.
* **Two caches with different lifetimes.** `ref -> commit` comes from `git ls-remote` and is
  reused for `ref_ttl` seconds only, because tags and branches move. `(url, commit, target) ->
  Out` never changes (a commit is content-addressed), so it is kept without a TTL (bounded in
  size). The ref listing is keyed by URL *and* by a keyed hash of the credentials, and every
  resolve needs a listing for its own credentials: a Dataset without a Secret cannot read a
  private repository's pins through the cache that another namespace's Secret filled.
* **Ref syntax**, in order: a full 40-hex sha is a commit (or tag object) and is fetched
  directly; a name is looked up as `refs/tags/<ref>` (the peeled `^{}` entry of an annotated
  tag), then `refs/heads/<ref>`; `HEAD` and full ref names (`refs/...`) as themselves. An
  abbreviated sha (7-39 hex) that names no tag or branch needs the history: all branches and
  tags are fetched (unshallowed, blobless) and `git rev-parse` finds the one commit.
* **Targets** (`data.dvc`, `data.dvc:OUT`, `dvc.lock:OUT`, `OUT`) are read at the commit by
  `dvcfile.read_out`, with the sidecar's own parsers; only directory outs are pins.
* **How git runs** (secrets out of argv, no prompts, no user configuration, allowed transports,
  timeouts that kill the process group, redacted stderr) is `gitrun.py`'s; every call of this
  class goes through `_git`.
* **Errors** are `GitError` (unreachable, authentication, unknown ref, timeout) or
  `PinReadError` (the commit's DVC file lacks the out), each with a fix.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

from datapin_sidecar.engine.revision import Out

from datapin_operator.errors import GitError, PinReadError
from datapin_operator.resolve.dvcfile import clean_target, read_out
from datapin_operator.resolve.gitrun import (
    DEFAULT_PROTOCOLS,
    GitCredentials,
    GitResult,
    GitSession,
    git_session,
    is_missing_commit,
    redact_url,
    remote_error,
    run_git,
    tail,
)

__all__ = ["DEFAULT_PROTOCOLS", "GitCredentials", "GitPin", "GitSource", "redact_url"]

_FULL_SHA: Final = re.compile(r"[0-9a-f]{40}")
_ABBREV_SHA: Final = re.compile(r"[0-9a-f]{7,39}")
_LISTING_LINE: Final = re.compile(r"([0-9a-f]{40})\t(\S+)")
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: `<transport>::<address>` runs a remote helper (`ext::` runs any command).
_TRANSPORT: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)::")
_BAD_TEXT: Final = re.compile(r"[\x00-\x20\x7f]")

#: How many tags/branches an unknown-ref error lists.
_SHOWN_REFS: Final = 12
#: Bound of the immutable (url, commit, target) -> Out cache; an entry is a few hundred bytes.
_MAX_OUTS: Final = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class GitPin:
    """What a git ref resolved to: the commit, and the directory out its DVC file names."""

    commit: str
    out: Out


@dataclass(slots=True, kw_only=True)
class _Repo:
    url: str
    path: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    #: Commits fetched (or found) in this process. Asking git instead could trigger a lazy
    #: fetch of a missing commit's whole history in a partial clone.
    present: set[str] = field(default_factory=set)


class GitSource:
    """Resolve git refs of DVC repositories to pins, with a bare-repository cache on disk.

    `cache_dir` holds the bare repositories, git's private HOME and short-lived credential
    files (an emptyDir in the chart); `timeout` bounds each git call; `ref_ttl` is how long a
    tag/branch listing is reused (0: ask every time); `clock` is injectable for tests;
    `allow_protocols` becomes `GIT_ALLOW_PROTOCOL`. Use one instance per event loop.
    """

    def __init__(
        self,
        *,
        cache_dir: Path,
        timeout: float = 60.0,
        ref_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        allow_protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    ) -> None:
        self._cache_dir = Path(cache_dir)
        self._timeout = timeout
        self._ref_ttl = ref_ttl
        self._clock = clock
        self._protocols = tuple(allow_protocols)
        self._repos: dict[str, _Repo] = {}
        self._listings: dict[tuple[str, str, str], tuple[float, dict[str, str]]] = {}
        self._outs: dict[tuple[str, str, str], Out] = {}
        self._peeled: dict[tuple[str, str], str] = {}
        # Keys the credentials fingerprint: equal Secrets share cache entries, and the
        # fingerprint itself reveals nothing about them.
        self._salt = secrets.token_bytes(32)

    async def resolve(
        self,
        *,
        repo: str,
        ref: str,
        target: str,
        credentials: GitCredentials | None = None,
    ) -> GitPin:
        """The commit `ref` names in `repo`, and the directory out `target` names there.

        Raises `GitError` (unreachable, authentication, unknown ref, timeout) or
        `PinReadError` (no such DVC file or out at that commit, or not a directory).
        """
        url, ref, target = repo.strip(), ref.strip(), clean_target(target)
        self._check_inputs(url, ref, target)
        state = self._repo(url)
        creds = credentials or GitCredentials()
        sealed = git_session(
            cache_dir=self._cache_dir,
            protocols=self._protocols,
            credentials=creds,
            fingerprint=self._fingerprint(creds),
        )
        async with state.lock, sealed as session:
            await self._ensure_repo(state, session)
            commit = await self._commit(state, session, ref)
            key = (url, commit, target)
            out = self._outs.get(key)
            if out is None:
                await self._fetch_commit(state, session, commit)
                out = await read_out(
                    partial(self._git, state, session),
                    url=url,
                    repo=state.path,
                    commit=commit,
                    target=target,
                    tmp=self._cache_dir / "tmp",
                )
                if len(self._outs) >= _MAX_OUTS:
                    del self._outs[next(iter(self._outs))]
                self._outs[key] = out
        return GitPin(commit=commit, out=out)

    # -- inputs -------------------------------------------------------------------------------

    def _check_inputs(self, url: str, ref: str, target: str) -> None:
        shown = redact_url(url)
        if not url or url.startswith("-") or _BAD_TEXT.search(url):
            raise GitError(
                f"repository URL {shown!r} is not a git URL. Fix: set spec.source.repo to an "
                "https://, ssh://, git@host:path or file:// URL"
            )
        helper = _TRANSPORT.match(url)
        transport = helper.group(1) if helper else None
        scheme = _SCHEME.match(url)
        if transport is not None or (scheme and scheme.group(1).lower() not in self._protocols):
            name = transport or (scheme.group(1) if scheme else "")
            allowed = ", ".join(f"{p}://" for p in self._protocols)
            raise GitError(
                f"repository URL {shown!r} uses transport {name!r}, which the operator does "
                f"not allow. Fix: use one of {allowed} (or git@host:path for ssh)"
            )
        if not ref or ref.startswith("-") or _BAD_TEXT.search(ref) or len(ref) > 255:
            raise GitError(
                f"{ref!r} is not a git ref of {shown}. Fix: name a tag, a branch or a commit "
                "sha (no spaces, not starting with '-')"
            )
        if not target or target.startswith("-") or ".." in target.split("/"):
            raise PinReadError(
                f"DVC target {target!r} of {shown} is not a path inside the repository. Fix: "
                "set spec.source.path to data.dvc, data.dvc:OUT, dvc.lock:OUT or OUT"
            )

    def _repo(self, url: str) -> _Repo:
        state = self._repos.get(url)
        if state is None:
            digest = hashlib.sha256(url.encode()).hexdigest()[:16]
            state = self._repos[url] = _Repo(url=url, path=self._cache_dir / digest)
        return state

    # -- the environment ----------------------------------------------------------------------

    def _fingerprint(self, creds: GitCredentials) -> str:
        if creds.is_empty:
            return "anonymous"
        material = "\0".join(
            v or ""
            for v in (creds.username, creds.password, creds.ssh_private_key, creds.known_hosts)
        )
        return hmac.new(self._salt, material.encode(), hashlib.sha256).hexdigest()

    # -- git ----------------------------------------------------------------------------------

    async def _git(self, state: _Repo, session: GitSession, *args: str) -> GitResult:
        """Every git call of this source goes through here (one place to time or trace)."""
        return await run_git(state.path, state.url, session, *args, seconds=self._timeout)

    async def _ensure_repo(self, state: _Repo, session: GitSession) -> None:
        if state.ready:
            return
        # Idempotent: a cache directory kept from an earlier run (or half made by a crash) is
        # simply re-initialised.
        steps: list[tuple[str, ...]] = [
            ("init", "--bare", "-q", str(state.path)),
            ("config", "core.repositoryformatversion", "1"),
            ("config", "remote.origin.url", state.url),
            ("config", "remote.origin.promisor", "true"),
            ("config", "remote.origin.partialclonefilter", "blob:none"),
            ("config", "extensions.partialClone", "origin"),
            # Auto-gc in the foreground, inside the call's timeout and process group.
            ("config", "gc.autoDetach", "false"),
        ]
        state.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for step in steps:
            result = await self._git(state, session, *step)
            if result.returncode != 0:
                raise GitError(
                    f"cannot prepare the git cache {state.path} for {redact_url(state.url)}: "
                    f"{tail(result.stderr)}. Fix: make DATAPIN_GIT_CACHE_DIR a writable "
                    "directory (an emptyDir) with free space"
                )
        state.ready = True

    async def _listing(self, state: _Repo, session: GitSession, scope: str = "") -> dict[str, str]:
        """Ref name -> commit sha (annotated tags peeled), cached for `ref_ttl` seconds.

        `scope` "" lists branches and tags (what users name, and cheap: protocol v2 sends only
        those); a full ref name or `HEAD` is asked for by itself.
        """
        key = (state.url, session.fingerprint, scope)
        cached = self._listings.get(key)
        now = self._clock()
        if cached is not None and now - cached[0] < self._ref_ttl:
            return cached[1]
        args = ["ls-remote", "--heads", "--tags"] if not scope else ["ls-remote"]
        result = await self._git(
            state, session, *args, "--", state.url, *([scope] if scope else [])
        )
        if result.returncode != 0:
            raise remote_error(state.url, result.stderr, doing="list the refs of")
        direct: dict[str, str] = {}
        peeled: dict[str, str] = {}
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            m = _LISTING_LINE.fullmatch(line.strip())
            if m is None:
                continue
            sha, name = m.groups()
            if name.endswith("^{}"):
                peeled[name[:-3]] = sha
            else:
                direct[name] = sha
        refs = {**direct, **peeled}
        self._listings[key] = (now, refs)
        return refs

    async def _commit(self, state: _Repo, session: GitSession, ref: str) -> str:
        # The branch/tag listing is needed in every case: it proves these credentials can read
        # the repository before any cached answer is handed out.
        refs = await self._listing(state, session)
        lowered = ref.lower()
        if _FULL_SHA.fullmatch(lowered):
            return await self._peel_full_sha(state, session, lowered)
        for name in (f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
            if name in refs:
                return refs[name]
        if ref == "HEAD" or ref.startswith("refs/"):
            special = await self._listing(state, session, scope=ref)
            if ref in special:
                # A pattern listing has no peeled `^{}` lines: peel an annotated tag here.
                return await self._peel_full_sha(state, session, special[ref])
        if _ABBREV_SHA.fullmatch(lowered):
            return await self._expand_abbreviated(state, session, lowered)
        raise _unknown_ref(state.url, ref, refs)

    async def _peel_full_sha(self, state: _Repo, session: GitSession, sha: str) -> str:
        cached = self._peeled.get((state.url, sha))
        if cached is not None:
            return cached
        await self._fetch_commit(state, session, sha)
        commit = await self._rev_parse(state, session, sha)
        if commit is None:
            raise GitError(
                f"{sha} is an object of {redact_url(state.url)} but not a commit or tag. Fix: "
                "name a commit sha, a tag or a branch"
            )
        self._peeled[(state.url, sha)] = commit
        state.present.add(commit)
        return commit

    async def _fetch_commit(self, state: _Repo, session: GitSession, sha: str) -> None:
        if sha in state.present:
            return
        result = await self._git(
            state,
            session,
            "fetch",
            "--quiet",
            "--depth=1",
            "--filter=blob:none",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
            "origin",
            sha,
        )
        if result.returncode != 0:
            if is_missing_commit(result.stderr):
                raise GitError(
                    f"commit {sha} is not in {redact_url(state.url)} (or the server does not "
                    "serve commits by sha). Fix: push the commit, or name a tag or branch "
                    "that points at it"
                )
            raise remote_error(state.url, result.stderr, doing="fetch from")
        state.present.add(sha)

    async def _expand_abbreviated(self, state: _Repo, session: GitSession, prefix: str) -> str:
        # Uniqueness can only be judged against the whole history, so fetch it (blobless).
        args = ["fetch", "--quiet", "--filter=blob:none", "--no-write-fetch-head", "--force"]
        if (state.path / "shallow").exists():
            args.append("--unshallow")
        refspecs = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
        result = await self._git(state, session, *args, "--", "origin", *refspecs)
        if result.returncode != 0:
            raise remote_error(state.url, result.stderr, doing="fetch the history of")
        check = await self._git(state, session, "rev-parse", "--verify", f"{prefix}^{{commit}}")
        shown = redact_url(state.url)
        if check.returncode != 0:
            if "ambiguous" in check.stderr.lower():
                raise GitError(
                    f"abbreviated commit {prefix!r} is ambiguous in {shown}. Fix: give more "
                    "hex digits, or the full 40-hex sha"
                )
            raise GitError(
                f"ref {prefix!r} is not a tag, branch or commit of {shown} (no branch or tag "
                "contains a commit starting with it). Fix: check the sha (git log), push the "
                "commit, or name a tag or branch"
            )
        commit = check.stdout.decode().strip()
        state.present.add(commit)
        return commit

    async def _rev_parse(self, state: _Repo, session: GitSession, sha: str) -> str | None:
        result = await self._git(state, session, "rev-parse", "--verify", "-q", f"{sha}^{{commit}}")
        text = result.stdout.decode().strip()
        return text if result.returncode == 0 and _FULL_SHA.fullmatch(text) else None

    # -- the DVC file -------------------------------------------------------------------------


def _natural(name: str) -> list[tuple[int, int | str]]:
    # v2 before v10, as people number releases.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def _some(names: list[str]) -> str:
    ordered = sorted(names, key=_natural)
    shown = ", ".join(ordered[:_SHOWN_REFS])
    more = len(ordered) - _SHOWN_REFS
    return (f"{shown} and {more} more" if more > 0 else shown) or "none"


def _unknown_ref(url: str, ref: str, refs: Mapping[str, str]) -> GitError:
    tags = [name.removeprefix("refs/tags/") for name in refs if name.startswith("refs/tags/")]
    heads = [name.removeprefix("refs/heads/") for name in refs if name.startswith("refs/heads/")]
    shown = redact_url(url)
    return GitError(
        f"ref {ref!r} is not a tag, branch or commit of {shown}; tags: {_some(tags)}; "
        f"branches: {_some(heads)}. Fix: name an existing tag or branch, a commit sha (at "
        "least 7 hex digits), or a named revision of the Dataset"
    )
