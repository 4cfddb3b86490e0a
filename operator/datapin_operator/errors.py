"""Every error the operator raises on purpose.

The hierarchy (in the style of httpx: one base, a branch per thing that went wrong)::

    OperatorError                       base; `reason` (named in each class line) is the
                                        Event/condition reason
    ├── SettingsError                   DATAPIN_* settings of the operator fail validation
    ├── BadSpecError                    a Dataset spec the API server took but the models refuse
    ├── RejectedError                   an object cannot be admitted (the webhook's answer)
    │   ├── AnnotationError             malformed `datapin.dev/*` annotations
    │   ├── UnknownDatasetError         the annotation names no Dataset in the namespace
    │   ├── MountCollisionError         a mount path or volume name is already taken
    │   └── SecretError                 a Secret a Dataset names is missing or lacks a key
    ├── ResolutionError                 a revision cannot be turned into a pin
    │   ├── UnknownRevisionError        not an md5, not a named revision, no git source
    │   ├── GitError                    git failed (unreachable, auth, unknown ref)
    │   ├── PinReadError                the `.dvc`/`dvc.lock` at that commit has no such out
    │   └── PartNotFoundError           folders asked for are not in the pin (or name a
    │                                   file, or a revision with folders gets more folders)
    ├── RemoteCheckError                the Dataset's remote cannot be reached or read
    └── AgentConfigError                the node agents' prefetch ConfigMap or credentials
                                        Secret cannot be written (or the agents listed)

    Conflict                            not a failure: an object changed (or appeared) since
                                        it was read (`kube.py`); the caller re-reads

Every message names the thing at fault and says how to fix it: the people reading them are
looking at `kubectl apply`'s output, `kubectl describe` and Events, not at our source. The
webhook answers any `OperatorError` with its message (a `ResolutionError` of a Job is a
rejection too); controllers turn `reason` into condition reasons and Event reasons, so the
reasons are CamelCase and stable. No message ever holds a Secret value: errors carry names of
Secrets and keys, and git's stderr is redacted before it is kept.
"""

from __future__ import annotations

from typing import Any


class OperatorError(Exception):
    """Base class: an error raised on purpose, with a message fit for users.

    Each subclass names its reason in its class line (`class GitError(ResolutionError,
    reason="GitFailed")`), so no error class can be declared without one."""

    reason = "Error"

    def __init_subclass__(cls, *, reason: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.reason = reason

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SettingsError(OperatorError, reason="BadSettings"):
    """The operator's `DATAPIN_*` settings fail validation: one line per bad field."""


class BadSpecError(OperatorError, reason="BadSpec"):
    """A spec the API server accepted but the models do not (a CRD older than the operator)."""


class RejectedError(OperatorError, reason="Rejected"):
    """An object the webhook must not admit."""


class AnnotationError(RejectedError, reason="BadAnnotation"):
    """A `datapin.dev/*` annotation is malformed, unknown or inconsistent."""

    def __init__(self, *, key: str, problem: str, fix: str) -> None:
        super().__init__(f"annotation {key}: {problem}. Fix: {fix}")
        self.key = key
        self.problem = problem


class UnknownDatasetError(RejectedError, reason="UnknownDataset"):
    """The annotations name a Dataset that does not exist in the object's namespace."""

    def __init__(self, *, dataset: str, namespace: str, known: list[str]) -> None:
        names = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"Dataset {dataset!r} does not exist in namespace {namespace!r} (Datasets there: "
            f"{names}). Fix: create it (kubectl apply -f dataset.yaml -n {namespace}) or name "
            "an existing one in datapin.dev/dataset"
        )
        self.dataset = dataset
        self.namespace = namespace


class MountCollisionError(RejectedError, reason="MountCollision"):
    """A dataset's mount path (or a volume/container name datapin needs) is already taken."""


class SecretError(RejectedError, reason="SecretNotFound"):
    """A Secret a Dataset names is missing, or lacks the keys it should hold."""

    def __init__(self, *, secret: str, namespace: str, problem: str, fix: str) -> None:
        super().__init__(f"Secret {namespace}/{secret}: {problem}. Fix: {fix}")
        self.secret = secret
        self.namespace = namespace


class ResolutionError(OperatorError, reason="Unresolvable"):
    """A revision cannot be resolved to a pin."""

    def __init__(self, message: str, *, dataset: str = "", revision: str = "") -> None:
        prefix = f"Dataset {dataset!r} revision {revision!r}: " if dataset else ""
        super().__init__(prefix + message)
        self.dataset = dataset
        self.revision = revision


class UnknownRevisionError(ResolutionError, reason="UnknownRevision"):
    """Not an md5, not a named revision of the Dataset, and no git source to ask."""


class GitError(ResolutionError, reason="GitFailed"):
    """git could not answer: the repository is unreachable, refuses us, or lacks the ref."""


class PinReadError(ResolutionError, reason="PinNotFound"):
    """The commit exists but its `.dvc` file or `dvc.lock` does not name the dataset's out."""


class PartNotFoundError(ResolutionError, reason="PathNotInRevision"):
    """The folders a revision is asked for cannot be served: one is not a folder of the pin
    (the sidecar's `PathNotInRevisionError` message, with the folders there are), or folders
    are asked of a revision that already stands for some."""


class RemoteCheckError(OperatorError, reason="RemoteUnreachable"):
    """The Dataset's remote cannot be reached, refuses the credentials, or lacks an object."""

    def __init__(self, message: str, *, reason: str = "RemoteUnreachable") -> None:
        super().__init__(message)
        self.reason = reason


class AgentConfigError(OperatorError, reason="AgentConfigFailed"):
    """The objects the node agents read (their prefetch ConfigMap, their credentials Secret)
    cannot be written, or the nodes and agents cannot be listed. Only Datasets that ask for
    prefetch report it (as `Prefetched=False`); everything else in their status still holds."""


class Conflict(Exception):  # noqa: N818 - a condition callers branch on, not a failure
    """The object changed (or appeared) since it was read: re-read and decide again."""
