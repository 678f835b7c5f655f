"""Durable audit appends per second, on SQLite and on PostgreSQL, in one run, over mutual TLS.

Every service in its own process, as production runs them, the load generator (this process) in its own:

  keyvault    python -m services.keyvault (SQLite), signing the audit checkpoints (key audit/checkpoint, Ed25519)
  audit       python -m services.audit on SQLite (a file on disk, WAL, synchronous=FULL: a commit is on disk before
              the answer); then the same service on the machine's PostgreSQL in a schema of this run's own (dropped
              after; the service has no schema setting, so it is started with its declaration's store pointed at
              that schema — nothing else differs from `python -m services.audit`). One backend at a time: they
              would share the cores.

Modes, per backend (appends as workload `trading`, a recorder; health and read as `ops`), rounds rotating their order:

  health      grpc.health.v1 Health/Check at N callers (--concurrency, default 64): the bare gRPC call of the
              same server process over mutual TLS (no store, no service code)
  read        GetCheckpoint, unary, at N callers: the same service over the same channel, a call that writes
              nothing (one read of the latest checkpoint): the baseline of the service's own shape
  append-1    Append, unary, one writer: every append its own commit (latency-bound)
  append-N    Append, unary, N concurrent writers: concurrent appends share one commit (group commit)
  batch-B     AppendBatch of B events (--batch, default 100 and 1000) from --batch-callers (default 4) callers

Every event a realistic one (an accepted PlaceOrder: principal, account, key id, caller, source ip, method,
resource, action, quota decision, outcome, status, request and trace ids, latency, clock), its event id unique, so
every append is a new entry of the Merkle tree (its nodes written in the same transaction) and the checkpoint
publisher signs at least every second meanwhile (through the key vault).

Printed per round: calls/s (and events/s), p50/p99 latency, µs of CPU per event (per call for health and read) of
the audit process; then per backend the median over rounds, the throughput ratios of one run (read / health: the
service's own call against the bare gRPC call; append-N / health and append-N / read: what the durable append
costs), and the issue's aims beside the figures: 5,000 unary appends/s at 64 writers, 50,000 events/s through
AppendBatch (issue 9: the bare gRPC call ran at about 7,400/s, SQLite commits about 9,000 single-row
transactions/s); the audit process's RSS before and after the load. The load generator shares the machine's cores
with the services: read the ratios of one run and the CPU per event, the steadier figures.

Then the trading call without and with the guard's audit stage, in the same run (bench/guard.py's pattern; aim,
issue 9: under 25 % cost): the key vault, auth (python -m services.auth), an audit service on SQLite for the guard,
and one trading process per mode, the reference trading service as bench/trading_server.py's guarded mode runs it
(the real declaration by the kit's runner, a JWT verified by its guard, the quota stage off in both, so that the
difference is the audit stage alone):

  jwt         the guard with its audit stage off
  jwt+audit   the same with the audit stage on (the reference service's default): every PlaceOrder recorded, the
              events of concurrent calls sharing AppendBatch calls (the guard's adaptive batcher), the response
              released only once its event is durable

Printed per round: throughput, p50/p99, CPU µs per call of the client, trading, auth and audit processes, and the
average events per AppendBatch (from the audit service's log lines); then the ratio and RSS before and after.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from bench import guard
from bench.guard import Layout, rss_mib, serving, start_keyvault
from bench.loadgen import Call, Result, closed_loop, free_port, load_arguments, median_ratio, process_cpu_s
from bench.mesh import dev_pki
from services.audit.store_postgres import pruner_role, writer_role
from services.auth.vault_client import ensure_keys
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.keyvault.signer import ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel

DEFAULT_PG_DSN: Final = "postgresql://127.0.0.1:5432/test?user=postgres"
UNARY_AIM: Final = 5_000  # unary appends/s at 64 writers (issue 9)
BATCH_AIM: Final = 50_000  # events/s through AppendBatch (issue 9)
CHECKPOINT_KEY: Final = "audit/checkpoint"
WORKLOADS: Final = ("keyvault", "audit", "auth", "trading", "ops", "trading-client")
TIMEOUT_S: Final = 30.0

# The audit service as `python -m services.audit` runs it, its PostgreSQL store in the schema given first.
IN_SCHEMA: Final = """\
import sys
from dataclasses import replace

