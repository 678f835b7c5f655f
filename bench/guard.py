"""PlaceOrder through the trading guard (a JWT, a signed HMAC API key, a signed Ed25519 API key; and the first two
again with the quota stage) against the same service with no guard, in one run, over mutual TLS.

Every service in its own process, as production runs them, the load generator (this process) in its own:

  keyvault    python -m services.keyvault (SQLite on tmpfs; the auth service's keys created as ops)
  auth        python -m services.auth (SQLite records, in-process hot state: nonces, revocations)
  trading     one process per mode (bench/trading_server.py), the same SQLite-backed trading service:
    none      the real declaration with the guard replaced by a layer naming a fixed principal (the baseline)
    jwt       the real declaration, guard included: `authorization: Bearer` with a certificate-bound access token
              (a trader who enrolled TOTP and logged in), verified in process, cached until it expires
    hmac      the same, each call signed with an HMAC API key (tradeguard.guard.signing_interceptors): the guard
              asks auth (VerifySignedRequests, adaptive batches), auth checks key, window, allow-list, signature,
              nonce (claimed once), permission; the guard checks the revocation set too
    ed25519   the same with an Ed25519 API key
    jwt+quota, hmac+quota
              jwt and hmac with the guard's quota stage on (the reference trading service's default): every call
              also counted by the rate-limit service (CheckQuotaBatch through the guard's adaptive batcher; for a
              signed key already verified, beside the auth RPC), four sliding-window limits per PlaceOrder
              (requests and orders, per second and per day), far above the load, the counters in the machine's
              Redis (127.0.0.1:6379). The modes above run with the quota stage off, so that they measure
              authentication alone, as issue 7 did.
  ratelimit   python -m services.ratelimit (Redis counters), called by the +quota modes' trading processes

The client calls each trading process as workload `trading-client` through `authenticated_channel` (the same
channel in every mode, with the mode's interceptors). Rounds rotate the order of the modes so that drift hits all
alike; each mode is warmed up before it is measured. Printed per round: throughput, p50/p99 latency (closed loop:
at 64 callers latency is mostly queueing), CPU per call (the client and every server, from /proc) and where it
went, and for the signed modes the average VerifySignedRequests batch (from auth's one log line per RPC); then the
median ratio of each mode to no guard, and each service's RSS before and after the load.
On a machine shared with other work a round's throughput moves by tens of percent, and the signed modes' average
batch with it (each VerifySignedRequests costs roughly 1 ms of CPU between the guard and auth, shared by its
batch): read the ratios of one run and the CPU per call, the steadier figure.
Aim (issue 7): a JWT costs under 10 % of throughput, a signed key under 35 %. Aim (issue 8): the quota stage costs
under 20 % (jwt+quota against jwt, hmac+quota against hmac).
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlparse

import grpc
import pyotp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loadgen import (
    Call,
    Result,
    closed_loop,
    free_port,
    load_arguments,
    median_ratio,
    process_cpu_s,
    tmpfs,
)
from bench.mesh import dev_pki, mtls_channel
from services.auth.vault_client import ensure_keys
from tradeguard import signing
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.guard.client import (
    ApiKeyCredentials,
    authenticated_channel,
    bearer_interceptors,
    signing_interceptors,
)
from tradeguard.mesh import pki, tls
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

MODES = ("none", "jwt", "hmac", "ed25519", "jwt+quota", "hmac+quota")
SIGNED = ("hmac", "ed25519", "hmac+quota")
QUOTA = "+quota"
QUOTA_AIM = 0.20
REDIS_URL = "redis://127.0.0.1:6379"
LIMITS = """\
version: 1
default_tier: bench
operations:
  default: {requests: 1}
  /tradeguard.trading.v1.TradingService/PlaceOrder: {requests: 1, orders: 1}
tiers:
  bench:
    requests:
      - {name: per-second, limit: 1000000000, window: 1s}
      - {name: per-day, limit: 1000000000000, window: 1d}
    orders:
      - {name: per-second, limit: 1000000000, window: 1s}
      - {name: per-day, limit: 1000000000000, window: 1d}
