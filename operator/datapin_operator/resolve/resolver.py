"""Turn the revision a user names for a Dataset into a pin (`<md5>.dir`): pure logic over git.

A revision is tried as, in this order:

1. a literal DVC directory id, `<32 hex>.dir`: that is the pin (any case; pins are written in
   lower case, as DVC writes them);
2. a named revision of the Dataset (`spec.revisions`);
3. a git ref of `spec.source.repo` (tag, branch, full or abbreviated commit sha), whose
   `spec.source.path` out at that commit is the pin (`GitSource`).

The order is a contract. A literal id cannot be anything else, and resolving it needs nothing
but the string. A name in `spec.revisions` that is also a git ref means the *named* one: the
Dataset's author wrote that mapping down on purpose, it cannot move when someone pushes a tag,
and it keeps working when the repository is unreachable. Git is asked only when `spec.source`
is set; otherwise the error lists the named revisions and says how to make the revision
resolvable.

Parts: a revision may stand for folders of a pin. A named revision written
`<md5>.dir:<folders>` resolves to the pin and that part; a git ref of a source whose
`spec.source.path` names a folder inside a directory out (`data.dvc:data/images/train`, or
`data/images/train` beside `data.dvc`) resolves to the out's pin and that folder, as
`dvc pull data/images/train` would take it. Never silently the whole: `Resolved.part` carries
it to the pins, and a Job's own `datapin.dev/path` on top of such a revision is refused by the
webhook (one revision, one place that says which folders).

Layouts: a git pin carries the layout its out records (`hash: md5` -> dvc3, none -> legacy),
which is what the materialiser must use; a literal or named pin has no such record, so it takes
`spec.remote.layout` (by default `auto`, which tries dvc3 then legacy).

Git credentials: a Dataset whose `spec.source.credentialsSecretRef` names a Secret is resolved
with the git credentials in it, read here (`resolve_in`, `resolve_many`), so the webhook and the
controller both just resolve. The Secret is read whenever the source names one, whatever the
revision, so a missing or empty git Secret is reported even while every revision is a pin.

Each resolve is timed by its kind and result, and each failure counted by reason, on the
`OperatorMetrics` the app factory injects (`datapin_operator_resolve_seconds`,
`datapin_operator_resolve_errors_total`): the webhook's and the controller's resolves alike.

Errors are `ResolutionError`s carrying `dataset=` and `revision=`, so the webhook's rejection
and the Dataset's conditions say which Dataset and which revision failed; an unreadable git
Secret is a `SecretError`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import UsageError

from datapin_operator.api.models import DatasetSpec, split_revision
from datapin_operator.errors import (
    OperatorError,
    PinReadError,
    ResolutionError,
    SecretError,
    UnknownRevisionError,
)
from datapin_operator.metrics import OperatorMetrics
from datapin_operator.resolve.gitsource import GitCredentials, GitSource
from datapin_operator.resolve.kinds import RevisionKind

__all__ = ["Resolved", "Resolver", "RevisionKind", "SecretReader", "git_credentials_from_secret"]

#: (namespace, name) -> the Secret's data as text, or None if it does not exist.
SecretReader = Callable[[str, str], Awaitable[Mapping[str, str] | None]]

_LITERAL_PIN: Final = re.compile(r"[0-9a-f]{32}\.dir", re.IGNORECASE)
_BARE_MD5: Final = re.compile(r"[0-9a-fA-F]{32}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """What a revision resolved to."""

    ref: str
    """What the user asked for (surrounding whitespace removed)."""
    pin: str
    """The directory object, `<md5>.dir`."""
    layout: LayoutChoice
    """named/literal: `spec.remote.layout`; git: the out's own layout (dvc3 or legacy)."""
    kind: RevisionKind
    commit: str | None = None
    """The commit, for git refs."""
    part: Part = Part.WHOLE
    """The folders of the pin the revision stands for (a named `<md5>.dir:<folders>`, or a
    source path inside an out); `Part.WHOLE` for all of it."""

    @property
    def part_source(self) -> str:
        """Where the part was said, for messages (empty for the whole pin)."""
        if self.part.whole:
            return ""
        if self.kind is RevisionKind.NAMED:
            return f"spec.revisions.{self.ref}"
        return "spec.source.path"


