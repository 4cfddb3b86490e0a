"""With which keys an S3 remote is read: `Credentials` and the sources they come from.

Credentials come from `CredentialSource`s: the environment (AWS names, then the B2 CLI's), a
mounted Kubernetes Secret, keys read from `.dvc/config.local` (`dvcconfig`) or a `.env` file,
tried in order by `ChainCredentials`. A source with nothing configured raises
`NoCredentialsError` and the chain moves on; a source that is *half* configured (a key id
without its secret) raises a plain `UsageError` and stops the chain, because the user clearly
meant that source and falling through to another key would be a surprise. A Secret volume is
re-read when kubelet swaps its `..data` symlink (how Secret updates arrive), checked at most
once per interval so a hot download loop does not stat per request; the client calls
`refresh()` after a 403. Which Secret key names hold the keys is `secretkeys`.

Secrets never leave this module in text: `Credentials.__repr__` masks them, no message or log
line includes a value read from a key file or an env file (messages name the key and the
file, and line numbers instead of lines), and exceptions from parsers that quote their input
are replaced (`from None`), not chained.

The key *id* is treated as a secret too. It is not one by itself, but people paste the secret
into the key-id file (or the key id into the secret's), and nothing can tell the two apart
reliably, so no value of either is ever shown: `repr` and the rotation log give
`Credentials.fingerprint`, the first 8 hex digits of the SHA-256 of the key id (enough to tell
two keys apart, `printf %s KEYID | sha256sum | cut -c1-8` to check which one; 32 bits of a
hash of a 20-40 character key cannot be turned back into it). As a net, every `Credentials`
built registers its values with `redaction`, whose `redact()` hides them wherever they turn up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from datapin_sidecar.errors import S3_KEYS_FIX, NoCredentialsError, UnsafeFileError, UsageError
from datapin_sidecar.redaction import register
from datapin_sidecar.remotes import secretkeys
from datapin_sidecar.remotes.secretkeys import SECRET_KEY_NAME, shown_name
from datapin_sidecar.safefs import read_regular

log = logging.getLogger(__name__)


#: Printable ASCII without spaces: what access key ids, secrets and session tokens are made of.
#: The id and token go into HTTP headers, where a stray newline would break the request.
_KEY_TEXT: Final = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """An access key (a B2 application key: keyID and applicationKey). repr masks the secret."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Registered before validation: a value that fails it is not shown either.
        for value in (self.access_key_id, self.secret_access_key, self.session_token):
            register(value)
        for label, value in (
            ("access key id", self.access_key_id),
            ("secret access key", self.secret_access_key),
            ("session token", self.session_token),
        ):
            if value is None:
                continue
            if not value:
                raise UsageError(f"the {label} is empty. Fix: give the whole key")
            if _KEY_TEXT.fullmatch(value) is None:
                raise UsageError(
                    f"the {label} contains spaces, control or non-ASCII characters (not "
                    "shown). Fix: copy the key again without surrounding text or line breaks"
                )

    @property
    def fingerprint(self) -> str:
        """`sha256:` and 8 hex digits of the key id: tells keys apart, reveals nothing."""
        digest = hashlib.sha256(self.access_key_id.encode()).hexdigest()
        return f"sha256:{digest[:8]}"

    def __repr__(self) -> str:
        token = ", session_token=***" if self.session_token is not None else ""
        return f"Credentials(key id {self.fingerprint}, secret=***{token})"

    def __str__(self) -> str:
        return self.__repr__()


def checked_credentials(key_id: str, secret: str, token: str | None, *, where: str) -> Credentials:
    """`Credentials`, or a `UsageError` that says `where` the bad key came from."""
    try:
        return Credentials(access_key_id=key_id, secret_access_key=secret, session_token=token)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


