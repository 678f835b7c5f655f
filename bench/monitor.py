"""The monitor's throughput in audit events per second, and its lag behind the audit log, against the audit
service's append rate (the aim: the monitor never falls behind, issue 11).

Two parts:

  core        in process, no network: the packaged configuration's detectors and the engine with its SQLite store
              (one transaction per batch of 500) over a synthetic mix — many keys and accounts, addresses in several
              countries, a few refusals of every kind — in µs per event and events/s. What one core can follow.
  live        every service in its own process, as production runs them: the key vault (signing the audit
              checkpoints), the audit service on SQLite, the monitor (python -m services.monitor, the packaged
              configuration, SQLite) following the audit Tail over mutual TLS. This process appends the same mix
              as fast as the audit service takes it (AppendBatch of --batch events from --batch-callers callers,
              as workload `trading`, a recorder) for --duration seconds, then stops; the monitor's position and
              lag are read from GetStatus (as ops) every 0.2 s.

Printed for `live`: the audit append rate (events/s acknowledged), the monitor's rate (events/s processed, over the
load and until it caught up), its lag behind the log (entries and seconds: the most and at the end of the load), how
long it took to catch up after the load stopped, the monitor's CPU µs per event and RSS before and after; the
alerts it raised (the mix is built to raise none: its false positives). The load generator, the audit service and
the monitor share the machine's cores: the monitor's CPU per event is the steadier figure.

Not in the Makefile: `python -m bench.monitor [--duration S] [--batch B] [--batch-callers N]`.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from google.protobuf import timestamp_pb2

from bench.audit import CHECKPOINT_KEY, start_audit
from bench.guard import Layout, rss_mib, serving, start_keyvault
from bench.loadgen import free_port, process_cpu_s
from bench.mesh import dev_pki
from services.monitor.config_file import MonitorFile
from services.monitor.core.engine import Detectors, Monitor
from services.monitor.geoip import GeoLocator
from services.monitor.model import ActionRecord, ActionStatus, Alert, AuditEvent, Outcome
from services.monitor.settings import packaged_config
from services.monitor.store_sqlite import SqliteMonitorStore
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.keyvault.signer import ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.monitor.v1 import monitor_pb2, monitor_pb2_grpc

WORKLOADS: Final = ("keyvault", "audit", "monitor", "trading", "ops")
# addresses geoip2fast places in GB, JP, US, DE, BR (a key keeps its own country)
ADDRESSES: Final = ("81.2.69.160", "1.0.16.1", "8.8.8.8", "5.9.0.1", "200.160.2.3")
KEYS: Final = 500
# per 100,000 calls: 1 % over quota, 0.1 % refused by a risk check, 1 in 50,000 a failed authentication and 1 in
# 50,000 a missing permission (a typo, a clock off by seconds): rare enough per key that no burst forms
_OUTCOMES: Final = (
    [pb.OUTCOME_OK] * 98_896 + [pb.OUTCOME_DENIED_QUOTA] * 1000 + [pb.OUTCOME_DENIED_RISK] * 100
    + [pb.OUTCOME_DENIED_AUTHENTICATION] * 2 + [pb.OUTCOME_DENIED_PERMISSION] * 2
)  # fmt: skip
_IDS = itertools.count()
_RUN_ID: Final = os.urandom(4).hex()


def mix(count: int, seed: int = 7) -> list[tuple[int, str, str, int]]:
    """(key index, method, address, outcome) of `count` calls: keys by a skewed popularity (key k ~ 1 / (k + 1)),
    each key from its own country, refusals as `_OUTCOMES`."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(KEYS)]
    keys = rng.choices(range(KEYS), weights=weights, k=count)
    return [
        (k, f"/tradeguard.trading.v1.TradingService/{rng.choice(('PlaceOrder', 'CancelOrder', 'GetOrder'))}",
         ADDRESSES[k % len(ADDRESSES)], rng.choice(_OUTCOMES))
        for k in keys
    ]  # fmt: skip