from services.audit.service import SERVICE
from services.audit.store_postgres import PostgresAuditStore
from services.audit.store_sqlite import SqliteAuditStore
from tradeguard.service import Stores, main

schema = sys.argv.pop(1)
stores = Stores(sqlite=SqliteAuditStore.open, postgres=lambda dsn: PostgresAuditStore.open(dsn, schema=schema))
raise SystemExit(main(replace(SERVICE, stores=stores)))
"""


def modes(batches: Sequence[int]) -> tuple[str, ...]:
    return ("health", "read", "append-1", "append-N", *(f"batch-{b}" for b in batches))


@dataclass
class Round:
    result: Result
    events: int  # events appended in the measured window (0 for read)
    audit_us: float  # CPU µs of the audit process per event (per call for health, read and trading calls)
    cpu_us: dict[str, float] = field(default_factory=dict)  # trading rounds: CPU µs per call of each process
    batch: float | None = None  # trading rounds with the audit stage: events per AppendBatch

    @property
    def events_per_s(self) -> float:
        return self.events / self.result.seconds if self.result.seconds else 0.0


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding `path` (Linux /proc/mounts): a durable append on tmpfs is not one."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            inside = len(fields) >= 3 and (
                resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/")
            )
            if inside and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def pg_unreachable(dsn: str) -> str:
    """Empty when PostgreSQL answers at `dsn`, else why not."""
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return ""


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        for role in (writer_role(schema), pruner_role(schema)):
            pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def start_audit(layout: Layout, name: str, database_url: str, schema: str | None) -> None:
    port = free_port()
    env = layout.env(
        TRADEGUARD_AUDIT_PORT=str(port),
        TRADEGUARD_AUDIT_DATABASE_URL=database_url,
        TRADEGUARD_AUDIT_KEYVAULT_TARGET=f"127.0.0.1:{layout.procs['keyvault'].port}",
    )
    cmd = [sys.executable, "-m", "services.audit"]
    if schema is not None:
        cmd = [sys.executable, "-c", IN_SCHEMA, schema]
    layout.spawn(name, port, cmd, env)


_TIME = timestamp_pb2.Timestamp(seconds=1_764_500_000, nanos=123_456_000)
_LATENCY = duration_pb2.Duration(nanos=1_850_000)


def event(event_id: str) -> pb.Event:
    """An accepted PlaceOrder as the guard records it."""
    return pb.Event(
        event_id=event_id,
        time=_TIME,
        clock=pb.Clock(sync=pb.CLOCK_SYNC_SYNCHRONIZED),
        principal="usr_01JBENCH0TRADER000000000000",
        account_id="acct-bench",
        api_key_id="tgk_bench0key",
        caller="spiffe://tradeguard.local/svc/edge",
        source_ip="192.0.2.10",
        method="/tradeguard.trading.v1.TradingService/PlaceOrder",
        resource="ord-01JBENCH",
        action="order.place",
        quota_decision="allowed",
        outcome=pb.OUTCOME_OK,
        status_code="OK",
        request_id=f"req-{event_id}",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        latency=_LATENCY,
    )


def calls(stubs: dict[str, Any], mode: str, prefix: str) -> tuple[Call, int]:
    """The mode's call and how many events each call appends."""
    recorder, reader = stubs["trading"], stubs["ops"]
    if mode == "health":
        health = stubs["health"]

        async def check(i: int) -> object:
            return await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)

        return check, 0
    if mode == "read":

        async def read(i: int) -> object:
            return await reader.GetCheckpoint(pb.GetCheckpointRequest(), timeout=TIMEOUT_S)

        return read, 0
    if mode.startswith("append"):

        async def append(i: int) -> object:
            reply = await recorder.Append(pb.AppendRequest(event=event(f"{prefix}-{i}")), timeout=TIMEOUT_S)
            assert reply.appended.created
            return reply

        return append, 1
    size = int(mode.removeprefix("batch-"))

    async def batch(i: int) -> object:
        events = [event(f"{prefix}-{i}-{j}") for j in range(size)]
        reply = await recorder.AppendBatch(pb.AppendBatchRequest(events=events), timeout=TIMEOUT_S)
        assert len(reply.appended) == size and all(a.created for a in reply.appended)
        return reply

    return batch, size


