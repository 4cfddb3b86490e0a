"""Live switch in CSI mode: follow the `datapin.dev/pins` annotation of the node's pods.

In sidecar mode the sidecar reads its pod's annotations from a downward-API file and switches
when they change. In CSI mode there is no container in the pod, so the agent does it: it lists
and watches the pods of its own node (`spec.nodeName` field selector, read-only RBAC) and, when
a pod with a published volume carries a pin for that volume's dataset other than the one
served (or names other folders of it: `Pin.part`), asks the plugin to switch that volume
(`NodePlugin.switch`: prove access with the volume's own keys, ensure the shared tree, bind it
under the volume and swap `current`). The pins are what the pod is to see: the folders they
name (none: the whole revision) are the part a switch serves, so a new pin keeps the part the
webhook wrote in both the volume's `path` and the pins, and an edit of the folders alone is a
switch too.

`changes` is the pure part (a pod and what is served in, the switches to make out), so it is
tested without a watch. `Follower.run` is the loop: list, then watch from the list's
resourceVersion until the server ends the watch (or it fails: a backoff), then list again.
One switch per volume runs at a time; a pod whose annotation cannot be parsed is logged once
per version and left as it is (the pin served stays: a bad edit never takes a running pod's
data away).

**Retries.** A switch that did not take (it failed, or it waits for the volume's keys, which
kubelet brings back with its next republish after an agent restart) is tried again from the
pods last seen, after `retry_seconds`, doubling up to `BACKOFF_MAX_SECONDS`: a watch can stay
open for `WATCH_SECONDS`, and a pod must not wait that long for a retry (an edit of the pod
is considered at once, as always).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from datapin_sidecar.csi.kubeapi import KubeApi
from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import DatapinError
from datapin_sidecar.pins import ANNOTATION, Pin, parse_pins

log = logging.getLogger(__name__)

#: Longest wait before listing again after a failed list or watch, or a switch is retried.
BACKOFF_MAX_SECONDS: Final = 30.0
#: First wait before a switch that did not take is tried again.
RETRY_SECONDS: Final = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """A published volume, as the follower needs it."""

    volume_id: str
    pod_uid: str
    dataset: str
    #: The object id served now (`<md5>.dir`).
    pin: str
    #: The folders of it served now (`engine.part`); `Part.WHOLE`: all of it.
    part: Part = Part.WHOLE

    def serves(self, pin: Pin) -> bool:
        """Whether this volume serves what `pin` names: its revision and its folders."""
        return pin.revision.oid == self.pin and pin.part == self.part


def changes(pod: Mapping[str, Any], served: Iterable[Served]) -> list[tuple[Served, Pin]]:
    """The volumes of `pod` whose dataset's pin in its annotations differs from the served one
    (another revision, or other folders of it: the pins say which folders, and no paths
    there is the whole revision)."""
    meta = pod.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    mine = [s for s in served if s.pod_uid == uid]
    annotations = meta.get("annotations") or {}
    if not mine or ANNOTATION not in annotations:
        return []
    source = f"pod {meta.get('namespace')}/{meta.get('name')}"
    pins = parse_pins(annotations, source=source)  # AnnotationsError: the caller logs it
    return [
        (s, pins[s.dataset]) for s in mine if s.dataset in pins and not s.serves(pins[s.dataset])
    ]


class Follower:
    """Watch the node's pods and switch volumes whose pin changed (see the module doc)."""

    def __init__(
        self,
        *,
        kube: KubeApi,
        node: str,
        served: Callable[[], list[Served]],
        switch: Callable[[Served, Pin], Awaitable[None]],
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.kube = kube
        self.node = node
        self.served = served
        self.switch = switch
        self.retry_seconds = retry_seconds
        self._running: dict[str, asyncio.Task[None]] = {}
        self._bad: set[tuple[str, str]] = set()
        #: The node's pods as last listed or watched, by uid (what a retry looks at).
        self._pods: dict[str, Mapping[str, Any]] = {}
        #: volume id -> (when a retry may run, switches that did not take in a row).
        self._retry: dict[str, tuple[float, int]] = {}

    async def run(self, stopping: asyncio.Event) -> None:
        """List and watch until `stopping` is set (which ends an open watch at once)."""
        stop = asyncio.ensure_future(stopping.wait())
        retries = asyncio.ensure_future(self._retries())
        failures = 0
        try:
            while not stopping.is_set():
                cycle = asyncio.ensure_future(self._cycle())
                await asyncio.wait({cycle, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not cycle.done():
                    cycle.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await cycle
                    break
                try:
                    cycle.result()
                    failures = 0
                except Exception as exc:  # the API is down, RBAC, a bug: list again later
                    failures += 1
                    log.warning("following the node's pods failed (%s); listing again", exc)
                wait = min(BACKOFF_MAX_SECONDS, 0.5 * 2**failures) if failures else 0.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop), timeout=wait)
        finally:
            stop.cancel()
            retries.cancel()
            for task in self._running.values():
                task.cancel()

    async def _cycle(self) -> None:
        """One list, then one watch from its resourceVersion until the server ends it."""
        pods, version = await self.kube.pods(self.node)
        self._pods = {}
        for pod in pods:
            self._seen(pod)
            self.consider(pod)
        async for kind, pod in self.kube.watch_pods(self.node, version):
            if kind in ("ADDED", "MODIFIED"):
                self._seen(pod)
                self.consider(pod)
            elif kind == "DELETED":
                self._pods.pop(str((pod.get("metadata") or {}).get("uid")), None)

    def _seen(self, pod: Mapping[str, Any]) -> None:
        if (pod.get("spec") or {}).get("nodeName") in (None, self.node):
            self._pods[str((pod.get("metadata") or {}).get("uid"))] = pod

    async def _retries(self) -> None:
        """Retry, from the pods last seen, the switches that did not take (module doc)."""
        while True:
            await asyncio.sleep(min(1.0, self.retry_seconds))
            if not self._retry:
                continue
            volumes = {s.volume_id for s in self.served()}
            self._retry = {v: r for v, r in self._retry.items() if v in volumes}
            for pod in list(self._pods.values()):
                self.consider(pod, retry=True)

    def consider(self, pod: Mapping[str, Any], *, retry: bool = False) -> None:
        """Start the switches `pod` asks for (one per volume at a time); `retry`: only those
        whose wait after a switch that did not take is over."""
        spec = pod.get("spec") or {}
        if spec.get("nodeName") not in (None, self.node):
            return  # the server filtered by node; a pod of another node is never ours
        meta = pod.get("metadata") or {}
        try:
            wanted = changes(pod, self.served())
        except DatapinError as exc:
            key = (str(meta.get("uid")), str(meta.get("resourceVersion")))
            if key not in self._bad:
                self._bad.add(key)
                log.error("%s; the pins served stay as they are", exc)
            return
        now = asyncio.get_running_loop().time()
        for served, pin in wanted:
            task = self._running.get(served.volume_id)
            if task is not None and not task.done():
                continue  # the next event or retry sees the pin again when this one is done
            if retry and now < self._retry.get(served.volume_id, (0.0, 0))[0]:
                continue
            task = asyncio.create_task(self._switch(served, pin))
            self._running[served.volume_id] = task

    async def _switch(self, served: Served, pin: Pin) -> None:
        try:
            await self.switch(served, pin)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # counted and logged by the plugin; retried (module doc)
            log.debug("switch of volume %s failed: %s", served.volume_id, exc)
        finally:
            self._running.pop(served.volume_id, None)
        took = any(s.volume_id == served.volume_id and s.serves(pin) for s in self.served())
        if took:
            self._retry.pop(served.volume_id, None)
            latest = self._pods.get(served.pod_uid)
            if latest is not None:  # an edit made during the switch was skipped: now
                self.consider(latest)
            return
        failures = self._retry.get(served.volume_id, (0.0, 0))[1] + 1
        wait = min(BACKOFF_MAX_SECONDS, self.retry_seconds * 2 ** (failures - 1))
        self._retry[served.volume_id] = (asyncio.get_running_loop().time() + wait, failures)
