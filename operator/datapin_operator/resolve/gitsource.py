"""Git refs of a Dataset's DVC repository, resolved to the pin its `.dvc`/`dvc.lock` names.

`GitSource.resolve(repo=, ref=, target=)` answers "which `<md5>.dir` did `data.dvc` name at tag
v2?" with the git CLI, because git is the one client that speaks every transport users host DVC
repositories on (https with tokens, ssh with deploy keys, file://), and the operator image ships
it anyway. Every call is `asyncio.create_subprocess_exec` with an argument list, never a shell.

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
* **Targets** follow `datapin_sidecar.engine.revision.resolve_target`: `data.dvc`, `data.dvc:OUT`,
  `dvc.lock:OUT`, or `OUT` (its `OUT.dvc` if that exists at the commit, else `dvc.lock`). The
  file is parsed by the sidecar's own `read_dvc_file`/`read_dvc_lock`/`find_out`, so the pin and
  its layout (dvc3 or legacy) are exactly what the materialiser will read. Only directory outs
  are pins.
* **Secrets stay out of argv** (`/proc/<pid>/cmdline` is world-readable; `environ` is not): https
  basic auth travels as `http.extraHeader` through `GIT_CONFIG_COUNT`/`KEY`/`VALUE` environment
  variables; an ssh key is written to a 0600 file (deleted when the resolve ends) named by
  `GIT_SSH_COMMAND`. git never prompts (`GIT_TERMINAL_PROMPT=0`, an askpass that answers
  nothing, ssh `BatchMode`), reads no user or system configuration, and runs with `LC_ALL=C` so
  its messages can be classified. `GIT_ALLOW_PROTOCOL` limits transports (never `ext::`, which
  runs commands).
* **Errors** are `GitError` (unreachable, authentication, unknown ref, timeout) or
  `PinReadError` (the commit's DVC file lacks the out), each with a fix. git's stderr is kept as
  a short tail with userinfo stripped from URLs and every credential value replaced by `***`.
  Each git call has a timeout; on timeout or cancellation its whole process group is killed
  (git spawns `git-remote-https`, `ssh`, `index-pack`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shlex
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from datapin_sidecar.engine.revision import Out, find_out, read_dvc_file, read_dvc_lock
from datapin_sidecar.errors import ManifestError, RevisionError

from datapin_operator.errors import GitError, PinReadError

__all__ = ["DEFAULT_PROTOCOLS", "GitCredentials", "GitPin", "GitSource", "redact_url"]

#: Transports git may use (`GIT_ALLOW_PROTOCOL`). `file` serves tests and local mirrors; drop it
#: where Dataset authors must not read the operator's own filesystem.
DEFAULT_PROTOCOLS: Final = ("https", "http", "ssh", "git", "file")

#: Username sent with a `token` that comes without one. GitHub and GitLab accept any username
#: with a personal access token; this one is what GitHub documents for app tokens.
TOKEN_USERNAME: Final = "x-access-token"  # noqa: S105 - a username, not a secret

_FULL_SHA: Final = re.compile(r"[0-9a-f]{40}")
_ABBREV_SHA: Final = re.compile(r"[0-9a-f]{7,39}")
_LISTING_LINE: Final = re.compile(r"([0-9a-f]{40})\t(\S+)")
_USERINFO: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: `<transport>::<address>` runs a remote helper (`ext::` runs any command).
_TRANSPORT: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)::")
_BAD_TEXT: Final = re.compile(r"[\x00-\x20\x7f]")

#: How much of git's stderr an error keeps: enough to see the cause, not a wall of hints.
_TAIL_LINES: Final = 4
_TAIL_CHARS: Final = 400
#: How many tags/branches an unknown-ref error lists.
_SHOWN_REFS: Final = 12
#: Bound of the immutable (url, commit, target) -> Out cache; an entry is a few hundred bytes.
_MAX_OUTS: Final = 8192

_AUTH_MARKERS: Final = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "permission denied (publickey",
    "access denied",
    "returned error: 401",
    "returned error: 403",
    "invalid username or password",
)
_MISSING_COMMIT_MARKERS: Final = (
    "not our ref",
    "couldn't find remote ref",
    "no such remote ref",
    "unadvertised object",
)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class GitCredentials:
    """Credentials from the Secret named by `spec.source.credentialsSecretRef`.

    https: `username` and `password` (or `token`); ssh: `ssh-privatekey` and optionally
    `known_hosts` (without it the host key is accepted on first use and remembered).
    """

    username: str | None = None
    password: str | None = None
    ssh_private_key: str | None = None
    known_hosts: str | None = None

    #: The Secret keys read, for error messages about a Secret that has none of them.
    KEYS = ("username", "password", "token", "ssh-privatekey", "known_hosts")

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> GitCredentials:
        """Credentials from a Secret's `data`, already base64-decoded.

        A trailing newline (what `kubectl create secret --from-file` keeps from an editor) is
        dropped from username, password and token; an ssh key gets one, as OpenSSH requires.
        A `token` without `username` is sent as `x-access-token`. A Secret with none of
        `KEYS` gives empty credentials (`is_empty`); the caller decides whether that is an
        error.
        """

        def text(key: str) -> str | None:
            value = data.get(key)
            return (value.rstrip("\r\n") or None) if value is not None else None

        password = text("password") or text("token")
        username = text("username") or (TOKEN_USERNAME if password else None)
        key = data.get("ssh-privatekey") or None
        if key is not None and not key.endswith("\n"):
            key += "\n"
        return cls(
            username=username,
            password=password,
            ssh_private_key=key,
            known_hosts=data.get("known_hosts") or None,
        )

    @property
    def is_empty(self) -> bool:
        return not (self.username or self.password or self.ssh_private_key)

    def __repr__(self) -> str:
        # Only which fields are set: a repr ends up in logs and tracebacks.
        shown = ", ".join(
            f"{name}=<set>"
            for name in ("username", "password", "ssh_private_key", "known_hosts")
            if getattr(self, name)
        )
        return f"GitCredentials({shown})"

    def _secret_values(self) -> list[str]:
        values = [v for v in (self.username, self.password) if v]
        if self.username is not None and self.password is not None:
            values.append(_basic(self.username, self.password))
        if self.ssh_private_key:
            values += [line for line in self.ssh_private_key.splitlines() if "-----" not in line]
        return [v.strip() for v in values if len(v.strip()) >= 4]


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


@dataclass(slots=True, kw_only=True)
class _Session:
    """The environment of the git calls of one resolve, and what to redact from their output."""

    env: dict[str, str]
    secrets: list[str]
    fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Result:
    returncode: int
    stdout: bytes
    stderr: str


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
        url, ref, target = repo.strip(), ref.strip(), _clean_target(target)
        self._check_inputs(url, ref, target)
        state = self._repo(url)
        async with state.lock, self._session(credentials) as session:
            await self._ensure_repo(state, session)
            commit = await self._commit(state, session, ref)
            key = (url, commit, target)
            out = self._outs.get(key)
            if out is None:
                await self._fetch_commit(state, session, commit)
                out = await self._read_out(state, session, commit, target)
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

    @contextlib.asynccontextmanager
    async def _session(self, credentials: GitCredentials | None) -> AsyncIterator[_Session]:
        creds = credentials or GitCredentials()
        home, tmp = self._cache_dir / "home", self._cache_dir / "tmp"
        for directory in (self._cache_dir, home, home / ".ssh", tmp):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        askpass = shutil.which("true") or "/bin/true"
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "LC_ALL": "C",
            "LANG": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": askpass,
            "SSH_ASKPASS": askpass,
            "SSH_ASKPASS_REQUIRE": "never",
            "GIT_ALLOW_PROTOCOL": ":".join(self._protocols),
        }
        # Proxies and CA bundles of the operator's environment still apply to git.
        for name in (
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
            "ALL_PROXY",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "GIT_SSL_CAINFO",
            "GIT_SSL_CAPATH",
        ):
            if name in os.environ:
                env[name] = os.environ[name]
        config: list[tuple[str, str]] = []
        if creds.username is not None and creds.password is not None:
            config.append(
                (
                    "http.extraHeader",
                    f"Authorization: Basic {_basic(creds.username, creds.password)}",
                )
            )
        env["GIT_CONFIG_COUNT"] = str(len(config))
        for index, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{index}"] = key
            env[f"GIT_CONFIG_VALUE_{index}"] = value

        files: list[Path] = []
        try:
            ssh = ["ssh", "-F", os.devnull, "-o", "BatchMode=yes"]
            if creds.ssh_private_key:
                key_file = _private_file(tmp, creds.ssh_private_key)
                files.append(key_file)
                ssh += ["-i", str(key_file), "-o", "IdentitiesOnly=yes"]
            if creds.known_hosts:
                hosts = _private_file(tmp, creds.known_hosts)
                files.append(hosts)
                ssh += ["-o", f"UserKnownHostsFile={hosts}", "-o", "StrictHostKeyChecking=yes"]
            else:
                # ssh finds ~ through the password database, not $HOME: name the file.
                hosts = home / ".ssh" / "known_hosts"
                ssh += [
                    "-o",
                    f"UserKnownHostsFile={hosts}",
                    "-o",
                    "StrictHostKeyChecking=accept-new",
                ]
            env["GIT_SSH_COMMAND"] = shlex.join(ssh)
            env["GIT_SSH_VARIANT"] = "ssh"
            yield _Session(
                env=env, secrets=creds._secret_values(), fingerprint=self._fingerprint(creds)
            )
        finally:
            for path in files:
                path.unlink(missing_ok=True)

    def _fingerprint(self, creds: GitCredentials) -> str:
        if creds.is_empty:
            return "anonymous"
        material = "\0".join(
            v or ""
            for v in (creds.username, creds.password, creds.ssh_private_key, creds.known_hosts)
        )
        return hmac.new(self._salt, material.encode(), hashlib.sha256).hexdigest()

    # -- git ----------------------------------------------------------------------------------

    async def _git(self, state: _Repo, session: _Session, *args: str) -> _Result:
        """Run `git -C <bare repo> args...`; a timeout or cancellation kills its process group."""
        argv = ["git", "-C", str(state.path), "-c", "protocol.version=2", *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=session.env,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise GitError(
                "the git executable is not on the operator's PATH. Fix: install git in the "
                "operator image"
            ) from None
        try:
            async with asyncio.timeout(self._timeout):
                stdout, stderr = await proc.communicate()
        except TimeoutError:
            await _kill(proc)
            raise GitError(
                f"git {args[0]} of {redact_url(state.url)} timed out after "
                f"{self._timeout:g} s. Fix: check that the repository is reachable from the "
                "operator (network policy, proxy, firewall), or raise "
                "DATAPIN_GIT_TIMEOUT_SECONDS for a slow server"
            ) from None
        except BaseException:
            await _kill(proc)
            raise
        assert proc.returncode is not None  # noqa: S101 - communicate() waited for it
        return _Result(
            returncode=proc.returncode,
            stdout=stdout,
            stderr=_redact(stderr.decode("utf-8", "replace"), session.secrets),
        )

    async def _ensure_repo(self, state: _Repo, session: _Session) -> None:
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
                    f"{_tail(result.stderr)}. Fix: make DATAPIN_GIT_CACHE_DIR a writable "
                    "directory (an emptyDir) with free space"
                )
        state.ready = True

    async def _listing(self, state: _Repo, session: _Session, scope: str = "") -> dict[str, str]:
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
            raise _remote_error(state.url, result.stderr, doing="list the refs of")
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

    async def _commit(self, state: _Repo, session: _Session, ref: str) -> str:
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

    async def _peel_full_sha(self, state: _Repo, session: _Session, sha: str) -> str:
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

    async def _fetch_commit(self, state: _Repo, session: _Session, sha: str) -> None:
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
            lowered = result.stderr.lower()
            if any(marker in lowered for marker in _MISSING_COMMIT_MARKERS):
                raise GitError(
                    f"commit {sha} is not in {redact_url(state.url)} (or the server does not "
                    "serve commits by sha). Fix: push the commit, or name a tag or branch "
                    "that points at it"
                )
            raise _remote_error(state.url, result.stderr, doing="fetch from")
        state.present.add(sha)

    async def _expand_abbreviated(self, state: _Repo, session: _Session, prefix: str) -> str:
        # Uniqueness can only be judged against the whole history, so fetch it (blobless).
        args = ["fetch", "--quiet", "--filter=blob:none", "--no-write-fetch-head", "--force"]
        if (state.path / "shallow").exists():
            args.append("--unshallow")
        refspecs = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
        result = await self._git(state, session, *args, "--", "origin", *refspecs)
        if result.returncode != 0:
            raise _remote_error(state.url, result.stderr, doing="fetch the history of")
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

    async def _rev_parse(self, state: _Repo, session: _Session, sha: str) -> str | None:
        result = await self._git(state, session, "rev-parse", "--verify", "-q", f"{sha}^{{commit}}")
        text = result.stdout.decode().strip()
        return text if result.returncode == 0 and _FULL_SHA.fullmatch(text) else None

    # -- the DVC file -------------------------------------------------------------------------

    async def _read_out(self, state: _Repo, session: _Session, commit: str, target: str) -> Out:
        shown = redact_url(state.url)
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
            found = await self._ls_tree(state, session, commit, f"{target}.dvc", "dvc.lock")
            if f"{target}.dvc" in found:
                file, out, lock = f"{target}.dvc", None, False
            elif "dvc.lock" in found:
                file, out, lock = "dvc.lock", target, True
            else:
                raise PinReadError(
                    f"DVC target {target!r} not found at {at}: no {target}.dvc and no dvc.lock. "
                    "Fix: set spec.source.path to a .dvc file or a dvc.lock output that exists "
                    "at that revision (and commit it)"
                )
        entries = await self._ls_tree(state, session, commit, file)
        entry = entries.get(file)
        if entry is None or entry[0] != "blob":
            problem = "does not exist" if entry is None else "is not a file"
            raise PinReadError(
                f"{file} {problem} at {at}. Fix: set spec.source.path to a .dvc file or "
                "dvc.lock:OUT that exists at that revision (is it committed?)"
            )
        blob = await self._git(state, session, "cat-file", "blob", entry[1])
        if blob.returncode != 0:
            raise _remote_error(state.url, blob.stderr, doing=f"read {file} from")
        label = f"{file} at {at}"
        tmp = self._cache_dir / "tmp"
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

    async def _ls_tree(
        self, state: _Repo, session: _Session, commit: str, *paths: str
    ) -> dict[str, tuple[str, str]]:
        """path -> (type, oid) of those of `paths` that exist at `commit` (trees only: no
        blob is fetched)."""
        result = await self._git(state, session, "ls-tree", "-z", commit, "--", *paths)
        if result.returncode != 0:
            raise GitError(
                f"cannot list commit {commit[:12]} of {redact_url(state.url)}: "
                f"{_tail(result.stderr)}. Fix: retry; if it persists, delete the git cache "
                f"{state.path}"
            )
        found: dict[str, tuple[str, str]] = {}
        for record in result.stdout.decode("utf-8", "replace").split("\0"):
            meta, tab, path = record.partition("\t")
            parts = meta.split()
            if tab and len(parts) == 3:
                found[path] = (parts[1], parts[2])
        return found


def redact_url(url: str) -> str:
    """`url` without userinfo (`https://user:token@host/x` -> `https://host/x`)."""
    return _USERINFO.sub(r"\1", url.strip())


def _clean_target(target: str) -> str:
    cleaned = target.strip()
    while cleaned.startswith("./"):
        cleaned = cleaned[2:]
    return cleaned.lstrip("/")


def _basic(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _private_file(directory: Path, content: str) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix="cred-")  # mode 0600
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    return Path(name)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await proc.wait()


def _redact(text: str, values: Sequence[str]) -> str:
    text = _USERINFO.sub(r"\1", text)
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def _tail(stderr: str) -> str:
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.lstrip().lower().startswith("hint:")
    ]
    text = " / ".join(lines[-_TAIL_LINES:])
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


def _remote_error(url: str, stderr: str, *, doing: str) -> GitError:
    shown = redact_url(url)
    lowered = stderr.lower()
    detail = _tail(stderr) or "no output from git"
    if "host key verification failed" in lowered:
        return GitError(
            f"cannot {doing} {shown}: the ssh host key does not match known_hosts ({detail}). "
            "Fix: put the server's current host key in the `known_hosts` key of the "
            "credentials Secret (ssh-keyscan <host>)"
        )
    if any(marker in lowered for marker in _AUTH_MARKERS):
        return GitError(
            f"authentication to {shown} failed ({detail}). Fix: check the Secret named by "
            "spec.source.credentialsSecretRef (`username` and `password` or `token` for "
            "https, `ssh-privatekey` for ssh) and that it grants read access to the repository"
        )
    return GitError(
        f"cannot {doing} {shown}: {detail}. Fix: check spec.source.repo and the network "
        "(and the credentials Secret, for a private repository)"
    )


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
