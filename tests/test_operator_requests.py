"""The `datapin.dev/*` annotation contract (`datapin_operator.webhook.requests`).

What users depend on: every documented form parses to the mounts, mode and writability they
wrote; every malformed form is refused with a message that names the annotation key at fault
and says how to fix it (it is what `kubectl apply` prints); and the pins the operator writes
are exactly what the sidecar's own parser reads.
"""

from __future__ import annotations

import json

import pytest
from datapin_operator.errors import AnnotationError, MountCollisionError
from datapin_operator.webhook.requests import (
    COMMITS_KEY,
    PINS_KEY,
    MountRequest,
    Request,
    parse_request,
    read_pins,
)
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.pins import KEYED_DATASET_NAME_MAX as DATASET_NAME_MAX
from datapin_sidecar.pins import PinRecord, format_pins, parse_pins

ROOT = "/data"
PIN_A = "0123456789abcdef0123456789abcdef.dir"
PIN_B = "fedcba9876543210fedcba9876543210.dir"
SHA = "3f0c6e2a91d1f0aa0b9a4c8e2d7e5b6c1a2b3c4d"


def _parse(annotations: dict[str, str]) -> Request:
    request = parse_request(annotations, mount_root=ROOT)
    assert request is not None
    return request


# --- valid forms ---------------------------------------------------------------------------


def test_single_dataset_defaults() -> None:
    request = _parse({"datapin.dev/dataset": "imagenet", "datapin.dev/revision": "v2"})
    assert request == Request(
        mounts=(MountRequest(dataset="imagenet", revision="v2", mount_path="/data/imagenet"),),
        mode="csi",  # the default: a csi volume, no hostPath, no container
        writable=False,
    )
    assert request.datasets == ("imagenet",)


@pytest.mark.parametrize("default", ["csi", "sidecar", "init"])
def test_the_operators_default_mode_applies_only_when_none_is_written(default: str) -> None:
    base = {"datapin.dev/dataset": "imagenet", "datapin.dev/revision": "v2"}
    request = parse_request(base, mount_root=ROOT, default_mode=default)  # type: ignore[arg-type]
    assert request is not None
    assert request.mode == default
    for written in ("csi", "sidecar", "init"):
        explicit = parse_request(
            {**base, "datapin.dev/mode": written},
            mount_root=ROOT,
            default_mode=default,  # type: ignore[arg-type]
        )
        assert explicit is not None
        assert explicit.mode == written


def test_sidecar_mode_is_kept_when_asked_for() -> None:
    request = _parse(
        {
            "datapin.dev/dataset": "imagenet",
            "datapin.dev/revision": "v2",
            "datapin.dev/mode": " sidecar\n",
        }
    )
    assert request.mode == "sidecar"
    assert request.writable is False


def test_single_dataset_with_everything() -> None:
    request = _parse(
        {
            "datapin.dev/dataset": " imagenet\n",
            "datapin.dev/revision": f"{PIN_A}\n",
            "datapin.dev/mount-path": "/mnt/in",
            "datapin.dev/mode": "init",
            "datapin.dev/writable": "true",
        }
    )
    assert request.mounts == (
        MountRequest(dataset="imagenet", revision=PIN_A, mount_path="/mnt/in"),
    )
    assert request.mode == "init"
    assert request.writable is True


def test_single_dataset_per_dataset_keys_win() -> None:
    request = _parse(
        {
            "datapin.dev/dataset": "imagenet",
            "datapin.dev/revision": "v1",
            "datapin.dev/revision.imagenet": "v2",
            "datapin.dev/mount-path": "/a",
            "datapin.dev/mount-path.imagenet": "/b",
        }
    )
    assert request.mounts == (MountRequest(dataset="imagenet", revision="v2", mount_path="/b"),)


