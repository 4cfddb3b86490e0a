"""Granular revisions (issue 18), the operator's side: a Job asks for folders of a revision.

The real operator runs in development mode against the kmock API (kopf, every handler, the
webhook on HTTPS with our self-signed certificate), resolving through a real git repository
whose `data.dvc` real DVC 3 wrote, and reading `.dir`s from a SeaweedFS S3 server that real
`dvc push` filled. Each test calls the webhook as an API server would (AdmissionReview v1 in,
JSONPatch out), applies the patch and validates the result strictly against the Kubernetes
schemas (kubernetes-validate).

What users depend on:

* `datapin.dev/path` (and `datapin.dev/path.<dataset>`, which wins) pins the folders: they
  are in `datapin.dev/pins` (what the sidecar and the node plugin read), in the csi volume's
  `path` attribute, and the Job's Pods keep them;
* a folder the revision does not hold, a file named as a folder, `..`, an absolute path are
  refused at `kubectl apply` with the sidecar's own message (the revision's top-level
  folders as the hint) and the annotation to fix;
* a Dataset's named revision `<md5>.dir:<folders>`, and a `spec.source.path` naming a folder
  inside an out, stand for those folders, never silently the whole; a Job adding its own
  path on top is refused, saying which and how to fix it;
* only Jobs naming folders read the remote (an unreachable remote does not stop the others),
  once per pin; a key pair that cannot read the `.dir` learns nothing from the cache;
* prefetch entries `v2:d3` reach the agents' ConfigMap with `paths`, the status lists
  `<pin>:<folders>` in `warmRevisions` from the agents' `<name>@<pin>:<folders>` reports, and
  the webhook prefers nodes warm for the pin or for a part holding the folders asked for.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest
from aiohttp import web
from datapin_operator.api.crd import validate_dataset
from datapin_operator.api.models import Remote
from datapin_operator.app import App
from datapin_operator.errors import RemoteCheckError
from datapin_operator.reconcile.remotecheck import RemoteKeys
from datapin_operator.resolve.partindex import FolderIndex, PartIndex
from datapin_operator.settings import Settings
from datapin_operator.webhook.placement import serves
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import PathNotInRevisionError

from testkit.dvcremote import S3DvcFixture
from testkit.dvcrepo import sample_files
from testkit.kubeapi import Api, admission_review, call_webhook, emulator
from testkit.operatorrun import running_operator, tagged_repo
from testkit.seaweed import SeaweedServer, free_ports

pytestmark = [pytest.mark.s3, pytest.mark.dvc]

NS = "ml"
OPERATOR_NS = "datapin"
DATASETS = "datapin.dev/v1alpha1/datasets"
VERSIONS = ("1.29", kubernetes_validate.latest_version())
AGENT_LABELS = {"app.kubernetes.io/name": "datapin", "app.kubernetes.io/component": "agent"}
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"
# Revision A's folders (conftest: `d{i % 12}/f{i:04d}.bin`); B adds `new/` (and keeps d*).
TOP_A = ", ".join(f"d{i}" for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9))


class FakeAgent:
    """A node agent's `/status` as the agents' contract shapes it: what the operator reads
    (the agent itself is another component's, tested on its own side)."""

    def __init__(self) -> None:
        self.prefetch: dict[str, dict[str, Any]] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeAgent:
        app = web.Application()
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": True, "prefetch": self.prefetch})


@dataclass
class World:
    api: Api
    app: App
    http: aiohttp.ClientSession
    webhooks: dict[str, dict[str, Any]]
    a: S3DvcFixture
    b: S3DvcFixture
    seaweed: SeaweedServer
    agent: FakeAgent

    async def review(self, obj: dict[str, Any]) -> dict[str, Any]:
        resource = {"Job": "jobs", "Pod": "pods"}[obj["kind"]]
        answer = await call_webhook(
            self.http, self.webhooks[resource], admission_review(obj, namespace=NS)
        )
        return dict(answer["response"])

    async def admit(self, obj: dict[str, Any]) -> dict[str, Any]:
        response = await self.review(obj)
        assert response["allowed"], response
        if "patch" not in response:
            return copy.deepcopy(obj)
        ops = json.loads(base64.b64decode(response["patch"]))
        admitted = dict(jsonpatch.apply_patch(obj, ops))
        for version in VERSIONS:
            kubernetes_validate.validate(admitted, version, strict=True)
        return admitted

    async def reject(self, obj: dict[str, Any]) -> str:
        response = await self.review(obj)
        assert not response["allowed"], f"admitted: {response}"
        assert response["status"]["code"] == 400
        message = str(response["status"]["message"])
        assert self.seaweed.secret_key not in message
        return message


def _job(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "train", "image": "python:3.12-slim"}],
                },
            },
        },
    }


