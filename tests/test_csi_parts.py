"""Granular revisions in csi mode (issue 18): a volume of some folders of a revision.

Driven as kubelet drives the plugin, with nothing mocked on the node: the real `datapin-sidecar
agent` in a subprocess on a real XFS node volume, serving CSI on real unix sockets; kubelet's
calls in kubelet's form (`testkit.kubelet`); the volume and the pins annotation written by the
operator's webhook code (`testkit.csiagent.injected`, with the part's `path` attribute);
tenant A's dataset pushed by real DVC 3 to SeaweedFS, read through the fault proxy, which
counts every GET by object key; bytes compared file by file.

What users depend on: a pod that asks for `images/train` sees exactly those entries, at their
paths in the revision, byte for byte, read-only, and the node downloads nothing else; a pod of
the part and a pod of the whole revision on one node download each object once between them
(with the endpoint's ETags trusted, and with proof by content); a path the revision does not
hold, a file named as a folder, or a path escaping the tree is refused with INVALID_ARGUMENT
and a message saying what to write instead (but a tenant who cannot read the pin learns no
folder names); kubelet's republish of a part volume is warm and the same volume with another
path is a conflict; a new pin keeps the part, and the pins can change the part live.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from datapin_sidecar.csi import mounts
from datapin_sidecar.csi.access import (
    Access,
    ProofMethod,
    ProvenanceRecord,
    fingerprint,
    remote_id,
)
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import tree_key
from datapin_sidecar.errors import PathNotInRevisionError
from datapin_sidecar.pins import ANNOTATION, PinRecord, format_pins
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials

from testkit.csiagent import ContainerView, CsiAgentNode, Injected, dataset_object, injected
from testkit.csinode import md5_files, md5_tree
from testkit.dvcremote import S3DvcFixture
from testkit.faultproxy import FaultProxy
from testkit.kubeapi import DATASETS, Api, Emulator, emulator
from testkit.kubelet import InlineVolume
from testkit.seaweed import SeaweedUnavailable, find_weed
from testkit.tenants import Tenant, TenantSeaweed, push_for
from testkit.trees import object_name
from tests.test_csi_access import Counting, s3_remote

pytestmark = [pytest.mark.s3, pytest.mark.xfs]

NS_A, NS_B = "team-a", "team-b"
TRAIN = Part.parse(["images/train"])


def _files(seed: int) -> dict[str, bytes]:
    """A revision laid out like an image dataset: splits under images/, labels, a README.

    One object is in both train and val (the same bytes twice), one only in train, an empty
    file in train: a part's objects and the rest overlap, as in real datasets.
    """
    rng = random.Random(seed)
    files: dict[str, bytes] = {"README.md": b"an image dataset\n"}
    shared = rng.randbytes(3000)
    for split, count in (("train", 8), ("val", 4), ("test", 3)):
        for i in range(count):
            files[f"images/{split}/img-{i:02d}.jpg"] = rng.randbytes(rng.choice([500, 4000, 30000]))
        files[f"labels/{split}.csv"] = f"id,label\n{split},{rng.randint(0, 9)}\n".encode()
    files["images/train/shared.bin"] = shared
    files["images/val/shared.bin"] = shared
    files["images/train/nested/deeper/note.txt"] = b"three levels into train\n"
    files["images/train/empty.txt"] = b""
    files["images/train-extra/x.bin"] = rng.randbytes(900)  # sorts right after images/train/
    return files


def _under(files: dict[str, bytes], part: Part) -> dict[str, bytes]:
    """The entries of `files` beneath the part's folders, at their paths in the revision."""
    return {k: v for k, v in files.items() if any(k.startswith(f"{p}/") for p in part.paths)}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantSeaweed]:
    try:
        weed = find_weed()
    except SeaweedUnavailable as exc:
        pytest.skip(f"no SeaweedFS S3 server: {exc.reason}")
    with TenantSeaweed(tmp_path_factory.mktemp("tenants"), weed=weed, tenants=("a", "b")) as s:
        yield s