class CredentialSource(Protocol):
    """Where the S3 client gets its keys."""

    def get(self) -> Credentials:
        """The current keys; cheap enough to call per request (sources cache)."""
        ...

    def refresh(self) -> Credentials:
        """Read the keys again now (after a 403: the Secret may have been rotated)."""
        ...

    def describe(self) -> str:
        """Where the keys come from, for messages; never a value."""
        ...


class StaticCredentials:
    """Fixed keys, e.g. from `.dvc/config.local`; `source` says where they came from."""

    def __init__(self, credentials: Credentials, *, source: str) -> None:
        self._credentials = credentials
        self._source = source

    def get(self) -> Credentials:
        return self._credentials

    def refresh(self) -> Credentials:
        return self._credentials

    def describe(self) -> str:
        return self._source

    def __repr__(self) -> str:
        return f"StaticCredentials({self._credentials!r}, source={self._source!r})"


#: (key id, secret, session token) variable names, in priority order: AWS's, then the B2 CLI's.
_ENV_SETS: Final = (
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    ("B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY", None),
)


class EnvCredentials:
    """Keys from environment variables: `AWS_*` first, then the B2 CLI's `B2_APPLICATION_KEY*`.

    `environ` is read on every call (it is the caller's mapping, usually `os.environ`). Empty
    variables count as unset. Any half-set pair is an error, even if the other pair is complete:
    which key was meant is then a guess.
    """

    def __init__(self, environ: Mapping[str, str], *, origin: str | None = None) -> None:
        self._environ = environ
        self._origin = origin

    def describe(self) -> str:
        names = (
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or B2_APPLICATION_KEY_ID/B2_APPLICATION_KEY)"
        )
        return (
            f"environment variables {names}"
            if self._origin is None
            else f"{names} in {self._origin}"
        )

    def get(self) -> Credentials:
        found: Credentials | None = None
        where = "" if self._origin is None else f" in {self._origin}"
        for id_var, secret_var, token_var in _ENV_SETS:
            key_id = self._environ.get(id_var) or None
            secret = self._environ.get(secret_var) or None
            token = (self._environ.get(token_var) or None) if token_var else None
            if key_id and secret:
                if found is None:
                    label = f"{id_var}/{secret_var}{where}"
                    found = checked_credentials(key_id, secret, token, where=label)
                continue
            pair = ((id_var, key_id), (secret_var, secret), (token_var, token))
            present = [name for name, value in pair if name and value]
            if present:
                missing = [name for name, value in pair[:2] if not value]
                raise UsageError(
                    f"environment variable {' and '.join(present)} set{where} but "
                    f"{' and '.join(missing)} not: {id_var} and {secret_var} go together. "
                    f"Fix: set {' and '.join(missing)} as well, or unset {' and '.join(present)}"
                )
        if found is None:
            looked = ", ".join(var for env_set in _ENV_SETS for var in env_set[:2])
            raise NoCredentialsError(source=self.describe(), looked=f"none of {looked} is set")
        return found

    def refresh(self) -> Credentials:
        return self.get()


#: A key file larger than this is not a key (a mounted dataset, a certificate chain...).
_MAX_KEY_FILE: Final = 16 * 1024


