"""The full guarded chain beside the bare call (issue 10, "The full chain, fast"), in one run, over mutual TLS.

Every service in its own process, as production runs them (the order `tradeguard up` starts them in), the load
generator (this process) in its own:

  keyvault    python -m services.keyvault (SQLite on tmpfs), recording its own security events in the audit service
  audit       python -m services.audit (SQLite on tmpfs), its checkpoints signed by the key vault
  auth        python -m services.auth (SQLite, in-process hot state), recording its security events in audit
  ratelimit   python -m services.ratelimit (the machine's Redis, 127.0.0.1:6379), bench/guard.py's limits (four
              sliding-window limits per PlaceOrder, far above the load)
  trading     one process per mode (bench/trading_server.py), the same handler and the same SQLite store:
    bare      the reference service's servicer and store as its declaration builds them (so its own checks are
              in: the pre-trade risk checks once the reference service runs them by default) on a plain
              grpc.aio server with the mesh's TLS credentials and NO interceptors at all, the principal fixed:
              the baseline
    jwt       the full chain, the reference service exactly as declared (the kit's runner): the mesh's caller
              policy, the chain, the log line, the guard's JWT authentication (certificate-bound token, verified in
              process), authorisation, quota (CheckQuotaBatch to the rate-limit service, adaptive batches), audit
              (AppendBatch to the audit service, adaptive batches; the response waits for the ack), and the
              handler's own risk checks
    hmac      the same with each call signed by an HMAC API key (VerifySignedRequests to auth, adaptive batches;
              the quota check beside it once the key is known)

Closed loop: `--concurrency` callers (default 64) each sending PlaceOrder back to back, `--rounds` rounds rotating
the order of the modes, each mode warmed up before it is measured. Printed per round: throughput, p50/p99 (closed
loop: queueing), CPU µs per call of each process (client, trading, auth, ratelimit, audit, keyvault, and the
machine's redis-server when it runs here: the counters' CPU is on the same cores; /proc) and
the average batch of each batched RPC (from the services' one log line per RPC). Before each round the mode's
trading process starts again on an empty database (`fresh`), so that every round and mode starts alike (the
bench's orders all stay open). Then the median ratio full/bare per mode (aim: above 0.5), and each process's RSS before and after.

Where the CPU of one call goes (on unless `--no-profile`): one more round per mode with py-spy sampling its
trading process (`py-spy record --native --gil --format raw` at 250 Hz: the Python and Cython/C frames of the
thread holding the GIL). Each sample goes to the innermost frame of its stack that belongs to a stage (`STAGES`):
authentication (the JWT verifier, revocations, the signed-request client), quota (the guard's quota stage, its
batch RPC), audit (the guard's audit stage and the kit's recorder: building events, the batch RPC), the guard's
own logic (tradeguard/guard/layer.py), the batcher (tradeguard/batching.py), handler+store (services/trading,
tradeguard/risk, the SQLite store), logging+telemetry (tradeguard/observability: the log line, metrics, tracing),
the chain (tradeguard/rpc), the mesh's server-side policy; else the mesh's client channel, gRPC (grpc.aio's
Python and Cython frames: both ends' call machinery, the outgoing batch RPCs' own tasks included) or the event
loop. The shares are scaled to the process's measured CPU µs per call of that round; gRPC core's own threads
(TLS, HTTP/2 I/O off the GIL) are not sampled, their CPU is spread like the rest (the profiled round runs slower:
py-spy pauses the process for each native sample).

Open loop (`--open-duration`, default 10 s): the jwt mode at half its own closed-loop maximum (the median of its
rounds) as a fixed arrival rate, latency from each call's intended send time (bench/loadgen.py `open_loop`):
p50/p99/p99.9 (aim: p99 under 5 ms), late and dropped sends; before it the bare call at the same rate (the latency
the chain adds). Every other guarded mode the same after it. `--open-rate` sets the rate instead.

On a machine shared with other work a round's throughput moves by tens of percent: read the ratios of one run
and the CPU per call (the steadier figure); the load average is printed with the figures.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import asyncio
import contextlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from bench import guard
from bench.audit import CHECKPOINT_KEY
from bench.guard import Credentials, Layout, Proc, rss_mib, serving, start_keyvault
from bench.loadgen import (
    Call,
    OpenResult,
    Result,
    closed_loop,
    free_port,
    load_arguments,
    median_ratio,
    open_loop,
    process_cpu_s,
    tmpfs,
)
from bench.mesh import dev_pki
from services.auth.vault_client import ensure_keys
from tradeguard.keyvault.signer import ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

MODES: Final = ("bare", "jwt", "hmac")
GUARDED: Final = ("jwt", "hmac")
# the jwt mode with one of the guard's optimisations undone (`--modes`; not run by default): what it gains
VARIANTS: Final = {
    "jwt-nofill": ["--fill-turns", "0"],
    **{f"jwt-fill{n}": ["--fill-turns", str(n)] for n in (3, 10, 25, 50)},
    **{f"jwt-patience{n}": ["--fill-patience", str(n)] for n in (0, 1, 2, 4)},
    # PlaceOrder's event appended beside its handler instead of before it (AUDIT_WRITE_AHEAD=false)
    "jwt-beside": ["--no-write-ahead"],
}
AIM: Final = 0.5  # the full chain keeps more than half of the bare throughput (issue 10)
P99_AIM_MS: Final = 5.0
WORKLOADS: Final = ("keyvault", "audit", "auth", "ratelimit", "trading", "ops", guard.CLIENT)
SERVICES: Final = ("auth", "ratelimit", "audit", "keyvault")
PROFILE_HZ: Final = 250
# The reference service's packaged limits (tradeguard/risk/risk.yaml: every check on), the bench account allowed the
# load: its message throttle and credit limit far above it (still checked). Orders differ in quantity, so none is
# a duplicate of another (`place_order`).
RISK: Final = f"""\
version: 1
restricted_symbols: []
defaults:
  max_quantity: 1000000
  max_notional: 10000000
  price_collar_bps: 1000
  credit_limit: 50000000
  duplicate_window: 1s
  throttle: {{messages: 200, window: 1s}}