def callers_of(mode: str, concurrency: int, batch_callers: int) -> int:
    if mode == "append-1":
        return 1
    return batch_callers if mode.startswith("batch") else concurrency


async def measure(
    stubs: dict[str, audit_pb2_grpc.AuditServiceAsyncStub],
    mode: str,
    prefix: str,
    pid: int,
    callers: int,
    duration: float,
) -> Round:
    """The mode warmed up, then measured (each phase its own event ids: every append a new entry)."""
    warm, _ = calls(stubs, mode, f"{prefix}w")
    await closed_loop(warm, concurrency=callers, duration=min(0.5, duration), warmup=0)
    call, per_call = calls(stubs, mode, f"{prefix}m")
    before = process_cpu_s(pid)
    result = await closed_loop(call, concurrency=callers, duration=duration, warmup=0)
    units = result.calls * per_call if per_call else result.calls
    return Round(result, result.calls * per_call, (process_cpu_s(pid) - before) / max(1, units) * 1e6)


def _line(label: str, rnd: Round) -> str:
    events = f"   {rnd.events_per_s:9.0f} events/s" if rnd.events else ""
    unit = "event" if rnd.events else "call "
    return f"{rnd.result.line(label)}{events}   audit CPU {rnd.audit_us:6.1f} us/{unit}"


@contextlib.contextmanager
def running(layout: Layout) -> Iterator[None]:
    try:
        yield
    finally:
        layout.stop()


async def backend_run(
    layout: Layout,
    name: str,
    run_modes: Sequence[str],
    concurrency: int,
    batch_callers: int,
    duration: float,
    rounds: int,
) -> tuple[dict[str, list[Round]], float, float]:
    """The modes against the running audit process `name`: the rounds, and its RSS MiB before and after."""
    await serving(layout, name)
    proc = layout.procs[name]
    target = f"127.0.0.1:{proc.port}"
    async with (
        MeshChannel(target, "audit", tls.Workload.of(layout.paths, "trading")) as recording,
        MeshChannel(target, "audit", tls.Workload.of(layout.paths, "ops")) as reading,
    ):
        stubs: dict[str, Any] = {
            "trading": audit_pb2_grpc.AuditServiceStub(recording),
            "ops": audit_pb2_grpc.AuditServiceStub(reading),
            "health": health_pb2_grpc.HealthStub(reading),
        }
        tag = secrets.token_hex(3)
        rss_before = rss_mib(proc.pid)
        results: dict[str, list[Round]] = {mode: [] for mode in run_modes}
        for r in range(rounds):
            shift = r % len(run_modes)
            for m, mode in enumerate([*run_modes[shift:], *run_modes[:shift]]):
                callers = callers_of(mode, concurrency, batch_callers)
                rnd = await measure(stubs, mode, f"bench-{tag}-r{r}m{m}", proc.pid, callers, duration)
                results[mode].append(rnd)
                label = mode.replace("-N", f"-{concurrency}")
                print(_line(f"{name} round {r + 1} {label}", rnd), flush=True)
        return results, rss_before, rss_mib(proc.pid)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio(numerators: list[Round] | None, denominators: list[Round] | None) -> float | None:
    if not numerators or not denominators:
        return None
    pairs = zip(numerators, denominators, strict=True)
    return _median([a.result.rps / b.result.rps for a, b in pairs if b.result.rps])


