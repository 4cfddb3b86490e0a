"""`Settings` of `datapin-sidecar`: every knob, from `DATAPIN_*` environment variables.

One pydantic-settings model for the program, built once in `main()` and passed down; nothing
else reads the environment. The operator's webhook (and anyone running the program by hand)
sets these variables; each field's description is the documentation, and `datapin-sidecar
settings` prints them all with their defaults.

Datasets are a JSON list in `DATAPIN_DATASETS` because a pod can mount several and each has its
own remote and Secret. Credentials are never settings: a dataset names the *directory* of a
mounted Secret (`credentials_dir`), or the keys come from the standard environment variables
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, or B2's names) set by `secretKeyRef`, which only
works for one dataset per pod.

A bad value fails at start with one line per bad field, naming the variable, what is wrong and
the value given (long values are cut). Settings hold no secrets, but people paste keys into the
wrong place: the value is never shown for a field that names key files, for a field the model
does not know (`"secret_access_key": ...` in a dataset), or when it matches a key datapin has
read (`redaction.redact`). Every path must be non-empty (an empty variable would otherwise mean
the working directory), the node volume paths absolute, `DATAPIN_POD_UID` a UUID (it becomes
a directory name under the workspaces root), and every number has a stated upper bound, so a
typo cannot make a loop spin, a sleep last forever (`inf`) or a pool take all memory.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import BadSettingsError, DatapinError, RevisionError
from datapin_sidecar.limits import MAX_DIR_PATH_BYTES
from datapin_sidecar.pins import DATASET_NAME_MAX, is_dataset_name
from datapin_sidecar.redaction import redact
from datapin_sidecar.remotes.secretkeys import SECRET_KEY_NAME

ENV_PREFIX: Final = "DATAPIN_"
Mode = Literal["once", "run", "agent"]
_SHOWN_VALUE: Final = 80
#: The published symlink's name: one plain file name (as `workspace.Workspace` requires).
_LINK_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
#: Upper bounds of the durations (seconds): far above any sensible value, below "forever".
HOUR: Final = 3600.0
DAY: Final = 86400.0
MONTH: Final = 30 * DAY
#: How a duration field's description states its bound.
_SPOKEN: Final = {HOUR: "an hour", DAY: "a day", MONTH: "30 days"}
#: Fields whose value is never shown in an error: they name key files, and a key pasted there
#: instead of its name must not be echoed.
_UNSHOWN: Final = frozenset({"access_key_id_file", "secret_access_key_file"})
#: The only dataset fields whose bad value is quoted back; anything else in DATAPIN_DATASETS
#: (an unknown field, a stray list item) may be a key pasted into the wrong place.
_SHOWN_DATASET_FIELDS: Final = frozenset(
    {"name", "remote", "region", "addressing", "layout", "pin", "ref", "credentials_dir"}
)


def _non_empty_path(value: Path | None) -> Path | None:
    if value is not None and str(value) in ("", "."):
        raise ValueError(
            "must not be empty (an empty path would mean the working directory); unset the "
            "variable for the default, or write the directory out"
        )
    return value


def _absolute(value: Path | None) -> Path | None:
    _non_empty_path(value)
    if value is not None and not value.is_absolute():
        raise ValueError("must be an absolute path (it is a mount point on the node volume)")
    if value is not None and len(str(value).encode("utf-8", "surrogateescape")) > (
        MAX_DIR_PATH_BYTES
    ):
        raise ValueError(
            f"must be at most {MAX_DIR_PATH_BYTES} bytes long, so what datapin creates beneath "
            "it fits in Linux's 4096-byte path limit"
        )
    return value


def _seconds(default: float, *, at_most: float, what: str, zero_ok: bool = False) -> Any:
    """A duration setting: above 0 (or at least 0), at most `at_most`, as its description says."""
    return Field(
        default=default,
        gt=None if zero_ok else 0,
        ge=0 if zero_ok else None,
        le=at_most,
        description=f"{what} (at most {_SPOKEN[at_most]}).",
    )


def _percent(default: float, what: str) -> Any:
    """A watermark: a percentage of the volume, above 0 and at most 100."""
    return Field(default=default, gt=0, le=100, description=what)


def check_directories(settings: Settings) -> None:
    """Raise `BadSettingsError` if a directory setting names a file (or a path through one).

    Done at start by `main()`, outside the model because it looks at the filesystem; a
    directory that does not exist yet is fine (it is created).
    """
    found = []
    for field in ("root", "workspace_dir", "kubelet_pods_dir"):
        path: Path | None = getattr(settings, field)
        if path is None:
            continue
        name = f"{ENV_PREFIX}{field.upper()}"
        try:
            is_dir = path.is_dir()
            exists = is_dir or path.exists()
        except OSError as exc:  # a name over 255 bytes, a loop of symlinks, no permission
            found.append(f"{name}: cannot be used ({exc.strerror}) (got {str(path)[:80]!r})")
            continue
        if exists and not is_dir:
            found.append(f"{name}: is a file, not a directory (got {str(path)[:80]!r})")
        elif not exists and any(p.exists() and not p.is_dir() for p in path.parents):
            found.append(f"{name}: a component of the path is a file (got {str(path)[:80]!r})")
    if found:
        raise BadSettingsError(found)


class DatasetSettings(BaseModel):
    """One dataset of the pod (or of the agent's prefetch list): where its objects come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(description="Dataset name (the Dataset resource's name).")]
    remote: Annotated[
        str,
        Field(
            description="s3://BUCKET/PREFIX (S3, Backblaze B2) or the path of a DVC directory "
            "remote.",
        ),
    ]
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint, e.g. https://s3.us-west-002.backblazeb2.com."
    )
    region: str | None = Field(
        default=None, description="SigV4 region (default: from a B2 endpoint, else us-east-1)."
    )
    addressing: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="Bucket addressing."
    )
    verify_tls: bool = Field(default=True, description="Verify the endpoint's certificate.")
    ca_bundle: Path | None = Field(default=None, description="CA certificates for the endpoint.")
    credentials_dir: Path | None = Field(
        default=None,
        description="Mounted Secret directory holding the keys (AWS_ACCESS_KEY_ID/"
        "AWS_SECRET_ACCESS_KEY or B2's keyID/applicationKey); re-read when it rotates. "
        "Default: the standard environment variables.",
    )
    access_key_id_file: str | None = Field(
        default=None,
        description="File name of the key id in credentials_dir (default: any "
        "of the AWS, DVC and B2 names).",
    )
    secret_access_key_file: str | None = Field(
        default=None, description="File name of the secret key in credentials_dir."
    )
    layout: LayoutChoice = Field(
        default=LayoutChoice.AUTO, description="Cache layout the revisions were pushed in."
    )
    pin: str | None = Field(
        default=None,
        description="The revision (<md5>.dir) to serve when no annotations file is used.",
    )
    ref: str | None = Field(default=None, description="What `pin` was resolved from (display).")
    paths: list[str] = Field(
        default_factory=list,
        description="Folders of the revision to serve or prefetch, relative to its root "
        "(e.g. images/train): only their objects are fetched and the tree holds only them. "
        "Empty: the whole revision. With `pin` when no annotations file is used, and in "
        "prefetch entries (the pins carry their own).",
    )
    writable: bool = Field(
        default=False,
        description="The pod mounts this dataset read-write (the webhook sets it for "
        'datapin.dev/writable: "true"): its trees are never recycled or carried over, so each '
        "switch builds the revision afresh and a pod's edits never reach the next tree.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_dataset_name(value):
            raise ValueError(
                "must be a Kubernetes resource name (lower-case letters, digits, '-', '.'; "
                f"at most {DATASET_NAME_MAX} characters, starting and ending with a letter or "
                "digit)"
            )
        return value

    @field_validator("paths")
    @classmethod
    def _part(cls, value: list[str]) -> list[str]:
        try:
            return Part.parse(value, what="path").to_list()
        except DatapinError as exc:
            raise ValueError(str(exc)) from None

    @property
    def part(self) -> Part:
        return Part(tuple(self.paths))

    @field_validator("remote")
    @classmethod
    def _remote(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: s3://BUCKET/PREFIX or a directory path")
        if "://" in value and not value.startswith("s3://"):
            raise ValueError("must be s3://BUCKET/PREFIX or a directory path")
        if "://" not in value and not value.startswith("/"):
            raise ValueError("a directory remote must be an absolute path")
        return value

    @field_validator("credentials_dir", "ca_bundle")
    @classmethod
    def _paths(cls, value: Path | None) -> Path | None:
        return _non_empty_path(value)

    @field_validator("access_key_id_file", "secret_access_key_file")
    @classmethod
    def _key_file(cls, value: str | None) -> str | None:
        if value is not None and (
            SECRET_KEY_NAME.fullmatch(value) is None or value.startswith("..")
        ):
            raise ValueError(
                "must be the name of a key in the Secret (letters, digits, '-', '_', '.'; "
                "the value is not shown in case it is a key pasted here). Fix: give the "
                "key's name, never its value"
            )
        return value

    @field_validator("pin")
    @classmethod
    def _pin(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Revision.parse(value)
            except RevisionError as exc:
                raise ValueError(str(exc)) from None
        return value


class Settings(BaseSettings):
    """Everything `datapin-sidecar` reads from its environment (prefix `DATAPIN_`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # -- where things are ----------------------------------------------------------------------
    root: Path = Field(
        default=Path("/datapin"),
        description="Mount point of the node volume (XFS with reflinks). The cache is "
        "ROOT/cache and pod workspaces ROOT/workspaces/<pod-uid>/<dataset>: one filesystem, "
        "one mount, so reflinks and hardlinks work between them.",
    )
    workspace_dir: Path | None = Field(
        default=None,
        description="This pod's workspace (default: ROOT/workspaces/<pod-uid>); for running "
        "outside Kubernetes.",
    )
    datasets: list[DatasetSettings] = Field(
        default_factory=list,
        description="JSON list of the pod's datasets: name, remote, endpoint_url, region, "
        "credentials_dir, layout, pin.",
    )
    annotations_file: Path | None = Field(
        default=None,
        description="Downward-API file of metadata.annotations; its `datapin.dev/pins` "
        "annotation names the revisions to serve, followed live in `run` mode.",
    )
    # -- the pod (downward API) ----------------------------------------------------------------
    pod_uid: str | None = Field(
        default=None,
        description="metadata.uid of the pod (a UUID: the workspace is ROOT/workspaces/<uid>).",
    )
    pod_name: str = Field(default="", description="metadata.name of the pod (for logs).")
    pod_namespace: str = Field(default="", description="metadata.namespace (for logs).")
    node_name: str = Field(default="", description="spec.nodeName (for logs).")
    # -- materialising -------------------------------------------------------------------------
    link: Literal["auto", "reflink", "hardlink", "copy"] = Field(
        default="auto", description="How files are made from cache objects."
    )
    link_name: str = Field(
        default="current",
        description="Name of the published symlink: one file name (letters, digits, '_', '.', "
        "'-'; not .revs).",
    )
    verify: bool = Field(default=False, description="Re-hash every object before linking.")
    jobs: int = Field(
        default=32, ge=1, le=1024, description="Remote requests in flight (1 to 1024)."
    )
    spare_grace_seconds: float = _seconds(
        60.0,
        at_most=DAY,
        what="A retired tree is not recycled for this long after a switch, so readers that "
        "resolved the link before it keep a complete old tree",
        zero_ok=True,
    )
    # -- the service (run, agent) --------------------------------------------------------------
    http_host: str = Field(default="0.0.0.0", description="Address of /readyz, /metrics.")  # noqa: S104 - kubelet probes the pod IP
    http_port: int = Field(
        default=9479, ge=0, le=65535, description="Port of /readyz, /healthz, /metrics."
    )
    watch_interval_seconds: float = _seconds(
        2.0, at_most=HOUR, what="How often the annotations file is checked"
    )
    retry_max_seconds: float = _seconds(
        60.0, at_most=DAY, what="Longest wait between retries of a failed switch"
    )
    shutdown_timeout_seconds: float = _seconds(
        20.0, at_most=HOUR, what="How long SIGTERM waits for work to unwind"
    )
    termination_message_path: Path = Field(
        default=Path("/dev/termination-log"),
        description="Where the reason of a failure is written (kubectl describe shows it).",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: text on a TTY, JSON lines otherwise."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    # -- the node agent ------------------------------------------------------------------------
    prefetch_file: Path | None = Field(
        default=None,
        description='JSON written by the operator: {"revisions": [{dataset settings + '
        "pin}]}; the agent keeps these warm in the cache.",
    )
    prefetch_interval_seconds: float = _seconds(
        30.0, at_most=DAY, what="How often the prefetch file is checked"
    )
    gc_interval_seconds: float = _seconds(
        60.0, at_most=DAY, what="How often the agent checks the watermarks"
    )
    gc_high_percent: float = _percent(85.0, "Evict when the volume is fuller than this.")
    gc_low_percent: float = _percent(70.0, "...down to this.")
    gc_inodes_high_percent: float = _percent(85.0, "Evict when more inodes than this are used.")
    gc_inodes_low_percent: float = _percent(70.0, "...down to this.")
    gc_slot_max_age_seconds: float = _seconds(
        3600.0, at_most=MONTH, what="Abandoned partial downloads older than this go"
    )
    kubelet_pods_dir: Path | None = Field(
        default=None,
        description="kubelet's pods directory (/var/lib/kubelet/pods, mounted read-only): a "
        "workspace whose pod has no directory there is removed. Unset: never removed.",
    )
    workspace_grace_seconds: float = _seconds(
        300.0, at_most=MONTH, what="A workspace younger than this is never removed", zero_ok=True
    )
    scan_interval_seconds: float = _seconds(
        300.0, at_most=DAY, what="How often cache objects and bytes are counted"
    )
    # -- the node plugin (agent, CSI mode) ------------------------------------------------------
    csi_socket: Path | None = Field(
        default=None,
        description="The CSI socket the agent serves the node plugin on (in its container, "
        "e.g. /csi/csi.sock). Unset: no node plugin.",
    )
    csi_endpoint: str | None = Field(
        default=None,
        description="The CSI socket's path on the host, which kubelet dials (default: "
        "DATAPIN_CSI_SOCKET): /var/lib/kubelet/plugins/datapin.dev/csi.sock.",
    )
    csi_registration_dir: Path | None = Field(
        default=None,
        description="kubelet's plugin registration directory (/var/lib/kubelet/"
        "plugins_registry): the agent serves its registration socket there. Unset: not "
        "registered (for tests).",
    )
    kubelet_dir: Path = Field(
        default=Path("/var/lib/kubelet"),
        description="kubelet's root directory as the agent sees it (mounted with Bidirectional "
        "propagation): every target path kubelet sends lies under its pods/.",
    )
    kube_api_url: str | None = Field(
        default=None,
        description="The Kubernetes API for the node plugin's reads (default: in-cluster, "
        "from KUBERNETES_SERVICE_HOST/PORT and the service account).",
    )
    csi_trusted_endpoints: list[str] = Field(
        default_factory=lambda: ["*.backblazeb2.com", "*.amazonaws.com"],
        description="JSON list of S3 endpoint host patterns (or exact endpoint URLs) whose "
        "ETags the node plugin takes as the md5 of an object's bytes, over verified TLS: "
        "services no tenant runs. Objects on other endpoints are proven by downloading them.",
    )
    csi_proof_seconds: float = _seconds(
        300.0,
        at_most=DAY,
        what="How long a successful proof of access (the request's keys read the pin's .dir "
        "from its remote) is remembered per keys, remote and pin",
    )

    # -- peer fetch (agent) ---------------------------------------------------------------------
    peer_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="The port the agent serves its node cache to the other agents on, over "
        "mutual TLS (the chart sets 9480). 0: no peer fetch; every object comes from the remote.",
    )
    peer_address: str | None = Field(
        default=None,
        description="This agent's own address as its peers reach it (the pod IP: the chart "
        "sets it from status.podIP). Required with DATAPIN_PEER_PORT.",
    )
    peer_service: str | None = Field(
        default=None,
        description="DNS name of the agents' headless Service, resolved for the members "
        "(the chart sets <agents>.<namespace>.svc).",
    )
    peers: list[str] = Field(
        default_factory=list,
        description="JSON list of further members, host:port (agents outside the Service).",
    )
    peer_tls_dir: Path | None = Field(
        default=None,
        description="Directory of the peer Secret: ca.crt, tls.crt, tls.key (mutual TLS "
        "between agents). Required with DATAPIN_PEER_PORT.",
    )
    peer_wait_seconds: float = _seconds(
        600.0,
        at_most=HOUR,
        what="How long an agent waits for the agent fetching an object (its lease) before "
        "fetching it from the remote itself; also a lease's lifetime",
    )
    peer_refresh_seconds: float = _seconds(
        10.0, at_most=HOUR, what="How often the agents' Service is resolved again"
    )

    @model_validator(mode="after")
    def _peering(self) -> Settings:
        if self.peer_port:
            missing = [
                f"{ENV_PREFIX}{name.upper()}"
                for name in ("peer_address", "peer_tls_dir")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"DATAPIN_PEER_PORT is set, so {' and '.join(missing)} must be too (the "
                    "chart sets both; or set DATAPIN_PEER_PORT=0 to fetch from the remote only)"
                )
        return self

    @field_validator("csi_socket", "csi_registration_dir", "kubelet_dir")
    @classmethod
    def _csi_path(cls, value: Path | None) -> Path | None:
        return _absolute(value)

    @field_validator("root", "workspace_dir", "kubelet_pods_dir")
    @classmethod
    def _volume_path(cls, value: Path | None) -> Path | None:
        return _absolute(value)

    @field_validator("annotations_file", "prefetch_file", "termination_message_path")
    @classmethod
    def _file_path(cls, value: Path | None) -> Path | None:
        return _non_empty_path(value)

    @field_validator("pod_uid")
    @classmethod
    def _pod_uid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            raise ValueError(
                "must be the pod's metadata.uid, a UUID such as "
                "6f1e0c1a-2b3c-4d5e-8f90-a1b2c3d4e5f6 (set it with valueFrom fieldRef "
                "metadata.uid, or set DATAPIN_WORKSPACE_DIR outside Kubernetes)"
            ) from None
        if str(parsed) != value.lower():
            raise ValueError("must be a UUID in its canonical 8-4-4-4-12 form")
        return value.lower()

    @field_validator("link_name")
    @classmethod
    def _link_name(cls, value: str) -> str:
        if not _LINK_NAME.fullmatch(value) or value == ".revs":
            raise ValueError(
                "must be one file name of at most 255 characters: letters, digits, '_', '.' "
                "and '-', starting with a letter, digit or '_' (and not .revs)"
            )
        return value

    @model_validator(mode="after")
    def _watermarks(self) -> Settings:
        if self.gc_low_percent >= self.gc_high_percent:
            raise ValueError(
                "DATAPIN_GC_LOW_PERCENT must be below DATAPIN_GC_HIGH_PERCENT "
                f"({self.gc_low_percent} >= {self.gc_high_percent})"
            )
        if self.gc_inodes_low_percent >= self.gc_inodes_high_percent:
            raise ValueError(
                "DATAPIN_GC_INODES_LOW_PERCENT must be below DATAPIN_GC_INODES_HIGH_PERCENT"
            )
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"DATAPIN_DATASETS names a dataset twice: {', '.join(dupes)}")
        return self

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def workspaces_dir(self) -> Path:
        return self.root / "workspaces"


def load_settings(**overrides: Any) -> Settings:
    """Build `Settings` from the environment; raise `BadSettingsError` naming each bad field."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise BadSettingsError(problems(exc)) from None
    except SettingsError as exc:
        # pydantic-settings could not decode a complex value (DATAPIN_DATASETS) as JSON.
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause else str(exc)
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else "a setting"
        raise BadSettingsError([f"{name}: not valid JSON ({detail})"]) from None


def problems(exc: ValidationError, *, env_prefix: str = ENV_PREFIX) -> list[str]:
    """One line per bad field: the variable, what is wrong, and the value given (cut short).

    Shared with the operator's settings, which use the same prefix and conventions.
    """
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if not loc:
            lines.append(error["msg"].removeprefix("Value error, "))
            continue
        name = env_prefix + loc[0].upper()
        inner = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
        value = error.get("input")
        shown = ""
        hidden = (
            error["type"] == "extra_forbidden"
            or not _UNSHOWN.isdisjoint(loc)
            or (loc[0] == "datasets" and loc[-1] not in _SHOWN_DATASET_FIELDS)
        )
        if isinstance(value, str | int | float | bool) and not hidden:
            text = redact(str(value))
            text = text if len(text) <= _SHOWN_VALUE else text[:_SHOWN_VALUE] + "..."
            shown = f" (got {text!r})"
            if "@" in text and "://" in text:
                shown = " (the value is not shown: a URL with '@' may embed credentials)"
        lines.append(f"{name}{inner}: {error['msg'].removeprefix('Value error, ')}{shown}")
    return lines


def describe() -> str:
    """Every setting with its default and description (`datapin-sidecar settings`)."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(unset)" if default is None else str(default)
        if isinstance(default, list):
            shown = "[]"
        lines.append(f"{ENV_PREFIX}{name.upper()}  default: {shown}\n    {field.description}")
    return "\n".join(lines) + "\n"
