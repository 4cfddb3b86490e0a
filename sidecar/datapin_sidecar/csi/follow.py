"""Live switch in CSI mode: follow the `datapin.dev/pins` annotation of the node's pods.

In sidecar mode the sidecar reads its pod's annotations from a downward-API file and switches
when they change. In CSI mode there is no container in the pod, so the agent does it: it lists
and watches the pods of its own node (`spec.nodeName` field selector, read-only RBAC) and, when
a pod with a published volume carries a pin for that volume's dataset other than the one
served, asks the plugin to switch that volume (`NodePlugin.switch`: prove access with the
volume's own keys, ensure the shared tree, bind it under the volume and swap `current`).

`changes` is the pure part (a pod and what is served in, the switches to make out), so it is
tested without a watch. `Follower.run` is the loop: list, then watch from the list's
resourceVersion until the server ends the watch (or it fails: a backoff), then list again; a
list also retries switches that failed. One switch per volume runs at a time; a pod whose
annotation cannot be parsed is logged once per version and left as it is (the pin served
stays: a bad edit never takes a running pod's data away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from datapin_sidecar.csi.kubeapi import KubeApi
from datapin_sidecar.errors import DatapinError
from datapin_sidecar.pins import ANNOTATION, Pin, parse_pins

log = logging.getLogger(__name__)

#: Longest wait before listing again after a failed list or watch.
BACKOFF_MAX_SECONDS: Final = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """A published volume, as the follower needs it."""

    volume_id: str
    pod_uid: str
    dataset: str
    #: The object id served now (`<md5>.dir`).
    pin: str


def changes(pod: Mapping[str, Any], served: Iterable[Served]) -> list[tuple[Served, Pin]]:
    """The volumes of `pod` whose dataset's pin in its annotations differs from the served one."""
    meta = pod.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    mine = [s for s in served if s.pod_uid == uid]
    annotations = meta.get("annotations") or {}
    if not mine or ANNOTATION not in annotations:
        return []
    source = f"pod {meta.get('namespace')}/{meta.get('name')}"
    pins = parse_pins(annotations, source=source)  # AnnotationsError: the caller logs it
    return [
        (s, pins[s.dataset])
        for s in mine
        if s.dataset in pins and pins[s.dataset].revision.oid != s.pin
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
    ) -> None:
        self.kube = kube
        self.node = node
        self.served = served
        self.switch = switch
        self._running: dict[str, asyncio.Task[None]] = {}
        self._bad: set[tuple[str, str]] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        """List and watch until `stopping` is set (which ends an open watch at once)."""
        stop = asyncio.ensure_future(stopping.wait())
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
            for task in self._running.values():
                task.cancel()

    async def _cycle(self) -> None:
        """One list, then one watch from its resourceVersion until the server ends it."""
        pods, version = await self.kube.pods(self.node)
        for pod in pods:
            self.consider(pod)
        async for kind, pod in self.kube.watch_pods(self.node, version):
            if kind in ("ADDED", "MODIFIED"):
                self.consider(pod)

    def consider(self, pod: Mapping[str, Any]) -> None:
        """Start the switches `pod` asks for (one per volume at a time)."""
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
        for served, pin in wanted:
            task = self._running.get(served.volume_id)
            if task is not None and not task.done():
                continue  # the next event or list sees the pin again when this one is done
            task = asyncio.create_task(self._switch(served, pin))
            self._running[served.volume_id] = task

    async def _switch(self, served: Served, pin: Pin) -> None:
        try:
            await self.switch(served, pin)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # counted and logged by the plugin; retried at the next list
            log.debug("switch of volume %s failed: %s", served.volume_id, exc)
        finally:
            self._running.pop(served.volume_id, None)