@pytest.fixture(scope="module")
def rev1(tmp_path_factory: pytest.TempPathFactory, tenants: TenantSeaweed) -> S3DvcFixture:
    """Tenant A's revision 1, pushed by real DVC 3."""
    return push_for(tenants, "a", tmp_path_factory.mktemp("parts-1"), files=_files(1))


@pytest.fixture(scope="module")
def rev2(
    tmp_path_factory: pytest.TempPathFactory, tenants: TenantSeaweed, rev1: S3DvcFixture
) -> S3DvcFixture:
    """Revision 2: in train one image changed, one added, one removed; val changed too."""
    files = dict(rev1.files)
    files["images/train/img-00.jpg"] = b"changed in revision two\n" * 50
    files["images/train/img-new.jpg"] = random.Random(2).randbytes(12000)
    files.pop("images/train/img-07.jpg")
    files["images/val/img-00.jpg"] = b"val changed too\n"
    return push_for(tenants, "a", tmp_path_factory.mktemp("parts-2"), files=files)


@pytest.fixture
async def api() -> AsyncIterator[tuple[Emulator, Api]]:
    async with emulator() as pair:
        yield pair


@pytest.fixture
def proxy(tenants: TenantSeaweed) -> Iterator[FaultProxy]:
    with FaultProxy(tenants.endpoint) as p:
        yield p


@pytest.fixture
def node_factory(
    xfs_dir: Path, tmp_path: Path, api: tuple[Emulator, Api], tenants: TenantSeaweed
) -> Iterator[Any]:
    """Make nodes (not started); each is closed (agents stopped by PID, every mount below it
    unmounted) even when the test fails. No tenant's key may reach an agent's log."""
    made: list[CsiAgentNode] = []

    def make(**kwargs: Any) -> CsiAgentNode:
        n = len(made)
        (tmp_path / f"agent{n}").mkdir()
        node = CsiAgentNode(
            xfs_dir / f"node{n}", tmp_path / f"agent{n}", kube_api_url=api[1].url, **kwargs
        )
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()
    keys = [k for t in tenants.tenants.values() for k in (t.access_key, t.secret_key)]
    for node in made:
        for agent in node.agents:
            assert not any(k in agent.output() for k in keys), f"a key in {agent.log_path}"


def _keys(tenant: Tenant) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": tenant.access_key, "AWS_SECRET_ACCESS_KEY": tenant.secret_key}


async def _dataset(api: Api, fx: S3DvcFixture, endpoint: str) -> dict[str, Any]:
    dataset = dataset_object("images", NS_A, url=fx.remote_url, endpoint=endpoint, secret="a-keys")
    await api.create(DATASETS, dataset)
    return dataset


async def _pod(
    api: Api, dataset: dict[str, Any], fx: S3DvcFixture, tenant: Tenant, part: Part = Part.WHOLE
) -> Injected:
    pod = injected(dataset=dataset, pin=fx.rev, secrets=_keys(tenant), part=part)
    await api.create("v1/pods", pod.pod)
    return pod


# -- checks -------------------------------------------------------------------------------------


def _assert_serves_exactly(target: Path, files: dict[str, bytes]) -> None:
    """`current` holds exactly `files`, byte for byte, and the target is read-only."""
    found = mounts.mounts_at(target)
    assert found, f"{target} is not a mount point"
    assert found[-1].read_only, f"the target is mounted {sorted(found[-1].options)}"
    current = target / "current"
    seen = sorted(p.relative_to(current).as_posix() for p in current.rglob("*") if p.is_file())
    assert seen == sorted(files), (
        f"extra {set(seen) - set(files)}, missing {set(files) - set(seen)}"
    )
    for rel, data in files.items():
        assert (current / rel).read_bytes() == data, rel


def _tree_key_of(target: Path) -> str:
    """The key of the shared tree `current` shows (the bind's root)."""
    mount = mounts.mounts_at((target / "current").resolve())[-1]
    return Path(mount.root).name