accounts:
  {guard.ACCOUNT}:
    credit_limit: 1000000000000000
    throttle: {{messages: 10000, window: 1s}}
reference_prices:
  BTC-USD: 64000
"""

# (stage, path fragments of a frame's file): a sample goes to the innermost frame of its stack that matches one, the
# first matching stage of this list; the kit's outgoing-call plumbing (the mesh channel and its client interceptor,
# peer parsing) is not a stage: an RPC the quota or audit stage makes is theirs
STAGES: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    (
        "authentication",
        ("tradeguard/guard/jwt.py", "tradeguard/guard/revocations.py", "jwt/", "cryptography/"),
    ),
    (
        "authentication",
        ("tradeguard/guard/signed.py", "tradeguard/guard/auth_client.py", "tradeguard/signing"),
    ),
    ("quota", ("tradeguard/guard/quota.py", "tradeguard/ratelimit/")),
    ("audit", ("tradeguard/guard/audit.py", "tradeguard/audit/", "tradeguard/clock.py")),
    ("guard (layer)", ("tradeguard/guard/",)),
    ("batcher", ("tradeguard/batching.py",)),
    (
        "handler+store",
        ("services/trading/", "tradeguard/risk/", "tradeguard/storage", "aiosqlite", "sqlite3"),
    ),
    (
        "logging+telemetry",
        ("tradeguard/observability/", "structlog/", "prometheus_client/", "opentelemetry/"),
    ),
    ("chain", ("tradeguard/rpc/",)),
    (
        "mesh policy (server)",
        ("tradeguard/mesh/server.py", "tradeguard/mesh/authz.py", "tradeguard/principal.py"),
    ),
)
GENERIC: Final = (
    ("mesh channel (client)", ("tradeguard/mesh/",)),
    ("gRPC (Python/Cython)", ("grpc/", "_cygrpc", "cygrpc")),
    ("event loop", ("asyncio/",)),
)


class ChainLayout(Layout):
    """bench/guard.py's layout, every process told where this run's audit service listens (the key vault and auth
    record their own security events there, as `tradeguard up` sets them)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.audit_port = free_port()

    def env(self, **extra: str) -> dict[str, str]:
        target = f"127.0.0.1:{self.audit_port}"
        audited = {"TRADEGUARD_KEYVAULT_AUDIT_TARGET": target, "TRADEGUARD_AUTH_AUDIT_TARGET": target}
        return super().env(**{**audited, **extra})


