"""What a volume's Dataset says about its remote, read from the pod's own namespace.

The node plugin never trusts a pod's attributes for anything that decides access: the remote
(bucket, prefix, endpoint) and which Secret keys hold the keys come from the Dataset object
named by the volume, looked up in the namespace kubelet says the pod is in. A Dataset of
another namespace is simply not found there.

The Dataset's schema is the operator's (`datapin_operator.api.models.DatasetSpec`, which the
CRD is generated from). The agent reads only `spec.remote`, leniently (`extra="ignore"`: the
operator may add fields the agent does not need), and strictly where it matters (the URL must
be an `s3://` URL, the key names Secret key names). A test checks that everything the
operator's model accepts, this reader reads the same.

Keys: the Secret kubelet passed (`nodePublishSecretRef`) arrives as a map; `credentials`
picks the key id and secret by the Dataset's key names (or the default names, as the sidecar
does: `secretkeys`) and never shows a value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.errors import AccessRefusedError, BadVolumeError, Refusal, UsageError
from datapin_sidecar.remotes.credentials import Credentials, checked_credentials
from datapin_sidecar.remotes.endpoint import Addressing, RemoteConfig
from datapin_sidecar.remotes.secretkeys import (
    DEFAULT_ID_KEYS,
    DEFAULT_SECRET_KEYS,
    DEFAULT_TOKEN_KEYS,
    SECRET_KEY_NAME,
    first_present,
    key_names,
    shown_name,
)


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="ignore", frozen=True)


class _SecretRef(_Model):
    name: str = ""
    access_key_id_key: str | None = Field(default=None, pattern=SECRET_KEY_NAME.pattern)
    secret_access_key_key: str | None = Field(default=None, pattern=SECRET_KEY_NAME.pattern)


class _Remote(_Model):
    url: str = Field(pattern=r"^s3://")
    endpoint: str | None = None
    region: str | None = None
    addressing: Literal["auto", "path", "virtual"] = "auto"
    credentials_secret_ref: _SecretRef = _SecretRef()
    layout: LayoutChoice = LayoutChoice.AUTO


class _Spec(_Model):
    remote: _Remote


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetRemote:
    """A Dataset's remote, as the node plugin uses it."""

    namespace: str
    name: str
    config: RemoteConfig
    layout: LayoutChoice
    #: The Secret the Dataset names (for messages: kubelet does not say which Secret it read).
    secret_name: str
    id_keys: tuple[str, ...]
    secret_keys: tuple[str, ...]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> DatasetRemote:
        """Read a Dataset object (as the API server returns it)."""
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        try:
            spec = _Spec.model_validate(obj.get("spec") or {})
            config = RemoteConfig.from_url(
                spec.remote.url,
                endpoint_url=spec.remote.endpoint,
                region=spec.remote.region,
                addressing=Addressing(spec.remote.addressing),
                remote_name=name,
            )
        except (ValidationError, ValueError, UsageError) as exc:
            raise BadVolumeError(
                f"Dataset {namespace}/{name}: spec.remote cannot be used ({_first(exc)}). "
                "Fix: correct the Dataset (the operator's Ready condition says what is wrong)"
            ) from None
        ref = spec.remote.credentials_secret_ref
        return cls(
            namespace=namespace,
            name=name,
            config=config,
            layout=spec.remote.layout,
            secret_name=ref.name,
            id_keys=key_names(ref.access_key_id_key, DEFAULT_ID_KEYS),
            secret_keys=key_names(ref.secret_access_key_key, DEFAULT_SECRET_KEYS),
        )

    def credentials(self, secrets: Mapping[str, str], *, pin: str = "") -> Credentials:
        """The keys in the Secret kubelet passed, by this Dataset's key names (`pin`: the
        volume's, for the messages)."""
        where = f"the Secret of Dataset {self.namespace}/{self.name}"
        volume = f"Dataset {self.namespace}/{self.name}" + (f" pin {pin}" if pin else "")
        if not secrets:
            raise AccessRefusedError(
                f"{volume}: kubelet passed no keys. Fix: the pod's "
                f"csi volume needs nodePublishSecretRef: {{name: {self.secret_name or '<secret>'}}}"
                " (the datapin webhook writes it from the Dataset)",
                refusal=Refusal.NO_CREDENTIALS,
            )
        id_key = first_present(secrets, self.id_keys)
        secret_key = first_present(secrets, self.secret_keys)
        if id_key is None or secret_key is None:
            lacking = self.id_keys if id_key is None else self.secret_keys
            raise AccessRefusedError(
                f"{volume}: {where} has none of the keys "
                f"{', '.join(shown_name(k) for k in lacking)}. Fix: put the S3 keys in the "
                f"Secret {self.secret_name!r}, or set spec.remote.credentialsSecretRef's key "
                "names to the keys it has",
                refusal=Refusal.NO_CREDENTIALS,
            )
        token_key = first_present(secrets, DEFAULT_TOKEN_KEYS)
        return checked_credentials(
            secrets[id_key].strip(),
            secrets[secret_key].strip(),
            secrets[token_key].strip() if token_key else None,
            where=where,
        )


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    return str(exc)
