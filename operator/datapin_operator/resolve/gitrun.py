"""Running git for the resolver: credentials, a sealed environment, one call at a time.

`GitSource` (gitsource.py) decides *what* to ask git; this module is *how* git runs, so that
every call is made the same safe way:

* **Secrets stay out of argv** (`/proc/<pid>/cmdline` is world-readable; `environ` is not): https
  basic auth travels as `http.extraHeader` through `GIT_CONFIG_COUNT`/`KEY`/`VALUE` environment
  variables; an ssh key is written to a 0600 file (deleted when the resolve ends) named by
  `GIT_SSH_COMMAND`. git never prompts (`GIT_TERMINAL_PROMPT=0`, an askpass that answers
  nothing, ssh `BatchMode`), reads no user or system configuration, and runs with `LC_ALL=C` so
  its messages can be classified. `GIT_ALLOW_PROTOCOL` limits transports (never `ext::`, which
  runs commands).
* **Every call is `asyncio.create_subprocess_exec`** with an argument list, never a shell, and
  has a timeout; on timeout or cancellation its whole process group is killed (git spawns
  `git-remote-https`, `ssh`, `index-pack`).
* **Errors** are `GitError`s with a fix. git's stderr is kept as a short tail (`tail`) with
  userinfo stripped from URLs and every credential value replaced by `***`; `remote_error`
  classifies a failed remote operation (host key, authentication, anything else).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shlex
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from datapin_operator.errors import GitError

#: Transports git may use (`GIT_ALLOW_PROTOCOL`). `file` serves tests and local mirrors; drop it
#: where Dataset authors must not read the operator's own filesystem.
DEFAULT_PROTOCOLS: Final = ("https", "http", "ssh", "git", "file")

#: Username sent with a `token` that comes without one. GitHub and GitLab accept any username
#: with a personal access token; this one is what GitHub documents for app tokens.
TOKEN_USERNAME: Final = "x-access-token"  # noqa: S105 - a username, not a secret

_USERINFO: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
#: How much of git's stderr a message keeps.
_TAIL_LINES: Final = 4
_TAIL_CHARS: Final = 400

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


#: What servers say when asked for a commit they do not have (or will not serve by sha).
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


@dataclass(slots=True, kw_only=True)
class GitSession:
    """The environment of the git calls of one resolve, and what to redact from their output."""

    env: dict[str, str]
    secrets: list[str]
    fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GitResult:
    returncode: int
    stdout: bytes
    stderr: str


@contextlib.asynccontextmanager
async def git_session(
    *,
    cache_dir: Path,
    protocols: Sequence[str],
    credentials: GitCredentials | None,
    fingerprint: str,
) -> AsyncIterator[GitSession]:
    """The environment of the git calls of one resolve; its key files go when it ends."""
    creds = credentials or GitCredentials()
    home, tmp = cache_dir / "home", cache_dir / "tmp"
    for directory in (cache_dir, home, home / ".ssh", tmp):
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
        "GIT_ALLOW_PROTOCOL": ":".join(protocols),
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
        yield GitSession(env=env, secrets=creds._secret_values(), fingerprint=fingerprint)
    finally:
        for path in files:
            path.unlink(missing_ok=True)


async def run_git(
    repo: Path, url: str, session: GitSession, *args: str, seconds: float
) -> GitResult:
    """Run `git -C <repo> args...` (`url`: for messages) for at most `seconds`; a timeout or
    cancellation kills its process group."""
    argv = ["git", "-C", str(repo), "-c", "protocol.version=2", *args]
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
        async with asyncio.timeout(seconds):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        await _kill(proc)
        raise GitError(
            f"git {args[0]} of {redact_url(url)} timed out after "
            f"{seconds:g} s. Fix: check that the repository is reachable from the "
            "operator (network policy, proxy, firewall), or raise "
            "DATAPIN_GIT_TIMEOUT_SECONDS for a slow server"
        ) from None
    except BaseException:
        await _kill(proc)
        raise
    assert proc.returncode is not None  # noqa: S101 - communicate() waited for it
    return GitResult(
        returncode=proc.returncode,
        stdout=stdout,
        stderr=_redact(stderr.decode("utf-8", "replace"), session.secrets),
    )


def redact_url(url: str) -> str:
    """`url` without userinfo (`https://user:token@host/x` -> `https://host/x`)."""
    return _USERINFO.sub(r"\1", url.strip())


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


def tail(stderr: str) -> str:
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.lstrip().lower().startswith("hint:")
    ]
    text = " / ".join(lines[-_TAIL_LINES:])
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


def remote_error(url: str, stderr: str, *, doing: str) -> GitError:
    shown = redact_url(url)
    lowered = stderr.lower()
    detail = tail(stderr) or "no output from git"
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


def is_missing_commit(stderr: str) -> bool:
    """Whether a failed fetch of a sha says the server lacks it (not a network or auth fault)."""
    lowered = stderr.lower()
    return any(marker in lowered for marker in _MISSING_COMMIT_MARKERS)
