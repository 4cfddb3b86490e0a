"""Every error datapin raises on purpose, and the exit code each maps to.

The hierarchy (in the style of httpx: one base, a branch per thing that went wrong)::

    DatapinError                      exit 1 unless a subclass says otherwise
    ├── UsageError                    2  a bad argument or option value
    │   ├── BadSettingsError          2  DATAPIN_* settings that fail validation
    │   ├── AnnotationsError          2  the pod's annotations file cannot be read or parsed
    │   └── NoCredentialsError        2  a credential source has no S3 keys at all
    │                                    (a chain of sources moves on to the next)
    ├── RevisionError                 3  the revision the user named cannot be read
    │   ├── ManifestError             3  a `.dir`/`.dvc`/`dvc.lock` is malformed or unsafe
    │   └── PathNotInRevisionError    3  a part's folder is not in the revision (or is a
    │                                    file); lists the folders that are
    ├── ObjectsMissingError           4  objects are in neither the node cache nor the remote
    ├── CorruptObjectError            5  objects fail their md5 and cannot be repaired
    ├── DestinationError              6  the destination cannot take the tree
    │   │                                (not ours, read-only, no space, permission)
    │   └── MountError                6  a mount(2)/umount2(2) of the node plugin failed
    │                                    (`csi.mounts`); names the call, the paths, errno
    ├── LinkError                     7  the requested link strategy is impossible here
    ├── RemoteError                   8  the remote cannot be read; `cause` says why
    │                                    (a `RemoteCause`: metrics label, transient or not)
    ├── StoppedError                143  SIGTERM arrived before the work was done
    ├── KubeApiError                     the agent's API request failed (status, message)
    └── VolumeError                      a CSI request (kubelet's NodePublishVolume) refused;
        │                                `refusal` (a `Refusal`) is the metrics label and
        │                                decides the gRPC code
        ├── BadVolumeError               the volume's attributes, id or target are invalid
        │   └── VolumeConflictError      the volume id is already published for another
        │                                    request (CSI: ALREADY_EXISTS)
        ├── DatasetNotFoundError         no such Dataset in the pod's own namespace
        └── AccessRefusedError           the request's own keys and remote do not prove
                                         access to the pin (see `csi.access`)

    OSError
    └── UnsafeFileError                  a path someone else controls is a symlink, FIFO,
                                         device or oversized file where ours should be
                                         (`safefs`); handled like a damaged file, never
                                         followed, opened or read whole

    RemoteSignal                         what a request or object came to, from the S3
    │                                    client to its fetch; never reaches a user
    ├── HTTPStatusError                  a non-success answer (status, S3 code, Retry-After)
    ├── TruncatedError                   a body shorter than announced (retried)
    ├── BadBodyError                     a body longer than announced, or another range
    ├── AbsentError                      the remote lacks the object (`FetchReport.absent`)
    ├── GaveUpError                      still failing after every attempt
    └── Md5MismatchError                 the bytes fail their md5 (fetched again, whole)

Every message names the thing at fault and says how to fix it, because the people reading it
are looking at `kubectl describe pod`, not at our source. Values are keyword-only so a raise
site reads as a sentence, and the structured fields stay available to callers (the CLI, the
sidecar's termination message, metrics by reason) without parsing the text.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from enum import StrEnum
from typing import Final

#: How many object ids an error lists before it says "and N more".
_SHOWN = 5
#: How many characters of a value or line a message quotes.
SNIPPET_CHARS = 60


def _some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = len(items) - _SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


class DatapinError(Exception):
    """Base class: an error we raise on purpose, with a message fit for users."""

    exit_code = 1
    #: A short stable label for metrics and logs (`fetch_errors_total{reason=...}`).
    reason = "error"


class UsageError(DatapinError):
    """A bad argument or option value."""

    exit_code = 2
    reason = "usage"


class BadSettingsError(UsageError):
    """`DATAPIN_*` settings failed validation: one line per bad field."""

    reason = "settings"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(
            "bad settings (fix the environment variables; `datapin-sidecar settings` lists "
            "them all):\n" + "\n".join(f"  {p}" for p in problems)
        )


class AnnotationsError(UsageError):
    """The pod's annotations do not say what to serve: a bad file, no pins, or a bad pin.

    `source` is the file or annotation, `line`/`dataset` where in it, `problem` what is wrong,
    `annotation` the annotation at fault when it is one (`datapin.dev/pins` or `.../commits`).
    """

    reason = "annotations"

    def __init__(
        self,
        *,
        source: str,
        problem: str,
        fix: str,
        line: int | None = None,
        dataset: str | None = None,
        annotation: str | None = None,
    ) -> None:
        self.source = source
        self.annotation = annotation
        self.problem = problem
        self.line = line
        self.dataset = dataset
        where = f" line {line}" if line is not None else ""
        where += f" dataset {snippet(dataset)}" if dataset is not None else ""
        super().__init__(f"{source}{where}: {problem}. Fix: {fix}")


def snippet(text: str) -> str:
    """`text` quoted for a message, cut to its first characters if it is long.

    Some values are huge (`kubectl.kubernetes.io/last-applied-configuration` holds a whole
    pod spec), and a message is read in `kubectl describe`.
    """
    if len(text) <= SNIPPET_CHARS:
        return repr(text)
    return f"{text[:SNIPPET_CHARS]!r}... ({len(text)} characters)"


#: The fix for "no S3 keys anywhere", in the words of the two places users put them.
S3_KEYS_FIX: Final = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to the application key's keyID and "
    "applicationKey (Backblaze B2) or an access key (AWS), or mount a Secret created with "
    "`kubectl create secret generic datapin-s3 --from-literal=AWS_ACCESS_KEY_ID=<keyID> "
    "--from-literal=AWS_SECRET_ACCESS_KEY=<applicationKey>`"
)


class NoCredentialsError(UsageError):
    """A credential source has nothing configured (not even half of a key pair).

    Distinct from a plain `UsageError`, which a source raises for something half configured:
    `ChainCredentials` skips a source raising this one and stops at any other error.
    """

    reason = "credentials"

    def __init__(self, *, source: str, looked: str, fix: str = S3_KEYS_FIX) -> None:
        self.source = source
        self.looked = looked
        super().__init__(f"no S3 credentials in {source}: {looked}. Fix: {fix}")


class RevisionError(DatapinError):
    """The revision named cannot be resolved or read."""

    exit_code = 3
    reason = "revision"


class ManifestError(RevisionError):
    """A DVC manifest (`.dir`), `.dvc` file or `dvc.lock` is malformed or unsafe."""

    reason = "manifest"

    def __init__(self, *, manifest: str, problem: str, entry: str | None = None) -> None:
        self.manifest = manifest
        self.entry = entry
        self.problem = problem
        where = f"entry {entry}: " if entry is not None else ""
        super().__init__(
            f"invalid DVC manifest {manifest}: {where}{problem}. "
            "Fix: regenerate it with `dvc add`/`dvc commit` (a hand-edited or truncated "
            "manifest cannot be materialised safely)"
        )


class PathNotInRevisionError(RevisionError):
    """A folder a part names (`engine.part`) is not in the revision, or names a file."""

    reason = "path"

    def __init__(
        self,
        *,
        revision: str,
        path: str,
        is_file: bool,
        parent: str,
        siblings: Sequence[str],
        top: Sequence[str],
    ) -> None:
        self.revision = revision
        self.path = path
        self.is_file = is_file
        self.top = tuple(top)
        if is_file:
            problem = f"path {path!r} is a file in revision {revision}, not a folder"
            folder = path.rpartition("/")[0]
            fix = (
                f"name its folder ({folder!r})"
                if folder
                else "leave the path out to get the whole revision"
            )
            fix += "; a part is one or more folders"
        else:
            problem = f"revision {revision} has no folder {path!r}"
            fix = "name one of the revision's folders"
        hints = []
        if parent:
            inside = ", ".join(siblings) or "no folders, only files"
            hints.append(f"{parent!r} holds: {inside}")
        top_text = ", ".join(top) or "none (it holds only files: leave the path out)"
        hints.append(f"its top-level folders are: {top_text}")
        super().__init__(f"{problem}; {'; '.join(hints)}. Fix: {fix}")


class ObjectsMissingError(DatapinError):
    """Objects a revision needs are in neither the node cache nor the remote."""

    exit_code = 4
    reason = "missing"

    def __init__(
        self, *, oids: Sequence[str], cache: str, remote: str | None, keys: Sequence[str] = ()
    ) -> None:
        self.oids = tuple(oids)
        self.cache = cache
        self.remote = remote
        self.keys = tuple(keys)
        where = f"node cache {cache}" + (f" nor remote {remote}" if remote else "")
        fix = (
            "run `dvc push` for this revision from the repository that made it (and check "
            "that the remote URL and layout are the ones it pushed to)"
            if remote
            else "pass --remote with the DVC remote that holds them, or `dvc push` them"
        )
        looked = f" (looked for {_some(self.keys)})" if self.keys else ""
        super().__init__(
            f"{len(self.oids)} object(s) not found in {where}: {_some(self.oids)}{looked}. "
            f"Fix: {fix}"
        )


class CorruptObjectError(DatapinError):
    """Objects fail their md5 check and no remote could supply a good copy."""

    exit_code = 5
    reason = "corrupt"

    def __init__(
        self,
        *,
        oids: Sequence[str],
        cache: str,
        detail: str = "",
        remote: str | None = None,
        keys: Sequence[str] = (),
    ) -> None:
        self.oids = tuple(oids)
        self.cache = cache
        self.remote = remote
        self.keys = tuple(keys)
        if remote is not None:
            # Fetched bytes that fail their md5 never enter the cache: nothing to quarantine.
            looked = f" ({_some(self.keys)})" if self.keys else ""
            super().__init__(
                f"{len(self.oids)} object(s) from remote {remote} fail their md5 on every "
                f"download: {_some(self.oids)}{looked}. They were not cached or linked. Fix: "
                "`dvc push` them again from a clean cache (`dvc cache` objects that hash to "
                "their names), or check what rewrites them in transit (a proxy)"
            )
            return
        super().__init__(
            f"{len(self.oids)} corrupt object(s) in {cache}: {_some(self.oids)} ({detail}). "
            "They were moved to quarantine and not linked. Fix: pass --remote to fetch good "
            "copies, or `dvc push` them again from a clean cache"
        )


class DestinationError(DatapinError):
    """The destination cannot take the tree: not ours, read-only, full, or not permitted."""

    exit_code = 6
    reason = "destination"

    def __init__(self, *, dest: str, problem: str, fix: str) -> None:
        self.dest = dest
        self.problem = problem
        super().__init__(f"destination {dest}: {problem}. Fix: {fix}")


class MountError(DestinationError):
    """A mount(2) or umount2(2) the node plugin made failed; `code` is the kernel's errno."""

    reason = "mount"

    def __init__(self, *, call: str, path: str, code: int, fix: str) -> None:
        self.call = call
        self.code = code
        name = errno.errorcode.get(code, str(code))
        super().__init__(dest=path, problem=f"{call} failed: {name} ({os.strerror(code)})", fix=fix)