def _pod_of(job: dict[str, Any], name: str) -> dict[str, Any]:
    template = copy.deepcopy(job["spec"]["template"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": name, "namespace": NS},
        "spec": template["spec"],
    }


def _pins(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(obj["metadata"]["annotations"]["datapin.dev/pins"]))


def _attributes(job: dict[str, Any]) -> dict[str, dict[str, str]]:
    volumes = job["spec"]["template"]["spec"]["volumes"]
    return {v["csi"]["volumeAttributes"]["dataset"]: v["csi"]["volumeAttributes"] for v in volumes}


def _dataset(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    obj = {
        "apiVersion": "datapin.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }
    assert validate_dataset(obj) == [], name  # what the API server would admit
    return obj


@pytest.fixture
async def world(
    tmp_path: Path, seaweed: SeaweedServer, dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture]
) -> AsyncIterator[World]:
    a, b = dvc3_revisions
    repo, _, _ = tagged_repo(tmp_path, a, b)
    webhook_port, metrics_port, closed = free_ports(3)
    async with (
        emulator() as (_, api),
        aiohttp.ClientSession() as http,
        FakeAgent() as agent,
    ):
        settings = Settings(
            api_server=api.url,
            namespace=OPERATOR_NS,
            webhook_mode="dev",
            webhook_host="127.0.0.1",
            webhook_port=webhook_port,
            metrics_port=metrics_port,
            resync_seconds=600,
            prefetch_poll_seconds=0.5,
            remote_timeout_seconds=2,
            agent_port=agent.port,
            git_cache_dir=tmp_path / "git-cache",
            part_index_dir=tmp_path / "parts",
            git_allow_protocols=["file"],
            git_ref_ttl_seconds=0,
            sidecar_image="ghcr.io/datapin/datapin:test",
        )
        await api.create(
            "v1/secrets",
            {
                "metadata": {"name": "b2", "namespace": NS},
                "data": {
                    "AWS_ACCESS_KEY_ID": base64.b64encode(seaweed.access_key.encode()).decode(),
                    "AWS_SECRET_ACCESS_KEY": base64.b64encode(seaweed.secret_key.encode()).decode(),
                },
            },
        )
        await api.create("v1/nodes", {"metadata": {"name": "node-a"}})
        await api.create(
            "v1/pods",
            {
                "metadata": {"name": "agent-a", "namespace": OPERATOR_NS, "labels": AGENT_LABELS},
                "spec": {"nodeName": "node-a", "containers": [{"name": "agent", "image": "x"}]},
                "status": {"phase": "Running", "podIP": "127.0.0.1"},
            },
        )
        remote = {
            "url": a.remote_url,
            "endpoint": seaweed.endpoint,
            "region": "us-east-1",
            "credentialsSecretRef": {"name": "b2"},
        }
        source = {"repo": f"file://{repo}", "path": "data.dvc"}
        datasets = {
            "images": {
                "remote": remote,
                "source": source,
                "revisions": {"golden": a.dvc.rev, "train-only": f"{a.dvc.rev}:d3/"},
            },
            "labels": {"remote": remote, "revisions": {"golden": b.dvc.rev}},
            # spec.source.path inside the out, both of DVC's spellings.
            "split": {"remote": remote, "source": {**source, "path": "data.dvc:data/d3"}},
            "nested": {"remote": remote, "source": {**source, "path": "data/d5"}},
            "offline": {
                "remote": {**remote, "endpoint": f"http://127.0.0.1:{closed}"},
                "revisions": {"golden": a.dvc.rev},
            },
            "warm": {
                "remote": remote,
                "source": source,
                "revisions": {"golden": f"{a.dvc.rev}:d1,d2"},
                "prefetch": {"revisions": ["v1:d3", "golden", "v2"]},
            },
        }
        for name, spec in datasets.items():
            await api.create(DATASETS, _dataset(name, spec))
        async with running_operator(settings) as app:
            config = await api.wait_for(
                "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                "datapin.dev",
                lambda o: len(o.get("webhooks") or []) == 2,
            )
            webhooks = {w["rules"][0]["resources"][0]: w for w in config["webhooks"]}
            for name in datasets:
                await api.wait_for(
                    DATASETS,
                    name,
                    lambda o: bool((o.get("status") or {}).get("conditions")),
                    namespace=NS,
                )
            yield World(api, app, http, webhooks, a, b, seaweed, agent)


async def test_a_path_annotation_is_pinned_and_becomes_the_csi_path_attribute(
    world: World,
) -> None:
    job = _job(
        "train",
        {
            "datapin.dev/dataset": "images",
            "datapin.dev/revision": "v1",
            "datapin.dev/path": "d5/, ./d3, d3",  # normalised: sorted, once each
        },
    )
    admitted = await world.admit(job)
    pins = _pins(admitted)
    assert pins["images"]["pin"] == world.a.dvc.rev
    assert pins["images"]["paths"] == ["d3", "d5"]
    template = admitted["spec"]["template"]
    assert _pins(template) == pins
    attributes = _attributes(admitted)["images"]
    assert attributes["path"] == "d3,d5"
    assert attributes["pin"] == world.a.dvc.rev
    # The Job controller's Pods keep the part (the Pod webhook reuses the template's pins).
    pod = _pod_of(admitted, "train-abcde")
    assert await world.admit(pod) == pod
    # The pin's folders were read once and are remembered: a second Job reads nothing.
    parts = world.app.admission.parts
    assert parts is not None
    remote = Remote.model_validate(
        (await world.api.get(DATASETS, "images", namespace=NS))["spec"]["remote"]
    )
    assert parts.cached(remote, world.a.dvc.rev)
    # Without a path: no `path` attribute, no `paths` in the pins (the whole revision).
    whole = await world.admit(
        _job("whole", {"datapin.dev/dataset": "images", "datapin.dev/revision": "v1"})
    )
    assert "path" not in _attributes(whole)["images"]
    assert "paths" not in _pins(whole)["images"]


async def test_the_per_dataset_path_wins_and_sidecar_mode_carries_it_in_the_pins(
    world: World,
) -> None:
    job = _job(
        "two",
        {
            "datapin.dev/dataset": "images, labels",
            "datapin.dev/revision": "golden",
            "datapin.dev/path": "d3",
            "datapin.dev/path.labels": "new",  # only in revision B: labels' golden
            "datapin.dev/mode": "sidecar",
        },
    )
    admitted = await world.admit(job)
    pins = _pins(admitted)
    assert pins["images"]["paths"] == ["d3"]
    assert pins["labels"]["paths"] == ["new"]
    assert pins["labels"]["pin"] == world.b.dvc.rev
    # The sidecar reads its part from the pins (the downward-API annotations file).
    template = admitted["spec"]["template"]
    assert template["spec"]["initContainers"][0]["name"] == "datapin"
    assert _pins(template) == pins


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/path": "d3,nope"},
            ["datapin.dev/path asks for folders d3,nope", "has no folder 'nope'", TOP_A, "Fix:"],
            id="unknown-folder",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/path": "d3/f0003.bin"},
            ["'d3/f0003.bin' is a file", "name its folder ('d3')", "Fix:"],
            id="file-as-folder",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/path": "d3/sub"},
            ["has no folder 'd3/sub'", "'d3' holds: no folders, only files", TOP_A],
            id="folder-under-a-folder-of-files",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/path": "../etc"},
            ["annotation datapin.dev/path", "'..'", "Fix:"],
            id="traversal",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/path.images": "/etc"},
            ["annotation datapin.dev/path.images", "absolute", "Fix:"],
            id="absolute",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/path": " "},
            ["annotation datapin.dev/path: names no folder", "remove the key"],
            id="empty",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/pth": "d3"},
            ["datapin.dev/pth", "did you mean datapin.dev/path?"],
            id="typo",
        ),
    ],
)
async def test_folders_that_are_not_in_the_revision_are_refused_with_the_folders_there_are(
    world: World, annotations: dict[str, str], expected: list[str]
) -> None:
    message = await world.reject(_job("bad", {"datapin.dev/revision": "v1", **annotations}))
    for part in expected:
        assert part in message, message


