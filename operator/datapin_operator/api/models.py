"""The `Dataset` resource (`datapin.dev/v1alpha1`) as pydantic models: the one source of truth.

The CRD's OpenAPI schema is generated from these models (`crd.py`), and a test keeps the
committed CRD equal to the generated one, so the API server validates exactly what the
controllers parse. Field names are camelCase on the wire (Kubernetes convention) and snake_case
in Python; `extra="forbid"` makes a typo in a spec an error here as it is in the API server
(structural schemas prune unknown fields, so the two agree).

**Revisions with folders.** A named revision (`spec.revisions` value) and a prefetch entry
(`spec.prefetch.revisions`) may name part of a revision as `<revision>:<folders>`:
`golden: 3f0c...e1.dir:images/train`, `prefetch.revisions: [v2:images/train,images/val]`
(`split_revision`). No git ref (git forbids `:` in ref names), md5 or revision name holds a
`:`, so the first one separates the two without ambiguity, and the field stays a plain string:
a string-or-object union would not be a structural schema. The folders are checked here with
the sidecar's own `Part.parse`, so a spec the operator accepts names a part the agents can
serve.

The status is written by the operator only. Conditions follow the Kubernetes convention
(`type`, `status`, `reason`, `message`, `lastTransitionTime`, `observedGeneration`); the types
are `Ready`, `RemoteReachable`, `Resolved` and `Prefetched`.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import DatapinError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)
from pydantic.alias_generators import to_camel

GROUP: Final = "datapin.dev"
VERSION: Final = "v1alpha1"
PLURAL: Final = "datasets"
KIND: Final = "Dataset"

PIN_PATTERN: Final = r"^[0-9a-f]{32}\.dir$"
#: A pin, optionally with the folders of it that are meant: `<md5>.dir[:<folders>]`.
PIN_PART_PATTERN: Final = r"^[0-9a-f]{32}\.dir(:.+)?$"
_REVISION_NAME: Final = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_OBJECT_NAME: Final = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_DATA_KEY: Final = r"^[-._a-zA-Z0-9]+$"

Pin = Annotated[str, StringConstraints(pattern=PIN_PATTERN)]
PinPart = Annotated[str, StringConstraints(pattern=PIN_PART_PATTERN)]
#: `hashing.LayoutChoice`, schema'd as a plain string enum: the enum's docstring is for readers of
#: the code, and would otherwise become the description of every layout field in the CRD.
Layout = Annotated[
    LayoutChoice,
    WithJsonSchema({"type": "string", "enum": [choice.value for choice in LayoutChoice]}),
]
ConditionType = Literal["Ready", "RemoteReachable", "Resolved", "Prefetched"]
CONDITION_TYPES: Final[tuple[ConditionType, ...]] = (
    "Ready",
    "RemoteReachable",
    "Resolved",
    "Prefetched",
)


def split_revision(text: str, *, what: str = "revision") -> tuple[str, Part]:
    """`<revision>[:<folders>]` -> (revision, part). Raises `ValueError` for bad folders
    (`what` names the field in the message)."""
    revision, sep, folders = text.strip().partition(":")
    if not sep:
        return revision, Part.WHOLE
    if not folders.strip():
        raise ValueError(
            f"{what} {text!r} has a ':' but no folders after it. Fix: name folders "
            "(<revision>:images/train,images/val) or drop the ':'"
        )
    try:
        return revision, Part.parse([folders], what=f"{what} {text!r}: path")
    except DatapinError as exc:
        raise ValueError(str(exc)) from None


def join_revision(revision: str, part: Part) -> str:
    """The inverse of `split_revision`: `revision` alone for the whole of it."""
    return f"{revision}:{part.label}" if not part.whole else revision


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class CredentialsSecretRef(_Model):
    """The Secret holding the remote's keys, in the Dataset's namespace."""

    name: Annotated[str, Field(pattern=_OBJECT_NAME, max_length=253, description="Secret name.")]
    access_key_id_key: Annotated[
        str | None,
        Field(
            default=None,
            pattern=_DATA_KEY,
            description="Key of the access key id (default: the first present of "
            "AWS_ACCESS_KEY_ID, access_key_id, keyID, B2_APPLICATION_KEY_ID).",
        ),
    ] = None
    secret_access_key_key: Annotated[
        str | None,
        Field(
            default=None,
            pattern=_DATA_KEY,
            description="Key of the secret access key (default: the first present of "
            "AWS_SECRET_ACCESS_KEY, secret_access_key, applicationKey, B2_APPLICATION_KEY).",
        ),
    ] = None


class Remote(_Model):
    """Where the DVC remote lives: an S3-compatible bucket (Backblaze B2, AWS, MinIO, ...)."""

    url: Annotated[
        str,
        Field(
            pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
            description="The DVC remote URL, s3://BUCKET/PREFIX (the `url` of `dvc remote add`).",
        ),
    ]
    endpoint: Annotated[
        str | None,
        Field(
            default=None,
            pattern=r"^https?://",
            description="S3 endpoint URL, e.g. https://s3.us-west-002.backblazeb2.com "
            "(default: AWS).",
        ),
    ] = None
    region: Annotated[
        str | None,
        Field(default=None, description="SigV4 region (default: read from a B2/AWS endpoint)."),
    ] = None
    addressing: Annotated[
        Literal["auto", "path", "virtual"],
        Field(default="auto", description="Bucket addressing style."),
    ] = "auto"
    credentials_secret_ref: Annotated[
        CredentialsSecretRef,
        Field(description="The Secret with the keys (a B2 keyID/applicationKey pair)."),
    ]
    layout: Annotated[
        Layout,
        Field(
            default=LayoutChoice.AUTO,
            description="Cache layout of the pushed objects: dvc3 (files/md5/), legacy (DVC 2) "
            "or auto (dvc3, then legacy).",
        ),
    ] = LayoutChoice.AUTO


class GitSecretRef(_Model):
    """A Secret with git credentials: `username`+`password` (or a token) for https, or
    `ssh-privatekey` (and optionally `known_hosts`) for ssh."""

    name: Annotated[str, Field(pattern=_OBJECT_NAME, max_length=253, description="Secret name.")]


class Source(_Model):
    """The user's DVC repository, so revisions can be its tags, branches and commits."""

    repo: Annotated[
        str,
        Field(
            min_length=1,
            description="git URL of the DVC repository (https://, ssh://, git@host:path, file://).",
        ),
    ]
    path: Annotated[
        str,
        Field(
            min_length=1,
            description="The DVC target in the repository: `data.dvc`, `data.dvc:OUT` for a "
            ".dvc file with several outs, `dvc.lock:OUT` for a pipeline output, or `OUT` "
            "(its OUT.dvc, else dvc.lock).",
        ),
    ]
    credentials_secret_ref: Annotated[
        GitSecretRef | None,
        Field(default=None, description="Secret with git credentials (private repositories)."),
    ] = None


