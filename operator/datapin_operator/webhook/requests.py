"""What a Job or Pod asks datapin for: the `datapin.dev/*` annotation contract.

Users annotate a Job (`metadata.annotations`; the operator copies them to the pod template,
because Kubernetes does not copy a Job's annotations to its Pods), a Pod, or any workload's pod
template::

    datapin.dev/dataset: imagenet                 # one dataset...
    datapin.dev/revision: v2                      # tag, branch, commit, named revision or
                                                  # <md5>.dir
    datapin.dev/mount-path: /data/imagenet        # optional; default <mount_root>/<dataset>
    datapin.dev/path: images/train,images/val     # optional: only these folders of the
                                                  # revision (relative to its root); default
                                                  # the whole revision

    # several datasets: a comma-separated list, with per-dataset keys
    datapin.dev/dataset: imagenet, coco
    datapin.dev/revision: v2                      # default revision of every listed dataset
    datapin.dev/revision.coco: 3f0c...e1.dir      # per-dataset revision (wins over the default)
    datapin.dev/mount-path.coco: /coco            # per-dataset mount path
    datapin.dev/path.coco: val2017                # per-dataset folders (wins over the default)

    datapin.dev/mode: csi | sidecar | init        # optional, default csi (the operator's
                                                  # default_mode): a `csi` volume the node
                                                  # plugin serves, no hostPath, no container;
                                                  # sidecar: a native sidecar that follows pin
                                                  # changes; init: a one-shot init container
                                                  # (`datapin-sidecar once`); both need a
                                                  # privileged namespace (hostPath)
    datapin.dev/writable: "false" | "true"        # optional, default false (see inject.py,
                                                  # the read-only rule)

Containers read a dataset at `<mount path>/current/...` (`current` is the symlink the sidecar,
or in csi mode the node plugin, swaps atomically). `datapin.dev/mount-path` without a dataset
suffix is only accepted when one dataset is listed: with several, one shared path would be a
collision by construction.

The operator writes two more keys, which users never set (their format is
`datapin_sidecar.pins`'s, writer and reader): `datapin.dev/pins` (JSON, the sidecar's contract:
`{"<dataset>": {"layout": "dvc3", "pin": "<md5>.dir", "ref": "v2"}}`) and
`datapin.dev/commits` (JSON `{"<dataset>": "<git sha>"}`, only when a revision was a git ref;
for humans reading `kubectl get -o yaml`).

Design:

* Parsing is strict and total. An object without `datapin.dev/dataset` is not ours and is
  admitted unchanged, *unless* it carries other user keys of ours: that is a typo'd or
  forgotten dataset key, and silently running the Job without its data is the worst outcome.
  Every other malformed input is an `AnnotationError` naming the key, the problem and the fix,
  because it is what `kubectl apply` prints. Unknown `datapin.dev/` keys are errors with the
  closest known key suggested (difflib), for the same reason.
* Dataset names follow the one rule of `datapin_sidecar.pins.is_dataset_name`, with the
  shorter limit `KEYED_DATASET_NAME_MAX` (52): the per-dataset keys put the name into an
  annotation key's name part, which Kubernetes caps at 63 characters.
* Mount paths are checked only for what breaks a mount or its use: not absolute, `/` itself,
  empty/`.`/`..` components (which also rules out `//` and a trailing `/`), `:`, the kernel's
  own `/proc`, `/sys`, `/dev`, and a last component `current` (the data would then be at
  `.../current/current`, a sure sign of a misunderstanding). Two datasets on the same or
  nested paths are a `MountCollisionError`: one mount would hide the other.
* Paths (`datapin.dev/path[.<dataset>]`) are a comma list of folders of the revision,
  checked and normalised by the sidecar's own `Part.parse` (relative, no `.`/`..`, not the
  root, at most 64): a part has one spelling whoever reads it. Like the revision, the plain key
  is the default of every listed dataset and a per-dataset key wins. An empty value is an
  error rather than "the whole revision": leaving the key out says that. Whether the folders
  exist is not known from the annotations; the webhook checks it against the pin's `.dir`
  (`resolve/partindex.py`). A revision holding `:` is refused with the path key as the fix:
  `<revision>:<folders>` is the Dataset's spelling (`spec.revisions`, `spec.prefetch`), and a
  Job says folders in one place only.
* Values are stripped of surrounding whitespace (YAML block scalars add newlines); nothing else
  is normalised, so what is accepted is what was written.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NoReturn, cast, get_args

from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import AnnotationsError, UsageError
from datapin_sidecar.pins import (
    ANNOTATION,
    COMMITS_ANNOTATION,
    KEYED_DATASET_NAME_MAX,
    PinRecord,
    is_dataset_name,
    read_pin_records,
)

from datapin_operator.errors import AnnotationError, MountCollisionError

ANNOTATION_PREFIX: Final = "datapin.dev/"
DATASET_KEY: Final = f"{ANNOTATION_PREFIX}dataset"
REVISION_KEY: Final = f"{ANNOTATION_PREFIX}revision"
MOUNT_PATH_KEY: Final = f"{ANNOTATION_PREFIX}mount-path"
PATH_KEY: Final = f"{ANNOTATION_PREFIX}path"
MODE_KEY: Final = f"{ANNOTATION_PREFIX}mode"
WRITABLE_KEY: Final = f"{ANNOTATION_PREFIX}writable"
#: Written by the operator; the sidecar reads it (`datapin_sidecar.pins` owns the format).
PINS_KEY: Final = ANNOTATION
COMMITS_KEY: Final = COMMITS_ANNOTATION

#: Keys users write (per-dataset keys are `<key>.<dataset>` of revision, mount-path and path).
USER_KEYS: Final = (DATASET_KEY, REVISION_KEY, MOUNT_PATH_KEY, PATH_KEY, MODE_KEY, WRITABLE_KEY)
OPERATOR_KEYS: Final = (PINS_KEY, COMMITS_KEY)
_PER_DATASET: Final = ("revision.", "mount-path.", "path.")

#: Mounting onto these breaks the container (runtimes refuse, or the app loses its /dev).
_KERNEL_DIRS: Final = ("/proc", "/sys", "/dev")
#: The symlink the sidecar publishes in each dataset's directory.
LINK_NAME: Final = "current"

#: How a pod gets its data; the first is the default unless the operator says otherwise.
Mode = Literal["csi", "sidecar", "init"]
_MODES: Final[tuple[str, ...]] = get_args(Mode)


@dataclass(frozen=True, slots=True, kw_only=True)
class MountRequest:
    """One dataset a pod asks for: which, at which revision, which folders, mounted where."""

    dataset: str
    revision: str
    mount_path: str
    #: The folders asked for (`datapin.dev/path[.<dataset>]`); `Part.WHOLE`: all of them.
    part: Part = Part.WHOLE
    #: The annotation the part came from (for messages); empty for the whole revision.
    part_key: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """Everything an object's annotations ask for."""

    mounts: tuple[MountRequest, ...]  # in the order listed
    mode: Mode
    writable: bool

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(mount.dataset for mount in self.mounts)