def start_audit(layout: ChainLayout) -> Proc:
    env = layout.env(
        TRADEGUARD_AUDIT_PORT=str(layout.audit_port),
        TRADEGUARD_AUDIT_DATABASE_URL=f"sqlite:///{layout.home / 'data' / 'audit.db'}",
        TRADEGUARD_AUDIT_KEYVAULT_TARGET=f"127.0.0.1:{layout.procs['keyvault'].port}",
    )
    return layout.spawn("audit", layout.audit_port, [sys.executable, "-m", "services.audit"], env)


def start_trading(layout: ChainLayout, mode: str, port: int | None = None, generation: int = 0) -> Proc:
    """The trading process of `mode` on `port` (a free one if None), on a new database of its own."""
    port = free_port() if port is None else port
    db = layout.home / "data" / f"trading-{mode}-{generation}.db"
    cmd = [sys.executable, "-m", "bench.trading_server", "--port", str(port), "--home", str(layout.home)]
    cmd += ["--db", f"sqlite:///{db}", "--account", guard.ACCOUNT]
    risk = layout.home / "config" / "risk.yaml"
    if not risk.exists():
        risk.parent.mkdir(parents=True, exist_ok=True)
        risk.write_text(RISK)
    cmd += ["--risk-file", str(risk)]
    if mode == "bare":
        cmd += ["--mode", "bare"]
    else:
        cmd += VARIANTS.get(mode, [])
        cmd += ["--mode", "guarded", "--auth-target", f"127.0.0.1:{layout.procs['auth'].port}"]
        cmd += ["--ratelimit-target", f"127.0.0.1:{layout.procs['ratelimit'].port}"]
        cmd += ["--audit-target", f"127.0.0.1:{layout.audit_port}"]
    return layout.spawn(f"trading-{mode}", port, cmd, layout.env())


@contextlib.asynccontextmanager
async def suite(home: Path, modes: Sequence[str] = MODES) -> AsyncIterator[tuple[ChainLayout, Credentials]]:
    """Every service running, one trading process per mode; the trader's credentials."""
    layout = ChainLayout(home)
    creds: Credentials | None = None
    dev_pki(layout.home, WORKLOADS)
    try:
        start_keyvault(layout)
        await serving(layout, "keyvault")
        start_audit(layout)
        await serving(layout, "audit")
        async with guard.channel(layout, "keyvault", "ops") as ops:
            await ensure_key(ops, CHECKPOINT_KEY, keyvault_pb2.KEY_TYPE_ED25519)
            await ensure_keys(ops)
        guard.start_auth(layout)
        guard.start_ratelimit(layout)
        await serving(layout, "auth")
        await serving(layout, "ratelimit")
        creds = await guard.credentials(layout)
        for mode in modes:
            start_trading(layout, mode)
        yield layout, creds
    finally:
        layout.stop()
        if creds is not None:
            guard.forget_counters(creds.subjects)


@dataclass
class Round:
    result: Result
    cpu_us: dict[str, float]  # CPU µs per call of each process
    batches: dict[str, float]  # average batch per batched RPC: auth, quota, audit


