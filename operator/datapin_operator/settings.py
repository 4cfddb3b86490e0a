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
* *What we inject*: the sidecar's image, resources and security context, the node volume's
  hostPath, the link mode, and the defaults of the annotation contract.
* *How often*: resync and git timings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

from datapin_sidecar.node.settings import problems
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from datapin_operator.errors import SettingsError

ENV_PREFIX: Final = "DATAPIN_"


class Settings(BaseSettings):
    """Everything `datapin-operator` reads from its environment (prefix `DATAPIN_`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # -- where we run -------------------------------------------------------------------------
    namespace: str = Field(
        default="datapin",
        description="The operator's namespace: node agents, their prefetch list and their "
        "credentials Secret live here.",
    )
    api_server: str | None = Field(
        default=None,
        description="Talk to this API server URL without authentication (tests against a "
        "local emulator). Unset: in-cluster config, else the kubeconfig.",
    )
    kubeconfig: Path | None = Field(
        default=None, description="Kubeconfig file (default: $KUBECONFIG or ~/.kube/config)."
    )
    context: str | None = Field(default=None, description="Kubeconfig context.")
    webhook_mode: Literal["cluster", "dev", "off"] = Field(
        default="cluster",
        description="cluster: serve on 0.0.0.0 behind the webhook Service with the certificate "
        "files below; dev: serve on webhook_host with a self-signed certificate and register a "
        "webhook configuration with that URL; off: no webhook.",
    )
    webhook_host: str = Field(
        default="127.0.0.1", description="dev mode: the address to serve on and register."
    )
    webhook_port: int = Field(default=9443, ge=0, le=65535, description="0: any free port.")
    webhook_service: str = Field(
        default="datapin-webhook", description="cluster mode: the webhook Service's name."
    )
    webhook_cert_file: Path | None = Field(
        default=None,
        description="cluster mode: TLS certificate (PEM), e.g. from cert-manager; unset: the "
        "self-signed certificate in webhook_tls_secret.",
    )
    webhook_key_file: Path | None = Field(
        default=None, description="cluster mode: TLS private key (PEM)."
    )
    webhook_ca_file: Path | None = Field(
        default=None, description="CA bundle for the webhook configuration (default: the cert)."
    )
    webhook_tls_secret: str = Field(
        default="datapin-webhook-tls",
        description="cluster mode without certificate files: the Secret (operator namespace) "
        "holding the self-signed certificate every replica serves. The operator creates it, "
        "renews it webhook_renew_days before it expires and keeps the caBundle of "
        "webhook_configuration current.",
    )
    webhook_cert_days: int = Field(
        default=365, ge=2, description="Validity of a self-signed webhook certificate (days)."
    )
    webhook_renew_days: int = Field(
        default=30,
        ge=1,
        description="Renew the self-signed certificate this long before it "
        "expires; old and new are both in the caBundle until the old one expires.",
    )
    webhook_cert_dir: Path = Field(
        default=Path("/tmp/datapin-webhook"),  # noqa: S108 - an emptyDir in the chart
        description="Where the self-signed certificate files are written for the server.",
    )
    webhook_tls_check_seconds: float = Field(
        default=300.0, gt=0, description="How often the certificate Secret is re-read."
    )
    webhook_configuration: str = Field(
        default="datapin.dev",
        description="Name of the MutatingWebhookConfiguration the operator keeps current.",
    )
    pod_failure_policy: Literal["Fail", "Ignore"] = Field(
        default="Ignore",
        description="Webhook failurePolicy for Pods. Jobs always Fail; Pods default to Ignore "
        "so an operator outage cannot stop every Pod in the cluster from being created (Pods "
        "of admitted Jobs already carry the sidecar).",
    )

    peering: str | None = Field(
        default=None,
        description="Name of the ClusterKopfPeering the replicas elect a leader in (the chart "
        "sets it when operator.replicas > 1). Unset: standalone, a single replica.",
    )
    health_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of kopf's liveness endpoint /healthz on 0.0.0.0 (the chart sets "
        "8080); 0: none.",
    )

    # -- what we inject -----------------------------------------------------------------------
    sidecar_image: str = Field(
        default="ghcr.io/datapin/datapin:0.1.0", description="Image of the sidecar."
    )
    sidecar_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="imagePullPolicy of the sidecar."
    )
    node_path: str = Field(
        default="/var/lib/datapin",
        description="hostPath of the node volume (an XFS with reflink=1, prepared on every "
        "node that runs datapin pods).",
    )
    sidecar_root: str = Field(
        default="/datapin", description="Where the sidecar mounts the node volume."
    )
    link: Literal["auto", "reflink", "hardlink", "copy"] = Field(
        default="auto",
        description="How the sidecar makes files from cache objects. Writable mounts need "
        "reflink or copy (see docs/architecture.md, the read-only rule).",
    )
    sidecar_cpu_request: str = Field(default="100m", description="Sidecar CPU request.")
    sidecar_memory_request: str = Field(default="128Mi", description="Sidecar memory request.")
    sidecar_cpu_limit: str | None = Field(default=None, description="Sidecar CPU limit.")
    sidecar_memory_limit: str = Field(default="1Gi", description="Sidecar memory limit.")
    sidecar_user: int = Field(
        default=65532, ge=1, description="UID (and GID) the sidecar runs as; owns the volume."
    )
    sidecar_port: int = Field(
        default=9479, ge=1, le=65535, description="The sidecar's /readyz and /metrics port."
    )
    startup_timeout_seconds: int = Field(
        default=3600,
        ge=10,
        description="How long the native sidecar may take to publish before kubelet restarts "
        "it (startupProbe failureThreshold x periodSeconds).",
    )
    mount_root: str = Field(
        default="/data",
        description="Default mount path of a dataset in app containers: MOUNT_ROOT/<dataset>.",
    )

    # -- agents and timings -------------------------------------------------------------------
    agent_selector: str = Field(
        default="app.kubernetes.io/name=datapin,app.kubernetes.io/component=agent",
        description="Label selector of the node agent pods in the operator's namespace.",
    )
    agent_port: int = Field(default=9479, ge=1, le=65535, description="Agents' /status port.")
    prefetch_configmap: str = Field(
        default="datapin-prefetch",
        description="ConfigMap of per-node prefetch lists (key <node>.json) the agents mount.",
    )
    agent_credentials_secret: str = Field(
        default="datapin-agent-credentials",
        description="Secret the operator fills with the keys of prefetched Datasets.",
    )
    agent_credentials_dir: str = Field(
        default="/etc/datapin/credentials",
        description="Where the agents mount agent_credentials_secret.",
    )
    resync_seconds: float = Field(
        default=60.0, gt=0, description="How often Datasets are re-checked."
    )
    prefetch_poll_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="While a Dataset's prefetch is not warm, how soon the agents' reports are "
        "read again (doubling while nothing changes, up to 15 s), so warm shows within seconds "
        "rather than at the next resync.",
    )
    prefetch_watch_seconds: float = Field(
        default=900.0,
        gt=0,
        le=86400,
        description="How long after a prefetch list is written that polling goes on; after "
        "that a prefetch still copying is reported at each resync.",
    )
    remote_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Timeout of one remote check request."
    )
    git_cache_dir: Path = Field(
        default=Path("/tmp/datapin-git"),  # noqa: S108 - an emptyDir in the chart
        description="Where bare clones of DVC repositories are cached.",
    )
    git_timeout_seconds: float = Field(default=60.0, gt=0, description="Timeout of one git call.")
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