def report(name: str, results: dict[str, list[Round]], concurrency: int, rss: tuple[float, float]) -> None:
    print(f"\n{name} (median of rounds):")
    for mode, rounds in results.items():
        label = mode.replace("-N", f"-{concurrency}")
        rate = _median([x.events_per_s if x.events else x.result.rps for x in rounds])
        call = mode in ("health", "read")
        unit = "calls/s " if call else "events/s"
        print(
            f"  {label:<11} {rate:9.0f} {unit}   p50 {_median([x.result.percentile(50) for x in rounds]):7.2f} ms"
            f"   p99 {_median([x.result.percentile(99) for x in rounds]):7.2f} ms   "
            f"audit CPU {_median([x.audit_us for x in rounds]):6.1f} us/{'call ' if call else 'event'}"
        )
    unary = results.get("append-N")
    print(f"  throughput ratios at {concurrency} callers (median of rounds):")
    for numerator, denominator, what in (
        ("read", "health", "the service's own call against the bare gRPC call"),
        ("append-N", "health", "a durable append against the bare gRPC call"),
        ("append-N", "read", "a durable append against a call that writes nothing"),
    ):
        ratio = _ratio(results.get(numerator), results.get(denominator))
        if ratio is not None:
            label = f"{numerator} / {denominator}".replace("-N", f"-{concurrency}")
            print(f"    {label:<18} {ratio:6.3f}  ({what})")
    if unary:
        rate = _median([x.events_per_s for x in unary])
        verdict = "met" if rate >= UNARY_AIM else "missed"
        note = "" if concurrency == 64 else f" (measured at {concurrency} writers, not 64)"
        print(f"  aim: {UNARY_AIM:,} unary appends/s at 64 writers: {rate:,.0f}/s, {verdict}{note}")
    batched = {
        mode: _median([x.events_per_s for x in rounds]) for mode, rounds in results.items() if "batch" in mode
    }
    if batched:
        best_mode, best = max(batched.items(), key=lambda item: item[1])
        verdict = "met" if best >= BATCH_AIM else "missed"
        print(f"  aim: {BATCH_AIM:,} events/s through AppendBatch: {best:,.0f}/s ({best_mode}), {verdict}")
    print(f"  RSS MiB of the audit process before -> after the load: {rss[0]:.0f} -> {rss[1]:.0f}")


# --- the trading call with and without the guard's audit stage -----------------------------------------------------

TRADING_MODES: Final = ("jwt", "jwt+audit")
TRADING_AIM: Final = 0.25  # the audit stage's cost in throughput (issue 9)