"""
ACCOUNT = "acct-bench"
USERNAME = "bench-trader"
PASSWORD = "correct horse trading staple"  # a benchmark's throwaway user on a throwaway PKI
CLIENT = "trading-client"
WORKLOADS = ("keyvault", "auth", "ratelimit", "trading", "ops", CLIENT)
AIM = {"jwt": 0.10, "hmac": 0.35, "ed25519": 0.35}


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid` in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Proc:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self) -> str:
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return (
            f"{self.name} (pid {self.pid}, exit {self.process.poll()}) did not come up; its log ends:\n{tail}"
        )


_PASSED = frozenset({"TRADEGUARD_EVENT_LOOP"})


@dataclass
class Layout:
    home: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def paths(self) -> pki.PkiPaths:
        return pki.PkiPaths(self.home)

    def spawn(self, name: str, port: int, cmd: list[str], env: dict[str, str]) -> Proc:
        log = self.home / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        proc = self.procs[name] = Proc(name, port, process, log)
        return proc

    def env(self, **extra: str) -> dict[str, str]:
        # the bench's own settings only, but the event loop passes (an A/B: TRADEGUARD_EVENT_LOOP=asyncio)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_") or k in _PASSED}
        env.update(TRADEGUARD_HOME=str(self.home), PYTHONUNBUFFERED="1", **extra)
        return env

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.process.poll() is None:
                proc.process.terminate()
        for proc in self.procs.values():
            try:
                proc.process.wait(20)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(5)


def channel(layout: Layout, name: str, as_workload: str) -> grpc.aio.Channel:
    workload = tls.Workload.of(layout.paths, as_workload)
    return mtls_channel(layout.procs[name].port, name.partition("-")[0], workload)


async def serving(layout: Layout, name: str, timeout_s: float = 60.0) -> None:
    """Until `name` answers its health check as SERVING (over mTLS, as ops)."""
    proc = layout.procs[name]
    deadline = time.monotonic() + timeout_s
    async with channel(layout, name, "ops") as ch:
        while time.monotonic() < deadline:
            if proc.process.poll() is not None:
                break
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(proc.failure())


def start_keyvault(layout: Layout) -> Proc:
    passphrase = layout.home / "data" / "vault-passphrase"
    passphrase.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(passphrase, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(os.urandom(24).hex())
    port = free_port()
    env = layout.env(
        TRADEGUARD_KEYVAULT_PORT=str(port),
        TRADEGUARD_KEYVAULT_DATABASE_URL=f"sqlite:///{layout.home / 'data' / 'keyvault.db'}",
        TRADEGUARD_KEYVAULT_PASSPHRASE_FILE=str(passphrase),
        TRADEGUARD_KEYVAULT_SCRYPT_N=str(2**10),  # the root key's sealing cost: start-up only
        # its security events (key creation, decryptions of API-key secrets on a cache miss) are not on the
        # measured path: not recorded here (tests/tradeguard/audit/test_recording.py records them for real)
        TRADEGUARD_KEYVAULT_AUDIT="false",
    )
    return layout.spawn("keyvault", port, [sys.executable, "-m", "services.keyvault"], env)


def start_auth(layout: Layout) -> Proc:
    port = free_port()
    env = layout.env(
        TRADEGUARD_AUTH_PORT=str(port),
        TRADEGUARD_AUTH_DATABASE_URL=f"sqlite:///{layout.home / 'data' / 'auth.db'}",
        TRADEGUARD_AUTH_KEYVAULT_TARGET=f"127.0.0.1:{layout.procs['keyvault'].port}",
        TRADEGUARD_AUTH_ACCESS_TTL_S="3600",  # one token for the whole run (the guard caches it until exp)
        TRADEGUARD_AUTH_AUDIT="false",  # its security events (logins, key creation) are not on the measured path
    )
    return layout.spawn("auth", port, [sys.executable, "-m", "services.auth"], env)


# The rate limiter's Redis deadline in the benchmarks: the service's default (50 ms) is sized for a Redis on its own
# cores, and on these 2 shared ones (load generator, every service, Redis, perhaps other work) a PING's p99 has
# been 20 ms and its maximum 150 ms: a call refused UNAVAILABLE then is the machine's stall, not the chain's cost.
BENCH_STORE_TIMEOUT_MS: Final = 1000


def start_ratelimit(layout: Layout, limits: str = LIMITS) -> Proc:
    """The rate-limit service on the machine's Redis, its keys under a subject prefix of this run (its Redis
    deadline `BENCH_STORE_TIMEOUT_MS`)."""
    path = layout.home / "config" / "limits.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(limits)
    port = free_port()
    env = layout.env(
        TRADEGUARD_RATELIMIT_PORT=str(port),
        TRADEGUARD_RATELIMIT_LIMITS_FILE=str(path),
        TRADEGUARD_RATELIMIT_REDIS_URL=REDIS_URL,
        TRADEGUARD_RATELIMIT_STORE_TIMEOUT_MS=str(BENCH_STORE_TIMEOUT_MS),
    )
    return layout.spawn("ratelimit", port, [sys.executable, "-m", "services.ratelimit"], env)


def start_trading(layout: Layout, mode: str) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.trading_server", "--port", str(port), "--home", str(layout.home)]
    cmd += ["--db", f"sqlite:///{layout.home / 'data' / f'trading-{mode}.db'}", "--account", ACCOUNT]
    if mode == "none":
        cmd += ["--mode", "mesh"]
    else:
        cmd += ["--mode", "guarded", "--auth-target", f"127.0.0.1:{layout.procs['auth'].port}"]
    if mode.endswith(QUOTA):
        cmd += ["--ratelimit-target", f"127.0.0.1:{layout.procs['ratelimit'].port}"]
    return layout.spawn(f"trading-{mode}", port, cmd, layout.env())


@dataclass
class Credentials:
    token: str
    hmac: ApiKeyCredentials
    ed25519: ApiKeyCredentials
    user_id: str = ""

    @property
    def subjects(self) -> tuple[str, ...]:
        """What the rate limiter counts these credentials as (tradeguard.guard.quota)."""
        return (f"user:{self.user_id}", f"key:{self.hmac.key_id}", f"key:{self.ed25519.key_id}")


async def credentials(layout: Layout) -> Credentials:
    """A trader (role trader, account ACCOUNT) created by ops, enrolled in TOTP and logged in as the trading
    client (so the token is bound to its certificate), and two API keys of theirs created by ops."""
    async with channel(layout, "auth", "ops") as ops_channel, channel(layout, "auth", CLIENT) as own:
        ops, me = auth_pb2_grpc.AuthServiceStub(ops_channel), auth_pb2_grpc.AuthServiceStub(own)
        user = (
            await ops.CreateUser(
                pb.CreateUserRequest(
                    username=USERNAME, password=PASSWORD, account_id=ACCOUNT, roles=["trader"]
                ),
                timeout=30,
            )
        ).user
        begun = await me.BeginTotpEnrollment(
            pb.BeginTotpEnrollmentRequest(username=USERNAME, password=PASSWORD), timeout=30
        )
        totp = pyotp.TOTP(parse_qs(urlparse(begun.otpauth_uri).query)["secret"][0])
        await me.ConfirmTotpEnrollment(
            pb.ConfirmTotpEnrollmentRequest(username=USERNAME, password=PASSWORD, code=totp.now()), timeout=30
        )
        first = await me.Login(pb.LoginRequest(username=USERNAME, password=PASSWORD), timeout=30)
        second = await me.VerifyMfa(  # the next step's code: enrolment spent the current one
            pb.VerifyMfaRequest(mfa_token=first.mfa_token, totp_code=totp.at(time.time() + 30)), timeout=30
        )
        scopes = ["orders:read", "orders:write"]
        hmac_key = await ops.CreateApiKey(
            pb.CreateApiKeyRequest(
                user_id=user.user_id, kind=pb.API_KEY_KIND_HMAC, scopes=scopes, ip_allow_list=["127.0.0.1/32"]
            ),
            timeout=30,
        )
        seed = os.urandom(32)
        ed_key = await ops.CreateApiKey(
            pb.CreateApiKeyRequest(
                user_id=user.user_id,
                kind=pb.API_KEY_KIND_ED25519,
                scopes=scopes,
                ip_allow_list=["127.0.0.1/32"],
                ed25519_public_key=signing.ed25519_public_key(seed),
            ),
            timeout=30,
        )
    return Credentials(
        token=second.tokens.access_token,
        hmac=ApiKeyCredentials(hmac_key.key.key_id, secret=hmac_key.secret),
        ed25519=ApiKeyCredentials(ed_key.key.key_id, ed25519_seed=seed),
        user_id=user.user_id,
    )


def forget_counters(subjects: Sequence[str]) -> None:
    """Delete the run's rate-limit counters from the machine's Redis (they would otherwise expire in a day)."""
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        for subject in subjects:
            for key in client.scan_iter(match=f"tg:rl:{{{subject}}}:*", count=1000):
                client.unlink(key)


@contextlib.asynccontextmanager
async def mode_stubs(
    layout: Layout, modes: Sequence[str], interceptors: Callable[[str], Sequence[grpc.aio.ClientInterceptor]]
) -> AsyncIterator[dict[str, trading_pb2_grpc.TradingServiceAsyncStub]]:
    """A stub per mode on an authenticated channel (as CLIENT, with the mode's `interceptors`) to its trading
    process (`trading-<mode>`), each answering before it is yielded; the channels closed after."""
    channels = {
        mode: authenticated_channel(
            f"127.0.0.1:{layout.procs[f'trading-{mode}'].port}",
            "trading",
            tls.Workload.of(layout.paths, CLIENT),
            list(interceptors(mode)),
        )
        for mode in modes
    }
    try:
        stubs = {mode: trading_pb2_grpc.TradingServiceStub(ch) for mode, ch in channels.items()}
        for mode, stub in stubs.items():
            await ready(stub, layout.procs[f"trading-{mode}"])
        yield stubs
    finally:
        for ch in channels.values():
            await ch.close(None)


def interceptors_of(mode: str, creds: Credentials) -> list[grpc.aio.ClientInterceptor]:
    mode = mode.removesuffix(QUOTA)
    if mode == "jwt":
        return bearer_interceptors(creds.token)
    if mode == "hmac":
        return signing_interceptors(creds.hmac)
    if mode == "ed25519":
        return signing_interceptors(creds.ed25519)
    return []


def place_order(stub: trading_pb2_grpc.TradingServiceAsyncStub, tag: str) -> Call:
    """PlaceOrder calls, the same request in every mode (a new client order id each call)."""

    async def call(i: int) -> object:
        return await stub.PlaceOrder(
            trading_pb2.PlaceOrderRequest(
                account_id=ACCOUNT,
                client_order_id=f"{tag}-{i}",
                symbol="BTC-USD",
                side=trading_pb2.SIDE_BUY,
                type=trading_pb2.ORDER_TYPE_LIMIT,
                quantity="0.01",
                price="64000.5",
            ),
            timeout=10,
        )

    return call


async def ready(stub: trading_pb2_grpc.TradingServiceAsyncStub, proc: Proc, timeout_s: float = 60.0) -> None:
    """Until an authenticated call passes (a guard refuses JWTs until its revocation stream is up)."""
    deadline = time.monotonic() + timeout_s
    last: grpc.aio.AioRpcError | None = None
    while time.monotonic() < deadline and proc.process.poll() is None:
        try:
            await stub.ListOrders(trading_pb2.ListOrdersRequest(account_id=ACCOUNT), timeout=2)
            return
        except grpc.aio.AioRpcError as error:
            last = error
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.failure()}\nlast answer: {last.code() if last else None}")


def verify_batches(
    log: Path, start: int, method: bytes = b"VerifySignedRequests", field: str = "batch"
) -> tuple[int, int, int]:
    """(RPCs of `method`, items in them, end offset) from a service's rpc log lines after `start`: by default
    auth's VerifySignedRequests and their `batch` sizes."""
    rpcs = items = 0
    with log.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = start + data.rfind(b"\n") + 1
    for line in data[: end - start].splitlines():
        if method not in line or f'"{field}"'.encode() not in line:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "rpc" and field in record:
                rpcs += 1
                items += int(record[field])
    return rpcs, items, end


@dataclass
class Round:
    result: Result
    cpu_us: dict[str, float]  # per process (client, trading, auth, keyvault): CPU µs per call
    batch: float | None  # average VerifySignedRequests batch (signed modes)
    quota_batch: float | None = None  # average CheckQuotaBatch batch (+quota modes)


def _per_call(seconds: float, calls: int) -> float:
    return seconds / max(1, calls) * 1e6


async def measure(
    mode: str,
    stub: trading_pb2_grpc.TradingServiceAsyncStub,
    layout: Layout,
    r: int,
    concurrency: int,
    duration: float,
) -> Round:
    trading, auth, vault = layout.procs[f"trading-{mode}"], layout.procs["auth"], layout.procs["keyvault"]
    servers = {
        "trading": trading.pid,
        "auth": auth.pid,
        "keyvault": vault.pid,
        "ratelimit": layout.procs["ratelimit"].pid,
    }
    tag = mode.replace(QUOTA, "q")  # client order ids: letters, digits, - and _ only
    await closed_loop(place_order(stub, f"w{tag}{r}"), concurrency=concurrency, duration=0.5, warmup=0)
    offset = auth.log.stat().st_size
    quota_log = layout.procs["ratelimit"].log
    quota_offset = quota_log.stat().st_size
    before = {name: process_cpu_s(pid) for name, pid in servers.items()}
    client_before = time.process_time()
    result = await closed_loop(
        place_order(stub, f"{tag}{r}"),
        concurrency=concurrency,
        duration=duration,
        warmup=0,
        cpu_of=list(servers.values()),
    )
    cpu_us = {"client": _per_call(time.process_time() - client_before, result.calls)}
    for name, pid in servers.items():
        cpu_us[name] = _per_call(process_cpu_s(pid) - before[name], result.calls)
    await asyncio.sleep(0.05)  # the last batches' log lines
    rpcs, items, _ = verify_batches(auth.log, offset)
    quota_rpcs, checks, _ = verify_batches(quota_log, quota_offset, b"CheckQuotaBatch", "checks")
    return Round(result, cpu_us, items / rpcs if rpcs else None, checks / quota_rpcs if quota_rpcs else None)


def _line(label: str, rnd: Round) -> str:
    parts = " ".join(f"{name} {us:4.0f}" for name, us in rnd.cpu_us.items())
    batch = "" if rnd.batch is None else f"   batch {rnd.batch:5.1f}"
    if rnd.quota_batch is not None:
        batch += f"   quota batch {rnd.quota_batch:5.1f}"
    return f"{rnd.result.line(label)}   [{parts}]{batch}"


@contextlib.asynccontextmanager
async def suite(home: Path) -> AsyncIterator[tuple[Layout, Credentials]]:
    """The key vault, auth, the rate limiter and one trading process per mode, running; the trader's
    credentials."""
    layout = Layout(home)
    creds: Credentials | None = None
    dev_pki(layout.home, WORKLOADS)
    try:
        start_keyvault(layout)
        await serving(layout, "keyvault")
        async with channel(layout, "keyvault", "ops") as ops:
            await ensure_keys(ops)
        start_auth(layout)
        start_ratelimit(layout)
        await serving(layout, "auth")
        await serving(layout, "ratelimit")
        creds = await credentials(layout)
        for mode in MODES:
            start_trading(layout, mode)
        yield layout, creds
    finally:
        layout.stop()
        if creds is not None:
            forget_counters(creds.subjects)


async def run(
    concurrency: int, duration: float, rounds: int, modes: Sequence[str] = MODES
) -> dict[str, list[Round]]:
    with tempfile.TemporaryDirectory(dir=tmpfs()) as tmp:
        async with (
            suite(Path(tmp)) as (layout, creds),
            mode_stubs(layout, modes, lambda mode: interceptors_of(mode, creds)) as stubs,
        ):
            rss_before = {name: rss_mib(proc.pid) for name, proc in layout.procs.items()}
            print(
                f"PlaceOrder over mTLS, {concurrency} concurrent callers, {duration:g} s per round, {rounds} "
                f"rounds, {os.cpu_count()} CPUs; processes: this load generator, keyvault, auth, one trading "
                "service per mode\nper round: [CPU us per call of each process]  batch: average "
                "VerifySignedRequests size; quota batch: average CheckQuotaBatch size"
            )
            results: dict[str, list[Round]] = {mode: [] for mode in modes}
            for r in range(rounds):
                shift = r % len(modes)
                for mode in [*modes[shift:], *modes[:shift]]:
                    rnd = await measure(mode, stubs[mode], layout, r, concurrency, duration)
                    results[mode].append(rnd)
                    print(_line(f"round {r + 1} {mode}", rnd), flush=True)
            rss_after = {name: rss_mib(proc.pid) for name, proc in layout.procs.items()}
            report(results, rss_before, rss_after)
            return results


def report(
    results: dict[str, list[Round]], rss_before: dict[str, float], rss_after: dict[str, float]
) -> None:
    base = results.get("none")
    print("\nagainst no guard (median of rounds; the ratios are what counts on a shared machine):")
    print(
        f"  {'mode':<10} {'throughput':>10} {'cost':>7} {'aim':>6}   {'p50 ms':>7} {'p99 ms':>7}   "
        f"{'CPU/call':>8} {'added':>7}   {'client':>6} {'trading':>7} {'auth':>5} {'vault':>5} {'rl':>5}   {'batch':>5} {'quota':>5}"
    )
    for mode, rounds in results.items():
        ratio = median_ratio([x.result for x in rounds], [x.result for x in base]) if base else float("nan")
        cpu = statistics.median(x.result.cpu_us_per_call or 0.0 for x in rounds)
        added = (
            cpu - statistics.median(x.result.cpu_us_per_call or 0.0 for x in base) if base else float("nan")
        )
        per = {name: statistics.median(x.cpu_us[name] for x in rounds) for name in rounds[0].cpu_us}
        batches = [x.batch for x in rounds if x.batch is not None]
        quota_batches = [x.quota_batch for x in rounds if x.quota_batch is not None]
        aim = f"<{AIM[mode] * 100:.0f} %" if mode in AIM else ""
        print(
            f"  {mode:<10} {ratio:10.3f} {(1 - ratio) * 100:6.1f}% {aim:>6}   "
            f"{statistics.median(x.result.percentile(50) for x in rounds):7.2f} "
            f"{statistics.median(x.result.percentile(99) for x in rounds):7.2f}   "
            f"{cpu:6.0f}us {added:+6.0f}   {per['client']:6.0f} {per['trading']:7.0f} {per['auth']:5.0f} "
            f"{per['keyvault']:5.0f} {per['ratelimit']:5.0f}   "
            + (f"{statistics.median(batches):5.1f}" if batches else "    -")
            + (f" {statistics.median(quota_batches):5.1f}" if quota_batches else "     -")
        )
    for mode in [m for m in results if m.endswith(QUOTA) and m.removesuffix(QUOTA) in results]:
        ratio = median_ratio(
            [x.result for x in results[mode]], [x.result for x in results[mode.removesuffix(QUOTA)]]
        )
        verdict = "met" if 1 - ratio < QUOTA_AIM else "missed"
        print(
            f"the quota stage: {mode} / {mode.removesuffix(QUOTA)} = {ratio:.3f}, a cost of "
            f"{(1 - ratio) * 100:.1f} % (aim under {QUOTA_AIM * 100:.0f} %: {verdict})"
        )
    print(
        "RSS MiB before -> after the load: "
        + ", ".join(f"{name} {rss_before[name]:.0f} -> {rss_after[name]:.0f}" for name in rss_before)
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = load_arguments(__doc__, rounds=3)
    parser.set_defaults(concurrency=64)
    args = parser.parse_args(argv)
    asyncio.run(run(args.concurrency, args.duration, args.rounds))


if __name__ == "__main__":
    main()