class _Vanished(Exception):  # noqa: N818 - internal signal, never escapes
    """The directory `..data` pointed to went away while we read it (kubelet swapped again)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _SecretRead:
    credentials: Credentials
    fingerprint: tuple[object, ...]


class SecretDirCredentials:
    """Keys from a mounted Kubernetes Secret: one file per key, trailing whitespace stripped.

    For each role the first existing file among the candidate names wins (defaults cover the
    AWS names, DVC's option names and B2's keyID/applicationKey). kubelet updates a Secret
    volume by writing a new `..<timestamp>` directory and renaming a `..data` symlink over the
    old one; the key names are symlinks through `..data`. So all files are read through one
    `readlink("..data")`, never a mix of two versions, and `get()` re-reads when that target or
    any candidate file's (inode, mtime, size) changed, looking at most once per
    `min_check_interval` seconds of `clock`. `refresh()` re-reads unconditionally.

    Not locked: concurrent callers may both re-read, and each sees a complete snapshot.
    """

    def __init__(
        self,
        directory: Path,
        *,
        id_keys: Sequence[str] = secretkeys.DEFAULT_ID_KEYS,
        secret_keys: Sequence[str] = secretkeys.DEFAULT_SECRET_KEYS,
        token_keys: Sequence[str] = secretkeys.DEFAULT_TOKEN_KEYS,
        min_check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for names in (id_keys, secret_keys):
            if not names:
                raise ValueError("SecretDirCredentials needs at least one key name per role")
        for name in (*id_keys, *secret_keys, *token_keys):
            if SECRET_KEY_NAME.fullmatch(name) is None or name.startswith(".."):
                raise UsageError(
                    f"{shown_name(name)!r} is not a Secret key name (letters, digits, '-', "
                    "'_' and '.'; the name is not shown if it looks like a key). Fix: name "
                    "the Secret's keys, not their values"
                )
        self._dir = Path(directory)
        self._id_keys = tuple(id_keys)
        self._secret_keys = tuple(secret_keys)
        self._token_keys = tuple(token_keys)
        self._interval = min_check_interval
        self._clock = clock
        self._read: _SecretRead | None = None
        self._checked_at = 0.0

    @property
    def directory(self) -> Path:
        return self._dir

    def describe(self) -> str:
        ids, secret_names = shown_name(self._id_keys[0]), shown_name(self._secret_keys[0])
        return f"Secret files in {self._dir} ({ids}, {secret_names})"

    def get(self) -> Credentials:
        now = self._clock()
        last = self._read
        if last is not None:
            if now - self._checked_at < self._interval:
                return last.credentials
            if self._fingerprint(*self._snapshot()) == last.fingerprint:
                self._checked_at = now
                return last.credentials
        return self._reload(now)

    def refresh(self) -> Credentials:
        return self._reload(self._clock())

    def _reload(self, now: float) -> Credentials:
        # A failed read leaves _checked_at alone, so the next get() looks again instead of
        # serving the old keys for another interval as if all were well.
        new = self._load()
        last = self._read
        if last is not None and new.credentials != last.credentials:
            log.info(
                "S3 credentials changed in %s (the Secret was updated); the keys changed, "
                "now key id %s",
                self._dir,
                new.credentials.fingerprint,
            )
        self._read = new
        self._checked_at = now
        return new.credentials

    def _snapshot(self) -> tuple[Path, str | None]:
        """The directory to read files from, and the `..data` target it came from (if any)."""
        try:
            target = os.readlink(self._dir / "..data")
        except OSError:  # no ..data (a plain directory) or not a symlink
            return self._dir, None
        return self._dir / target, target

    def _names(self) -> tuple[str, ...]:
        return (*self._id_keys, *self._secret_keys, *self._token_keys)

    def _fingerprint(self, base: Path, target: str | None) -> tuple[object, ...]:
        stats: list[object] = [target]
        for name in self._names():
            try:
                st = (base / name).stat()
            except OSError:
                stats.append(None)
            else:
                stats.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stats)

    def _load(self) -> _SecretRead:
        for _ in range(5):
            base, target = self._snapshot()
            try:
                return self._load_from(base, target)
            except _Vanished:
                continue
        raise UsageError(
            f"{self.describe()}: the Secret changed five times while being read. Fix: check "
            "what keeps updating it"
        )

    def _load_from(self, base: Path, target: str | None) -> _SecretRead:
        try:
            held = sorted(name for name in os.listdir(base) if not name.startswith(".."))
        except FileNotFoundError:
            if target is not None and self._dir.is_dir():
                raise _Vanished from None
            raise NoCredentialsError(
                source=self.describe(),
                looked=f"{self._dir} does not exist",
                fix=f"{S3_KEYS_FIX}, mounted at {self._dir}",
            ) from None
        except NotADirectoryError:
            raise NoCredentialsError(
                source=self.describe(),
                looked=f"{self._dir} is not a directory",
                fix=f"{S3_KEYS_FIX}, mounted at {self._dir}",
            ) from None
        except OSError as exc:
            raise UsageError(
                f"cannot read the Secret directory {self._dir}: {exc.strerror}. Fix: make the "
                "Secret volume readable by the sidecar (defaultMode, fsGroup)"
            ) from None
        fingerprint = self._fingerprint(base, target)
        key_id = self._first(base, target, self._id_keys)
        secret = self._first(base, target, self._secret_keys)
        token = self._first(base, target, self._token_keys)
        if key_id is None and secret is None and token is None:
            shown = [shown_name(name) for name in held]
            raise NoCredentialsError(
                source=self.describe(),
                looked=(
                    f"{self._dir} holds none of {_names(self._id_keys)} nor "
                    f"{_names(self._secret_keys)}; it holds: "
                    f"{', '.join(shown) if shown else 'nothing'}"
                ),
                fix=f"{S3_KEYS_FIX} (or rename the Secret's keys to those names)",
            )
        if key_id is None or secret is None:
            present = [found[0] for found in (key_id, secret, token) if found is not None]
            missing = self._id_keys if key_id is None else self._secret_keys
            raise UsageError(
                f"{self.describe()}: {_names(present)} is there but none of "
                f"{_names(missing)} is. Fix: add the missing key to the Secret: {S3_KEYS_FIX}"
            )
        where = f"{self.describe()}: {shown_name(key_id[0])}/{shown_name(secret[0])}"
        creds = checked_credentials(key_id[1], secret[1], token[1] if token else None, where=where)
        return _SecretRead(credentials=creds, fingerprint=fingerprint)

    def _first(
        self, base: Path, target: str | None, names: Sequence[str]
    ) -> tuple[str, str] | None:
        """(name, stripped text) of the first file among `names` in `base`, or None.

        Key files are symlinks through `..data` (kubelet's layout), so the link is resolved
        first; what it points to must be a regular file (never a FIFO or a device, which
        would block or never end) of at most `_MAX_KEY_FILE` bytes.
        """
        for name in names:
            shown = self._dir / shown_name(name)
            try:
                data = read_regular(os.path.realpath(base / name), limit=_MAX_KEY_FILE)
            except FileNotFoundError:
                if target is not None and not base.is_dir():
                    raise _Vanished from None
                continue
            except UnsafeFileError as exc:
                too_big = exc.problem.startswith("is larger")
                raise UsageError(
                    f"Secret file {shown} is over {_MAX_KEY_FILE} bytes, too big for a key. "
                    "Fix: put only the key in it"
                    if too_big
                    else f"Secret file {shown} is not a regular file (a directory, FIFO or "
                    "device). Fix: mount a Secret whose keys are the key id and the secret"
                ) from None
            except OSError as exc:
                raise UsageError(
                    f"cannot read Secret file {shown}: {exc.strerror}. Fix: make "
                    "the Secret volume readable by the sidecar (defaultMode, fsGroup)"
                ) from None
            try:
                text = data.rstrip().decode("ascii")
            except UnicodeDecodeError:
                raise UsageError(
                    f"Secret file {shown} is not ASCII text (not shown). Fix: "
                    "store the key itself, e.g. with --from-literal"
                ) from None
            if not text:
                raise UsageError(f"Secret file {shown} is empty. Fix: put the key in it")
            return name, text
        return None


def _names(names: Sequence[str]) -> str:
    return ", ".join(shown_name(name) for name in names)


class ChainCredentials:
    """The first source that has keys, in order.

    A source raising `NoCredentialsError` is skipped; any other error stops the chain (a half
    configured source is a mistake to report, not a reason to try the next). `get()` sticks
    to the source that answered last (cheap), falling back to the whole chain if that source
    loses its keys; `refresh()` walks the chain again from the start.
    """

    def __init__(self, sources: Sequence[CredentialSource]) -> None:
        if not sources:
            raise ValueError("ChainCredentials needs at least one source")
        self._sources = tuple(sources)
        self._current: CredentialSource | None = None

    @property
    def current(self) -> CredentialSource | None:
        """The source the last keys came from, for messages (e.g. after a 403)."""
        return self._current

    def describe(self) -> str:
        return "; then ".join(source.describe() for source in self._sources)

    def get(self) -> Credentials:
        if self._current is not None:
            try:
                return self._current.get()
            except NoCredentialsError:
                self._current = None
        return self._walk(refresh=False)

    def refresh(self) -> Credentials:
        self._current = None
        return self._walk(refresh=True)

    def _walk(self, *, refresh: bool) -> Credentials:
        looked: list[str] = []
        for source in self._sources:
            try:
                creds = source.refresh() if refresh else source.get()
            except NoCredentialsError as exc:
                looked.append(f"{len(looked) + 1}) {exc.source}: {exc.looked}")
                continue
            self._current = source
            return creds
        raise NoCredentialsError(
            source=f"any of the {len(looked)} places datapin looks",
            looked="; ".join(looked),
        )


#: A `.env` file is a few lines; anything larger is the wrong file.
_MAX_ENV_FILE: Final = 1024 * 1024
_ENV_ASSIGNMENT: Final = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")


def _env_value(text: str) -> str | None:
    """The value of `KEY=<text>` in a dotenv file, or None if badly quoted."""
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        if end < 0:
            return None
        tail = text[end + 1 :].strip()
        return text[1:end] if not tail or tail.startswith("#") else None
    comment = re.search(r"\s#", text)
    return (text[: comment.start()] if comment else text).strip()


def read_env_file(path: Path) -> dict[str, str]:
    """Variables of a dotenv file, as the B2 + DVC tutorial's `.env`.

    `KEY=VALUE` lines, optional `export `, `#` comment lines and ` #` trailing comments, blank
    lines, values optionally in single or double quotes (taken literally: no escapes, no
    `$VAR` interpolation, no multi-line values). A later line wins. A malformed line is
    reported by number, never shown, as it may hold a secret.
    """
    try:
        # The user named this path: a symlink to the real file is fine, a FIFO, a device or
        # a huge file is not (it would block, never end, or fill memory).
        text = read_regular(os.path.realpath(path), limit=_MAX_ENV_FILE).decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(
            f"env file {path} does not exist. Fix: give the path of the .env file with "
            "AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"env file {path} is not UTF-8 text. Fix: save it as UTF-8") from None
    except UnsafeFileError as exc:
        what = (
            f"is larger than {_MAX_ENV_FILE} bytes"
            if exc.problem.startswith("is larger")
            else "is not a regular file (a directory, FIFO or device)"
        )
        raise UsageError(
            f"env file {path} {what}. Fix: give the path of the .env file with "
            "AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot read env file {path}: {exc.strerror}. Fix: make it readable by the user "
            "datapin runs as"
        ) from None
    result: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_ASSIGNMENT.fullmatch(stripped)
        value = _env_value(match.group(2)) if match else None
        if match is None or value is None:
            what = f"the value of {match.group(1)} is badly quoted" if match else "not KEY=VALUE"
            raise UsageError(
                f"env file {path}, line {lineno}: {what} (the line is not shown: it may hold "
                "a secret). Fix: write KEY=VALUE, quoting a value that has spaces or ' #' in "
                "single quotes"
            )
        result[match.group(1)] = value
    return result


def credentials_from_env_file(path: Path) -> EnvCredentials:
    """Keys from a dotenv file (see `read_env_file`), read now so a bad file fails at start.

    A missing or malformed file is a `UsageError` (it was named on purpose); a file without
    the key variables is a source with nothing configured (`NoCredentialsError` on `get()`).
    """
    return EnvCredentials(read_env_file(path), origin=f"env file {path}")