def start_trading(layout: Layout, mode: str) -> None:
    """The reference trading service as bench/trading_server.py's `guarded` mode runs it (the real declaration by
    the kit's runner, its guard verifying JWTs at the auth service, the quota stage off), the guard's audit stage on
    for the +audit mode."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.trading_server", "--mode", "guarded", "--port", str(port)]
    cmd += ["--home", str(layout.home), "--db", f"sqlite:///{layout.home / 'data' / f'trading-{mode}.db'}"]
    cmd += ["--auth-target", f"127.0.0.1:{layout.procs['auth'].port}"]
    if mode.endswith("+audit"):
        cmd += ["--audit-target", f"127.0.0.1:{layout.procs['audit-guard'].port}"]
    layout.spawn(f"trading-{mode}", port, cmd, layout.env())


async def trading_round(
    mode: str, stub: Any, layout: Layout, tag: str, concurrency: int, duration: float
) -> Round:
    """PlaceOrder at `concurrency` callers; CPU µs per call of each process; AppendBatch sizes from the audit log."""
    pids = {
        "trading": layout.procs[f"trading-{mode}"].pid,
        "auth": layout.procs["auth"].pid,
        "audit": layout.procs["audit-guard"].pid,
    }
    await closed_loop(
        guard.place_order(stub, f"w{tag}"), concurrency=concurrency, duration=min(0.5, duration)
    )
    audit_log = layout.procs["audit-guard"].log
    offset = audit_log.stat().st_size
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    result = await closed_loop(
        guard.place_order(stub, tag), concurrency=concurrency, duration=duration, warmup=0
    )
    calls = max(1, result.calls)
    cpu = {"client": (time.process_time() - client_before) / calls * 1e6}
    for name, pid in pids.items():
        cpu[name] = (process_cpu_s(pid) - before[name]) / calls * 1e6
    rpcs, events = 0, 0
    if mode.endswith("+audit"):
        await asyncio.sleep(0.05)  # the last AppendBatch log lines
        rpcs, events, _ = guard.verify_batches(audit_log, offset, b"AppendBatch", "events")
    return Round(result, 0, cpu["audit"], cpu, events / rpcs if rpcs else None)


async def trading_run(
    layout: Layout, db: Path, concurrency: int, duration: float, rounds: int
) -> dict[str, list[Round]]:
    """The auth service, an audit service (SQLite) for the guard, one trading process per mode; the rounds."""
    async with guard.channel(layout, "keyvault", "ops") as ops:
        await ensure_keys(ops)
    guard.start_auth(layout)
    start_audit(layout, "audit-guard", f"sqlite:///{db}", None)
    await serving(layout, "auth")
    await serving(layout, "audit-guard")
    creds = await guard.credentials(layout)
    for mode in TRADING_MODES:
        start_trading(layout, mode)
    async with guard.mode_stubs(
        layout, TRADING_MODES, lambda _: guard.interceptors_of("jwt", creds)
    ) as stubs:
        rss_before = {name: rss_mib(proc.pid) for name, proc in layout.procs.items()}
        print(
            f"\nPlaceOrder through the trading guard (JWT; quota stage off) without and with its audit stage, "
            f"{concurrency} callers; [CPU us per call of each process]; batch: events per AppendBatch"
        )
        results: dict[str, list[Round]] = {mode: [] for mode in TRADING_MODES}
        for r in range(rounds):
            order = TRADING_MODES if r % 2 == 0 else TRADING_MODES[::-1]
            for mode in order:
                tag = f"{'a' if mode.endswith('+audit') else 'j'}{r}"
                rnd = await trading_round(mode, stubs[mode], layout, tag, concurrency, duration)
                results[mode].append(rnd)
                parts = " ".join(f"{name} {us:4.0f}" for name, us in rnd.cpu_us.items())
                batch = "" if rnd.batch is None else f"   batch {rnd.batch:5.1f}"
                print(f"{rnd.result.line(f'round {r + 1} {mode}')}   [{parts}]{batch}", flush=True)
        rss_after = {name: rss_mib(proc.pid) for name, proc in layout.procs.items()}
        trading_report(results, rss_before, rss_after)
        return results


def trading_report(
    results: dict[str, list[Round]], rss_before: dict[str, float], rss_after: dict[str, float]
) -> None:
    base, audited = results["jwt"], results["jwt+audit"]
    ratio = median_ratio([x.result for x in audited], [x.result for x in base])
    cpu = {mode: _median([sum(x.cpu_us.values()) for x in rounds]) for mode, rounds in results.items()}
    print("the audit stage (median of rounds; the ratio of one run is what counts on a shared machine):")
    for mode, rounds in results.items():
        per = {name: _median([x.cpu_us[name] for x in rounds]) for name in rounds[0].cpu_us}
        batches = [x.batch for x in rounds if x.batch is not None]
        print(
            f"  {mode:<10} {_median([x.result.rps for x in rounds]):7.0f} calls/s   "
            f"p50 {_median([x.result.percentile(50) for x in rounds]):6.2f} ms   "
            f"p99 {_median([x.result.percentile(99) for x in rounds]):6.2f} ms   CPU/call "
            + " ".join(f"{name} {us:4.0f}" for name, us in per.items())
            + (f"   batch {_median(batches):5.1f}" if batches else "")
        )
    verdict = "met" if 1 - ratio < TRADING_AIM else "missed"
    print(
        f"  jwt+audit / jwt = {ratio:.3f}, a cost of {(1 - ratio) * 100:.1f} % of throughput "
        f"(aim under {TRADING_AIM * 100:.0f} %: {verdict})"
    )
    added = (cpu["jwt+audit"] / cpu["jwt"] - 1) * 100 if cpu["jwt"] else float("nan")
    print(
        f"  CPU per call, the client and every service: {cpu['jwt']:.0f} -> {cpu['jwt+audit']:.0f} us "
        f"({added:+.1f} %; steadier than throughput on a shared machine)"
    )
    print(
        "  RSS MiB before -> after the load: "
        + ", ".join(f"{name} {rss_before[name]:.0f} -> {rss_after[name]:.0f}" for name in rss_before)
    )


async def run(
    concurrency: int,
    duration: float,
    rounds: int,
    *,
    batches: Sequence[int] = (100, 1000),
    batch_callers: int = 4,
    pg: str | None = DEFAULT_PG_DSN,
    directory: str | None = None,
    trading: bool = True,
) -> dict[str, dict[str, list[Round]]]:
    """Both backends (PostgreSQL when `pg` is given and answers), then (`trading`) the trading call without and
    with the guard's audit stage: the rounds per backend ("sqlite", "postgres", "trading") and mode."""
    run_modes = modes(batches)
    measured: dict[str, dict[str, list[Round]]] = {}
    with tempfile.TemporaryDirectory(prefix="tg-bench-audit-", dir=directory) as tmp:
        home = Path(tmp)
        layout = Layout(home)
        dev_pki(layout.home, WORKLOADS)
        with running(layout):
            start_keyvault(layout)
            await serving(layout, "keyvault")
            async with MeshChannel(
                f"127.0.0.1:{layout.procs['keyvault'].port}", "keyvault", tls.Workload.of(layout.paths, "ops")
            ) as ops:
                await ensure_key(ops, CHECKPOINT_KEY, keyvault_pb2.KEY_TYPE_ED25519)
            db = home / "data" / "audit.db"
            print(
                f"durable audit appends over mTLS, {duration:g} s per round, {rounds} rounds, {os.cpu_count()} CPUs,"
                f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; append-N: {concurrency} writers; "
                f"batch-B: {batch_callers} callers of AppendBatch(B events)\nSQLite: {db} "
                f"({filesystem_of(home)}); processes: this load generator, keyvault, one audit service at a time"
            )
            backends: list[tuple[str, str, str | None]] = [("audit-sqlite", f"sqlite:///{db}", None)]
            schema: str | None = None
            if pg is None:
                print("PostgreSQL: not measured (no DSN given)")
            elif reason := pg_unreachable(pg):
                print(f"PostgreSQL: not measured: unreachable at {pg} ({reason})")
            else:
                schema = f"bench_audit_{secrets.token_hex(4)}"
                backends.append(("audit-postgres", pg, schema))
                print(f"PostgreSQL: {pg}, schema {schema} (dropped after)")
            try:
                for name, url, in_schema in backends:
                    start_audit(layout, name, url, in_schema)
                    try:
                        results, before, after = await backend_run(
                            layout, name, run_modes, concurrency, batch_callers, duration, rounds
                        )
                    finally:
                        process = layout.procs.pop(name).process
                        process.terminate()
                        await asyncio.to_thread(process.wait, 30)
                    measured[name.removeprefix("audit-")] = results
                    report(name, results, concurrency, (before, after))
            finally:
                if schema is not None and pg is not None:
                    drop_schema(pg, schema)
            if trading:
                measured["trading"] = await trading_run(
                    layout, home / "data" / "audit-guard.db", concurrency, duration, rounds
                )
    return measured