# (process, method in its log line, the batch size field)
BATCHED: Final = (
    ("auth", b"VerifySignedRequests", "batch"),
    ("ratelimit", b"CheckQuotaBatch", "checks"),
    ("audit", b"AppendBatch", "events"),
)


def redis_pid() -> int | None:
    """The machine's redis-server process (the rate limiter's counters: its CPU is on the same cores), if it runs
    here and is readable."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "redis-server":
                return int(comm.parent.name)
    return None


REDIS_PID: Final = redis_pid()


_ORDERS = itertools.count()
FAILURES: Counter[str] = Counter()  # failed calls by status and message, printed with each round that had any


def place_order(stub: trading_pb2_grpc.TradingServiceAsyncStub, tag: str) -> Call:
    """PlaceOrder calls, the same in every mode but for a new client order id and a quantity of its own
    (0.01 BTC + n * 1e-8, n counting every order of the run, at 64,000.5: within every risk limit, never a
    duplicate)."""

    async def call(i: int) -> object:
        n = next(_ORDERS)
        try:
            return await place(n, i)
        except grpc.aio.AioRpcError as error:
            FAILURES[f"{error.code().name} {error.details()}"[:120]] += 1
            raise

    async def place(n: int, i: int) -> object:
        return await stub.PlaceOrder(
            trading_pb2.PlaceOrderRequest(
                account_id=guard.ACCOUNT,
                client_order_id=f"{tag}-{i}",
                symbol="BTC-USD",
                side=trading_pb2.SIDE_BUY,
                type=trading_pb2.ORDER_TYPE_LIMIT,
                quantity=f"0.{1_000_000 + n % 90_000_000:08d}",
                price="64000.5",
            ),
            timeout=10,
        )

    return call


_GENERATIONS = itertools.count(1)


async def fresh(layout: ChainLayout, mode: str, stub: trading_pb2_grpc.TradingServiceAsyncStub) -> None:
    """`mode`'s trading process started again on the same port with an empty database, ready: every round and
    mode starts alike, whatever the rounds before placed (every order of the bench stays open)."""
    old = layout.procs[f"trading-{mode}"]
    old.process.terminate()
    await asyncio.to_thread(old.process.wait, 30)
    start_trading(layout, mode, old.port, next(_GENERATIONS))
    await guard.ready(stub, layout.procs[f"trading-{mode}"])


def _pids(layout: Layout, mode: str) -> dict[str, int]:
    pids = {"trading": layout.procs[f"trading-{mode}"].pid} | {s: layout.procs[s].pid for s in SERVICES}
    if REDIS_PID is not None:
        pids["redis"] = REDIS_PID
    return pids


async def measure(
    mode: str,
    stub: trading_pb2_grpc.TradingServiceAsyncStub,
    layout: Layout,
    tag: str,
    concurrency: int,
    duration: float,
) -> Round:
    await closed_loop(place_order(stub, f"w{tag}"), concurrency=concurrency, duration=0.5, warmup=0)
    FAILURES.clear()  # the warm-up's
    pids = _pids(layout, mode)
    offsets = {name: layout.procs[name].log.stat().st_size for name, _, _ in BATCHED}
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    result = await closed_loop(place_order(stub, tag), concurrency=concurrency, duration=duration, warmup=0)
    calls = max(1, result.calls)
    cpu = {"client": (time.process_time() - client_before) / calls * 1e6}
    for name, pid in pids.items():
        cpu[name] = (process_cpu_s(pid) - before[name]) / calls * 1e6
    await asyncio.sleep(0.05)  # the last batches' log lines
    batches: dict[str, float] = {}
    for name, method, field in BATCHED:
        rpcs, items, _ = guard.verify_batches(layout.procs[name].log, offsets[name], method, field)
        if rpcs:
            batches[name] = items / rpcs
    return Round(result, cpu, batches)


def _line(label: str, rnd: Round) -> str:
    parts = " ".join(f"{name} {us:4.0f}" for name, us in rnd.cpu_us.items())
    batches = "".join(f"   {name} batch {size:4.1f}" for name, size in rnd.batches.items())
    failures = "".join(f"\n    failed: {n} x {what}" for what, n in FAILURES.most_common(5))
    FAILURES.clear()
    return f"{rnd.result.line(label)}   [{parts}]{batches}{failures}"


# --- where the CPU goes ----------------------------------------------------------------------------------------


def stage_of(stack: Sequence[str]) -> str:
    """The stage a sampled stack (root first) is charged to: its innermost frame that belongs to a stage, else
    gRPC or the event loop, else "other"."""
    for frame in reversed(stack):
        for stage, fragments in STAGES:
            if any(fragment in frame for fragment in fragments):
                return stage
    for frame in reversed(stack):
        for stage, fragments in GENERIC:
            if any(fragment in frame for fragment in fragments):
                return stage
    return "other"


def stages_of(raw: str) -> Counter[str]:
    """Samples per stage from py-spy's raw (collapsed) output: one `frame;frame;... count` line per stack."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack.split(";"))] += int(count)
    return counts