class Prefetch(_Model):
    """Revisions the node agents keep warm, and on which nodes."""

    revisions: Annotated[
        list[str],
        Field(
            default_factory=list,
            description="Revisions to keep in the node caches (any form a Job may name), "
            "each optionally with folders of it: <revision>:<folder>[,<folder>...] (e.g. "
            "v2:images/train) keeps only those folders warm.",
        ),
    ]

    @field_validator("revisions")
    @classmethod
    def _parts(cls, value: list[str]) -> list[str]:
        for entry in value:
            split_revision(entry, what="prefetch revision")
        return value

    node_selector: Annotated[
        dict[str, str],
        Field(
            default_factory=dict,
            description="Labels of the nodes to prefetch onto (default: every agent's node).",
        ),
    ]


class DatasetSpec(_Model):
    """What the user declares."""

    remote: Remote
    source: Annotated[
        Source | None,
        Field(default=None, description="The DVC repository revisions may be git refs of."),
    ] = None
    revisions: Annotated[
        dict[str, PinPart],
        Field(
            default_factory=dict,
            description="Named pins, name: <md5>.dir (the `md5` of a .dvc file's directory "
            "out), or <md5>.dir:<folder>[,<folder>...] for only those folders of it (e.g. "
            "3f0c...e1.dir:images/train).",
        ),
    ]
    prefetch: Annotated[
        Prefetch | None, Field(default=None, description="Revisions to keep warm on nodes.")
    ] = None

    @field_validator("revisions")
    @classmethod
    def _revision_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if not re.fullmatch(_REVISION_NAME, name)]
        if bad:
            raise ValueError(
                f"revision names {bad} must be letters, digits, '-', '_' and '.', and start "
                "and end with a letter or digit"
            )
        for name, pin in value.items():
            split_revision(pin, what=f"named revision {name!r}")
        return value


class Condition(_Model):
    """One condition, as in every Kubernetes status."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(description="CamelCase reason.")]
    message: Annotated[str, Field(default="", description="What is wrong and how to fix it.")] = ""
    last_transition_time: Annotated[
        str, Field(description="When the status last changed (RFC 3339).")
    ]
    observed_generation: Annotated[
        int | None, Field(default=None, description="The spec generation the condition is for.")
    ] = None


class ResolvedRevision(_Model):
    """How one named or prefetched revision resolved."""

    ref: Annotated[str, Field(description="What was asked for: a name, git ref or md5.")]
    pin: Pin
    path: Annotated[
        str | None,
        Field(
            default=None,
            description="The folders of the pin meant (comma-separated), when only part of "
            "it is: from a prefetch entry <revision>:<folders>, a named revision "
            "<md5>.dir:<folders>, or spec.source.path naming a folder inside an out.",
        ),
    ] = None
    layout: Layout = LayoutChoice.AUTO
    commit: Annotated[
        str | None, Field(default=None, description="The git commit, for git refs.")
    ] = None
    resolved_at: Annotated[str, Field(description="When it was resolved (RFC 3339).")]


class NodePrefetch(_Model):
    """One node agent's report."""

    node: str
    warm: Annotated[int, Field(ge=0, description="Revisions fully in the node's cache.")]
    total: Annotated[int, Field(ge=0, description="Revisions to prefetch on the node.")]
    failed: Annotated[
        list[str], Field(default_factory=list, description="Revisions that failed, with why.")
    ]
    warm_revisions: Annotated[
        list[PinPart],
        Field(
            default_factory=list,
            description="The pins fully in the node's cache (sorted): <md5>.dir for a whole "
            "revision, <md5>.dir:<folders> for part of one. The webhook prefers these nodes "
            "for Jobs pinned to them (or to folders of them).",
        ),
    ]


class PrefetchStatus(_Model):
    """Prefetch progress over the selected nodes."""

    summary: Annotated[str, Field(description='e.g. "3/4 nodes warm".')]
    warm_nodes: Annotated[int, Field(ge=0)]
    total_nodes: Annotated[int, Field(ge=0)]
    nodes: Annotated[list[NodePrefetch], Field(default_factory=list)]


class DatasetStatus(_Model):
    """What the operator reports."""

    observed_generation: Annotated[int | None, Field(default=None)] = None
    conditions: Annotated[list[Condition], Field(default_factory=list)]
    resolved: Annotated[
        list[ResolvedRevision],
        Field(default_factory=list, description="Named and prefetch revisions, resolved."),
    ]
    prefetch: Annotated[PrefetchStatus | None, Field(default=None)] = None


def dump(model: BaseModel) -> dict[str, object]:
    """A model as the API server stores it: camelCase, no nulls."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
