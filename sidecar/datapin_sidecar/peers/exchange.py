"""This agent among its peers: the asking side of a fetch that goes through object homes.

A fetch of a batch of objects (`PeeredRemote.fetch`) runs in four steps, in this order so that
no agent ever waits on another before it has done its own share (two agents each holding a
lease the other waits for would otherwise wait until the leases expired):

1. `plan`: each object's home (`rendezvous.home` over `membership`). Objects whose home is this
   agent take a lease in our own table; the others are claimed at their homes, one request per
   home and `protocol.MAX_CLAIMS` objects. Each object ends up *have* (its home has it),
   *leased* (we fetch it from the remote and deliver it), *local* (we are its home and fetch
   it), *busy* (someone else is fetching it) or *fallback* (its home did not answer: we fetch
   it, and nobody waits for us).
2. The remote fetch of leased, local and fallback objects, while the *have* objects stream in
   from their homes (`collect` with no wait).
3. `settle`: leased objects are PUT to their homes (or the leases given back), local leases end.
4. `collect` the *busy* objects, waiting at their homes for the leases to end; whatever a peer
   could not give is fetched from the remote by the caller.

A peer that fails (refuses, times out, sends bytes that are not the object) costs only its
objects a fallback to the remote, counted as a peer error. Received objects go through the
node's download slots (`transfer`), so they arrive once per node like remote downloads.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.peers import protocol
from datapin_sidecar.peers.client import PeerClient, PeerError
from datapin_sidecar.peers.events import Direction, PeerEvents
from datapin_sidecar.peers.leases import Claim, Leases
from datapin_sidecar.peers.membership import Membership
from datapin_sidecar.peers.rendezvous import Member, home
from datapin_sidecar.peers.transfer import Committer, claim_all

log = logging.getLogger(__name__)

#: Transfers in flight per connection: a received object waits for its batch's `syncfs`
#: after its bytes are in, and with one transfer per connection the batches stay as small as
#: the connections are many. 8 per connection: 2 agents sharing 10,000 x 64 KiB went from
#: 30.2 s to 27.1 s (docs/benchmarks.md, issue 16); the rest is per-request CPU.
_WAITING: Final = 8


@dataclass(slots=True, kw_only=True)
class Plan:
    """Where each object of a fetch comes from (see the module doc, step 1)."""

    have: dict[str, Member] = field(default_factory=dict)
    leased: dict[str, tuple[Member, str]] = field(default_factory=dict)
    local: dict[str, str] = field(default_factory=dict)  # oid -> our own lease's token
    busy: dict[str, Member | None] = field(default_factory=dict)  # None: we are the home
    fallback: list[str] = field(default_factory=list)

    def own(self) -> list[str]:
        """What this agent fetches from the remote itself."""
        return [*self.leased, *self.local, *self.fallback]


class Peers:
    """This agent's side of peer fetch: members, the client, its own lease table."""

    def __init__(
        self,
        *,
        membership: Membership,
        client: PeerClient,
        leases: Leases,
        committer: Committer,
        events: PeerEvents,
        wait: float,
        jobs: int = 32,
    ) -> None:
        self.membership = membership
        self.client = client
        self.leases = leases
        self.committer = committer
        self.events = events
        self.wait = wait
        self.jobs = jobs

    def active(self) -> bool:
        """Whether there is anyone to ask."""
        return len(self.membership.members()) > 1

    async def plan(self, oids: Sequence[str], layout: Layout) -> Plan:
        members = self.membership.members()
        me = self.membership.me
        plan = Plan()
        by_home: dict[Member, list[str]] = defaultdict(list)
        for oid in dict.fromkeys(oids):
            owner = home(oid, members)
            if owner is None or owner == me:
                got, lease = self.leases.take((layout, oid), holder="self")
                if got is Claim.GRANTED:
                    plan.local[oid] = lease.token
                else:
                    plan.busy[oid] = None
            else:
                by_home[owner].append(oid)

        async def ask(member: Member, chunk: list[str]) -> None:
            try:
                answer = await self.client.claims(member, layout, chunk)
            except PeerError as exc:
                self._failed(exc)
                plan.fallback.extend(chunk)
                return
            leases = answer.leases or {}
            plan.have.update(dict.fromkeys(answer.have, member))
            plan.leased.update({oid: (member, token) for oid, token in leases.items()})
            plan.busy.update(dict.fromkeys(answer.busy, member))
            said = {*answer.have, *leases, *answer.busy}
            plan.fallback.extend(oid for oid in chunk if oid not in said)

        step = protocol.MAX_CLAIMS
        await self._gather(
            ask(member, chunk[i : i + step])
            for member, chunk in by_home.items()
            for i in range(0, len(chunk), step)
        )
        return plan

    async def collect(
        self, cache: NodeCache, sources: Mapping[str, Member | None], layout: Layout, *, wait: float
    ) -> set[str]:
        """Bring `sources` (oid -> its home; None: us) in from their homes; the oids now in
        the cache. `wait`: how long a home may hold a GET for a lease to end."""
        got: set[str] = set()
        ours = [oid for oid, member in sources.items() if member is None]
        for oid in ours:  # we are the home: a peer's PUT brings it into our own cache
            lease = self.leases.current((layout, oid))
            if lease is not None:
                await self.leases.wait(lease, wait)
        if ours:
            present = await asyncio.to_thread(lambda: [o for o in ours if cache.present(o, layout)])
            got.update(present)
        theirs = [oid for oid, member in sources.items() if member is not None]
        if not theirs:
            return got
        slots, present_now, _busy_on_node = await claim_all(cache, theirs, layout)
        got.update(present_now)  # objects another process on the node is fetching are left

        async def bundle(member: Member, oids: list[str]) -> None:
            got_sizes, corrupt, failure = await self.client.bundle(
                member, layout, {o: slots[o] for o in oids}, self.committer, wait=wait
            )
            if failure is not None:
                self._failed(failure)
            for _ in corrupt:
                self.events.error("corrupt")
            for oid, size in got_sizes.items():
                got.add(oid)
                self.events.moved(Direction.RECEIVED, size)

        async def one(oid: str) -> None:
            slot = slots[oid]
            member = sources[oid]
            assert member is not None  # noqa: S101 - theirs
            try:
                size = await self.client.get(member, slot, self.committer, wait=wait)
            except PeerError as exc:
                self._failed(exc)
                size = None
            finally:
                if slot.fd >= 0:  # a 404 or a failure before any byte: the remote's turn
                    slot.release()
            if size is not None:
                got.add(oid)
                self.events.moved(Direction.RECEIVED, size)

        by_member: dict[Member, list[str]] = defaultdict(list)
        for oid in slots:
            member = sources[oid]
            assert member is not None  # noqa: S101 - theirs
            by_member[member].append(oid)
        step = protocol.MAX_BUNDLE
        try:
            # Small objects in bundles; what a bundle left out (large, or not there) one by one.
            await self._gather(
                bundle(member, oids[i : i + step])
                for member, oids in by_member.items()
                for i in range(0, len(oids), step)
            )
            left = [oid for oid, slot in slots.items() if slot.fd >= 0]
            await self._gather((one(oid) for oid in left), limit=self.jobs * _WAITING)
        finally:
            for slot in slots.values():
                if slot.fd >= 0:
                    slot.release()
        return got

    async def settle(
        self, cache: NodeCache, plan: Plan, layout: Layout, oids: Sequence[str]
    ) -> None:
        """Deliver the leased objects among `oids` to their homes (or give the leases back);
        end our own leases among them."""
        present = set(
            await asyncio.to_thread(lambda: [o for o in oids if cache.present(o, layout)])
        )
        for oid in oids:
            token = plan.local.get(oid)
            if token is not None:
                self.leases.finish((layout, oid), token, delivered=oid in present)

        async def deliver(oid: str, member: Member, token: str) -> None:
            try:
                if oid in present:
                    sent = await self.client.put(member, cache, oid, layout, token)
                    self.events.moved(Direction.DELIVERED, sent)
                else:
                    await self.client.release(member, oid, layout, token)
            except PeerError as exc:
                self._failed(exc)

        await self._gather(
            (deliver(oid, *plan.leased[oid]) for oid in oids if oid in plan.leased),
            limit=self.jobs * _WAITING,
        )

    def _failed(self, exc: PeerError) -> None:
        self.events.error(exc.reason)
        log.info("peer fetch: %s (falling back to the remote)", exc)

    async def _gather(self, coros: Iterable[Awaitable[None]], *, limit: int = 0) -> None:
        """Run `coros` with at most `jobs` at a time; the first non-peer error is raised."""
        bound = asyncio.Semaphore(limit or self.jobs)

        async def bounded(coro: Awaitable[None]) -> None:
            async with bound:
                await coro

        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(bounded(coro))