class LinkError(DatapinError):
    """The requested link strategy cannot work between the cache and the destination."""

    exit_code = 7
    reason = "link"

    def __init__(self, *, strategy: str, cache: str, dest: str, detail: str) -> None:
        self.strategy = strategy
        super().__init__(
            f"--link {strategy} is not possible from cache {cache} to destination {dest} "
            f"({detail}). Fix: use --link auto, or put both on one XFS volume made with "
            "`mkfs.xfs -m reflink=1`"
        )


class RemoteCause(StrEnum):
    """Why a remote could not be read: the one list of causes a `RemoteError` carries.

    Each cause says whether it is *transient* (the sidecar retries it with backoff before its
    first publish; any other error is permanent) and whether it is *labelled* (its own value of
    the `reason` label of `datapin_fetch_errors_total`, created at zero for every dataset; the
    others count as `remote`). The values are the label values: a public contract.
    """

    UNREACHABLE = "unreachable"
    ACCESS_DENIED = "access_denied"
    NO_BUCKET = "no_bucket"
    REGION = "region"
    TLS = "tls"
    GAVE_UP = "gave_up"
    WAIT_TIMEOUT = "wait_timeout"
    #: Anything else the server refused (an S3 error code we have no cause for).
    REMOTE = "remote"
    UNREADABLE = "unreadable"  # a directory remote datapin cannot read
    TOO_LARGE = "too_large"  # a `.dir` over `MAX_DIR_BYTES`
    BAD_SIZE = "bad_size"  # a size no S3 object can have
    MEMORY = "memory"

    @property
    def transient(self) -> bool:
        """Whether waiting may fix it (network, load, another process's download)."""
        return self in _TRANSIENT_CAUSES

    @property
    def labelled(self) -> bool:
        """Whether it is a `reason` label value of its own (else it counts as `remote`)."""
        return self not in _UNLABELLED_CAUSES