def test_several_datasets_defaults_and_overrides_keep_listed_order() -> None:
    request = _parse(
        {
            "datapin.dev/dataset": "imagenet, coco,wiki.en",
            "datapin.dev/revision": "v2",
            "datapin.dev/revision.coco": PIN_B,
            "datapin.dev/mount-path.coco": "/coco",
            "datapin.dev/writable": "false",
            "datapin.dev/mode": "sidecar",
            "unrelated.example.com/owner": "team-a",
        }
    )
    assert request.mounts == (
        MountRequest(dataset="imagenet", revision="v2", mount_path="/data/imagenet"),
        MountRequest(dataset="coco", revision=PIN_B, mount_path="/coco"),
        MountRequest(dataset="wiki.en", revision="v2", mount_path="/data/wiki.en"),
    )
    assert request.datasets == ("imagenet", "coco", "wiki.en")
    assert request.mode == "sidecar"
    assert request.writable is False


def test_every_dataset_may_have_its_own_revision_without_a_default() -> None:
    request = _parse(
        {
            "datapin.dev/dataset": "a,b",
            "datapin.dev/revision.a": "main",
            "datapin.dev/revision.b": "release/2024-01",
        }
    )
    assert [m.revision for m in request.mounts] == ["main", "release/2024-01"]


def test_mount_root_slash_gives_top_level_paths() -> None:
    request = parse_request(
        {"datapin.dev/dataset": "imagenet", "datapin.dev/revision": "v2"}, mount_root="/"
    )
    assert request is not None
    assert request.mounts[0].mount_path == "/imagenet"


def test_longest_dataset_name_is_accepted() -> None:
    name = "a" * DATASET_NAME_MAX
    request = _parse({"datapin.dev/dataset": name, "datapin.dev/revision": "v1"})
    assert request.datasets == (name,)
    # Its longest per-dataset key still has a valid name part (<= 63 characters).
    assert len(f"mount-path.{name}") == 63


@pytest.mark.parametrize(
    "annotations",
    [
        None,
        {},
        {"app.kubernetes.io/name": "train", "datapin.example/dataset": "x"},
        # Written by the operator only: a pod carrying pins but no request is not ours to judge.
        {PINS_KEY: json.dumps({"imagenet": PIN_A}), COMMITS_KEY: "{}"},
    ],
)
def test_objects_that_ask_for_nothing_are_not_ours(annotations: dict[str, str] | None) -> None:
    assert parse_request(annotations, mount_root=ROOT) is None


# --- malformed forms -----------------------------------------------------------------------

BASE = {"datapin.dev/dataset": "imagenet", "datapin.dev/revision": "v2"}
TWO = {"datapin.dev/dataset": "imagenet, coco", "datapin.dev/revision": "v2"}