async def profile(
    mode: str,
    stub: trading_pb2_grpc.TradingServiceAsyncStub,
    layout: Layout,
    concurrency: int,
    duration: float,
    keep: Path | None = None,
) -> tuple[Counter[str], Round] | None:
    """A round of `mode` with py-spy recording its trading process: samples per stage, and the round."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not await asyncio.to_thread(Path(spy).exists):
        print("where the CPU goes: not measured (py-spy not found)")
        return None
    out = layout.home / f"profile-{mode}.txt"
    proc = layout.procs[f"trading-{mode}"]
    await closed_loop(place_order(stub, f"wp{mode}"), concurrency=concurrency, duration=0.5, warmup=0)
    cmd = [spy, "record", "--pid", str(proc.pid), "--rate", str(PROFILE_HZ), "--format", "raw"]
    cmd += ["--gil", "--native", "--duration", str(max(1, round(duration))), "--output", str(out)]
    spying = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.sleep(0.3)  # py-spy attached
        rnd = await measure(mode, stub, layout, f"p{mode}", concurrency, duration)
        _, err = await asyncio.wait_for(spying.communicate(), duration + 30)
    finally:
        if spying.returncode is None:
            spying.kill()
            await spying.wait()
    if not await asyncio.to_thread(out.exists):
        print(f"where the CPU goes: py-spy failed: {err.decode(errors='replace')[-500:]}")
        return None
    raw = await asyncio.to_thread(out.read_text, errors="replace")
    if keep is not None:
        await asyncio.to_thread(keep.with_name(f"{keep.stem}-{mode}{keep.suffix}").write_text, raw)
    return stages_of(raw), rnd


def profile_report(profiles: dict[str, tuple[Counter[str], Round]]) -> None:
    """Per stage, µs of the trading process's CPU per call in each profiled mode (its measured CPU per call shared
    out by the samples' stages)."""
    modes = list(profiles)
    print(
        "\nwhere the CPU of one call goes in the trading process (py-spy --native --gil, "
        f"{PROFILE_HZ} Hz, one round per mode; the process's measured CPU per call shared out by the samples' "
        "stages; gRPC core's own threads are not sampled, their CPU is spread alike), us per call:"
    )
    per: dict[str, dict[str, float]] = {}
    for mode, (counts, rnd) in profiles.items():
        total = sum(counts.values()) or 1
        per[mode] = {stage: n / total * rnd.cpu_us["trading"] for stage, n in counts.items()}
    stages = sorted(
        {s for p in per.values() for s in p}, key=lambda s: -max(p.get(s, 0.0) for p in per.values())
    )
    print(f"  {'stage':<24}" + "".join(f"{mode:>9}" for mode in modes))
    for stage in stages:
        print(f"  {stage:<24}" + "".join(f"{per[mode].get(stage, 0.0):9.0f}" for mode in modes))
    print(f"  {'total (measured)':<24}" + "".join(f"{profiles[m][1].cpu_us['trading']:9.0f}" for m in modes))
    print(f"  {'samples':<24}" + "".join(f"{sum(profiles[m][0].values()):9d}" for m in modes))
    for mode, (_, rnd) in profiles.items():
        others = {k: v for k, v in rnd.cpu_us.items() if k != "trading"}
        print(
            f"  {mode}: the other processes per call: "
            + ", ".join(f"{k} {v:.0f} us" for k, v in others.items())
        )