def proto_event(key: int, method: str, address: str, outcome: int, time_us: int) -> pb.Event:
    # a PlaceOrder carries the order as the guard records it, so the volume and notional detectors work too
    details = (
        {"symbol": "BTC-USD", "side": "SIDE_BUY", "quantity": f"0.{1 + key % 9}", "price": "64000"}
        if method.endswith("/PlaceOrder")
        else {}
    )
    return pb.Event(
        event_id=f"bench-monitor.{_RUN_ID}.{next(_IDS)}",
        time=timestamp_pb2.Timestamp(seconds=time_us // 1_000_000, nanos=time_us % 1_000_000 * 1000),
        principal=f"usr_bench{key:04d}",
        account_id=f"acct-{key % 100:03d}",
        api_key_id=f"tgk_bench{key:04d}",
        source_ip=address,
        method=method,
        action="orders:write",
        outcome=pb.Outcome.ValueType(outcome),
        status_code="OK",
        details=details,
    )


# --- core -------------------------------------------------------------------------------------------------------


class _NoActions:
    async def act(self, alert: Alert, action: ActionRecord) -> tuple[ActionStatus, str]:
        return ActionStatus.DONE, ""

    async def record(self, alert: Alert, action: ActionRecord) -> bool:
        return True


async def core(events: int, directory: Path) -> None:
    config = MonitorFile(packaged_config(), lambda: 0)
    calls = mix(events)
    start_us = time.time_ns() // 1000 - events * 1000  # one call per ms, ending now
    audit = [
        AuditEvent(
            sequence=i, time_us=start_us + i * 1000, record_time_us=start_us + i * 1000,
            recorder="spiffe://bench/svc/trading", principal=f"usr_bench{k:04d}", account_id=f"acct-{k % 100:03d}",
            api_key_id=f"tgk_bench{k:04d}", source_ip=address, method=method, action="orders:write",
            outcome=Outcome(outcome),
        )
        for i, (k, method, address, outcome) in enumerate(calls)
    ]  # fmt: skip
    detectors = Detectors(lambda: config.current, GeoLocator().locate)
    started = time.perf_counter()
    findings = sum(len(detectors.detect(audit[i : i + 500])) for i in range(0, len(audit), 500))
    detect_s = time.perf_counter() - started
    store = await SqliteMonitorStore.open(directory / "core.db")
    engine = Monitor(store, Detectors(lambda: config.current, GeoLocator().locate), _NoActions(), lambda: 0)
    await engine.open()
    started = time.perf_counter()
    raised = 0
    for i in range(0, len(audit), 500):
        raised += len(await engine.process(audit[i : i + 500]))
    engine_s = time.perf_counter() - started
    await store.close()
    print(
        f"core ({events} events, packaged configuration, {KEYS} keys):\n"
        f"  detectors        {detect_s / events * 1e6:7.1f} us/event   {events / detect_s:9.0f} events/s   "
        f"findings {findings}\n"
        f"  engine + SQLite  {engine_s / events * 1e6:7.1f} us/event   {events / engine_s:9.0f} events/s   "
        f"alerts {raised}   (batches of 500, one transaction each)"
    )


# --- live -------------------------------------------------------------------------------------------------------


def start_monitor(layout: Layout) -> None:
    port = free_port()
    env = layout.env(
        TRADEGUARD_MONITOR_PORT=str(port),
        TRADEGUARD_MONITOR_DATABASE_URL=f"sqlite:///{layout.home / 'data' / 'monitor.db'}",
        TRADEGUARD_MONITOR_AUDIT_TARGET=f"127.0.0.1:{layout.procs['audit'].port}",
        TRADEGUARD_MONITOR_AUTH_TARGET="127.0.0.1:1",  # no action is expected: the mix raises no alert
        TRADEGUARD_MONITOR_REPLAY_ENTRIES="0",
    )
    layout.spawn("monitor", port, [sys.executable, "-m", "services.monitor"], env)


async def live(layout: Layout, duration: float, batch: int, callers: int) -> None:
    start_keyvault(layout)
    await serving(layout, "keyvault")
    ops = tls.Workload.of(layout.paths, "ops")
    async with MeshChannel(f"127.0.0.1:{layout.procs['keyvault'].port}", "keyvault", ops) as vault:
        await ensure_key(vault, CHECKPOINT_KEY, keyvault_pb2.KEY_TYPE_ED25519)
    start_audit(layout, "audit", f"sqlite:///{layout.home / 'data' / 'audit.db'}", None)
    await serving(layout, "audit")
    start_monitor(layout)
    await serving(layout, "monitor")
    monitor_pid = layout.procs["monitor"].process.pid
    rss_before = rss_mib(monitor_pid)
    calls = mix(200_000, seed=11)
    appended = 0
    done = asyncio.Event()
    trading = tls.Workload.of(layout.paths, "trading")
    audit_target = f"127.0.0.1:{layout.procs['audit'].port}"
    samples: list[tuple[float, int, int, float]] = []  # (t, log end, monitor position, lag s)

    async def appender(index: int) -> None:
        nonlocal appended
        async with MeshChannel(audit_target, "audit", trading) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            n = index
            while not done.is_set():
                now = time.time_ns() // 1000
                events = [proto_event(*calls[(n + j) % len(calls)], now) for j in range(batch)]
                n += batch * callers
                await stub.AppendBatch(pb.AppendBatchRequest(events=events), timeout=30)
                appended += batch

    async def status(stub: Any) -> monitor_pb2.GetStatusResponse:
        reply: monitor_pb2.GetStatusResponse = await stub.GetStatus(
            monitor_pb2.GetStatusRequest(), timeout=10
        )
        return reply

    async with MeshChannel(f"127.0.0.1:{layout.procs['monitor'].port}", "monitor", ops) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        base = (await status(stub)).position
        cpu_before = process_cpu_s(monitor_pid)
        started = time.perf_counter()
        tasks = [asyncio.create_task(appender(i * batch)) for i in range(callers)]
        while time.perf_counter() - started < duration:
            await asyncio.sleep(0.2)
            reply = await status(stub)
            samples.append(
                (
                    time.perf_counter() - started,
                    base + appended,
                    reply.position,
                    reply.lag.ToTimedelta().total_seconds(),
                )
            )
        done.set()
        await asyncio.gather(*tasks)
        load_s = time.perf_counter() - started
        end = base + appended
        at_stop = samples[-1] if samples else (load_s, end, base, 0.0)
        while (await status(stub)).position < end:  # noqa: ASYNC110 - a remote position, polled
            await asyncio.sleep(0.05)
        caught_s = time.perf_counter() - started
        cpu = process_cpu_s(monitor_pid) - cpu_before
        alerts = await stub.ListAlerts(monitor_pb2.ListAlertsRequest(page_size=1000), timeout=10)
    rss_after = rss_mib(monitor_pid)
    behind = [log_end - position for _, log_end, position, _ in samples]
    print(
        f"live ({duration:g} s of load, AppendBatch of {batch} from {callers} callers, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}):\n"
        f"  audit appends    {appended / load_s:9.0f} events/s acknowledged ({appended} events)\n"
        f"  monitor          {(at_stop[2] - base) / at_stop[0]:9.0f} events/s during the load, "
        f"{appended / caught_s:9.0f} events/s until caught up\n"
        f"  lag              at most {max(behind, default=0)} entries behind the log; at the end of the load "
        f"{at_stop[1] - at_stop[2]} entries, {at_stop[3]:.3f} s (GetStatus.lag); caught up "
        f"{caught_s - load_s:.2f} s after the load stopped\n"
        f"  monitor CPU      {cpu / appended * 1e6:7.1f} us/event; RSS {rss_before:.0f} -> {rss_after:.0f} MiB\n"
        f"  alerts raised    {len(alerts.alerts)} (false positives: the mix is normal traffic)"
    )


async def run(duration: float, batch: int, callers: int, core_events: int, directory: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="tg-bench-monitor-", dir=directory) as tmp:
        home = Path(tmp)
        await core(core_events, home)
        layout = Layout(home)
        dev_pki(layout.home, WORKLOADS)
        try:
            await live(layout, duration, batch, callers)
        finally:
            layout.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    parser.add_argument("--batch", type=int, default=100, help="events per AppendBatch (default 100)")
    parser.add_argument(
        "--batch-callers", type=int, default=4, help="concurrent AppendBatch callers (default 4)"
    )
    parser.add_argument(
        "--core-events", type=int, default=100_000, help="events of the core part (default 100k)"
    )
    parser.add_argument("--dir", help="where the run's files go (default: the system's temporary directory)")
    args = parser.parse_args(argv)
    asyncio.run(run(args.duration, args.batch, args.batch_callers, args.core_events, args.dir))


if __name__ == "__main__":
    main()