# --- parsing a request ---------------------------------------------------------------------


def parse_request(
    annotations: Mapping[str, str] | None, *, mount_root: str, default_mode: Mode = "csi"
) -> Request | None:
    """What `annotations` ask for; None if they do not ask datapin for anything.

    `default_mode` is the mode of a request without `datapin.dev/mode` (the operator's
    `default_mode` setting).

    Raises `AnnotationError` for a malformed, unknown or inconsistent key and
    `MountCollisionError` for two datasets on the same or nested mount paths.
    """
    ours = {k: v for k, v in (annotations or {}).items() if k.startswith(ANNOTATION_PREFIX)}
    if DATASET_KEY not in ours:
        _no_dataset_key(ours)
        return None
    datasets = _datasets(ours[DATASET_KEY])
    keyed = _per_dataset_keys(ours, datasets)
    revisions, paths, folders = keyed["revision."], keyed["mount-path."], keyed["path."]

    default_revision = ours.get(REVISION_KEY)
    if MOUNT_PATH_KEY in ours and len(datasets) > 1:
        _fail(
            MOUNT_PATH_KEY,
            f"applies to a single dataset, but {DATASET_KEY} lists {len(datasets)}",
            f"set {MOUNT_PATH_KEY}.<dataset> for each dataset that needs a path other than "
            f"{mount_root.rstrip('/')}/<dataset>",
        )
    mounts = []
    path_keys: dict[str, str] = {}
    for dataset in datasets:
        revision_key = f"{REVISION_KEY}.{dataset}" if dataset in revisions else REVISION_KEY
        revision = revisions.get(dataset, default_revision)
        if revision is None:
            _fail(
                REVISION_KEY,
                f"no revision for dataset {dataset!r}",
                f"set {REVISION_KEY} (every dataset) or {REVISION_KEY}.{dataset} to a tag, "
                "branch, commit, named revision or <md5>.dir",
            )
        path_key = f"{MOUNT_PATH_KEY}.{dataset}" if dataset in paths else MOUNT_PATH_KEY
        path = paths.get(dataset, ours.get(MOUNT_PATH_KEY))
        if path is None:
            path = f"{mount_root.rstrip('/')}/{dataset}"
            path_key = f"{MOUNT_PATH_KEY} (default {mount_root.rstrip('/')}/<dataset>)"
        path_keys[dataset] = path_key
        part_key = f"{PATH_KEY}.{dataset}" if dataset in folders else PATH_KEY
        folder_list = folders.get(dataset, ours.get(PATH_KEY))
        part = Part.WHOLE if folder_list is None else _part(part_key, folder_list)
        mounts.append(
            MountRequest(
                dataset=dataset,
                revision=_revision(revision_key, revision),
                mount_path=_mount_path(path_key, path),
                part=part,
                part_key="" if part.whole else part_key,
            )
        )
    _check_nesting(mounts, path_keys)
    return Request(
        mounts=tuple(mounts),
        mode=_mode(ours.get(MODE_KEY, default_mode)),
        writable=_writable(ours.get(WRITABLE_KEY, "false")),
    )


def _no_dataset_key(ours: Mapping[str, str]) -> None:
    """Refuse user keys of ours without `datapin.dev/dataset`: its key is misspelt or missing."""
    stray = sorted(k for k in ours if k not in OPERATOR_KEYS)
    if not stray:
        return
    near = [k for k in stray if difflib.get_close_matches(k, [DATASET_KEY], n=1, cutoff=0.8)]
    fix = (
        f"rename {near[0]} to {DATASET_KEY}"
        if near
        else f"add {DATASET_KEY}: <dataset>[, <dataset>...], or remove the datapin.dev/ keys"
    )
    _fail(stray[0], f"is set but {DATASET_KEY} is not, so no dataset is requested", fix)


def _datasets(value: str) -> list[str]:
    if not value.strip():
        _fail(DATASET_KEY, "empty dataset list", "name one or more Datasets, comma-separated")
    names = [name.strip() for name in value.split(",")]
    seen: set[str] = set()
    for name in names:
        if not name:
            _fail(
                DATASET_KEY,
                f"empty entry in the list {value.strip()!r}",
                "separate Dataset names with single commas, without a trailing comma",
            )
        if name in seen:
            _fail(DATASET_KEY, f"dataset {name!r} is listed twice", "list each Dataset once")
        seen.add(name)
        if not is_dataset_name(name, limit=KEYED_DATASET_NAME_MAX):
            _fail(
                DATASET_KEY,
                f"{name!r} is not a usable Dataset name",
                "use a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', starting "
                "and ending with a letter or digit) of at most "
                f"{KEYED_DATASET_NAME_MAX} characters, so that the per-dataset keys "
                "(datapin.dev/mount-path.<dataset>) stay valid "
                "annotation keys; rename the Dataset if needed",
            )
    return names


def _per_dataset_keys(
    ours: Mapping[str, str], datasets: Sequence[str]
) -> dict[str, dict[str, str]]:
    """The per-dataset values by prefix (`revision.`, `mount-path.`, `path.`), each dataset ->
    value; refuse unknown keys and unlisted datasets."""
    keyed: dict[str, dict[str, str]] = {prefix: {} for prefix in _PER_DATASET}
    known = [*USER_KEYS, *OPERATOR_KEYS]
    known += [f"{ANNOTATION_PREFIX}{p}{d}" for p in _PER_DATASET for d in datasets]
    for key in sorted(ours):
        if key in USER_KEYS or key in OPERATOR_KEYS:
            continue
        name = key.removeprefix(ANNOTATION_PREFIX)
        prefix = next((p for p in _PER_DATASET if name.startswith(p)), None)
        if prefix is None:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            _fail(
                key,
                "unknown datapin annotation",
                f"{hint}datapin reads {', '.join(USER_KEYS)}, {REVISION_KEY}.<dataset>, "
                f"{MOUNT_PATH_KEY}.<dataset> and {PATH_KEY}.<dataset>",
            )
        dataset = name.removeprefix(prefix)
        if dataset not in datasets:
            close = difflib.get_close_matches(dataset, datasets, n=1, cutoff=0.6)
            hint = f"did you mean {ANNOTATION_PREFIX}{prefix}{close[0]}? " if close else ""
            _fail(
                key,
                f"names dataset {dataset!r}, which {DATASET_KEY} does not list "
                f"({', '.join(datasets)})",
                f"{hint}add {dataset!r} to {DATASET_KEY} or remove this key",
            )
        keyed[prefix][dataset] = ours[key]
    return keyed


def _revision(key: str, value: str) -> str:
    revision = value.strip()
    if not revision:
        _fail(key, "empty revision", "set a tag, branch, commit, named revision or <md5>.dir")
    if ":" in revision:
        # `<revision>:<folders>` is the Dataset's spelling; no ref, md5 or name holds ':'.
        name, _, folders = revision.partition(":")
        _fail(
            key,
            f"revision {revision!r} contains ':'",
            f"name the revision alone ({name!r}) and its folders in {PATH_KEY} "
            f"(or {PATH_KEY}.<dataset>): {folders!r}",
        )
    if any(c.isspace() for c in revision):
        # No git ref, commit, revision name or md5 can hold whitespace: a list was meant?
        _fail(
            key,
            f"revision {revision!r} contains whitespace",
            f"give one revision; several datasets take {REVISION_KEY}.<dataset> each",
        )
    return revision


def _part(key: str, value: str) -> Part:
    """The folders a path key names, normalised (`Part.parse`: the sidecar's own rules)."""
    if not value.strip():
        _fail(
            key,
            "names no folder",
            "name folders of the revision, comma-separated (like images/train,images/val), "
            "or remove the key to get the whole revision",
        )
    try:
        return Part.parse([value], what="path")
    except UsageError as exc:
        problem, _, fix = str(exc).partition(". Fix: ")
        _fail(key, problem, fix or "name folders relative to the revision's root")


def _mount_path(key: str, value: str) -> str:
    path = value.strip()
    fix = "use an absolute path like /data/<dataset>, without '.', '..', '//', ':' or a trailing /"
    if not path.startswith("/"):
        _fail(key, f"mount path {path!r} is not absolute", fix)
    if path == "/":
        _fail(key, "mount path is '/', which would hide the container's filesystem", fix)
    if ":" in path:
        _fail(key, f"mount path {path!r} contains ':'", fix)
    parts = path[1:].split("/")
    if "" in parts or "." in parts or ".." in parts:
        _fail(key, f"mount path {path!r} has an empty, '.' or '..' component", fix)
    for kernel in _KERNEL_DIRS:
        if path == kernel or path.startswith(f"{kernel}/"):
            _fail(key, f"mount path {path!r} is inside {kernel}, which the kernel owns", fix)
    if parts[-1] == LINK_NAME:
        parent = path.rsplit("/", 1)[0] or "/"
        _fail(
            key,
            f"mount path {path!r} ends with /{LINK_NAME}: the data is read at "
            f"<mount path>/{LINK_NAME}/..., so it would be at {path}/{LINK_NAME}",
            f"mount at {parent!r} and read {path}/...",
        )
    return path


def _check_nesting(mounts: Sequence[MountRequest], keys: Mapping[str, str]) -> None:
    for i, first in enumerate(mounts):
        for second in mounts[i + 1 :]:
            if paths_overlap(first.mount_path, second.mount_path):
                raise MountCollisionError(
                    f"annotations {keys[first.dataset]} and {keys[second.dataset]}: datasets "
                    f"{first.dataset!r} ({first.mount_path}) and {second.dataset!r} "
                    f"({second.mount_path}) are mounted on the same or nested paths, so one "
                    f"would hide the other. Fix: give each dataset its own directory with "
                    f"{MOUNT_PATH_KEY}.<dataset>, neither inside the other"
                )


def paths_overlap(first: str, second: str) -> bool:
    """Whether two absolute mount paths are equal or one is inside the other."""
    a, b = first.rstrip("/") + "/", second.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _mode(value: str) -> Mode:
    mode = value.strip()
    if mode not in _MODES:
        _fail(
            MODE_KEY,
            f"unknown mode {mode!r}",
            "use csi (a volume served by the node plugin; the usual default), sidecar "
            "(a native sidecar that follows pin changes) or init (a one-shot init container)",
        )
    return cast(Mode, mode)


def _writable(value: str) -> bool:
    text = value.strip()
    if text not in {"true", "false"}:
        _fail(WRITABLE_KEY, f"{text!r} is not a boolean", 'use "true" or "false" (quoted in YAML)')
    return text == "true"


def _fail(key: str, problem: str, fix: str) -> NoReturn:
    raise AnnotationError(key=key, problem=problem, fix=fix)


# --- pins already on the object ----------------------------------------------------------


def read_pins(annotations: Mapping[str, str]) -> dict[str, PinRecord] | None:
    """The pins in `annotations` by dataset, None if there are none.

    `pins.read_pin_records` reads them as the sidecar would. Raises `AnnotationError` for a
    malformed value of either key: on a Job or Pod, pins are the webhook's to write.
    """
    try:
        return read_pin_records(annotations, source="the object")
    except AnnotationsError as exc:
        where = f"dataset {exc.dataset!r}: " if exc.dataset is not None else ""
        _fail(
            exc.annotation or PINS_KEY,
            where + exc.problem,
            f"remove {PINS_KEY} and {COMMITS_KEY}: the datapin webhook writes them when it "
            "admits the object; to choose a revision set datapin.dev/revision",
        )
