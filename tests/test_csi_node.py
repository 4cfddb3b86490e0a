"""The CSI node plugin end to end: the real agent, called exactly as kubelet calls it.

Everything is real except the API server (kmock's emulator, which the agent reads over HTTP):
the `datapin-sidecar agent` program in a subprocess on a real XFS node volume, serving CSI and
kubelet registration on unix sockets; kubelet's calls in kubelet's form (`testkit.kubelet`);
volume attributes written by the operator's own webhook code (`inject_csi`); two tenants on
one SeaweedFS server with bucket-scoped keys, tenant A's data pushed by real DVC; mounts
checked in /proc/self/mountinfo and bytes by md5 of every file.

What users depend on: a pod sees its pinned revision read-only, byte for byte, and a second
pod of that revision starts warm on the same shared tree; another tenant is refused, with the
right gRPC code and a message naming the dataset and the pin, by every route the threat model
names; a writable volume writes without touching the shared tree or the cache; an agent killed
with -9 leaves the pod's mount alone and unpublish still cleans up; a pin change on the pod
reaches `current` without a remount; concurrent cold publishes fetch each object once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from datapin_sidecar.csi import mounts
from datapin_sidecar.csi.proto import csi_pb2 as pb
from datapin_sidecar.csi.volume import DRIVER
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.pins import ANNOTATION, PinRecord, format_pins

from testkit.csiagent import ContainerView, CsiAgentNode, Injected, dataset_object, injected
from testkit.csinode import md5_files, md5_tree
from testkit.dvcremote import S3DvcFixture, object_key
from testkit.dvcrepo import sample_files
from testkit.faultproxy import FaultProxy
from testkit.kubeapi import DATASETS, Api, Emulator, emulator
from testkit.kubelet import InlineVolume, publish_request
from testkit.seaweed import SeaweedUnavailable, find_weed
from testkit.tenants import Tenant, TenantSeaweed, push_for
from testkit.trees import object_name

pytestmark = [pytest.mark.s3, pytest.mark.xfs]

NS_A, NS_B = "team-a", "team-b"


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
def pushed_a(tmp_path_factory: pytest.TempPathFactory, tenants: TenantSeaweed) -> S3DvcFixture:
    """Tenant A's revision 1, pushed by real DVC 3 to A's bucket."""
    return push_for(tenants, "a", tmp_path_factory.mktemp("push-a1"))


@pytest.fixture(scope="module")
def pushed_a2(tmp_path_factory: pytest.TempPathFactory, tenants: TenantSeaweed) -> S3DvcFixture:
    """Tenant A's revision 2 (a file changed, one added, one removed), same remote."""
    files = dict(sample_files())
    files["README.txt"] = b"revision two\n"
    files["v2/only-in-two.bin"] = os.urandom(70_000)
    files.pop(sorted(files)[-1])
    return push_for(tenants, "a", tmp_path_factory.mktemp("push-a2"), files=files)


@pytest.fixture
async def api() -> AsyncIterator[tuple[Emulator, Api]]:
    async with emulator() as pair:
        yield pair


def _keys(tenant: Tenant) -> dict[str, str]:
    """The data of a tenant's Secret (the default key names)."""
    return {"AWS_ACCESS_KEY_ID": tenant.access_key, "AWS_SECRET_ACCESS_KEY": tenant.secret_key}


@pytest.fixture
def node_factory(
    xfs_dir: Path, tmp_path: Path, api: tuple[Emulator, Api], tenants: TenantSeaweed
) -> Iterator[Any]:
    """Make nodes (the agent not started yet); every one is closed, even on failure. No
    tenant's key may ever reach an agent's log."""
    made: list[CsiAgentNode] = []

    def make(**kwargs: Any) -> CsiAgentNode:
        n = len(made)
        node = CsiAgentNode(
            xfs_dir / f"node{n}", tmp_path / f"agent{n}", kube_api_url=api[1].url, **kwargs
        )
        (tmp_path / f"agent{n}").mkdir()
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()
    keys = [k for t in tenants.tenants.values() for k in (t.access_key, t.secret_key)]
    for node in made:
        for agent in node.agents:
            output = agent.output()
            assert not any(k in output for k in keys), f"a key in {agent.log_path}"


