"""CPU µs per event of the audit service's append path, in this process, stage by stage (no gRPC, no TLS).

The events are bench/audit.py's (an accepted PlaceOrder as the guard records it, every event id unique), sent as
one serialised `AppendBatchRequest` of --batch events per round, so that each stage does what the service does
with an `AppendBatch` call:

  decode        AppendBatchRequest.FromString (what gRPC's deserialiser does before the servicer runs)
  model         codec.event_from_proto per event (the servicer)
  validate      AuditLog.validate per event (what the core checks inside append, once per event)
  mask          masking.mask_event per event
  encode+hash   codec.encode_entry of the masked event's Entry (the bytes the tree hashes and the store keeps),
                their leaf hash SHA-256(0x00 ‖ bytes) and codec.event_digest of the masked event, event by event
  core          AuditLog.append on a store that answers at once (validate + mask + encode + hash + group commit
                + the tree's right edge), a store doing nothing
  store         SqliteAuditStore.append of the batch's pending entries alone (a file in a temporary directory,
                WAL, synchronous=FULL: the per-row INSERTs, their indexes and triggers, the tree's nodes, the
                COMMIT's fsync)
  path          decode + model + core: the append path of AppendBatch without the store
  path+sqlite   the same with the SQLite store: the service's whole in-process work for an AppendBatch call
  unary-64      --batch events as unary Appends (decode, model, core) from 64 concurrent writers,
                without a store: what group commit of one-event calls costs in the core (no gRPC)
  unary-64+sqlite  the same with the SQLite store (one transaction per group of concurrent calls)

CPU time is the process's (`time.process_time`, every thread: SQLite's worker thread included), steadier than wall
time on a shared machine; events/s is wall clock. Printed per round, then the medians, the ratio of the reference
implementations to the service's (`ref`: the entry's whole message built from the model and serialised, and the
event's built and serialised again for the digest; masking without the prefilter and the cache) when those are available, and the store's
share of path+sqlite.

    python -m bench.audit_core [--batch 1000] [--rounds 7] [--details 0]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

from bench.audit import event
from services.audit import codec, masking
from services.audit.core import AuditLog
from services.audit.model import Appended, Entry, Event, Pending
from services.audit.store import AuditStore, EventIdConflict
from services.audit.store_sqlite import SqliteAuditStore
from tradeguard.audit.v1 import audit_pb2 as pb

RECORDER = "spiffe://tradeguard.local/ns/default/sa/trading"
UNARY_WRITERS = 64
START_US = 1_764_600_000_000_000  # the log's clock (the events' time is 2025-11-30: in range)


class NullStore:
    """A store that keeps nothing: every new entry is the next sequence number (what the core's own work costs)."""

    def __init__(self) -> None:
        self._size = 0

    async def append(self, batch: Sequence[Pending]) -> list[Appended | EventIdConflict]:
        first, self._size = self._size, self._size + len(batch)
        return [Appended(first + i, p.leaf_hash) for i, p in enumerate(batch)]

    async def size(self) -> int:
        return self._size

    async def nodes(self, keys: Sequence[tuple[int, int]]) -> list[bytes]:
        if keys:
            raise KeyError(keys[0])
        return []


def request_bytes(tag: str, count: int, details: int) -> bytes:
    """One AppendBatchRequest of `count` events, their ids unique to `tag`."""
    events = []
    for i in range(count):
        message = event(f"{tag}-{i}")
        for d in range(details):
            message.details[f"detail_{d}"] = f"value {d} of {tag}-{i}"
        events.append(message)
    return pb.AppendBatchRequest(events=events).SerializeToString()


def cpu_us(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) * 1e6


def cpu_us_async(
    loop: asyncio.AbstractEventLoop, work: Callable[[], Awaitable[object]]
) -> tuple[float, float]:
    """(CPU µs, wall s) of running `work` to completion."""
    wall, start = time.perf_counter(), time.process_time()
    loop.run_until_complete(work())
    return (time.process_time() - start) * 1e6, time.perf_counter() - wall


def models(data: bytes) -> list[Event]:
    request = pb.AppendBatchRequest.FromString(data)
    return [codec.event_from_proto(m, f"events[{i}]") for i, m in enumerate(request.events)]


def reference(name: str) -> Callable[..., Any] | None:
    """The codec's or the masking's reference (slow, obviously right) implementation, when it has one."""
    module = codec if name.startswith("encode") else masking
    found = getattr(module, f"{name}_reference", None)
    return cast("Callable[..., Any] | None", found)


class Bench:
    def __init__(self, loop: asyncio.AbstractEventLoop, sqlite: AuditStore, batch: int, details: int) -> None:
        self.loop = loop
        self.batch = batch
        self.details = details
        self.sqlite = sqlite
        self.null_log = AuditLog(
            cast("AuditStore", NullStore()), codec.encode_entry, codec.event_digest, self.clock
        )
        self.sqlite_log = AuditLog(sqlite, codec.encode_entry, codec.event_digest, self.clock)
        loop.run_until_complete(self.null_log.open())
        loop.run_until_complete(self.sqlite_log.open())
        self.rounds = 0

    @staticmethod
    def clock() -> int:
        return START_US

    def fresh(self, what: str) -> bytes:
        self.rounds += 1
        return request_bytes(f"{what}{self.rounds}", self.batch, self.details)

    def servicer(self, data: bytes, log: AuditLog) -> Callable[[], Awaitable[object]]:
        """What AuditServicer.AppendBatch does with `data` (decode, model each, then the core: validate, ...)."""

        async def work() -> object:
            request = pb.AppendBatchRequest.FromString(data)
            fields = [f"events[{i}]" for i in range(len(request.events))]
            events = [codec.event_from_proto(m, f) for m, f in zip(request.events, fields, strict=True)]
            return await log.append(events, RECORDER, fields)

        return work

    def unary(self, requests: list[bytes], log: AuditLog) -> Callable[[], Awaitable[object]]:
        """What AuditServicer.Append does for each of `requests`, from UNARY_WRITERS concurrent writers."""
        pending = iter(requests)

        async def writer() -> None:
            for data in pending:  # shared: each request appended once, by whichever writer is free
                one = codec.event_from_proto(pb.AppendRequest.FromString(data).event, "event")
                await log.append([one], RECORDER, ("event",))

        async def work() -> object:
            return await asyncio.gather(*(writer() for _ in range(UNARY_WRITERS)))

        return work

    def round(self) -> dict[str, float]:
        """µs of CPU per event per stage (and events/s of the whole paths)."""
        n = self.batch
        out: dict[str, float] = {}
        data = self.fresh("stages")
        out["decode"] = cpu_us(lambda: pb.AppendBatchRequest.FromString(data)) / n
        request = pb.AppendBatchRequest.FromString(data)
        out["model"] = (
            cpu_us(lambda: [codec.event_from_proto(m, f"events[{i}]") for i, m in enumerate(request.events)])
            / n
        )
        events = models(data)
        log = self.null_log

        def validate() -> None:
            for i, one in enumerate(events):
                log.validate(one, f"events[{i}]")

        out["validate"] = cpu_us(validate) / n
        out["mask"] = cpu_us(lambda: [masking.mask_event(e) for e in events]) / n
        masked = [masking.mask_event(e) for e in events]
        entries = [Entry(START_US, RECORDER, e) for e in masked]

        def encode() -> None:  # as the core does it, event by event: entry bytes, leaf hash, event digest
            for entry in entries:
                data = codec.encode_entry(entry)
                hashlib.sha256(b"\x00" + data).digest()
                codec.event_digest(entry.event)

        out["encode+hash"] = cpu_us(encode) / n
        slow_mask, slow_encode = reference("mask_event"), reference("encode_entry")
        if slow_mask is not None:
            out["mask ref"] = cpu_us(lambda: [slow_mask(e) for e in events]) / n
        if slow_encode is not None:

            def encode_reference() -> None:
                for entry in entries:
                    data = slow_encode(entry)
                    hashlib.sha256(b"\x00" + data).digest()
                    hashlib.sha256(
                        codec.event_to_proto(entry.event).SerializeToString(deterministic=True)
                    ).digest()

            out["encode+hash ref"] = cpu_us(encode_reference) / n

        events = models(self.fresh("core"))
        out["core"] = cpu_us_async(self.loop, lambda: log.append(events, RECORDER))[0] / n
        events = models(self.fresh("store"))
        pendings = [
            Pending(entry, data, hashlib.sha256(b"\x00" + data).digest(), codec.event_digest(entry.event))
            for entry in (Entry(START_US, RECORDER, masking.mask_event(e)) for e in events)
            for data in (codec.encode_entry(entry),)
        ]
        sqlite = self.sqlite
        out["store"] = cpu_us_async(self.loop, lambda: sqlite.append(pendings))[0] / n
        for name, unary_log in (("unary-64", self.null_log), ("unary-64+sqlite", self.sqlite_log)):
            requests = [
                pb.AppendRequest(event=m).SerializeToString()
                for m in pb.AppendBatchRequest.FromString(self.fresh(name.replace("+", "-"))).events
            ]
            cpu, wall = cpu_us_async(self.loop, self.unary(requests, unary_log))
            out[name], out[f"{name} events/s"] = cpu / n, n / wall
        cpu, wall = cpu_us_async(self.loop, self.servicer(self.fresh("path"), self.null_log))
        out["path"], out["path events/s"] = cpu / n, n / wall
        cpu, wall = cpu_us_async(self.loop, self.servicer(self.fresh("sqlite"), self.sqlite_log))
        out["path+sqlite"], out["path+sqlite events/s"] = cpu / n, n / wall
        return out


def _line(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:,.0f}" if k.endswith("/s") else f"{k} {v:.1f}" for k, v in values.items())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1000, help="events per AppendBatch (default 1000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7; the first is a warm-up)")
    parser.add_argument("--details", type=int, default=0, help="details per event (default 0, as the guard)")
    args = parser.parse_args(argv)
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="audit-core-") as tmp:
        sqlite = loop.run_until_complete(SqliteAuditStore.open(Path(tmp) / "audit.sqlite3"))
        try:
            bench = Bench(loop, sqlite, args.batch, args.details)
            print(
                f"audit append path: {args.batch} events per batch, {args.details} details each, µs of CPU per event"
            )
            results = []
            for r in range(args.rounds):
                values = bench.round()
                print(f"round {r}{' (warm-up)' if r == 0 else ''}: {_line(values)}")
                if r or args.rounds == 1:
                    results.append(values)
            loop.run_until_complete(bench.null_log.close())
            loop.run_until_complete(bench.sqlite_log.close())
        finally:
            loop.run_until_complete(sqlite.close())
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(f"median: {_line(median)}")
    stages = sum(median[k] for k in ("decode", "model", "validate", "mask", "encode+hash"))
    print(f"stages decode..encode+hash: {stages:.1f} µs/event (the service validates once, in the core)")
    for name in ("mask", "encode+hash"):
        if f"{name} ref" in median:
            print(f"{name}: reference / service = {median[f'{name} ref'] / median[name]:.2f}")
    share = median["store"] / median["path+sqlite"]
    print(
        f"path: {median['path']:.1f} µs/event, {median['path events/s']:,.0f} events/s; path+sqlite: "
        f"{median['path+sqlite']:.1f} µs/event, {median['path+sqlite events/s']:,.0f} events/s; the store alone "
        f"{median['store']:.1f} µs/event ({share:.0%} of path+sqlite)"
    )
    print(
        f"unary-64: {median['unary-64']:.1f} µs/event, {median['unary-64 events/s']:,.0f} events/s; unary-64+sqlite: "
        f"{median['unary-64+sqlite']:.1f} µs/event, {median['unary-64+sqlite events/s']:,.0f} events/s (no gRPC)"
    )
    loop.close()


if __name__ == "__main__":
    main()