class Resolver:
    """Resolve a Dataset's revisions: literal pin, then named revision, then git ref."""

    def __init__(
        self, git: GitSource, *, secrets: SecretReader, metrics: OperatorMetrics | None = None
    ) -> None:
        self._git = git
        self._secrets = secrets
        self._metrics = metrics if metrics is not None else OperatorMetrics()

    async def resolve_in(
        self, namespace: str, *, dataset: str, spec: DatasetSpec, revision: str
    ) -> Resolved:
        """Resolve `revision` of the Dataset `namespace/dataset`, with its git Secret's
        credentials; raise a `ResolutionError`, or a `SecretError` for the git Secret."""
        credentials = await self.git_credentials(namespace, spec)
        return await self.resolve(
            dataset=dataset, spec=spec, revision=revision, git_credentials=credentials
        )

    async def resolve_many(
        self, namespace: str, *, dataset: str, spec: DatasetSpec, revisions: Sequence[str]
    ) -> tuple[dict[str, Resolved], list[OperatorError]]:
        """Resolve each of `revisions`: (what resolved by revision, every error).

        A bad git Secret is one error, and the revisions are still resolved without
        credentials (pins, named revisions and public repositories need none).
        """
        errors: list[OperatorError] = []
        if not revisions:
            return {}, errors
        credentials = None
        try:
            credentials = await self.git_credentials(namespace, spec)
        except SecretError as exc:
            errors.append(exc)
        resolved: dict[str, Resolved] = {}
        for revision in revisions:
            try:
                resolved[revision] = await self.resolve(
                    dataset=dataset, spec=spec, revision=revision, git_credentials=credentials
                )
            except ResolutionError as exc:
                errors.append(exc)
        return resolved, errors

    async def git_credentials(self, namespace: str, spec: DatasetSpec) -> GitCredentials | None:
        """The credentials in the git Secret `spec.source` names; None if it names none."""
        if spec.source is None or spec.source.credentials_secret_ref is None:
            return None
        name = spec.source.credentials_secret_ref.name
        return git_credentials_from_secret(
            await self._secrets(namespace, name), secret=name, namespace=namespace
        )

    async def resolve(
        self,
        *,
        dataset: str,
        spec: DatasetSpec,
        revision: str,
        git_credentials: GitCredentials | None = None,
    ) -> Resolved:
        """Resolve `revision` of `dataset` with `git_credentials` (none: anonymous git); raise
        a `ResolutionError` naming both. Timed by kind (`datapin_operator_resolve_seconds`)."""
        started = time.perf_counter()
        try:
            resolved = await self._resolve(
                dataset=dataset, spec=spec, revision=revision, git_credentials=git_credentials
            )
        except ResolutionError as exc:
            # Only git can fail as a kind: a pin or a name that resolves cannot fail.
            kind = None if isinstance(exc, UnknownRevisionError) else RevisionKind.GIT
            self._metrics.resolve_failed(exc, kind, seconds=time.perf_counter() - started)
            raise
        self._metrics.resolved(resolved.kind, seconds=time.perf_counter() - started)
        return resolved

    async def _resolve(
        self,
        *,
        dataset: str,
        spec: DatasetSpec,
        revision: str,
        git_credentials: GitCredentials | None,
    ) -> Resolved:
        ref = revision.strip()
        if not ref:
            raise UnknownRevisionError(
                "the revision is empty. Fix: name a revision in datapin.dev/revision: a named "
                f"revision ({_names(spec)}), a git tag, branch or commit of spec.source, or "
                "a `<md5>.dir` pin",
                dataset=dataset,
                revision=revision,
            )
        if _LITERAL_PIN.fullmatch(ref):
            return Resolved(
                ref=ref, pin=ref.lower(), layout=spec.remote.layout, kind=RevisionKind.PIN
            )
        named = spec.revisions.get(ref)
        if named is not None:
            # The models checked the folders when the spec was parsed.
            named_pin, part = split_revision(named)
            return Resolved(
                ref=ref,
                pin=named_pin,
                layout=spec.remote.layout,
                kind=RevisionKind.NAMED,
                part=part,
            )
        if spec.source is None:
            hint = (
                " (it looks like a DVC md5: a directory pin ends in `.dir`)"
                if _BARE_MD5.fullmatch(ref)
                else ""
            )
            raise UnknownRevisionError(
                f"{ref!r} is not a `<md5>.dir` pin nor a named revision of the Dataset (named "
                f"revisions: {_names(spec)}){hint}, and the Dataset has no spec.source to look "
                "git refs up in. Fix: add it to spec.revisions, or set spec.source (repo and "
                "path) so tags, branches and commits resolve",
                dataset=dataset,
                revision=revision,
            )
        try:
            pin = await self._git.resolve(
                repo=spec.source.repo,
                ref=ref,
                target=spec.source.path,
                credentials=git_credentials,
            )
        except ResolutionError as exc:
            # Same class (GitError, PinReadError), now saying which Dataset and revision.
            raise type(exc)(exc.message, dataset=dataset, revision=revision) from exc
        layout = LayoutChoice.of(pin.out.layout)
        part = Part.WHOLE
        if pin.out.within:
            try:
                part = Part.parse([pin.out.within], what="spec.source.path folder")
            except UsageError as exc:
                raise PinReadError(str(exc), dataset=dataset, revision=revision) from None
        return Resolved(
            ref=ref,
            pin=pin.out.revision.oid,
            layout=layout,
            kind=RevisionKind.GIT,
            commit=pin.commit,
            part=part,
        )


def git_credentials_from_secret(
    data: Mapping[str, str] | None, *, secret: str, namespace: str
) -> GitCredentials:
    """The git credentials in a Secret's data, or a `SecretError` naming what is missing."""
    fix = "`username` and `password` (or `token`) for https, or `ssh-privatekey` for ssh"
    if data is None:
        raise SecretError(
            secret=secret,
            namespace=namespace,
            problem="does not exist (spec.source.credentialsSecretRef names it)",
            fix=f"create it with {fix}",
        )
    credentials = GitCredentials.from_secret_data(data)
    if credentials.is_empty:
        raise SecretError(
            secret=secret,
            namespace=namespace,
            problem=f"has none of the keys {', '.join(GitCredentials.KEYS)}",
            fix=f"add {fix}",
        )
    return credentials


def _names(spec: DatasetSpec) -> str:
    return ", ".join(sorted(spec.revisions)) or "none"