async def _tenant_a(api: Api, fx: S3DvcFixture, endpoint: str) -> dict[str, Any]:
    dataset = dataset_object("images", NS_A, url=fx.remote_url, endpoint=endpoint, secret="a-keys")
    await api.create(DATASETS, dataset)
    return dataset


async def _pod(api: Api, pod: Injected) -> None:
    await api.create("v1/pods", pod.pod)


# -- checks -------------------------------------------------------------------------------------


def _mount_at(path: Path) -> mounts.Mount:
    found = mounts.mounts_at(path)
    assert found, f"{path} is not a mount point (/proc/self/mountinfo)"
    return found[-1]


def _assert_serves(target: Path, fx: S3DvcFixture) -> None:
    mount = _mount_at(target)
    assert mount.read_only, f"the target is mounted {sorted(mount.options)}"
    assert md5_tree(target / "current") == md5_files(fx.files)


def _tree_of(target: Path) -> tuple[str, str]:
    """The filesystem and directory `current` shows: the shared tree a volume binds."""
    mount = _mount_at((target / "current").resolve())
    assert mount.read_only
    return mount.device, mount.root


def _assert_read_only(target: Path) -> None:
    some = next(p for p in (target / "current").rglob("*") if p.is_file())
    for attempt in (
        lambda: some.write_bytes(b"x"),
        lambda: (target / "current" / "new-file").write_bytes(b"x"),
        lambda: (target / "planted").write_bytes(b"x"),
    ):
        with pytest.raises(OSError, match="Read-only file system") as caught:
            attempt()
        assert caught.value.errno == errno.EROFS, caught.value


def _assert_no_mounts(node: CsiAgentNode, volume: InlineVolume) -> None:
    target = volume.target_path(node.node.kubelet)
    assert node.mounts_below(target) == []
    assert node.mounts_below(node.root / "csi" / volume.volume_id) == []
    assert not (node.root / "csi" / volume.volume_id).exists()


async def _refused(node: CsiAgentNode, volume: InlineVolume) -> tuple[grpc.StatusCode, str]:
    async with node.kubelet.csi(node.csi_socket) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.kubelet.publish(client, volume)
    target = volume.target_path(node.node.kubelet)
    assert not mounts.is_mount(target), "a refused publish left a mount"
    return caught.value.code(), caught.value.details() or ""


# -- 1. registration, identity, a cold and a warm publish ---------------------------------------