# --- open loop ---------------------------------------------------------------------------------------------------


async def open_round(
    mode: str, stub: trading_pb2_grpc.TradingServiceAsyncStub, layout: Layout, rate: float, duration: float
) -> OpenResult:
    await closed_loop(place_order(stub, f"wo{mode}"), concurrency=8, duration=0.5, warmup=0)
    return await open_loop(
        place_order(stub, f"o{mode}"),
        rate,
        duration,
        warmup=1.0,
        cpu_of=list(_pids(layout, mode).values()),
    )


# --- the run -----------------------------------------------------------------------------------------------------


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(results: dict[str, list[Round]]) -> None:
    base = results["bare"]
    print(
        f"\nagainst the bare call (median of rounds; the ratios of one run are what counts; load average {_load()}):"
    )
    print(
        f"  {'mode':<6} {'calls/s':>8} {'full/bare':>9} {'aim':>6}   {'p50 ms':>7} {'p99 ms':>7}   CPU us per call: "
        f"{'total':>6} {'client':>6} {'trading':>7} {'auth':>5} {'rl':>5} {'redis':>5} {'audit':>5} {'vault':>5}   batches"
    )
    for mode, rounds in results.items():
        ratio = median_ratio([x.result for x in rounds], [x.result for x in base])
        per = {name: statistics.median(x.cpu_us[name] for x in rounds) for name in rounds[0].cpu_us}
        batch_names = sorted({name for x in rounds for name in x.batches})
        batches = " ".join(
            f"{name} {statistics.median(x.batches[name] for x in rounds if name in x.batches):.1f}"
            for name in batch_names
        )
        verdict = "" if mode == "bare" else ("met" if ratio > AIM else "missed")
        print(
            f"  {mode:<6} {statistics.median(x.result.rps for x in rounds):8.0f} {ratio:9.3f} {verdict:>6}   "
            f"{statistics.median(x.result.percentile(50) for x in rounds):7.2f} "
            f"{statistics.median(x.result.percentile(99) for x in rounds):7.2f}   {'':16}"
            f"{sum(per.values()):6.0f} {per['client']:6.0f} {per['trading']:7.0f} {per['auth']:5.0f} "
            f"{per['ratelimit']:5.0f} {per.get('redis', float('nan')):5.0f} {per['audit']:5.0f} "
            f"{per['keyvault']:5.0f}   {batches}"
        )


def _credential(mode: str) -> str:
    """The credential a mode's calls carry: none for the bare call, else its first part (`jwt`, `hmac`)."""
    return "none" if mode == "bare" else mode.partition("-")[0]