def _object_gets(proxy: FaultProxy, fx: S3DvcFixture) -> dict[str, int]:
    """Object key -> complete GETs at the proxy, for every non-empty object of `fx` (an empty
    file needs no download) and any other object key of the remote that was fetched."""
    gets = proxy.count_ok_gets()
    prefix = f"/{fx.bucket}/{fx.prefix}/files/md5/"
    found = {f"/{fx.bucket}/{fx.key(object_name(d))}": 0 for d in fx.files.values() if d}
    for path, n in gets.items():
        if path.startswith(prefix) and not path.endswith(".dir"):
            found[path] = n
    return found


def _with_path(volume: InlineVolume, path: str) -> InlineVolume:
    """`volume` with its `path` attribute written by hand."""
    return dataclasses.replace(volume, attributes={**volume.attributes, "path": path})


def _keys_of(fx: S3DvcFixture, files: dict[str, bytes]) -> set[str]:
    return {f"/{fx.bucket}/{fx.key(object_name(d))}" for d in files.values() if d}


async def _refused(node: CsiAgentNode, volume: InlineVolume) -> tuple[grpc.StatusCode, str]:
    async with node.kubelet.csi(node.csi_socket) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.kubelet.publish(client, volume)
    assert not mounts.is_mount(volume.target_path(node.node.kubelet)), "a refusal mounted"
    assert not (node.root / "csi" / volume.volume_id).exists(), "a refusal left a volume"
    return caught.value.code(), caught.value.details() or ""


def _assert_no_mounts(node: CsiAgentNode, volume: InlineVolume) -> None:
    assert node.mounts_below(volume.target_path(node.node.kubelet)) == []
    assert not (node.root / "csi" / volume.volume_id).exists()


def _md5_or_none(target: Path) -> dict[str, str] | None:
    try:
        return md5_tree(target / "current")
    except OSError:
        return None


# -- the proof of access of a part --------------------------------------------------------------


async def test_proofs_of_a_part_and_of_the_whole_compose(
    tmp_path: Path, tenants: TenantSeaweed, rev1: S3DvcFixture
) -> None:
    """Proof by content (every object asked is downloaded and hashed): a part asks for its own
    objects and writes its own record; the whole then asks only for the rest; a whole record
    proves any part; a record whose folders are not its key's is not trusted; an ETag record
    does not count where ETags are not trusted; a folder the revision lacks is found after the
    pin was proven."""
    a = tenants.tenants["a"]
    all_objects = {object_name(d) for d in rev1.files.values()}
    train = {object_name(d) for d in _under(rev1.files, TRAIN).values()}
    md5 = rev1.rev.removesuffix(".dir")
    cache = NodeCache(tmp_path / "root" / "cache")
    keys = _static(a)
    async with s3_remote(tenants.endpoint, a.bucket, keys) as s3:
        # The node has the revision cached (another pod's): proof by content downloads all.
        await s3.afetch(cache, [rev1.rev, *all_objects], Layout.DVC3)
        remote = Counting(s3)

        async def prove(access: Access, part: Part, *, trust: bool = False) -> None:
            await access.prove(
                remote=remote,
                credentials_fingerprint=fingerprint(a.access_key, a.secret_key),
                cache=cache,
                revision=Revision.parse(rev1.rev),
                layout=Layout.DVC3,
                dataset="images",
                trust_etags=trust,
                part=part,
            )

        access = Access(tmp_path / "root")
        await prove(access, TRAIN)
        assert remote.asked == [1, len(train)]
        (record,) = access.records()
        assert record.tree_key == tree_key(md5, "dvc3", TRAIN)
        assert record.paths == ("images/train",)
        assert record.objects == len(train)
        await prove(access, Part.WHOLE)
        assert remote.asked[2:] == [len(all_objects - train)], "the part's objects asked again"
        assert {r.tree_key for r in access.records()} == {md5, tree_key(md5, "dvc3", TRAIN)}
        # Another part: the whole's record proves it, nothing is asked (the pin is remembered).
        remote.asked.clear()
        await prove(access, Part.parse(["labels"]))
        assert remote.asked == []

        # Records read by a new process: the part's own record proves it.
        other_root = tmp_path / "other"
        other_root.mkdir()
        fresh = Access(other_root)
        await prove(fresh, TRAIN, trust=True)  # an ETag record...
        remote.asked.clear()
        await prove(fresh, TRAIN)  # ...does not count for proof by content (pin remembered)
        assert remote.asked == [len(train)]

        # A record whose folders are not the ones its key names is not ours: ignored.
        val = Part.parse(["images/val"])
        forged = ProvenanceRecord(
            remote_id=remote_id(s3),
            tree_key=tree_key(md5, "dvc3", val),
            remote=s3.url,
            objects=1,
            method=ProofMethod.CONTENT,
            proven_at=0.0,
            paths=("images/test",),
        )
        path = other_root / "provenance" / forged.remote_id / forged.tree_key
        path.write_text(forged.to_json())
        assert forged.tree_key not in {r.tree_key for r in fresh.records()}
        remote.asked.clear()
        await prove(fresh, val)
        # (the train record's proof of the object val shares with train still counts)
        val_objects = {object_name(d) for d in _under(rev1.files, val).values()}
        assert val_objects & train, "the dataset has an object in both splits"
        assert remote.asked == [len(val_objects - train)]

        # A folder the revision lacks: known only once the pin is proven with these keys.
        (tmp_path / "third").mkdir()
        with pytest.raises(PathNotInRevisionError, match="top-level folders are: images, labels"):
            await prove(Access(tmp_path / "third"), Part.parse(["nope"]))