_TRANSIENT_CAUSES: Final = frozenset(
    {RemoteCause.UNREACHABLE, RemoteCause.GAVE_UP, RemoteCause.WAIT_TIMEOUT, RemoteCause.TLS}
)
_UNLABELLED_CAUSES: Final = frozenset(
    {RemoteCause.UNREADABLE, RemoteCause.TOO_LARGE, RemoteCause.BAD_SIZE, RemoteCause.MEMORY}
)


class RemoteError(DatapinError):
    """The remote cannot be read at all (as opposed to single objects missing from it)."""

    exit_code = 8
    reason = "remote"

    def __init__(
        self,
        *,
        remote: str,
        problem: str,
        fix: str,
        keys: Sequence[str] = (),
        cause: RemoteCause = RemoteCause.REMOTE,
    ) -> None:
        self.remote = remote
        self.problem = problem
        #: The object keys that failed (all of them; the message shows the first few).
        self.keys = tuple(keys)
        #: What failed, for metrics, retry decisions and tests; never contains request data.
        self.cause = cause
        some = f" ({len(self.keys)} object(s): {_some(self.keys)})" if self.keys else ""
        super().__init__(f"remote {remote}: {problem}{some}. Fix: {fix}")


class StoppedError(DatapinError):
    """The program was told to stop (SIGTERM) and cancelled the work in flight."""

    exit_code = 143
    reason = "stopped"

    def __init__(self) -> None:
        super().__init__("stopped by SIGTERM before the revision was published")