async def run(
    concurrency: int,
    duration: float,
    rounds: int,
    *,
    profiled: bool = True,
    open_duration: float = 10.0,
    modes: Sequence[str] = MODES,
    keep: Path | None = None,
    open_rate: float | None = None,
) -> dict[str, list[Round]]:
    if "bare" not in modes:
        raise ValueError("the bare mode is the baseline")
    with tempfile.TemporaryDirectory(prefix="tg-bench-chain-", dir=tmpfs()) as tmp:
        async with (
            suite(Path(tmp), modes) as (layout, creds),
            guard.mode_stubs(
                layout, modes, lambda mode: guard.interceptors_of(_credential(mode), creds)
            ) as stubs,
        ):
            rss_before = {name: rss_mib(proc.pid) for name, proc in layout.procs.items()}
            print(
                f"PlaceOrder over mTLS, {concurrency} concurrent callers (closed loop), {duration:g} s per round, "
                f"{rounds} rounds, {os.cpu_count()} CPUs, load average {_load()}\nper round: [CPU us per call "
                "of each process]; batch: average items per VerifySignedRequests (auth), CheckQuotaBatch "
                "(ratelimit), AppendBatch (audit)"
            )
            results: dict[str, list[Round]] = {mode: [] for mode in modes}
            for r in range(rounds):
                shift = r % len(modes)
                for mode in [*modes[shift:], *modes[:shift]]:
                    await fresh(layout, mode, stubs[mode])
                    rnd = await measure(mode, stubs[mode], layout, f"{mode[0]}{r}", concurrency, duration)
                    results[mode].append(rnd)
                    print(_line(f"round {r + 1} {mode}", rnd), flush=True)
            report(results)
            if profiled:
                profiles = {}
                for mode in [m for m in modes if m not in VARIANTS]:
                    await fresh(layout, mode, stubs[mode])
                    profiled_round = await profile(mode, stubs[mode], layout, concurrency, duration, keep)
                    if profiled_round is not None:
                        profiles[mode] = profiled_round
                if profiles:
                    profile_report(profiles)
            if open_duration > 0:
                asked = f"{open_rate:g} calls/s" if open_rate else "half the mode's closed-loop maximum"
                print(
                    f"\nopen loop: a fixed arrival rate of {asked} (median of its rounds), {open_duration:g} s, "
                    "the bare call at the same rate before each mode; latency from each call's intended send "
                    f"time (aim: p99 under {P99_AIM_MS:g} ms)"
                )
                for mode in [m for m in modes if m != "bare"]:
                    rate = open_rate or statistics.median(x.result.rps for x in results[mode]) / 2
                    # the bare call at the same rate first: the latency the chain adds to it
                    for measured in ("bare", mode):
                        await fresh(layout, measured, stubs[measured])
                        opened = await open_round(measured, stubs[measured], layout, rate, open_duration)
                        label = f"open loop {mode}" if measured == mode else f"  (bare at {mode}'s rate)"
                        verdict = "met" if opened.percentile(99) < P99_AIM_MS else "missed"
                        aim = f"   (p99 aim: {verdict})" if measured == mode else ""
                        print(f"{opened.open_line(label)}{aim}", flush=True)
            rss_after = {name: rss_mib(proc.pid) for name, proc in layout.procs.items()}
            print(
                "RSS MiB before -> after the load: "
                + ", ".join(f"{name} {rss_before[name]:.0f} -> {rss_after[name]:.0f}" for name in rss_before)
            )
            return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = load_arguments(__doc__, rounds=3)
    parser.set_defaults(concurrency=64)
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy round")
    parser.add_argument(
        "--open-duration", type=float, default=10.0, help="seconds of the open-loop run per mode (0: none)"
    )
    parser.add_argument(
        "--open-rate",
        type=float,
        help="the open loop's rate in calls/s (default: half of each mode's maximum)",
    )
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's raw stacks in this file")
    parser.add_argument(
        "--modes", nargs="+", choices=[*MODES, *VARIANTS], default=list(MODES), help="modes (bare always)"
    )
    args = parser.parse_args(argv)
    asyncio.run(
        run(
            args.concurrency,
            args.duration,
            args.rounds,
            profiled=not args.no_profile,
            open_duration=args.open_duration,
            modes=list(dict.fromkeys(["bare", *args.modes])),
            keep=args.profile_out,
            open_rate=args.open_rate,
        )
    )


if __name__ == "__main__":
    main()