def _static(tenant: Tenant) -> StaticCredentials:
    creds = Credentials(access_key_id=tenant.access_key, secret_access_key=tenant.secret_key)
    return StaticCredentials(creds, source="the test's Secret")


# -- a part, alone ------------------------------------------------------------------------------


@pytest.mark.parametrize("etags", ["trusted", "untrusted"])
async def test_a_part_volume_serves_exactly_the_part_and_fetches_nothing_else(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    proxy: FaultProxy,
    rev1: S3DvcFixture,
    etags: str,
) -> None:
    """`images/train` (next to `images/train-extra`, which sorts right after it): exactly its
    entries at their paths; every object of the part downloaded once, none of the rest; the
    proof is the part's own record; kubelet's republish and a second pod of the part are
    warm with no request for an object; the same volume asking for another path conflicts."""
    node: CsiAgentNode = node_factory(
        trusted_endpoints=[proxy.endpoint] if etags == "trusted" else []
    )
    dataset = await _dataset(api[1], rev1, proxy.endpoint)
    await node.start()
    a = tenants.tenants["a"]
    pod = await _pod(api[1], dataset, rev1, a, TRAIN)
    assert pod.volume.attributes["path"] == "images/train"
    assert json.loads(pod.pod["metadata"]["annotations"][ANNOTATION])["images"]["paths"] == [
        "images/train"
    ]
    part_files = _under(rev1.files, TRAIN)
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
        _assert_serves_exactly(target, part_files)
        md5 = rev1.rev.removesuffix(".dir")
        key = tree_key(md5, "dvc3", TRAIN)
        assert _tree_key_of(target) == key
        assert not (node.root / "trees" / md5).exists(), "the whole revision was built"

        gets = _object_gets(proxy, rev1)
        inside = _keys_of(rev1, part_files)
        assert {k: n for k, n in gets.items() if k in inside and n != 1} == {}
        outside = {k: n for k, n in gets.items() if k not in inside and n}
        assert outside == {}, f"objects outside the part were fetched: {outside}"

        # The proof of access is the part's own record, naming its folders.
        (record,) = [p for p in (node.root / "provenance").glob("*/*") if p.is_file()]
        assert record.name == key
        assert json.loads(record.read_bytes())["paths"] == ["images/train"]

        # kubelet's republish (the same request): warm, nothing asked of the remote.
        proxy.reset_counters()
        warm = await node.sample("datapin_csi_publish_seconds_count", result="warm")
        await node.kubelet.publish(client, pod.volume)
        another = await _pod(api[1], dataset, rev1, a, TRAIN)
        second = await node.kubelet.publish(client, another.volume)
        assert await node.sample("datapin_csi_publish_seconds_count", result="warm") == warm + 2
        _assert_serves_exactly(second, part_files)
        assert _tree_key_of(second) == key
        assert not [k for k, n in _object_gets(proxy, rev1).items() if n], "a warm publish fetched"

        # The agent's /status lists each volume with the part it serves.
        def listed() -> list[Any]:
            csi = node.agent.status()["csi"]
            return [v for v in csi["volumes"] if v["path"] == "images/train"]

        await node.until("/status lists the part's volumes", lambda: len(listed()) == 2)
        assert {v["tree"] for v in listed()} == {key}

        # The same volume id asking for other folders is not the volume kubelet published.
        other = _with_path(pod.volume, "labels")
        async with node.kubelet.csi(node.csi_socket) as again:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await node.kubelet.publish(again, other)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "path" in (caught.value.details() or "")
        _assert_serves_exactly(target, part_files)

        for p in (pod, another):
            await node.kubelet.unpublish(client, p.volume)
            _assert_no_mounts(node, p.volume)
    assert node.mounts_below(node.root) == []