async def test_named_revisions_and_source_paths_stand_for_their_folders(world: World) -> None:
    named = await world.admit(
        _job("named", {"datapin.dev/dataset": "images", "datapin.dev/revision": "train-only"})
    )
    assert _pins(named)["images"] == {
        "layout": "auto",
        "pin": world.a.dvc.rev,
        "ref": "train-only",
        "paths": ["d3"],
    }
    assert _attributes(named)["images"]["path"] == "d3"
    # spec.source.path inside the out: a git ref serves that folder, not the whole out.
    for dataset, folder in (("split", "d3"), ("nested", "d5")):
        job = await world.admit(
            _job(dataset, {"datapin.dev/dataset": dataset, "datapin.dev/revision": "v2"})
        )
        assert _pins(job)[dataset]["pin"] == world.b.dvc.rev
        assert _pins(job)[dataset]["paths"] == [folder]
        assert _attributes(job)[dataset]["path"] == folder

    # Folders said twice: refused, naming both places and the fix.
    message = await world.reject(
        _job(
            "twice",
            {
                "datapin.dev/dataset": "images",
                "datapin.dev/revision": "train-only",
                "datapin.dev/path.images": "d5",
            },
        )
    )
    for part in (
        "datapin.dev/path.images asks for folders d5",
        "already stands for folders d3 (spec.revisions.train-only)",
        f"name the pin {world.a.dvc.rev}",
    ):
        assert part in message, message
    message = await world.reject(
        _job(
            "twice-git",
            {
                "datapin.dev/dataset": "split",
                "datapin.dev/revision": "v1",
                "datapin.dev/path": "d5",
            },
        )
    )
    assert "(spec.source.path)" in message
    assert "point the Dataset's spec.source.path at the whole out" in message
    # The Dataset's own spelling is not the annotation's.
    message = await world.reject(
        _job("colon", {"datapin.dev/dataset": "images", "datapin.dev/revision": "v1:d3"})
    )
    assert "contains ':'" in message
    assert "its folders in datapin.dev/path" in message