class KubeApiError(DatapinError):
    """A request of the node agent to the Kubernetes API failed (never shows the token)."""

    reason = "kube_api"

    def __init__(self, *, path: str, status: int, message: str) -> None:
        self.status = status
        fix = (
            "the chart grants the agent get/list/watch on pods and datasets; check its ClusterRole"
            if status in {401, 403}
            else "check the API server"
        )
        super().__init__(f"Kubernetes API {path}: {status} {message}. Fix: {fix}")


class Refusal(StrEnum):
    """Why the node plugin refused a volume: the `reason` label of
    `datapin_csi_refusals_total` (a public contract) and what decides the gRPC code."""

    BAD_VOLUME = "bad_volume"  # attributes, volume id or target path invalid
    NO_DATASET = "no_dataset"  # no such Dataset in the pod's namespace
    NO_CREDENTIALS = "no_credentials"  # kubelet passed no keys (no nodePublishSecretRef)
    WRONG_KEYS = "wrong_keys"  # the remote refused the request's keys
    NOT_ON_REMOTE = "not_on_remote"  # the request's remote does not hold the pin's `.dir`
    OBJECTS_NOT_ON_REMOTE = "objects_not_on_remote"  # ...or not every object it names


class VolumeError(DatapinError):
    """A CSI volume request the node plugin refuses; the message names the dataset, the pin
    and the fix (kubelet shows it in the pod's Events and retries)."""

    reason = "volume"

    def __init__(self, message: str, *, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(message)


class BadVolumeError(VolumeError):
    """The request's volume attributes, volume id or target path are invalid."""

    def __init__(self, message: str) -> None:
        super().__init__(message, refusal=Refusal.BAD_VOLUME)


class VolumeConflictError(BadVolumeError):
    """The volume id is already published for a different request (another target, pod,
    dataset or mode): kubelet never does that, so the request is refused, not served."""


class DatasetNotFoundError(VolumeError):
    """The Dataset a volume names does not exist in the pod's own namespace."""

    def __init__(self, *, dataset: str, namespace: str, pin: str = "") -> None:
        self.dataset = dataset
        self.namespace = namespace
        for_pin = f" (asked for pin {pin})" if pin else ""
        super().__init__(
            f"Dataset {dataset!r}{for_pin} does not exist in namespace {namespace!r} (a pod can "
            "only use "
            f"the Datasets of its own namespace). Fix: create Dataset {dataset!r} in "
            f"{namespace!r}, or correct the volume's `dataset` attribute",
            refusal=Refusal.NO_DATASET,
        )


class AccessRefusedError(VolumeError):
    """The request's own credentials and remote do not prove access to what it asks for."""


# -- signals inside the S3 remote ---------------------------------------------------------------


class RemoteSignal(Exception):  # noqa: N818 - a signal between two modules, never a failure shown
    """What one request or object came to, told by the S3 client (`remotes.s3client`) to the
    fetch (`remotes.s3fetch`). Never reaches a user: each ends as a retry, a `FetchReport`
    entry (absent, corrupt) or a `RemoteError`."""


class HTTPStatusError(RemoteSignal):
    """A non-success answer: its status, S3 error code and Retry-After."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None) -> None:
        super().__init__(f"{status} {code}".strip())
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        return self.code or f"http_{self.status}"


class TruncatedError(RemoteSignal):
    """The body ended before the length the server announced."""


class BadBodyError(RemoteSignal):
    """The answer does not frame the bytes asked for: a body longer than its declared length
    or than the range, or a different range. Nothing past the expected end is read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        #: A short label (`overlong`, `bad_range`) for the retry counters.
        self.reason = reason


class AbsentError(RemoteSignal):
    """The remote does not have the object."""


class GaveUpError(RemoteSignal):
    """A request still failed after every attempt."""

    def __init__(self, key: str, last: str, attempts: int) -> None:
        super().__init__(f"{key}: {last} after {attempts} attempts")
        self.key = key
        self.last = last


class Md5MismatchError(RemoteSignal):
    """The bytes fail their md5 (fetched again, whole, a bounded number of times)."""


class UnsafeFileError(OSError):
    """A path that must be our own regular file or directory is something else.

    An `OSError` (errno `ELOOP`) so code that already treats a damaged file as absent treats a
    planted symlink, FIFO, device or oversized file the same way; never a `DatapinError`,
    because it is a state of the volume to repair or skip, not an answer to a user.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(errno.ELOOP, f"{path} {problem}; datapin does not follow or open it")
        self.filename = path
        self.problem = problem


def os_error(where: str, exc: OSError, *, volume: str = "destination") -> Exception:
    """The user-facing error for an OSError writing under `where`, or `exc` itself.

    Space and permission failures are the user's to fix and get a `DestinationError` naming
    the volume, as does a path something other than datapin put in its way
    (`UnsafeFileError`); anything else is unexpected and propagates as it is.
    """
    if isinstance(exc, UnsafeFileError):
        return DestinationError(
            dest=where,
            problem=f"{exc.filename} {exc.problem} (something other than datapin changed it)",
            fix="let datapin manage this directory alone; a new pod gets a new workspace",
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DestinationError(
            dest=where,
            problem=f"no space left on the {volume} volume",
            fix="free space (the node agent's GC evicts unused objects) or use a larger volume",
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DestinationError(
            dest=where,
            problem=f"cannot write to the {volume} ({os.strerror(exc.errno)})",
            fix=f"mount the {volume} read-write for datapin (consumers get trees read-only)",
        )
    return exc
