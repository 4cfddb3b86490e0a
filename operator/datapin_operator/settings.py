"""`Settings` of `datapin-operator`: every knob, from `DATAPIN_*` environment variables.

One pydantic-settings model for the program, built once in `main()` and passed down; nothing
else reads the environment. The chart sets these variables on the operator's Deployment; each
field's description is the documentation, and `datapin-operator settings` prints them.

Three groups:

* *Where we run*: the operator's own namespace (node agents, their prefetch list and their
  credentials live there), how to reach the API server (in-cluster, a kubeconfig, or a bare
  URL for tests), and how the webhook is served (`cluster`: behind a Service with a certificate
  from files; `dev`: on 127.0.0.1 with a self-signed certificate and a webhook configuration
  pointing at that URL, for running from a laptop against any cluster).
* *What we inject*: the default mode (csi), the sidecar's image, resources and security
  context, the node volume's hostPath, the link mode, and the defaults of the annotation
  contract.
* *How often*: resync and git timings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

from datapin_sidecar.node.settings import problems
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from datapin_operator.errors import SettingsError
from datapin_operator.webhook.requests import Mode

ENV_PREFIX: Final = "DATAPIN_"
_PORT_MAX: Final = 65535

# One factory per family of fields, so each declaration reads as default, bounds, meaning.


def _unset(what: str) -> Any:
    """An optional setting, unset unless given."""
    return Field(default=None, description=what)


def _name(default: str, what: str) -> Any:
    """The name of a Kubernetes object the operator uses or serves."""
    return Field(default=default, description=what)


def _path(default: str, what: str) -> Any:
    """An absolute path on a node or in a container (normalised by `Settings._absolute`)."""
    return Field(default=default, description=what)


def _port(default: int, what: str, *, lowest: int = 1) -> Any:
    """A TCP port; `lowest=0` where 0 means "none" or "any free port"."""
    return Field(default=default, ge=lowest, le=_PORT_MAX, description=what)


def _whole(default: int, what: str, *, at_least: int) -> Any:
    """A whole number (days, seconds, an id) with a lower bound."""
    return Field(default=default, ge=at_least, description=what)


def _seconds(default: float, what: str, *, at_most: float | None = None) -> Any:
    """A positive duration in seconds, bounded above where a longer one makes no sense."""
    return Field(default=default, gt=0, le=at_most, description=what)


class Settings(BaseSettings):
    """Everything `datapin-operator` reads from its environment (prefix `DATAPIN_`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # -- where we run -------------------------------------------------------------------------
    namespace: str = _name(
        "datapin",
        "The operator's namespace: node agents, their prefetch list and their "
        "credentials Secret live here.",
    )
    api_server: str | None = _unset(
        "Talk to this API server URL without authentication (tests against a "
        "local emulator). Unset: in-cluster config, else the kubeconfig.",
    )
    kubeconfig: Path | None = _unset("Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
    context: str | None = _unset("Kubeconfig context.")
    webhook_mode: Literal["cluster", "dev", "off"] = Field(
        default="cluster",
        description="cluster: serve on 0.0.0.0 behind the webhook Service with the certificate "
        "files below; dev: serve on webhook_host with a self-signed certificate and register a "
        "webhook configuration with that URL; off: no webhook.",
    )
    webhook_host: str = Field(
        default="127.0.0.1", description="dev mode: the address to serve on and register."
    )
    webhook_port: int = _port(9443, "0: any free port.", lowest=0)
    webhook_service: str = _name("datapin-webhook", "cluster mode: the webhook Service's name.")
    webhook_cert_file: Path | None = _unset(
        "cluster mode: TLS certificate (PEM), e.g. from cert-manager; unset: the "
        "self-signed certificate in webhook_tls_secret.",
    )
    webhook_key_file: Path | None = _unset("cluster mode: TLS private key (PEM).")
    webhook_ca_file: Path | None = _unset(
        "CA bundle for the webhook configuration (default: the cert)."
    )
    webhook_tls_secret: str = _name(
        "datapin-webhook-tls",
        "cluster mode without certificate files: the Secret (operator namespace) "
        "holding the self-signed certificate every replica serves. The operator creates it, "
        "renews it webhook_renew_days before it expires and keeps the caBundle of "
        "webhook_configuration current.",
    )
    webhook_cert_days: int = _whole(
        365, "Validity of a self-signed webhook certificate (days).", at_least=2
    )
    webhook_renew_days: int = _whole(
        30,
        "Renew the self-signed certificate this long before it "
        "expires; old and new are both in the caBundle until the old one expires.",
        at_least=1,
    )
    webhook_cert_dir: Path = Field(
        default=Path("/tmp/datapin-webhook"),  # noqa: S108 - an emptyDir in the chart
        description="Where the self-signed certificate files are written for the server.",
    )
    webhook_tls_check_seconds: float = _seconds(
        300.0, "How often the certificate Secret is re-read."
    )
    webhook_configuration: str = _name(
        "datapin.dev",
        "Name of the MutatingWebhookConfiguration the operator keeps current.",
    )
    pod_failure_policy: Literal["Fail", "Ignore"] = Field(
        default="Ignore",
        description="Webhook failurePolicy for Pods. Jobs always Fail; Pods default to Ignore "
        "so an operator outage cannot stop every Pod in the cluster from being created (Pods "
        "of admitted Jobs already carry the sidecar).",
    )

    peering: str | None = _unset(
        "Name of the ClusterKopfPeering the replicas elect a leader in (the chart "
        "sets it when operator.replicas > 1). Unset: standalone, a single replica.",
    )
    health_port: int = _port(
        0,
        "Port of kopf's liveness endpoint /healthz on 0.0.0.0 (the chart sets 8080); 0: none.",
        lowest=0,
    )
    metrics_port: int = _port(
        0,
        "Port of the operator's Prometheus /metrics (the chart sets 8081): on 0.0.0.0 in "
        "cluster mode, on webhook_host in dev mode; 0: none.",
        lowest=0,
    )

    # -- what we inject -----------------------------------------------------------------------
    sidecar_image: str = Field(
        default="ghcr.io/datapin/datapin:0.1.0", description="Image of the sidecar."
    )
    sidecar_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="imagePullPolicy of the sidecar."
    )
    node_path: str = _path(
        "/var/lib/datapin",
        "hostPath of the node volume (an XFS with reflink=1, prepared on every "
        "node that runs datapin pods).",
    )
    sidecar_root: str = _path("/datapin", "Where the sidecar mounts the node volume.")
    link: Literal["auto", "reflink", "hardlink", "copy"] = Field(
        default="auto",
        description="How the sidecar makes files from cache objects. Writable mounts need "
        "reflink or copy (see docs/architecture.md, the read-only rule).",
    )
    sidecar_cpu_request: str = Field(default="100m", description="Sidecar CPU request.")
    sidecar_memory_request: str = Field(default="128Mi", description="Sidecar memory request.")
    sidecar_cpu_limit: str | None = _unset("Sidecar CPU limit.")
    sidecar_memory_limit: str = Field(default="1Gi", description="Sidecar memory limit.")
    sidecar_user: int = _whole(
        65532, "UID (and GID) the sidecar runs as; owns the volume.", at_least=1
    )
    sidecar_port: int = _port(9479, "The sidecar's /readyz and /metrics port.")
    startup_timeout_seconds: int = _whole(
        3600,
        "How long the native sidecar may take to publish before kubelet restarts "
        "it (startupProbe failureThreshold x periodSeconds).",
        at_least=10,
    )
    default_mode: Mode = Field(
        default="csi",
        description="datapin.dev/mode of pods that do not set it: csi (a csi volume served by "
        "the node plugin; needs the chart's csi.enabled), sidecar or init (both mount the node "
        "volume as a hostPath, so the namespace must allow privileged pods).",
    )
    mount_root: str = _path(
        "/data",
        "Default mount path of a dataset in app containers: MOUNT_ROOT/<dataset>.",
    )
    prefer_warm_nodes: bool = Field(
        default=True,
        description="Give admitted pods a preferred node affinity toward the nodes whose "
        "agents report their pinned revisions warm (Dataset status.prefetch). Preferred only: "
        "it never keeps a pod from being scheduled.",
    )
    warm_node_weight: int = Field(
        default=50,
        ge=1,
        le=100,
        description="Weight (1-100) of that preference, split over a pod's datasets: datapin "
        "never adds more than this to a node's score, so the pod's own preferences still count.",
    )

    # -- agents and timings -------------------------------------------------------------------
    agent_selector: str = Field(
        default="app.kubernetes.io/name=datapin,app.kubernetes.io/component=agent",
        description="Label selector of the node agent pods in the operator's namespace.",
    )
    agent_port: int = _port(9479, "Agents' /status port.")
    prefetch_configmap: str = _name(
        "datapin-prefetch",
        "ConfigMap of per-node prefetch lists (key <node>.json) the agents mount.",
    )
    agent_credentials_secret: str = _name(
        "datapin-agent-credentials",
        "Secret the operator fills with the keys of prefetched Datasets.",
    )
    agent_credentials_dir: str = _path(
        "/etc/datapin/credentials",
        "Where the agents mount agent_credentials_secret.",
    )
    resync_seconds: float = _seconds(60.0, "How often Datasets are re-checked.")
    prefetch_poll_seconds: float = _seconds(
        5.0,
        "While a Dataset's prefetch is not warm, how soon the agents' reports are "
        "read again (doubling while nothing changes, up to 15 s), so warm shows within seconds "
        "rather than at the next resync.",
        at_most=60,
    )
    prefetch_watch_seconds: float = _seconds(
        900.0,
        "How long after a prefetch list is written that polling goes on; after "
        "that a prefetch still copying is reported at each resync.",
        at_most=86400,
    )
    remote_timeout_seconds: float = _seconds(10.0, "Timeout of one remote check request.")
    part_index_dir: Path = Field(
        default=Path("/tmp/datapin-parts"),  # noqa: S108 - an emptyDir in the chart
        description="Where a pin's .dir is downloaded to check the folders a Job asks for "
        "(datapin.dev/path); removed once parsed.",
    )
    part_index_cache_mib: int = _whole(
        64,
        "Memory for the folder indexes of pins read to check datapin.dev/path (least "
        "recently used dropped first); about 8 bytes per file of a revision.",
        at_least=1,
    )
    part_index_max_dir_mib: int = _whole(
        128,
        "The largest .dir (a revision's list of files) read to check datapin.dev/path; "
        "reading takes about twice its size in memory. Jobs naming folders of a larger "
        "revision are refused with this setting as the fix.",
        at_least=1,
    )
    part_index_wait_seconds: float = _seconds(
        8.0,
        "How long an admission waits for a pin's .dir to be read (keep it below the webhook's "
        "timeoutSeconds); a longer read goes on and the Job is refused with 'apply again'.",
        at_most=30,
    )
    git_cache_dir: Path = Field(
        default=Path("/tmp/datapin-git"),  # noqa: S108 - an emptyDir in the chart
        description="Where bare clones of DVC repositories are cached.",
    )
    git_timeout_seconds: float = _seconds(60.0, "Timeout of one git call.")
    git_ref_ttl_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a tag/branch -> commit answer is reused. Admitted Jobs keep "
        "their pins forever; this only bounds how fast a moved tag reaches new Jobs.",
    )
    git_allow_protocols: list[Literal["https", "http", "ssh", "git", "file"]] = Field(
        default=["https", "http", "ssh", "git"],
        description="git transports a Dataset's spec.source.repo may use. `file` lets "
        "Dataset authors read repositories on the operator's own filesystem: enable it only "
        "for local development and tests.",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: JSON lines unless stderr is a TTY."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")

    @field_validator("node_path", "sidecar_root", "mount_root", "agent_credentials_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "/../" in f"{value}/":
            raise ValueError("must be an absolute path without '..'")
        return value.rstrip("/") or "/"

    @model_validator(mode="after")
    def _renewal(self) -> Settings:
        if self.webhook_renew_days >= self.webhook_cert_days:
            raise ValueError(
                f"DATAPIN_WEBHOOK_RENEW_DAYS ({self.webhook_renew_days}) must be below "
                f"DATAPIN_WEBHOOK_CERT_DAYS ({self.webhook_cert_days}), or the certificate "
                "would be renewed on every check"
            )
        return self

    @property
    def startup_failure_threshold(self) -> int:
        return -(-self.startup_timeout_seconds // STARTUP_PERIOD_SECONDS)


#: The native sidecar's startupProbe period: short, so a warm start is seen within 1 s.
STARTUP_PERIOD_SECONDS: Final = 1


def load_settings(**overrides: Any) -> Settings:
    """Build `Settings` from the environment; raise `SettingsError` naming each bad field."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError("\n".join(problems(exc, env_prefix=ENV_PREFIX))) from None


def describe() -> str:
    """Every setting with its default and description (`datapin-operator settings`)."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(unset)" if default is None else str(default)
        lines.append(f"{ENV_PREFIX}{name.upper()}  default: {shown}\n    {field.description}")
    return "\n".join(lines) + "\n"