async def test_an_unreachable_remote_refuses_only_jobs_that_name_folders(world: World) -> None:
    # No folders: nothing is read at admission, so the Job is admitted as before parts.
    await world.admit(
        _job("plain", {"datapin.dev/dataset": "offline", "datapin.dev/revision": "golden"})
    )
    message = await world.reject(
        _job(
            "folders",
            {
                "datapin.dev/dataset": "offline",
                "datapin.dev/revision": "golden",
                "datapin.dev/path": "d3",
            },
        )
    )
    assert "Dataset 'offline' revision 'golden': the folders d3 (datapin.dev/path)" in message
    assert "cannot be checked against" in message
    assert "Fix:" in message


async def test_prefetch_entries_with_folders_reach_the_agents_and_the_status(world: World) -> None:
    a, b = world.a.dvc.rev, world.b.dvc.rev
    cm = await world.api.wait_for(
        "v1/configmaps",
        "datapin-prefetch",
        lambda o: "node-a.json" in (o.get("data") or {}),
        namespace=OPERATOR_NS,
    )
    entries = json.loads(cm["data"]["node-a.json"])["revisions"]
    listed = sorted((e["pin"], e["ref"], e.get("paths")) for e in entries if e["name"] == "ml.warm")
    assert listed == sorted([(a, "v1", ["d3"]), (a, "golden", ["d1", "d2"]), (b, "v2", None)])
    obj = await world.api.get(DATASETS, "warm", namespace=NS)
    resolved = {(r["ref"], r.get("path")) for r in obj["status"]["resolved"]}
    assert resolved == {("golden", "d1,d2"), ("v1", "d3"), ("v2", None)}

    # The agent reports the part of A and the whole of B warm, by the contract's keys.
    world.agent.prefetch = {
        f"ml.warm@{a}:d3": {"state": "warm", "last_error": None},
        f"ml.warm@{a}:d1,d2": {"state": "pending", "last_error": None},
        f"ml.warm@{b}": {"state": "warm", "last_error": None},
    }
    obj = await world.api.wait_for(
        DATASETS,
        "warm",
        lambda o: (
            ((o.get("status") or {}).get("prefetch") or {}).get("nodes", [{}])[0].get("warm") == 2
        ),
        namespace=NS,
    )
    node = obj["status"]["prefetch"]["nodes"][0]
    assert node["warmRevisions"] == sorted([f"{a}:d3", b])
    assert node["total"] == 3
    assert validate_dataset(obj) == []  # the status the operator wrote fits its own CRD

    # Placement from that status: whole pin B, and folders of A held by the warm part.
    async def affinity(asked: dict[str, str]) -> list[Any]:
        job = await world.admit(_job("placed", {"datapin.dev/dataset": "warm", **asked}))
        spec = job["spec"]["template"]["spec"]
        return list((spec.get("affinity") or {}).get("nodeAffinity", {}).get(PREFERRED, []))

    node_a = [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}]
    for asked, warm in (
        ({"datapin.dev/revision": "v2"}, True),  # B whole, warm whole
        ({"datapin.dev/revision": "v2", "datapin.dev/path": "new"}, True),  # part of a warm whole
        ({"datapin.dev/revision": "v1", "datapin.dev/path": "d3"}, True),  # exactly the part
        ({"datapin.dev/revision": "v1"}, False),  # A whole: only a part of it is warm
        ({"datapin.dev/revision": "v1", "datapin.dev/path": "d4"}, False),  # another folder
    ):
        preferred = await affinity(asked)
        assert bool(preferred) is warm, asked
        if warm:
            assert preferred[0]["preference"]["matchFields"] == node_a

    # A prefetch entry naming a folder A does not hold: Resolved=False with the folders there
    # are, and the entry left off the agents' list.
    await world.api.patch(
        DATASETS,
        "warm",
        {"spec": {"prefetch": {"revisions": ["v1:d3", "v1:nope"]}}},
        namespace=NS,
    )

    def resolved_false(o: dict[str, Any]) -> bool:
        conditions = {c["type"]: c for c in (o.get("status") or {}).get("conditions", [])}
        return conditions.get("Resolved", {}).get("status") == "False"

    obj = await world.api.wait_for(DATASETS, "warm", resolved_false, namespace=NS)
    resolved_condition = next(c for c in obj["status"]["conditions"] if c["type"] == "Resolved")
    assert resolved_condition["reason"] == "PathNotInRevision"
    assert "has no folder 'nope'" in resolved_condition["message"]
    assert TOP_A in resolved_condition["message"]
    cm = await world.api.wait_for(
        "v1/configmaps",
        "datapin-prefetch",
        lambda o: "nope" not in json.dumps(o.get("data")) and "v2" not in json.dumps(o.get("data")),
        namespace=OPERATOR_NS,
    )
    entries = json.loads(cm["data"]["node-a.json"])["revisions"]
    assert [(e["ref"], e.get("paths")) for e in entries if e["name"] == "ml.warm"] == [
        ("v1", ["d3"])
    ]


# -- the folder index and its cache, directly ---------------------------------------------


def _manifest(files: dict[str, bytes]) -> Manifest:
    rng = random.Random(3)
    return Manifest.from_entries(
        ((path, f"{rng.getrandbits(128):032x}") for path in files), source="test"
    )


def test_the_folder_index_answers_exactly_as_the_manifest_does() -> None:
    """The index keeps folders and file hashes only; every answer, and every word of every
    refusal, is the sidecar's own (`Part.select` on the whole manifest)."""
    files = sample_files()
    files.update({f"many/f{i:02d}/x.bin": b"x" for i in range(30)})  # > 20: "and N more"
    files.update({"a-b/x": b"", "a/y": b"", "a.txt": b"", "deep/er/est/z": b""})
    manifest = _manifest(files)
    index = FolderIndex.of(manifest)
    asks = [
        "text",
        "données",
        "deep",
        "deep/er/est",
        "a",
        "a-b",
        "many/f07",
        "nope",
        "a.txt",
        "text/train.csv",
        "deep/er/nope",
        "deep/er/est/z",
        "many/nope",
        "deep/nope/more",
    ]
    for ask in asks:
        part = Part.parse([ask])
        try:
            part.select(manifest, revision="r.dir")
            expected = None
        except PathNotInRevisionError as exc:
            expected = str(exc)
        try:
            index.check(part, revision="r.dir")
            got = None
        except PathNotInRevisionError as exc:
            got = str(exc)
        assert got == expected, ask
    assert index.nbytes < manifest.nbytes()


def _remote(fx: S3DvcFixture, seaweed: SeaweedServer) -> Remote:
    return Remote.model_validate(
        {
            "url": fx.remote_url,
            "endpoint": seaweed.endpoint,
            "region": "us-east-1",
            "credentialsSecretRef": {"name": "b2"},
        }
    )