async def test_registration_identity_and_a_read_only_publish_then_a_warm_one(
    node_factory: Any, api: tuple[Emulator, Api], tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    # kubelet refusing the plugin is shown on /status, where an admin looks.
    await node.kubelet.notify(node.registration_socket, registered=False, error="kubelet says no")
    status = (await asyncio.to_thread(node.agent.status))["csi"]
    assert status == {
        "registered": False,
        "registration_error": "kubelet says no",
        "volumes": [],  # nothing published yet
    }
    registered = await node.kubelet.register(node.registration_socket)
    assert registered.name == DRIVER
    assert registered.endpoint == str(node.csi_socket)
    assert registered.node_id == "node-1"
    await node.until("kubelet's verdict", lambda: node.agent.status()["csi"]["registered"])

    async with node.kubelet.csi(node.csi_socket) as client:
        info = await client.get_plugin_info()
        assert info.name == DRIVER
        assert info.vendor_version
        caps = await client.node_get_capabilities()
        assert all(
            c.rpc.type != pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME
            for c in caps.capabilities
        ), "no staging: an ephemeral volume is published directly"
        assert (await client.node_get_info()).node_id == "node-1"

        pods = [
            injected(dataset=dataset, pin=pushed_a.rev, secrets=_keys(tenants.tenants["a"]))
            for _ in range(2)
        ]
        for pod in pods:
            await _pod(api[1], pod)
        first = await node.kubelet.publish(client, pods[0].volume)
        _assert_serves(first, pushed_a)
        _assert_read_only(first)
        assert await node.sample("datapin_csi_publish_seconds_count", result="built") == 1

        second = await node.kubelet.publish(client, pods[1].volume)
        _assert_serves(second, pushed_a)
        assert _tree_of(first) == _tree_of(second), "the second pod got a tree of its own"
        assert await node.sample("datapin_csi_publish_seconds_count", result="warm") == 1
        await node.until(
            "the gauges",
            lambda: (
                node.agent.sample("datapin_csi_shared_trees") == 1
                and node.agent.sample("datapin_csi_published_volumes") == 2
            ),
        )
        for pod in pods:
            await node.kubelet.unpublish(client, pod.volume)
            _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


# -- 2. two tenants -----------------------------------------------------------------------------


async def test_another_tenant_is_refused_by_every_route(
    node_factory: Any, api: tuple[Emulator, Api], tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    node: CsiAgentNode = node_factory()
    a, b = tenants.tenants["a"], tenants.tenants["b"]
    dataset_a = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    # B's own bucket holds a `.dir` naming A's objects (the same bytes as A's: its md5 is the
    # pin), under B's Dataset "planted"; B's Dataset "empty" is a prefix holding nothing.
    a_dir = tenants.get(a.bucket, pushed_a.dir_key)
    tenants.put(b.bucket, object_key("dvcstore", pushed_a.rev, layout="dvc3"), a_dir)
    planted = dataset_object(
        "planted", NS_B, url=f"s3://{b.bucket}/dvcstore", endpoint=tenants.endpoint, secret="b"
    )
    empty = dataset_object(
        "empty", NS_B, url=f"s3://{b.bucket}/nothing", endpoint=tenants.endpoint, secret="b"
    )
    for obj in (planted, empty):
        await api[1].create(DATASETS, obj)
    await node.start()

    # A came first: the node has A's revision cached and its tree built.
    pod_a = injected(dataset=dataset_a, pin=pushed_a.rev, secrets=_keys(a))
    await _pod(api[1], pod_a)
    async with node.kubelet.csi(node.csi_socket) as client:
        _assert_serves(await node.kubelet.publish(client, pod_a.volume), pushed_a)

    bogus = {"AWS_ACCESS_KEY_ID": "AKBOGUSBOGUSBOGUS1", "AWS_SECRET_ACCESS_KEY": "S" + "x" * 39}
    cases = [
        # (what, dataset, secrets, pod namespace, code, refusal)
        ("a .dir naming A's objects", planted, _keys(b), None, "PERMISSION_DENIED",
         "objects_not_on_remote"),
        ("A's keys on B's remote", planted, _keys(a), None, "PERMISSION_DENIED", "wrong_keys"),
        ("bogus keys", planted, bogus, None, "PERMISSION_DENIED", "wrong_keys"),
        ("a pin cached on the node but not on B's remote", empty, _keys(b), None,
         "PERMISSION_DENIED", "not_on_remote"),
        ("a Dataset of another namespace", dataset_a, _keys(b), NS_B, "NOT_FOUND", "no_dataset"),
        ("no keys at all", planted, {}, None, "INVALID_ARGUMENT", "no_credentials"),
    ]  # fmt: skip
    every_key = [a.access_key, a.secret_key, b.access_key, b.secret_key, *bogus.values()]
    for what, dataset, secrets, namespace, code, refusal in cases:
        pod = injected(dataset=dataset, pin=pushed_a.rev, secrets=secrets, namespace=namespace)
        await _pod(api[1], pod)
        before = await node.sample("datapin_csi_refusals_total", reason=refusal)
        got, message = await _refused(node, pod.volume)
        assert got.name == code, f"{what}: {got.name} ({message})"
        assert pod.volume.attributes["dataset"] in message, f"{what}: {message}"
        assert pushed_a.rev in message, f"{what}: the message names no pin: {message}"
        assert "Fix" in message, f"{what}: no fix in {message}"
        assert not any(k in message for k in every_key), f"{what}: a key in {message}"
        after = await node.sample("datapin_csi_refusals_total", reason=refusal)
        assert after == before + 1, f"{what}: refusals{{reason={refusal}}} {before} -> {after}"
        assert not (node.root / "csi" / pod.volume.volume_id).exists(), what
    assert await node.sample("datapin_csi_publish_seconds_count", result="refused") == len(cases)
    output = node.agent.output() if node.agent else ""
    assert not any(k in output for k in every_key), "a key reached the agent's log"
    # A is still served, and unaffected.
    target = pod_a.volume.target_path(node.node.kubelet)
    _assert_serves(target, pushed_a)


# -- 3. a writable volume -----------------------------------------------------------------------


async def test_a_writable_volume_writes_and_the_shared_tree_and_cache_stay_identical(
    node_factory: Any, api: tuple[Emulator, Api], tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    keys = _keys(tenants.tenants["a"])
    reader = injected(dataset=dataset, pin=pushed_a.rev, secrets=keys)
    writer = injected(dataset=dataset, pin=pushed_a.rev, secrets=keys, writable=True)
    assert writer.volume.read_only is False
    assert writer.volume.attributes["writable"] == "true"
    async with node.kubelet.csi(node.csi_socket) as client:
        read_only = await node.kubelet.publish(client, reader.volume)
        before = (md5_tree(node.root / "trees"), md5_tree(node.root / "cache"))
        assert before[0], "no shared tree"
        assert before[1], "no cache"
        target = await node.kubelet.publish(client, writer.volume)
        assert md5_tree(target / "current") == md5_files(pushed_a.files)
        current = target / "current"
        some = sorted(p for p in current.rglob("*") if p.is_file())[0]
        some.write_bytes(b"rewritten by the pod\n")
        (current / "a" / "b" / "c" / "deep.txt").unlink()
        (current / "made-by-the-pod").write_bytes(b"new\n")
        (current / "new-dir").mkdir()
        assert some.read_bytes() == b"rewritten by the pod\n"
        # The read-only pod of the same revision still sees the pushed bytes.
        _assert_serves(read_only, pushed_a)
        # The target's own directory is read-only: only the data below `current` is writable.
        with pytest.raises(OSError, match="Read-only file system") as caught:
            (target / "planted").write_bytes(b"x")
        assert caught.value.errno == errno.EROFS
        assert (md5_tree(node.root / "trees"), md5_tree(node.root / "cache")) == before
        for pod in (writer, reader):
            await node.kubelet.unpublish(client, pod.volume)
            _assert_no_mounts(node, pod.volume)
    assert (md5_tree(node.root / "trees"), md5_tree(node.root / "cache")) == before


# -- 4. kill -9 of the agent, restart, idempotency ----------------------------------------------


async def test_an_agent_killed_between_publish_and_unpublish_leaves_the_pod_alone(
    node_factory: Any, api: tuple[Emulator, Api], tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    keys = _keys(tenants.tenants["a"])
    pods = [injected(dataset=dataset, pin=pushed_a.rev, secrets=keys) for _ in range(2)]
    writable = injected(dataset=dataset, pin=pushed_a.rev, secrets=keys, writable=True)
    pods.append(writable)
    async with node.kubelet.csi(node.csi_socket) as client:
        targets = [await node.kubelet.publish(client, pod.volume) for pod in pods]
        # Publish twice (kubelet's retry): the same mount, one mount, still warm.
        table = mounts.mountinfo()
        await node.kubelet.publish(client, pods[0].volume)
        assert len(mounts.mounts_at(targets[0])) == len(mounts.mounts_at(targets[0], table))
        (targets[2] / "current" / "written-before-the-kill").write_bytes(b"kept\n")
    opened = (targets[0] / "current" / "README.txt").open("rb")  # a reader in the pod
    try:
        node.kill()
        # Nothing unmounted by the death of the agent.
        for target in targets[:2]:
            _assert_serves(target, pushed_a)

        await node.start()
        for target in targets[:2]:
            _assert_serves(target, pushed_a)  # the restart unmounted nothing either
        assert (await node.kubelet.register(node.registration_socket)).node_id == "node-1"
        await node.until(
            "the recovered volumes counted",
            lambda: (
                node.agent.sample("datapin_csi_published_volumes") == 3
                and node.agent.sample("datapin_csi_shared_trees") == 1
            ),
        )
        written = targets[2] / "current" / "written-before-the-kill"
        assert written.read_bytes() == b"kept\n"
        assert opened.read() == pushed_a.files["README.txt"]
    finally:
        opened.close()
    async with node.kubelet.csi(node.csi_socket) as client:
        # kubelet republishes after the restart (requiresRepublish): idempotent, warm.
        warm = await node.sample("datapin_csi_publish_seconds_count", result="warm")
        await node.kubelet.publish(client, pods[1].volume)
        assert await node.sample("datapin_csi_publish_seconds_count", result="warm") == warm + 1
        _assert_serves(targets[1], pushed_a)
        for pod in pods:
            await node.kubelet.unpublish(client, pod.volume)
            _assert_no_mounts(node, pod.volume)
            # Unpublish is idempotent (kubelet retries it too).
            await client.node_unpublish(
                volume_id=pod.volume.volume_id,
                target_path=str(pod.volume.target_path(node.node.kubelet)),
            )
    assert node.mounts_below(node.root) == []
    assert node.mounts_below(node.node.kubelet / "pods") == []
    assert list((node.root / "csi").iterdir()) == []


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
async def test_a_publish_cut_by_a_kill_is_served_by_the_retry_and_unpublished_clean(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    pushed_a: S3DvcFixture,
    delay: float,
) -> None:
    """kill -9 during kubelet's first (cold) publish; kubelet retries against the new agent."""
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    pod = injected(dataset=dataset, pin=pushed_a.rev, secrets=_keys(tenants.tenants["a"]))
    async with node.kubelet.csi(node.csi_socket) as client:
        node.kubelet.prepare(pod.volume)
        call = asyncio.ensure_future(
            client.node_publish(publish_request(pod.volume, kubelet_dir=node.node.kubelet))
        )
        await asyncio.sleep(delay)
        node.kill()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call  # cut, or done just before the kill
    await node.start()
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
        _assert_serves(target, pushed_a)
        await node.kubelet.unpublish(client, pod.volume)
        _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


# -- 5. live switch -----------------------------------------------------------------------------


async def test_a_pin_change_on_the_pod_switches_current_without_a_remount(
    tmp_path: Path,
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    pushed_a: S3DvcFixture,
    pushed_a2: S3DvcFixture,
) -> None:
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    pod = injected(dataset=dataset, pin=pushed_a.rev, secrets=_keys(tenants.tenants["a"]))
    assert ANNOTATION in pod.pod["metadata"]["annotations"]
    await _pod(api[1], pod)
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
    _assert_serves(target, pushed_a)
    mount_id = _mount_at(target).mount_id
    container = ContainerView(target, tmp_path / "container-mount")
    opened = (target / "current" / "README.txt").open("rb")  # a reader of revision 1
    try:
        assert await asyncio.to_thread(container.md5_tree) == md5_files(pushed_a.files)
        pins = format_pins(
            [PinRecord(dataset="images", pin=pushed_a2.rev, ref="v2", layout="dvc3")]
        )
        await api[1].patch(
            "v1/pods", pod.pod["metadata"]["name"], {"metadata": {"annotations": pins}}, NS_A
        )
        want = md5_files(pushed_a2.files)
        await node.until("current shows revision 2", lambda: _md5_or_none(target) == want, 60)
        assert _mount_at(target).mount_id == mount_id, "the target was remounted"
        _assert_serves(target, pushed_a2)
        _assert_read_only(target)  # the new tree's mount as well, where the pod sees it
        assert await node.sample("datapin_csi_switches_total", result="ok") == 1
        assert await node.sample("datapin_csi_switches_total", result="failed") == 0
        assert opened.read() == pushed_a.files["README.txt"]
        # The pod's container sees it too: the new tree's mount propagated into its namespace.
        assert await asyncio.to_thread(container.md5_tree) == want
    finally:
        opened.close()
        container.close()
    async with node.kubelet.csi(node.csi_socket) as client:
        await node.kubelet.unpublish(client, pod.volume)
    _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


def _md5_or_none(target: Path) -> dict[str, str] | None:
    try:
        return md5_tree(target / "current")
    except OSError:
        return None


# -- 6. concurrent cold publishes ---------------------------------------------------------------


@pytest.mark.parametrize("etags", ["trusted", "untrusted"])
async def test_concurrent_cold_publishes_fetch_each_object_once(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    pushed_a: S3DvcFixture,
    etags: str,
) -> None:
    """Six pods of one cold revision at once. With the endpoint's ETags trusted (an admin's
    choice) the proof lists and the build downloads; untrusted (the default for a local
    endpoint) the proof is by content, and the cold objects it downloads are the cache's."""
    with FaultProxy(tenants.endpoint) as proxy:
        trusted = [proxy.endpoint] if etags == "trusted" else []
        node: CsiAgentNode = node_factory(trusted_endpoints=trusted)
        dataset = await _tenant_a(api[1], pushed_a, proxy.endpoint)
        await node.start()
        keys = _keys(tenants.tenants["a"])
        pods = [injected(dataset=dataset, pin=pushed_a.rev, secrets=keys) for _ in range(6)]
        async with node.kubelet.csi(node.csi_socket) as client:
            targets = await asyncio.gather(
                *(node.kubelet.publish(client, pod.volume) for pod in pods)
            )
            for target in targets:
                _assert_serves(target, pushed_a)
            gets = proxy.count_ok_gets()
            objects = {  # an empty file needs no download
                f"/{pushed_a.bucket}/{pushed_a.key(object_name(data))}"
                for data in pushed_a.files.values()
                if data
            }
            assert objects <= set(gets), sorted(objects - set(gets))
            fetched_twice = {k: n for k, n in gets.items() if k in objects and n != 1}
            assert not fetched_twice, fetched_twice
            built = await node.sample("datapin_csi_publish_seconds_count", result="built")
            warm = await node.sample("datapin_csi_publish_seconds_count", result="warm")
            assert built >= 1
            assert built + warm == len(pods)
            await node.until(
                "one shared tree", lambda: node.agent.sample("datapin_csi_shared_trees") == 1
            )
            assert len({_tree_of(target) for target in targets}) == 1
            for pod in pods:
                await node.kubelet.unpublish(client, pod.volume)
                _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


async def test_a_pin_changed_while_the_agent_was_down_is_switched_once_keys_are_back(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    pushed_a: S3DvcFixture,
    pushed_a2: S3DvcFixture,
) -> None:
    """The agent keeps no keys on disk: after a restart a switch waits for kubelet's
    republish (requiresRepublish), and then happens within seconds, not at the next list."""
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    pod = injected(dataset=dataset, pin=pushed_a.rev, secrets=_keys(tenants.tenants["a"]))
    await _pod(api[1], pod)
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
    node.kill()
    pins = format_pins([PinRecord(dataset="images", pin=pushed_a2.rev, ref="v2", layout="dvc3")])
    await api[1].patch(
        "v1/pods", pod.pod["metadata"]["name"], {"metadata": {"annotations": pins}}, NS_A
    )
    await node.start()
    await asyncio.sleep(1.0)  # the follower has listed the pod: no keys yet, nothing switched
    _assert_serves(target, pushed_a)
    async with node.kubelet.csi(node.csi_socket) as client:
        await node.kubelet.publish(client, pod.volume)  # kubelet's republish brings the keys
    want = md5_files(pushed_a2.files)
    await node.until("current shows revision 2", lambda: _md5_or_none(target) == want, 20)
    _assert_serves(target, pushed_a2)
    _assert_read_only(target)
    assert await node.sample("datapin_csi_switches_total", result="ok") == 1
    async with node.kubelet.csi(node.csi_socket) as client:
        await node.kubelet.unpublish(client, pod.volume)
    _assert_no_mounts(node, pod.volume)


# -- more of what kubelet and users do -----------------------------------------------------------


async def test_switches_of_a_writable_volume_a_failed_switch_and_unpublish_within_the_grace(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    pushed_a: S3DvcFixture,
    pushed_a2: S3DvcFixture,
) -> None:
    """A writable volume switches to an overlay of the new tree; a switch to a pin the
    tenant's remote lacks fails and the pod keeps its data; unpublish while an old tree is
    still kept for readers (the grace) removes everything."""
    node: CsiAgentNode = node_factory(extra={"spare_grace_seconds": "600"})
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    pod = injected(
        dataset=dataset, pin=pushed_a.rev, secrets=_keys(tenants.tenants["a"]), writable=True
    )
    await _pod(api[1], pod)
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
    (target / "current" / "written-in-one").write_bytes(b"1\n")
    trees_before = md5_tree(node.root / "trees")

    async def pin(rev: str) -> None:
        pins = format_pins([PinRecord(dataset="images", pin=rev, ref="x", layout="dvc3")])
        await api[1].patch(
            "v1/pods", pod.pod["metadata"]["name"], {"metadata": {"annotations": pins}}, NS_A
        )

    await pin(pushed_a2.rev)
    want = md5_files(pushed_a2.files)
    await node.until("current shows revision 2", lambda: _md5_or_none(target) == want, 60)
    (target / "current" / "written-in-two").write_bytes(b"2\n")
    assert md5_tree(node.root / "trees").items() >= trees_before.items()

    await pin("0123456789abcdef0123456789abcdef.dir")  # not on A's remote
    await node.until(
        "a failed switch", lambda: node.agent.sample("datapin_csi_switches_total", result="failed")
    )
    assert (target / "current" / "written-in-two").read_bytes() == b"2\n"
    assert await node.sample("datapin_csi_switches_total", result="ok") == 1
    async with node.kubelet.csi(node.csi_socket) as client:
        await node.kubelet.unpublish(client, pod.volume)
    _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


async def test_what_kubelet_may_send_besides(
    node_factory: Any, api: tuple[Emulator, Api], tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    """readOnly false on a volume that is not writable still mounts read-only; writable with
    readOnly true is refused as contradictory; unpublish of a volume never published is fine."""
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    keys = _keys(tenants.tenants["a"])
    pod = injected(dataset=dataset, pin=pushed_a.rev, secrets=keys)
    by_hand = dataclasses.replace(pod.volume, read_only=False)
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, by_hand)
        _assert_serves(target, pushed_a)
        _assert_read_only(target)
        await node.kubelet.unpublish(client, by_hand)
        _assert_no_mounts(node, by_hand)
        contradictory = injected(dataset=dataset, pin=pushed_a.rev, secrets=keys, writable=True)
        code, message = await _refused(
            node, dataclasses.replace(contradictory.volume, read_only=True)
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT, message
        assert "'images'" in message
        assert pushed_a.rev in message
        assert "Fix" in message
        never = injected(dataset=dataset, pin=pushed_a.rev, secrets=keys).volume
        await client.node_unpublish(
            volume_id=never.volume_id, target_path=str(never.target_path(node.node.kubelet))
        )
    assert node.mounts_below(node.root) == []


# -- GC under space pressure --------------------------------------------------------------------


async def test_gc_under_pressure_removes_unused_trees_and_keeps_what_pods_use(
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
    pushed_a: S3DvcFixture,
    pushed_a2: S3DvcFixture,
) -> None:
    """The volume always above the high watermark: every GC pass evicts all it may. Trees a
    volume uses and their objects stay, publishes still work, an unused tree goes."""
    node: CsiAgentNode = node_factory(
        extra={"gc_high_percent": "1", "gc_low_percent": "0.5", "gc_interval_seconds": "0.2"}
    )
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    keys = _keys(tenants.tenants["a"])
    one = injected(dataset=dataset, pin=pushed_a.rev, secrets=keys)
    two = injected(dataset=dataset, pin=pushed_a2.rev, secrets=keys)
    async with node.kubelet.csi(node.csi_socket) as client:
        target_one = await node.kubelet.publish(client, one.volume)
        target_two = await node.kubelet.publish(client, two.volume)
        _assert_serves(target_one, pushed_a)
        _assert_serves(target_two, pushed_a2)
        tree_two = _tree_of(target_two)
        await node.until(
            "GC passes", lambda: node.agent.sample("datapin_gc_runs_total", result="short") >= 3
        )
        _assert_serves(target_one, pushed_a)
        _assert_serves(target_two, pushed_a2)
        await node.kubelet.unpublish(client, two.volume)
        key_two = Path(tree_two[1]).name
        await node.until(
            "the unused tree removed", lambda: not (node.root / "trees" / key_two).exists()
        )
        _assert_serves(target_one, pushed_a)
        # Published again: rebuilt from the remote.
        again = injected(dataset=dataset, pin=pushed_a2.rev, secrets=keys)
        _assert_serves(await node.kubelet.publish(client, again.volume), pushed_a2)
        for pod in (one, again):
            await node.kubelet.unpublish(client, pod.volume)
    assert node.mounts_below(node.root) == []


async def test_a_graceful_stop_of_the_agent_leaves_volumes_mounted(
    node_factory: Any, api: tuple[Emulator, Api], tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    """A DaemonSet rolling update stops the agent with SIGTERM: pods keep their data, the
    sockets go (kubelet drops the plugin), and the next agent unpublishes cleanly."""
    node: CsiAgentNode = node_factory()
    dataset = await _tenant_a(api[1], pushed_a, tenants.endpoint)
    await node.start()
    pod = injected(dataset=dataset, pin=pushed_a.rev, secrets=_keys(tenants.tenants["a"]))
    async with node.kubelet.csi(node.csi_socket) as client:
        target = await node.kubelet.publish(client, pod.volume)
    assert node.agent is not None
    assert await asyncio.to_thread(node.agent.stop) == 0
    _assert_serves(target, pushed_a)
    assert not node.registration_socket.exists()
    await node.start()
    _assert_serves(target, pushed_a)
    async with node.kubelet.csi(node.csi_socket) as client:
        await node.kubelet.unpublish(client, pod.volume)
    _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


async def test_a_publish_past_kubelets_deadline_keeps_building_and_the_retry_joins_it(
    node_factory: Any, api: tuple[Emulator, Api], tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    """kubelet cancels a slow cold publish at its deadline and retries: the build goes on,
    the retry is served from it, and no object is fetched twice."""
    with FaultProxy(tenants.endpoint) as proxy:
        node: CsiAgentNode = node_factory(trusted_endpoints=[proxy.endpoint])
        dataset = await _tenant_a(api[1], pushed_a, proxy.endpoint)
        await node.start()
        pod = injected(dataset=dataset, pin=pushed_a.rev, secrets=_keys(tenants.tenants["a"]))
        # Objects (not the .dir) slow: the call is cut in the middle of the build.
        proxy.latency(1.5, method="GET", path=re.compile(r"/md5/../[0-9a-f]{30}$"), times=None)
        async with node.kubelet.csi(node.csi_socket) as client:
            node.kubelet.prepare(pod.volume)
            request = publish_request(pod.volume, kubelet_dir=node.node.kubelet)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await client.node_publish(request, deadline=1.0)
            assert cut.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert not mounts.is_mount(request.target_path)
            proxy.clear_faults()
            target = await node.kubelet.publish(client, pod.volume)
            _assert_serves(target, pushed_a)
            downloads = collections.Counter(
                r.path
                for r in proxy.gets("/files/md5/")
                if r.status in (200, 206) and r.complete and r.range != "bytes=0-0"  # a probe
            )
            twice = {k: n for k, n in downloads.items() if n > 1}
            assert not twice, twice
            await node.kubelet.unpublish(client, pod.volume)
            _assert_no_mounts(node, pod.volume)
    assert node.mounts_below(node.root) == []


async def test_a_legacy_dvc2_dataset_in_auto_layout(
    tmp_path_factory: pytest.TempPathFactory,
    node_factory: Any,
    api: tuple[Emulator, Api],
    tenants: TenantSeaweed,
) -> None:
    """A revision pushed by DVC 2.58 (legacy layout, md5-dos2unix names), asked for with
    layout `auto`: the plugin finds the layout on the tenant's remote and serves the bytes."""
    a = tenants.tenants["a"]
    legacy = push_for(
        tenants, "a", tmp_path_factory.mktemp("push-legacy"), version=2, prefix="legacy"
    )
    node: CsiAgentNode = node_factory()
    dataset = dataset_object(
        "old", NS_A, url=legacy.remote_url, endpoint=tenants.endpoint, secret="a-keys"
    )
    await api[1].create(DATASETS, dataset)
    await node.start()
    pods = [
        injected(dataset=dataset, pin=legacy.rev, secrets=_keys(a), layout=LayoutChoice.AUTO)
        for _ in range(2)
    ]
    assert pods[0].volume.attributes["layout"] == "auto"
    async with node.kubelet.csi(node.csi_socket) as client:
        targets = [await node.kubelet.publish(client, pod.volume) for pod in pods]
        for target in targets:
            _assert_serves(target, legacy)
        assert Path(_tree_of(targets[0])[1]).name.endswith("-legacy")
        assert await node.sample("datapin_csi_publish_seconds_count", result="warm") == 1
        for pod in pods:
            await node.kubelet.unpublish(client, pod.volume)
            _assert_no_mounts(node, pod.volume)