def main(argv: Sequence[str] | None = None) -> None:
    parser = load_arguments(__doc__, rounds=3)
    parser.set_defaults(concurrency=64)
    parser.add_argument(
        "--batch", type=int, action="append", help="events per AppendBatch (repeatable; default 100 and 1000)"
    )
    parser.add_argument(
        "--batch-callers", type=int, default=4, help="concurrent AppendBatch callers (default 4)"
    )
    parser.add_argument(
        "--pg",
        default=os.environ.get("TRADEGUARD_BENCH_PG_DSN", DEFAULT_PG_DSN),
        help=f"PostgreSQL DSN (default $TRADEGUARD_BENCH_PG_DSN or {DEFAULT_PG_DSN}); measured when it answers",
    )
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--dir", help="where the run's files go (default: the system's temporary directory)")
    parser.add_argument(
        "--no-trading", action="store_true", help="appends only (not the guard's audit stage)"
    )
    args = parser.parse_args(argv)
    asyncio.run(
        run(
            args.concurrency,
            args.duration,
            args.rounds,
            batches=args.batch or (100, 1000),
            batch_callers=args.batch_callers,
            pg=None if args.no_pg else args.pg,
            directory=args.dir,
            trading=not args.no_trading,
        )
    )


if __name__ == "__main__":
    main()