async def test_a_part_of_several_folders(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    rev1: S3DvcFixture,
) -> None:
    """`labels,images/val/` as a user may write it: normalised, served together."""
    node: CsiAgentNode = node_factory()
    dataset = await _dataset(api[1], rev1, tenants.endpoint)
    await node.start()
    part = Part.parse(["images/val", "labels"])
    pod = await _pod(api[1], dataset, rev1, tenants.tenants["a"], part)
    assert pod.volume.attributes["path"] == "images/val,labels"
    written = _with_path(pod.volume, " labels,images/val/")
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, written)
        _assert_serves_exactly(target, _under(rev1.files, part))
        assert _tree_key_of(target) == tree_key(rev1.rev.removesuffix(".dir"), "dvc3", part)
        await node.kubelet.unpublish(client, written)
        _assert_no_mounts(node, written)
    assert node.mounts_below(node.root) == []


# -- a part and the whole on one node -----------------------------------------------------------


@pytest.mark.parametrize("etags", ["trusted", "untrusted"])
async def test_a_part_and_the_whole_at_once_download_each_object_once(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    proxy: FaultProxy,
    rev1: S3DvcFixture,
    etags: str,
) -> None:
    """Two pods on one node published at once, one of `images/train`, one of the whole
    revision: two trees, and one GET per object between them, whichever goes first; untrusted
    ETags (proof by content) included, where the proofs compose instead of re-downloading."""
    node: CsiAgentNode = node_factory(
        trusted_endpoints=[proxy.endpoint] if etags == "trusted" else []
    )
    dataset = await _dataset(api[1], rev1, proxy.endpoint)
    await node.start()
    a = tenants.tenants["a"]
    part_pod = await _pod(api[1], dataset, rev1, a, TRAIN)
    whole_pod = await _pod(api[1], dataset, rev1, a)
    assert "path" not in whole_pod.volume.attributes
    async with node.kubelet.csi(node.csi_socket) as client:
        part_target, whole_target = await asyncio.gather(
            node.kubelet.publish(client, part_pod.volume),
            node.kubelet.publish(client, whole_pod.volume),
        )
        _assert_serves_exactly(part_target, _under(rev1.files, TRAIN))
        _assert_serves_exactly(whole_target, rev1.files)
        # The part's entries are the whole's under the same folders, byte for byte.
        for rel in _under(rev1.files, TRAIN):
            assert (part_target / "current" / rel).read_bytes() == (
                whole_target / "current" / rel
            ).read_bytes()
        md5 = rev1.rev.removesuffix(".dir")
        assert _tree_key_of(part_target) == tree_key(md5, "dvc3", TRAIN)
        assert _tree_key_of(whole_target) == md5
        gets = _object_gets(proxy, rev1)
        assert set(gets) == _keys_of(rev1, rev1.files)
        assert {k: n for k, n in gets.items() if n != 1} == {}, "not one GET per object"
        for pod in (part_pod, whole_pod):
            await node.kubelet.unpublish(client, pod.volume)
            _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