# fmt: off
MALFORMED: list[tuple[str, dict[str, str], str, str]] = [
    # (id, annotations, key named, part of the problem)
    ("empty-list", {"datapin.dev/dataset": "", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "empty dataset list"),
    ("blank-list", {"datapin.dev/dataset": "  \n", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "empty dataset list"),
    ("empty-entry", {"datapin.dev/dataset": "a,,b", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "empty entry"),
    ("trailing-comma", {"datapin.dev/dataset": "a,", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "empty entry"),
    ("duplicate", {"datapin.dev/dataset": "a, b, a", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "listed twice"),
    ("upper-case", {"datapin.dev/dataset": "ImageNet", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "not a usable Dataset name"),
    ("underscore", {"datapin.dev/dataset": "image_net", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "not a usable Dataset name"),
    ("leading-dash", {"datapin.dev/dataset": "-imagenet", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "not a usable Dataset name"),
    ("empty-label", {"datapin.dev/dataset": "image..net", "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "not a usable Dataset name"),
    ("too-long", {"datapin.dev/dataset": "a" * (DATASET_NAME_MAX + 1),
                  "datapin.dev/revision": "v1"},
     "datapin.dev/dataset", "not a usable Dataset name"),
    ("no-revision", {"datapin.dev/dataset": "imagenet"},
     "datapin.dev/revision", "no revision for dataset 'imagenet'"),
    ("no-revision-for-one", {"datapin.dev/dataset": "a, b", "datapin.dev/revision.a": "v1"},
     "datapin.dev/revision", "no revision for dataset 'b'"),
    ("empty-revision", {**BASE, "datapin.dev/revision": "  "},
     "datapin.dev/revision", "empty revision"),
    ("empty-per-dataset-revision", {**TWO, "datapin.dev/revision.coco": ""},
     "datapin.dev/revision.coco", "empty revision"),
    ("two-revisions", {**BASE, "datapin.dev/revision": "v1 v2"},
     "datapin.dev/revision", "contains whitespace"),
    ("unlisted-revision", {**BASE, "datapin.dev/revision.coco": "v1"},
     "datapin.dev/revision.coco", "does not list"),
    ("unlisted-mount-path", {**TWO, "datapin.dev/mount-path.imagenett": "/x"},
     "datapin.dev/mount-path.imagenett", "does not list"),
    ("unknown-key", {**BASE, "datapin.dev/revison": "v1"},
     "datapin.dev/revison", "unknown datapin annotation"),
    ("unknown-mountpath", {**BASE, "datapin.dev/mountpath": "/x"},
     "datapin.dev/mountpath", "unknown datapin annotation"),
    ("stray-without-dataset", {"datapin.dev/datasets": "imagenet", "datapin.dev/revision": "v2"},
     "datapin.dev/datasets", "datapin.dev/dataset is not"),
    ("revision-without-dataset", {"datapin.dev/revision": "v2"},
     "datapin.dev/revision", "datapin.dev/dataset is not"),
    ("relative-path", {**BASE, "datapin.dev/mount-path": "data/imagenet"},
     "datapin.dev/mount-path", "not absolute"),
    ("root-path", {**BASE, "datapin.dev/mount-path": "/"},
     "datapin.dev/mount-path", "is '/'"),
    ("colon", {**BASE, "datapin.dev/mount-path": "/data:ro"},
     "datapin.dev/mount-path", "contains ':'"),
    ("double-slash", {**BASE, "datapin.dev/mount-path": "/data//imagenet"},
     "datapin.dev/mount-path", "empty, '.' or '..' component"),
    ("trailing-slash", {**BASE, "datapin.dev/mount-path": "/data/imagenet/"},
     "datapin.dev/mount-path", "empty, '.' or '..' component"),
    ("dotdot", {**BASE, "datapin.dev/mount-path": "/data/../etc"},
     "datapin.dev/mount-path", "empty, '.' or '..' component"),
    ("dot", {**TWO, "datapin.dev/mount-path.coco": "/data/./coco"},
     "datapin.dev/mount-path.coco", "empty, '.' or '..' component"),
    ("proc", {**BASE, "datapin.dev/mount-path": "/proc/data"},
     "datapin.dev/mount-path", "inside /proc"),
    ("dev", {**BASE, "datapin.dev/mount-path": "/dev"},
     "datapin.dev/mount-path", "inside /dev"),
    ("ends-with-current", {**BASE, "datapin.dev/mount-path": "/data/imagenet/current"},
     "datapin.dev/mount-path", "ends with /current"),
    ("shared-mount-path", {**TWO, "datapin.dev/mount-path": "/data/all"},
     "datapin.dev/mount-path", "applies to a single dataset"),
    ("bad-mode", {**BASE, "datapin.dev/mode": "once"},
     "datapin.dev/mode", "unknown mode 'once'"),
    ("capitalised-mode", {**BASE, "datapin.dev/mode": "Sidecar"},
     "datapin.dev/mode", "unknown mode"),
    ("writable-yes", {**BASE, "datapin.dev/writable": "yes"},
     "datapin.dev/writable", "not a boolean"),
    ("writable-capital", {**BASE, "datapin.dev/writable": "True"},
     "datapin.dev/writable", "not a boolean"),
]
# fmt: on


@pytest.mark.parametrize(
    ("annotations", "key", "problem"),
    [pytest.param(a, k, p, id=i) for i, a, k, p in MALFORMED],
)
def test_malformed_annotations_are_refused_naming_the_key(
    annotations: dict[str, str], key: str, problem: str
) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_request(annotations, mount_root=ROOT)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"annotation {key}: ")
    assert problem in message
    assert "Fix: " in message
    assert info.value.reason == "BadAnnotation"


@pytest.mark.parametrize(
    ("annotations", "suggestion"),
    [
        ({**BASE, "datapin.dev/revison": "v1"}, "did you mean datapin.dev/revision?"),
        ({**BASE, "datapin.dev/mountpath": "/x"}, "did you mean datapin.dev/mount-path?"),
        ({**TWO, "datapin.dev/revision.cocoo": "v1"}, "did you mean datapin.dev/revision.coco?"),
        ({"datapin.dev/datasets": "a", "datapin.dev/revision": "v"}, "rename datapin.dev/datasets"),
    ],
)
def test_typos_suggest_the_intended_key(annotations: dict[str, str], suggestion: str) -> None:
    with pytest.raises(AnnotationError, match="Fix: ") as info:
        parse_request(annotations, mount_root=ROOT)
    assert suggestion in str(info.value)


def test_name_limit_is_explained() -> None:
    with pytest.raises(AnnotationError) as info:
        parse_request(
            {"datapin.dev/dataset": "x" * 60, "datapin.dev/revision": "v"}, mount_root=ROOT
        )
    assert f"at most {DATASET_NAME_MAX} characters" in str(info.value)
    assert "annotation keys" in str(info.value)


@pytest.mark.parametrize(
    ("paths", "keys"),
    [
        (
            {"datapin.dev/mount-path.imagenet": "/d", "datapin.dev/mount-path.coco": "/d"},
            ("datapin.dev/mount-path.imagenet", "datapin.dev/mount-path.coco"),
        ),
        (
            {"datapin.dev/mount-path.imagenet": "/d", "datapin.dev/mount-path.coco": "/d/coco"},
            ("datapin.dev/mount-path.imagenet", "datapin.dev/mount-path.coco"),
        ),
        # The default path of imagenet (/data/imagenet) holds coco's explicit one.
        (
            {"datapin.dev/mount-path.coco": "/data/imagenet/coco"},
            ("datapin.dev/mount-path (default", "datapin.dev/mount-path.coco"),
        ),
    ],
)
def test_same_or_nested_mount_paths_collide(paths: dict[str, str], keys: tuple[str, str]) -> None:
    with pytest.raises(MountCollisionError) as info:
        parse_request({**TWO, **paths}, mount_root=ROOT)
    message = str(info.value)
    assert all(key in message for key in keys)
    assert "Fix: " in message
    assert info.value.reason == "MountCollision"


def test_sibling_paths_with_a_common_prefix_do_not_collide() -> None:
    request = _parse({**TWO, "datapin.dev/mount-path.coco": "/data/imagenet2"})
    assert [m.mount_path for m in request.mounts] == ["/data/imagenet", "/data/imagenet2"]


# --- pins ----------------------------------------------------------------------------------


RECORDS = [
    PinRecord(dataset="imagenet", pin=PIN_A, ref="v2", layout="dvc3", commit=SHA),
    PinRecord(dataset="coco", pin=PIN_B, ref=PIN_B, layout="auto"),
    PinRecord(dataset="old", pin=PIN_A, ref="legacy-v1", layout="legacy"),
]


def test_format_pins_writes_compact_sorted_json() -> None:
    written = format_pins(RECORDS)
    assert written[PINS_KEY] == (
        f'{{"coco":{{"layout":"auto","pin":"{PIN_B}","ref":"{PIN_B}"}},'
        f'"imagenet":{{"layout":"dvc3","pin":"{PIN_A}","ref":"v2"}},'
        f'"old":{{"layout":"legacy","pin":"{PIN_A}","ref":"legacy-v1"}}}}'
    )
    assert written[COMMITS_KEY] == f'{{"imagenet":"{SHA}"}}'
    # Order of the records does not change the bytes (stable pod templates, no-op patches).
    assert format_pins(list(reversed(RECORDS))) == written


def test_format_pins_omits_commits_when_there_are_none() -> None:
    written = format_pins(RECORDS[1:])
    assert set(written) == {PINS_KEY}


def test_pins_round_trip() -> None:
    assert read_pins(format_pins(RECORDS)) == {r.dataset: r for r in RECORDS}
    assert read_pins(format_pins(RECORDS[1:])) == {r.dataset: r for r in RECORDS[1:]}


def test_the_sidecar_reads_what_the_operator_writes() -> None:
    pins = parse_pins(format_pins(RECORDS), source="test")
    assert {name: str(pin.revision) for name, pin in pins.items()} == {
        r.dataset: r.pin for r in RECORDS
    }
    assert {name: pin.ref for name, pin in pins.items()} == {r.dataset: r.ref for r in RECORDS}
    assert pins["imagenet"].layout == Layout.DVC3
    assert pins["old"].layout == Layout.LEGACY
    assert pins["coco"].layout is None


def test_read_pins_accepts_the_sidecars_short_form() -> None:
    assert read_pins({PINS_KEY: json.dumps({"imagenet": PIN_A})}) == {
        "imagenet": PinRecord(dataset="imagenet", pin=PIN_A, ref=PIN_A, layout="auto")
    }


def test_read_pins_without_pins_is_none() -> None:
    assert read_pins({"datapin.dev/dataset": "imagenet"}) is None


@pytest.mark.parametrize(
    ("annotations", "key", "problem"),
    [
        ({PINS_KEY: "{"}, PINS_KEY, "not valid JSON"),
        ({PINS_KEY: "{}"}, PINS_KEY, "no datasets"),
        ({PINS_KEY: '{"imagenet": "v2"}'}, PINS_KEY, "dataset 'imagenet': pin 'v2'"),
        ({PINS_KEY: f'{{"Bad": "{PIN_A}"}}'}, PINS_KEY, "dataset 'Bad'"),
        ({PINS_KEY: f'{{"a": "{PIN_A}"}}', COMMITS_KEY: "["}, COMMITS_KEY, "not valid JSON"),
        ({PINS_KEY: f'{{"a": "{PIN_A}"}}', COMMITS_KEY: '{"a": 1}'}, COMMITS_KEY, "JSON object"),
        ({PINS_KEY: f'{{"a": "{PIN_A}"}}', COMMITS_KEY: '{"b": "x"}'}, COMMITS_KEY, "no pin"),
    ],
)
def test_read_pins_refuses_malformed_values(
    annotations: dict[str, str], key: str, problem: str
) -> None:
    with pytest.raises(AnnotationError) as info:
        read_pins(annotations)
    assert info.value.key == key
    assert problem in str(info.value)
    assert "Fix: " in str(info.value)


@pytest.mark.parametrize(
    "records",
    [
        [],
        [RECORDS[0], RECORDS[0]],
        [PinRecord(dataset="a", pin="v2", ref="v2", layout="auto")],
        [PinRecord(dataset="a", pin=PIN_A[:-4], ref="x", layout="auto")],
        [PinRecord(dataset="a", pin=PIN_A, ref="", layout="auto")],
    ],
    ids=["empty", "duplicate", "not-md5", "file-not-dir", "empty-ref"],
)
def test_format_pins_refuses_what_no_sidecar_would_serve(records: list[PinRecord]) -> None:
    with pytest.raises(ValueError, match=r"."):
        format_pins(records)