class CountingPartIndex(PartIndex):
    """A real `PartIndex` that counts the `.dir`s it parses."""

    parsed = 0

    def _index(self, *args: Any, **kwargs: Any) -> FolderIndex:
        self.parsed += 1
        return super()._index(*args, **kwargs)


async def test_the_part_index_reads_a_pin_once_stays_bounded_and_proves_each_key(
    tmp_path: Path, seaweed: SeaweedServer, dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture]
) -> None:
    a, b = dvc3_revisions
    remote = _remote(a, seaweed)
    keys = RemoteKeys(
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
        id_key="AWS_ACCESS_KEY_ID",
        secret_key="AWS_SECRET_ACCESS_KEY",
    )
    one = FolderIndex.of(_manifest({f"d{i}/f": b"" for i in range(12)}))
    parts = CountingPartIndex(
        scratch=tmp_path / "parts", max_bytes=one.nbytes * 3 // 2 + 2000, max_dir_bytes=1 << 20
    )

    async def check(pin: str, folders: str, with_keys: RemoteKeys = keys) -> None:
        await parts.check(
            remote=remote,
            keys=with_keys,
            pin=pin,
            layout=LayoutChoice.AUTO,
            part=Part.parse([folders]),
            where="Secret ml/b2",
        )

    # Eight admissions of one pin at once: one read.
    await asyncio.gather(*(check(a.dvc.rev, "d3") for _ in range(8)))
    assert parts.parsed == 1
    assert parts.cached(remote, a.dvc.rev)
    assert list((tmp_path / "parts").iterdir()) == []  # the scratch copy is gone
    # Bounded by bytes: B's index pushes A's out; A is read again when asked again.
    await check(b.dvc.rev, "new")
    assert parts.cached(remote, b.dvc.rev)
    assert not parts.cached(remote, a.dvc.rev)
    assert parts.cached_bytes <= parts.max_bytes
    await check(a.dvc.rev, "d4")
    assert parts.parsed == 3

    # Another key pair learns nothing from the cache: it must read the `.dir` itself.
    wrong = RemoteKeys(
        access_key_id=seaweed.access_key,
        secret_access_key="not-the-key",
        id_key="AWS_ACCESS_KEY_ID",
        secret_key="AWS_SECRET_ACCESS_KEY",
    )
    with pytest.raises(RemoteCheckError) as refused:
        await check(a.dvc.rev, "nope", wrong)
    assert "nope" not in str(refused.value)
    # A pin never pushed: refused as such, and nothing cached.
    with pytest.raises(RemoteCheckError, match=r"has no 0{32}\.dir"):
        await check("0" * 32 + ".dir", "d3")
    # A `.dir` over the read limit: refused with the setting to raise.
    small = PartIndex(scratch=tmp_path / "small", max_bytes=1 << 20, max_dir_bytes=100)
    with pytest.raises(RemoteCheckError, match="DATAPIN_PART_INDEX_MAX_DIR_MIB"):
        await small.check(
            remote=remote,
            keys=keys,
            pin=a.dvc.rev,
            layout=LayoutChoice.AUTO,
            part=Part.parse(["d3"]),
            where="Secret ml/b2",
        )


def test_a_node_warm_for_the_pin_or_a_part_holding_the_folders_serves_them() -> None:
    pin = "a" * 32 + ".dir"
    images = Part.parse(["images"])
    train = Part.parse(["images/train"])
    both = Part.parse(["images/train", "labels"])
    assert serves(pin, pin=pin, part=Part.WHOLE)
    assert serves(pin, pin=pin, part=train)
    assert not serves(f"{pin}:images", pin=pin, part=Part.WHOLE)
    assert serves(f"{pin}:images", pin=pin, part=train)
    assert serves(f"{pin}:images", pin=pin, part=images)
    assert not serves(f"{pin}:images/train", pin=pin, part=images)
    assert not serves(f"{pin}:images", pin=pin, part=both)
    assert serves(f"{pin}:images,labels", pin=pin, part=both)
    assert not serves(f"{pin}:imagesx", pin=pin, part=images)
    assert not serves("b" * 32 + ".dir", pin=pin, part=Part.WHOLE)
    assert not serves(f"{pin}:../x", pin=pin, part=train)  # not a part: ignored
    assert not serves(None, pin=pin, part=train)