# -- refusals -----------------------------------------------------------------------------------


async def test_a_bad_path_is_refused_with_what_to_write_instead(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    rev1: S3DvcFixture,
) -> None:
    """INVALID_ARGUMENT, counted as bad_volume, nothing built or mounted: for a folder the
    revision lacks (the message lists its folders), a file named as a folder (the message names
    its folder), and paths that leave the tree (refused before the remote is asked). Another
    tenant, whose keys cannot read the pin, is refused for that and learns no folder names."""
    node: CsiAgentNode = node_factory()
    dataset = await _dataset(api[1], rev1, tenants.endpoint)
    empty = dataset_object(
        "empty",
        NS_B,
        url=f"s3://{tenants.tenants['b'].bucket}/nothing",
        endpoint=tenants.endpoint,
        secret="b",
    )
    await api[1].create(DATASETS, empty)
    await node.start()

    def asking(path: str) -> InlineVolume:
        pod = injected(
            dataset=dataset, pin=rev1.rev, secrets=_keys(tenants.tenants["a"]), part=TRAIN
        )
        return _with_path(pod.volume, path)

    cases = [
        # (path, what the message must say)
        ("images/nope", ["has no folder 'images/nope'", "'images' holds: ",
                         "top-level folders are: images, labels", "Fix"]),
        ("nope", ["has no folder 'nope'", "top-level folders are: images, labels", "Fix"]),
        ("README.md", ["is a file", "leave the path out", "Fix"]),
        ("images/train/img-00.jpg", ["is a file", "name its folder ('images/train')", "Fix"]),
        ("../secrets", ["'..' segment escapes the tree", "Fix"]),
        ("images/../labels", ["'..' segment escapes the tree", "Fix"]),
        ("/etc", ["absolute path", "Fix"]),
        (".", ["names the revision's root", "leave the path out"]),
    ]  # fmt: skip
    for path, says in cases:
        before = await node.sample("datapin_csi_refusals_total", reason="bad_volume")
        code, message = await _refused(node, asking(path))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (path, message)
        assert "volume attribute 'path'" in message, message
        assert "'images'" in message, f"the dataset is not named: {message}"
        assert rev1.rev in message, f"the pin is not named: {message}"
        for text in says:
            assert text in message, f"{path!r}: {text!r} not in {message}"
        if "'images' holds: " in message:  # the folders beside the one asked for (any order)
            beside = message.split("'images' holds: ", 1)[1].split(";", 1)[0].split(", ")
            assert sorted(beside) == ["test", "train", "train-extra", "val"], message
        after = await node.sample("datapin_csi_refusals_total", reason="bad_volume")
        assert after == before + 1, path
    md5 = rev1.rev.removesuffix(".dir")
    built = [p.name for p in (node.root / "trees").glob(f"{md5}*")]
    assert built == [], f"a refused path built {built}"

    # Tenant B names A's pin (cached on the node by now: the .dir) with a folder that does not
    # exist: refused for access, before any folder of A's revision is looked at.
    stranger = injected(
        dataset=empty, pin=rev1.rev, secrets=_keys(tenants.tenants["b"]), part=Part(("nope",))
    )
    code, message = await _refused(node, stranger.volume)
    assert code is grpc.StatusCode.PERMISSION_DENIED, message
    assert "train" not in message
    assert "labels" not in message
    assert node.mounts_below(node.root) == []


# -- live switch --------------------------------------------------------------------------------


