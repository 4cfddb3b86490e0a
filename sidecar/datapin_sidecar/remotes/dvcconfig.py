"""The remote a DVC repository names, read the way DVC reads it: `read_dvc_remote`.

DVC keeps its remotes in the repository's `.dvc/config` and `.dvc/config.local` (local
overrides per key). Only those two levels: the sidecar runs in a pod, and reading a user's
`~/.config/dvc` would make the result depend on the machine. DVC writes configobj syntax; we
parse it with configparser after removing indentation (configobj ignores it, configparser
would take an indented line for a continuation) and apply configobj's value rules ourselves:
quotes, triple quotes, `#` comments, an unquoted comma making a list (which DVC then rejects,
and so do we). No interpolation. Options that would change which keys or which bytes we get
(`profile`, `credentialpath`, SSE-C keys, version-aware remotes, anonymous access) are refused
with what to do instead, rather than ignored into a confusing 403; options that only matter to
uploads or to DVC itself are ignored. An S3 remote comes back as an `endpoint.RemoteConfig`
(with any keys its section holds, as `Credentials`), a directory remote as a path for
`directory.DirectoryRemote`.

No value read from a config file is ever shown: messages name the key and the file, and
parser exceptions that quote their input are replaced (`from None`), not chained.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from datapin_sidecar.errors import UsageError
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials, checked_credentials
from datapin_sidecar.remotes.endpoint import URL_SCHEME, RemoteConfig, shown_url

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DvcRemote:
    """The remote a DVC repository names: an S3 `config`, or a `directory` remote."""

    name: str
    config: RemoteConfig | None = None
    directory: Path | None = None
    """Absolute path of a directory remote (for `remote.DirectoryRemote`); may not exist."""
    credentials: Credentials | None = None
    """Keys written in the remote's section (normally `.dvc/config.local`)."""
    credentials_file: Path | None = None
    """The file `credentials` came from."""

    def __post_init__(self) -> None:
        if (self.config is None) == (self.directory is None):
            raise ValueError("DvcRemote has exactly one of config and directory")

    def credential_source(self) -> StaticCredentials | None:
        """The remote's own keys as a source for `ChainCredentials`, or None.

        DVC itself prefers these to the environment (they are passed to botocore explicitly).
        """
        if self.credentials is None:
            return None
        return StaticCredentials(
            self.credentials,
            source=f"access_key_id/secret_access_key of DVC remote {self.name!r} in "
            f"{self.credentials_file}",
        )

    def describe(self) -> str:
        where = self.config.describe() if self.config is not None else str(self.directory)
        return f"DVC remote {self.name!r} ({where})"


#: DVC's own section-name rule (dvc/config.py `_parse_named`), applied after lower-casing.
_NAMED_SECTION: Final = re.compile(r'\s*remote\s*"(.*)"\s*')
_TRIPLE_QUOTED: Final = re.compile(r"""('''|\"\"\")(.*?)\1\s*(?:#.*)?""", re.DOTALL)
#: One quoted value: the quote does not occur inside (DVC then picks the other quote).
_QUOTED: Final = re.compile(r"""(?:'([^']*)'|"([^"]*)")\s*(?:#.*)?""")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Option:
    raw: str = field(repr=False)
    file: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class _ConfigFile:
    core: dict[str, _Option]
    remotes: dict[str, dict[str, _Option]]


def _configobj_value(raw: str) -> str | None:
    """A value as configobj reads it (quotes, `#` comment), or None if a list or malformed."""
    if raw.startswith(("'''", '"""')):
        triple = _TRIPLE_QUOTED.fullmatch(raw)
        return triple.group(2) if triple else None
    if raw.startswith(("'", '"')):
        quoted = _QUOTED.fullmatch(raw)
        return (quoted.group(1) or quoted.group(2) or "") if quoted else None
    value = raw.split("#", 1)[0].rstrip()
    return None if "," in value else value


#: What configparser raises for a config it cannot read (`MissingSectionHeaderError` is a
#: `ParsingError`).
_UNPARSABLE: Final = (
    configparser.DuplicateOptionError,
    configparser.DuplicateSectionError,
    configparser.ParsingError,
)


def _where_unparsable(
    exc: configparser.DuplicateOptionError
    | configparser.DuplicateSectionError
    | configparser.ParsingError,
) -> str:
    """Where and what is wrong in a config configparser refused, never the line itself (it
    may hold a secret)."""
    if isinstance(exc, configparser.DuplicateOptionError):
        return (
            f", line {exc.lineno}: option {exc.option!r} appears twice in section [{exc.section}]"
        )
    if isinstance(exc, configparser.DuplicateSectionError):
        return f", line {exc.lineno}: section [{exc.section}] appears twice"
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return (
            f", line {exc.lineno}: an option before any [section] (the line is not shown: it "
            "may hold a secret)"
        )
    lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
    return (
        f": cannot parse line(s) {lines}, expected `key = value` or `[section]` (lines not "
        "shown: they may hold secrets)"
    )


def _unquote_name(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        return name[1:-1]
    return name


def _read_config_file(path: Path) -> _ConfigFile | None:
    """Sections `core` and `remote "NAME"` of one DVC config file; None if it is absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise UsageError(f"DVC config {path} is not UTF-8 text. Fix: save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read DVC config {path}: {exc.strerror}") from None
    parser = configparser.ConfigParser(
        delimiters=("=",),
        comment_prefixes=("#",),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        interpolation=None,
        default_section="\0no default section",
    )
    # configobj ignores indentation; configparser would read a deeper-indented line as the
    # continuation of the value above it. Line numbers are kept.
    dedented = "\n".join(line.lstrip() for line in text.splitlines())
    fix = "Fix: rewrite it with `dvc remote add` / `dvc remote modify`, or repair it by hand"
    try:
        parser.read_string(dedented, source=str(path))
    except _UNPARSABLE as exc:
        raise UsageError(f"DVC config {path}{_where_unparsable(exc)}. {fix}") from None
    core: dict[str, _Option] = {}
    remotes: dict[str, dict[str, _Option]] = {}
    for section in parser.sections():
        # DVC lower-cases section names and keys when it loads a config (`_lower_keys`).
        normal = _unquote_name(section).lower()
        named = _NAMED_SECTION.fullmatch(normal)
        if named is None and normal != "core":
            continue
        target = remotes.setdefault(named.group(1), {}) if named else core
        if target:
            raise UsageError(
                f"DVC config {path}: section [{section}] appears twice (with and without "
                f"quotes). {fix}"
            )
        for raw_key, raw in parser.items(section):
            key = _unquote_name(raw_key).lower()
            if key in target:
                raise UsageError(
                    f"DVC config {path}: option {key!r} appears twice in [{section}]. {fix}"
                )
            target[key] = _Option(raw=raw, file=path)
    return _ConfigFile(core=core, remotes=remotes)


def _choose_remote(
    name: str | None, core: dict[str, _Option], remotes: Collection[str], where: str
) -> str:
    names = ", ".join(sorted(remotes)) or "none"
    if name is not None:
        if name.lower() in remotes:
            return name.lower()
        raise UsageError(
            f"no DVC remote named {name!r} in {where} (remotes: {names}). Fix: pass one of "
            f"those, or add it with `dvc remote add {name} s3://bucket/prefix`"
        )
    default = core.get("remote")
    if default is not None:
        chosen = _option_value(default, "remote", "core").lower()
        if chosen in remotes:
            return chosen
        raise UsageError(
            f"the default remote (core.remote in {default.file}) is {chosen!r}, which is not "
            f"defined in {where} (remotes: {names}). Fix: `dvc remote default NAME` with one "
            "of them, or pass the remote's name"
        )
    if len(remotes) == 1:
        return next(iter(remotes))
    if not remotes:
        raise UsageError(
            f"no DVC remote is configured in {where}. Fix: `dvc remote add -d NAME "
            "s3://bucket/prefix` (for B2 also `dvc remote modify NAME endpointurl "
            "https://s3.<region>.backblazeb2.com`)"
        )
    raise UsageError(
        f"{len(remotes)} DVC remotes are configured in {where} ({names}) and none is the "
        "default. Fix: pass the remote's name, or run `dvc remote default NAME` in the "
        "repository"
    )


def _option_value(option: _Option, key: str, section: str) -> str:
    value = _configobj_value(option.raw)
    if value is None:
        raise UsageError(
            f"DVC config {option.file}: [{section}] {key} is badly quoted or is a list (an "
            "unquoted comma), which DVC rejects too; the value is not shown. Fix: set it "
            f"again with `dvc remote modify` (or `dvc config`), which quotes it"
        )
    return value


#: Options whose effect datapin cannot reproduce, so reading without them would fetch with other
#: keys or other bytes than DVC: refused when set, with what to do instead.
_UNSUPPORTED: Final = {
    "profile": "AWS profiles live in ~/.aws files, which datapin does not read",
    "credentialpath": "datapin does not read AWS credentials files",
    "configpath": "datapin does not read AWS config files",
    "sse_customer_key": "reading SSE-C encrypted objects (customer-provided keys) is not supported",
    "sse_customer_algorithm": "reading SSE-C encrypted objects is not supported",
}
#: Boolean options that are refused only when true, and why.
_UNSUPPORTED_IF_TRUE: Final = {
    "version_aware": "a version-aware remote stores files by path, not by md5, so datapin "
    "cannot find objects in it",
    "worktree": "a worktree remote stores files by path, not by md5, so datapin cannot find "
    "objects in it",
    "allow_anonymous_login": "datapin signs every request and needs keys",
}
#: Options that only concern uploads or DVC's own behaviour: nothing to do when reading.
_IGNORED: Final = frozenset(
    {
        "jobs",
        "checksum_jobs",
        "verify",
        "listobjects",
        "no_traverse",
        "cache_regions",
        "read_timeout",
        "connect_timeout",
        "sse",
        "sse_kms_key_id",
        "acl",
        "grant_read",
        "grant_read_acp",
        "grant_write_acp",
        "grant_full_control",
        "slow_link_warning",
        "type",
        "protected",
        "shared",
    }
)
_USED: Final = frozenset(
    {
        "url",
        "endpointurl",
        "region",
        "ssl_verify",
        "use_ssl",
        "access_key_id",
        "secret_access_key",
        "session_token",
    }
)


def _dvc_bool(value: str, key: str, origin: Path) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise UsageError(
            f"DVC config {origin}: {key} must be true or false. Fix: `dvc remote modify "
            f"NAME {key} true` (or false)"
        )
    return lowered == "true"


def _local_remote_path(url: str, dvc_dir: Path, name: str) -> Path:
    if url.startswith("~"):
        raise UsageError(
            f"DVC remote {name!r} is a directory under a home directory ({url}); the "
            "sidecar has no home directory. Fix: use an absolute path"
        )
    path = Path(url)
    # DVC resolves a relative remote path against the config file's directory (.dvc).
    return path if path.is_absolute() else Path(os.path.normpath(dvc_dir / path))


def read_dvc_remote(repo: Path, name: str | None = None) -> DvcRemote:
    """The remote `name` (else the default, else the only one) of the DVC repository `repo`.

    Reads `repo/.dvc/config` then `repo/.dvc/config.local`, the latter overriding per key,
    as DVC does. Raises `UsageError` for anything datapin cannot read as DVC would.
    """
    repo = Path(repo).absolute()
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        raise UsageError(
            f"{repo} is not a DVC repository: it has no .dvc directory. Fix: pass the "
            "repository's root (where `dvc init` was run)"
        )
    core: dict[str, _Option] = {}
    remotes: dict[str, dict[str, _Option]] = {}
    for path in (dvc_dir / "config", dvc_dir / "config.local"):
        parsed = _read_config_file(path)
        if parsed is None:
            continue
        core.update(parsed.core)
        for remote, options in parsed.remotes.items():
            remotes.setdefault(remote, {}).update(options)
    where = f"{dvc_dir / 'config'} and config.local"
    chosen = _choose_remote(name, core, remotes.keys(), where)
    return _remote_from_options(chosen, remotes[chosen], repo)


def _remote_from_options(name: str, options: dict[str, _Option], repo: Path) -> DvcRemote:
    dvc_dir = repo / ".dvc"
    section = f'remote "{name}"'

    def value(key: str) -> str | None:
        option = options.get(key)
        if option is None:
            return None
        return _option_value(option, key, section) or None  # DVC passes "" on as unset

    url = value("url")
    if url is None:
        raise UsageError(
            f"DVC remote {name!r} has no url in {dvc_dir / 'config'} or config.local. Fix: "
            f"`dvc remote modify {name} url s3://bucket/prefix`"
        )
    scheme = URL_SCHEME.match(url)
    if scheme is None:
        if re.match(r"s3:/?[^/]", url, re.IGNORECASE):
            raise UsageError(
                f"DVC remote {name!r} has url {url!r}. Fix: write it as s3://bucket/prefix"
            )
        return DvcRemote(name=name, directory=_local_remote_path(url, dvc_dir, name))
    kind = scheme.group(1).lower()
    if kind == "file" and url[scheme.end() :].startswith("/"):
        return DvcRemote(name=name, directory=Path(url[scheme.end() :]))
    if kind != "s3":
        raise UsageError(
            f"DVC remote {name!r} uses {kind}:// ({shown_url(url)}): datapin reads s3:// "
            "remotes (Amazon S3, Backblaze B2 and other S3-compatible stores) and directory "
            f"remotes. Fix: push the data to one (`dvc remote add NAME s3://bucket/prefix`, "
            "`dvc push -r NAME`) and name that remote"
        )

    for key, option in options.items():
        if key in _UNSUPPORTED:
            raise UsageError(
                f"DVC remote {name!r} sets {key} (in {option.file}): {_UNSUPPORTED[key]}. Fix: "
                f"remove it (`dvc remote modify --unset {name} {key}`) and put the keys in "
                f".dvc/config.local (`dvc remote modify --local {name} access_key_id ...`), "
                "in the environment or in a Secret"
            )
        if key in _UNSUPPORTED_IF_TRUE and _dvc_bool(value(key) or "false", key, option.file):
            raise UsageError(
                f"DVC remote {name!r} sets {key} = true (in {option.file}): "
                f"{_UNSUPPORTED_IF_TRUE[key]}. Fix: use a remote without it"
            )
        if key not in _USED and key not in _IGNORED and key not in _UNSUPPORTED_IF_TRUE:
            log.warning("DVC remote %r: ignoring unknown option %r in %s", name, key, option.file)

    endpoint = value("endpointurl")
    use_ssl = value("use_ssl")
    # With an endpoint URL, its scheme decides (botocore ignores use_ssl then, too).
    ssl_off = use_ssl is not None and not _dvc_bool(use_ssl, "use_ssl", options["use_ssl"].file)
    if ssl_off and endpoint is None:
        raise UsageError(
            f"DVC remote {name!r} sets use_ssl = false without an endpointurl: datapin "
            "talks to AWS over https only. Fix: remove use_ssl, or give an http:// "
            "endpointurl for a server without TLS"
        )

    verify_tls, ca_bundle = True, None
    ssl_verify = value("ssl_verify")
    if ssl_verify is not None:
        if ssl_verify.lower() in ("true", "false"):
            verify_tls = ssl_verify.lower() == "true"
        elif ssl_verify.startswith("~"):
            raise UsageError(
                f"DVC remote {name!r}: ssl_verify names a CA bundle under a home directory "
                f"({ssl_verify}); the sidecar has no home directory. Fix: use an absolute path "
                "or one relative to the repository root"
            )
        else:
            # DVC hands ssl_verify to botocore unchanged, so a relative path is relative to
            # where dvc runs: the repository root, normally.
            ca_bundle = repo / ssl_verify

    try:
        config = RemoteConfig.from_url(
            url,
            endpoint_url=endpoint,
            region=value("region"),
            verify_tls=verify_tls,
            ca_bundle=ca_bundle,
            remote_name=name,
        )
    except UsageError as exc:
        files = sorted({str(option.file) for option in options.values()})
        raise UsageError(f"DVC remote {name!r} (in {' and '.join(files)}): {exc}") from None

    credentials, credentials_file = _dvc_credentials(name, options, value)
    return DvcRemote(
        name=name, config=config, credentials=credentials, credentials_file=credentials_file
    )


def _dvc_credentials(
    name: str, options: dict[str, _Option], value: Callable[[str], str | None]
) -> tuple[Credentials | None, Path | None]:
    key_id, secret = value("access_key_id"), value("secret_access_key")
    token = value("session_token")
    if key_id is None and secret is None:
        if token is not None:
            raise UsageError(
                f"DVC remote {name!r} has a session_token but no access_key_id and "
                f"secret_access_key. Fix: `dvc remote modify --local {name} access_key_id "
                f"<keyID>` and `... secret_access_key <applicationKey>`, or remove the token"
            )
        return None, None
    if key_id is None or secret is None:
        present, missing = (
            ("access_key_id", "secret_access_key")
            if secret is None
            else ("secret_access_key", "access_key_id")
        )
        raise UsageError(
            f"DVC remote {name!r} has {present} (in {options[present].file}) but no {missing}. "
            f"Fix: `dvc remote modify --local {name} {missing} <value>`"
        )
    origin = options["secret_access_key"].file
    if origin.name == "config":
        log.warning(
            "DVC remote %r keeps its secret_access_key in %s, which git tracks: anyone with "
            "the repository has the key. Move it to config.local: `dvc remote modify --local "
            "%s secret_access_key ...` and `dvc remote modify --unset %s secret_access_key`",
            name,
            origin,
            name,
            name,
        )
    where = f"DVC remote {name!r} (in {origin})"
    return checked_credentials(key_id, secret, token, where=where), origin
