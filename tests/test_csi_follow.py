"""Live switch in CSI mode: the agent follows `datapin.dev/pins` of its node's pods over the
API (kmock's emulator, a real list and watch) and switches exactly the volumes whose pin
changed; other nodes' pods, unrelated pods and bad annotations never cause a switch."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from datapin_sidecar.csi.follow import Follower, Served, changes
from datapin_sidecar.csi.kubeapi import KubeApi, KubeConfig
from datapin_sidecar.pins import ANNOTATION, Pin

from testkit.kubeapi import emulator

A1, A2, B1 = "a" * 32 + ".dir", "b" * 32 + ".dir", "c" * 32 + ".dir"


def _pod(name: str, node: str, pins: dict[str, str], uid: str | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": uid or str(uuid.uuid4()),
            "annotations": {ANNOTATION: json.dumps(pins)},
        },
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
    }


def test_changes_names_only_volumes_whose_pin_moved() -> None:
    uid = str(uuid.uuid4())
    pod = _pod("p", "n", {"imagenet": A2, "coco": B1}, uid)
    served = [
        Served(volume_id="v1", pod_uid=uid, dataset="imagenet", pin=A1),
        Served(volume_id="v2", pod_uid=uid, dataset="coco", pin=B1),
        Served(volume_id="v3", pod_uid=str(uuid.uuid4()), dataset="imagenet", pin=A1),
    ]
    moved = changes(pod, served)
    assert [(s.volume_id, p.revision.oid) for s, p in moved] == [("v1", A2)]
    # A pod without the annotation, or a dataset it no longer lists: nothing to do.
    bare = {"metadata": {"uid": uid}, "spec": {}}
    assert changes(bare, served) == []
    assert changes(_pod("p", "n", {"coco": B1}, uid), served) == []


async def test_follower_switches_on_annotation_change_of_its_nodes_pods() -> None:
    uid, other_uid = str(uuid.uuid4()), str(uuid.uuid4())
    served = [
        Served(volume_id="v1", pod_uid=uid, dataset="imagenet", pin=A1),
        Served(volume_id="v9", pod_uid=other_uid, dataset="imagenet", pin=A1),
    ]
    switched: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def switch(s: Served, pin: Pin) -> None:
        switched.append((s.volume_id, pin.revision.oid))
        done.set()

    async with emulator() as (_, client), KubeApi(KubeConfig(url=client.url)) as api:
        await client.create("v1/pods", _pod("mine", "node-a", {"imagenet": A1}, uid))
        # The same uid's volume on another node's pod would be a forged object: never ours.
        await client.create("v1/pods", _pod("theirs", "node-b", {"imagenet": A2}, other_uid))
        follower = Follower(kube=api, node="node-a", served=lambda: served, switch=switch)
        stopping = asyncio.Event()
        task = asyncio.create_task(follower.run(stopping))
        await asyncio.sleep(0.5)
        assert switched == []  # nothing moved on node-a
        await client.patch(
            "v1/pods",
            "mine",
            {"metadata": {"annotations": {ANNOTATION: json.dumps({"imagenet": A2})}}},
            namespace="ml",
        )
        await asyncio.wait_for(done.wait(), timeout=10)
        # A malformed annotation is logged and changes nothing.
        await client.patch(
            "v1/pods",
            "mine",
            {"metadata": {"annotations": {ANNOTATION: "{not json"}}},
            namespace="ml",
        )
        await asyncio.sleep(0.5)
        stopping.set()
        await asyncio.wait_for(task, timeout=10)
    assert switched == [("v1", A2)]


async def test_a_switch_that_did_not_take_is_retried_without_any_pod_event() -> None:
    """A switch fails (or waits for keys after a restart): it is tried again after a backoff
    from the pod last seen, not only when the watch ends (minutes later)."""
    uid = str(uuid.uuid4())
    served = [Served(volume_id="v1", pod_uid=uid, dataset="imagenet", pin=A1)]
    calls: list[str] = []

    async def switch(s: Served, pin: Pin) -> None:
        calls.append(pin.revision.oid)
        if len(calls) == 1:
            raise RuntimeError("the remote is down")
        served[0] = Served(volume_id="v1", pod_uid=uid, dataset="imagenet", pin=pin.revision.oid)

    async with emulator() as (_, client), KubeApi(KubeConfig(url=client.url)) as api:
        await client.create("v1/pods", _pod("mine", "node-a", {"imagenet": A2}, uid))
        follower = Follower(
            kube=api, node="node-a", served=lambda: list(served), switch=switch, retry_seconds=0.2
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(follower.run(stopping))
        await client.wait_for_true(lambda: served[0].pin == A2, within=10)
        await asyncio.sleep(1.0)  # taken: no more attempts
        stopping.set()
        await asyncio.wait_for(task, timeout=10)
    assert calls == [A2, A2]