async def test_a_new_pin_keeps_the_part_and_the_pins_may_change_it(
    tmp_path: Path,
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    proxy: FaultProxy,
    rev1: S3DvcFixture,
    rev2: S3DvcFixture,
) -> None:
    """A part volume whose pod gets a new pin (the webhook writes the same folders) switches
    `current` to revision 2's train, without a remount, fetching only train's new objects; the
    pod's container sees it; kubelet's republish (the original attributes) stays warm; the
    pins naming other folders switch the part too."""
    node: CsiAgentNode = node_factory(trusted_endpoints=[proxy.endpoint])
    dataset = await _dataset(api[1], rev1, proxy.endpoint)
    await node.start()
    pod = await _pod(api[1], dataset, rev1, tenants.tenants["a"], TRAIN)
    name = pod.pod["metadata"]["name"]

    async def pin(fx: S3DvcFixture, part: Part) -> None:
        record = PinRecord(
            dataset="images", pin=fx.rev, ref="v2", layout=LayoutChoice.DVC3, part=part
        )
        patch = {"metadata": {"annotations": format_pins([record])}}
        await api[1].patch("v1/pods", name, patch, NS_A)

    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
    _assert_serves_exactly(target, _under(rev1.files, TRAIN))
    mount_id = mounts.mounts_at(target)[-1].mount_id
    container = ContainerView(target, tmp_path / "container-mount")
    try:
        proxy.reset_counters()
        await pin(rev2, TRAIN)
        want = md5_files(_under(rev2.files, TRAIN))
        await node.until("current shows revision 2's train", lambda: _md5_or_none(target) == want)
        assert mounts.mounts_at(target)[-1].mount_id == mount_id, "the target was remounted"
        _assert_serves_exactly(target, _under(rev2.files, TRAIN))
        assert _tree_key_of(target) == tree_key(rev2.rev.removesuffix(".dir"), "dvc3", TRAIN)
        assert await asyncio.to_thread(container.md5_tree) == want
        # Only train's new objects: not val's changed one, nothing already cached.
        new = _keys_of(rev2, _under(rev2.files, TRAIN)) - _keys_of(rev1, rev1.files)
        fetched = {k for k, n in _object_gets(proxy, rev2).items() if n}
        assert fetched == new, (sorted(fetched), sorted(new))
        assert await node.sample("datapin_csi_switches_total", result="ok") == 1

        # kubelet's republish sends the pod's attributes as they were: the same volume, warm.
        warm = await node.sample("datapin_csi_publish_seconds_count", result="warm")
        async with node.kubelet.csi(node.csi_socket) as client:
            await node.kubelet.publish(client, pod.volume)
        assert await node.sample("datapin_csi_publish_seconds_count", result="warm") == warm + 1
        _assert_serves_exactly(target, _under(rev2.files, TRAIN))

        # The pins name other folders of revision 2: the part follows them.
        other = Part.parse(["images/val", "labels"])
        await pin(rev2, other)
        want = md5_files(_under(rev2.files, other))
        await node.until("current shows val and labels", lambda: _md5_or_none(target) == want)
        _assert_serves_exactly(target, _under(rev2.files, other))
        assert await asyncio.to_thread(container.md5_tree) == want
        assert await node.sample("datapin_csi_switches_total", result="ok") == 2
    finally:
        container.close()
    async with node.kubelet.csi(node.csi_socket) as client:
        await node.kubelet.unpublish(client, pod.volume)
    _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


async def test_a_switch_to_folders_the_new_pin_lacks_keeps_the_pod_on_its_tree(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    rev1: S3DvcFixture,
) -> None:
    """The pins name a folder the revision does not hold: the switch fails (counted), the
    pod keeps what it had."""
    node: CsiAgentNode = node_factory()
    dataset = await _dataset(api[1], rev1, tenants.endpoint)
    await node.start()
    pod = await _pod(api[1], dataset, rev1, tenants.tenants["a"], TRAIN)
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
    record = PinRecord(
        dataset="images",
        pin=rev1.rev,
        ref="v1",
        layout=LayoutChoice.DVC3,
        part=Part(("images/nope",)),
    )
    patch = {"metadata": {"annotations": format_pins([record])}}
    await api[1].patch("v1/pods", pod.pod["metadata"]["name"], patch, NS_A)
    agent = node.agent
    assert agent is not None
    await node.until(
        "a failed switch", lambda: agent.sample("datapin_csi_switches_total", result="failed")
    )
    _assert_serves_exactly(target, _under(rev1.files, TRAIN))
    assert "has no folder 'images/nope'" in agent.output()
    async with node.kubelet.csi(node.csi_socket) as client:
        await node.kubelet.unpublish(client, pod.volume)
    _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []
