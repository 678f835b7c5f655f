"""The Redis counters on a real Redis Cluster of `redis-server` processes on loopback ports (stopped after).

- The counters' contract (`TestContract` of test_counters.py, collected here too) on a cluster of three primaries:
  this module's `counters_backend` overrides conftest's.
- Subjects spread over the nodes, every key of one subject in one slot, a batch spanning every node in one
  `evaluate`, NOSCRIPT on every node recovered; a cluster client not made by the kit (redis-py's own, which sends
  a pipeline again after a failure) refused.
- Failover: three primaries with a replica each, a stream of evaluations, a primary killed (SIGKILL). Meanwhile
  every evaluation is Counted or StoreUnavailable (none hangs, no other exception escapes); once its replica is
  promoted every subject is served again by the same `RedisCounters`; what replication had before the kill is
  kept; nothing is counted that was not asked for, nothing admitted on the surviving nodes beyond the limit.

`cluster_with_replicas` is this module's (tests/support.py `redis_cluster` starts primaries only).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from services.ratelimit.counters import counter_key
from services.ratelimit.counters_redis import EVALUATE, RedisCounters
from services.ratelimit.model import Counted, StoreUnavailable
from tests.services.ratelimit.conftest import CountersBackend, counted, evaluation, limit
from tests.services.ratelimit.test_counters import TestContract
from tests.support import RedisServer, free_cluster_port, start_redis
from tradeguard.storage.redis import ClusterClient, RedisConfig
from tradeguard.testing import FakeClock, eventually

__all__ = ["TestContract"]  # collected here too, on the cluster

HANG_S = 60  # a hang detector only (a failover takes a few node timeouts)

# --- a cluster with replicas ------------------------------------------------------------------------------------


def _wait(condition: Callable[[], bool], within_s: float, what: str) -> None:
    """Poll `condition` (a few ms apart) until it holds; fail after `within_s` (for set-up outside a loop)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {within_s} s")
        time.sleep(0.01)


def node(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def replication(port: int) -> dict[str, Any]:
    with node(port) as r:
        return dict(r.info("replication"))


def cluster_ok(servers: list[RedisServer]) -> bool:
    """Every live node says `cluster_state:ok` and every live replica's link to its primary is up."""
    try:
        for server in servers:
            if server.process.poll() is not None:
                continue
            with node(server.port) as r:
                if r.cluster("INFO").get("cluster_state") != "ok":
                    return False
                info = r.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
    except (redis.RedisError, OSError):
        return False
    return True


@contextlib.contextmanager
def cluster_with_replicas(
    directory: Path, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 15_000
) -> Iterator[list[RedisServer]]:
    """`primaries` primaries with `replicas` replicas each (`redis-cli --cluster create`), all ok and every
    replica linked before it is yielded; every server stopped afterwards. `node_timeout_ms` is how long a node
    must be unreachable before the cluster fails it over (Redis's `cluster-node-timeout`)."""
    servers: list[RedisServer] = []
    try:
        for _ in range(primaries * (1 + replicas)):
            port = free_cluster_port()
            servers.append(
                start_redis(
                    directory,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-replica-validity-factor",
                    "0",  # a replica may always take over, however long since it heard from its primary
                    port=port,
                )
            )
        _wait(lambda: all(server.answers() for server in servers), HANG_S, "every node answers")
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers)]
        create += ["--cluster-replicas", str(replicas), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=HANG_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        _wait(lambda: cluster_ok(servers), HANG_S, "cluster_state:ok and every replica linked")
        yield servers
    finally:
        for server in servers:
            server.stop()


def owner_port(cluster: RedisCluster, key: str) -> int:
    """The port of the primary that holds `key` (as the client's slot map has it)."""
    owner = cluster.get_node_from_key(key)
    assert owner is not None
    return int(owner.port)


def cluster_url(servers: list[RedisServer], options: str = "timeout=5") -> str:
    return f"redis+cluster://127.0.0.1:{servers[0].port}?{options}"


# --- the contract, on a cluster of three primaries ------------------------------------------------------------


@pytest.fixture(scope="module")
def contract_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    with cluster_with_replicas(tmp_path_factory.mktemp("cluster")) as servers:
        yield servers


@pytest.fixture
async def counters_backend(
    contract_cluster: list[RedisServer], clock: FakeClock
) -> AsyncIterator[CountersBackend]:
    backend = CountersBackend("cluster", clock, url=cluster_url(contract_cluster))
    try:
        yield backend
    finally:
        await backend.aclose()


PER_HOUR = limit(3, 3600, name="per-hour", buckets=4)
PER_DAY = limit(100, 86_400, name="per-day", buckets=24, group="orders")


async def test_subjects_spread_over_the_nodes_and_one_batch_spans_them(
    counters_backend: CountersBackend, contract_cluster: list[RedisServer], clock: FakeClock
) -> None:
    counters = await counters_backend.open()
    assert isinstance(counters, RedisCounters) and isinstance(counters.client, RedisCluster)
    subjects = [counters_backend.subject(f"k{i}") for i in range(24)]
    owners = {s: owner_port(counters.client, counter_key(s, PER_HOUR)) for s in subjects}
    assert set(owners.values()) == {s.port for s in contract_cluster}  # every primary holds some
    with node(contract_cluster[0].port) as r:
        for s in subjects:  # the cluster's own hashing: one slot per subject, whatever the limit
            assert len({r.cluster("KEYSLOT", counter_key(s, x)) for x in (PER_HOUR, PER_DAY)}) == 1
    t = clock()
    batch = [evaluation(s, PER_HOUR, PER_DAY) for s in subjects]
    for round_ in range(1, 5):
        results = [counted(r) for r in await counters.evaluate(batch, t + round_)]
        assert [r.allowed for r in results] == [round_ <= 3] * len(subjects)
        assert {r.counts[0].counted for r in results} == {min(round_, 3)}
    for s in subjects:  # each subject's counters live on its node
        with node(owners[s]) as r:
            assert r.exists(counter_key(s, PER_HOUR), counter_key(s, PER_DAY)) == 2


async def test_noscript_on_every_node_is_recovered_in_one_load(
    counters_backend: CountersBackend, contract_cluster: list[RedisServer], clock: FakeClock
) -> None:
    counters = await counters_backend.open()
    subjects = [counters_backend.subject(f"n{i}") for i in range(12)]
    batch = [evaluation(s, PER_DAY) for s in subjects]
    await counters.evaluate(batch, clock())
    for server in contract_cluster:
        with node(server.port) as r:
            r.script_flush()
    loads = EVALUATE.loads
    results = [counted(r) for r in await counters.evaluate(batch, clock())]
    assert {r.counts[0].counted for r in results} == {2}
    assert EVALUATE.loads == loads + 1  # SCRIPT LOAD goes to every primary at once


async def test_a_cluster_client_not_made_by_the_kit_is_refused(contract_cluster: list[RedisServer]) -> None:
    plain = RedisCluster(host="127.0.0.1", port=contract_cluster[0].port)  # no I/O until used
    try:
        with pytest.raises(TypeError, match="ClusterClient"):
            RedisCounters(plain)
    finally:
        await plain.aclose()


# --- failover -----------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """Evaluations of `subjects` in a loop (several tasks), each outcome recorded per subject."""

    counters: RedisCounters
    subjects: list[str]
    charges: tuple[Any, ...]
    admitted: Counter[str] = field(default_factory=Counter)
    admitted_before_kill: Counter[str] = field(default_factory=Counter)  # by calls started before the kill
    unavailable: Counter[str] = field(default_factory=Counter)
    escaped: list[BaseException] = field(default_factory=list)
    full_batches: int = 0  # batches in which every subject was answered
    killed: bool = False
    stop: bool = False

    async def run(self) -> None:
        batch = [evaluation(s, *self.charges) for s in self.subjects]
        while not self.stop:
            before_kill = not self.killed
            try:
                async with asyncio.timeout(HANG_S):  # a hang detector only
                    results: list[Counted | StoreUnavailable] = await self.counters.evaluate(batch)
            except StoreUnavailable:
                results = [StoreUnavailable("the batch")] * len(batch)
            except (
                BaseException
            ) as error:  # anything else escaping (a hang's TimeoutError too) fails the test
                self.escaped.append(error)
                return
            for s, r in zip(self.subjects, results, strict=True):
                if isinstance(r, StoreUnavailable):
                    self.unavailable[s] += 1
                elif r.consumed:
                    self.admitted[s] += 1
                    if before_kill:
                        self.admitted_before_kill[s] += 1
            if all(isinstance(r, Counted) for r in results):
                self.full_batches += 1
            await asyncio.sleep(0)


async def test_a_primary_killed_under_load_fails_over_and_service_resumes(tmp_path: Path) -> None:
    limit_count, phase_one = 400, 10
    quota = limit(limit_count, 86_400, name="per-day", buckets=24)
    loose = limit(10**9, 3600, name="per-hour", group="orders", buckets=12)
    with cluster_with_replicas(
        tmp_path / "cluster", primaries=3, replicas=1, node_timeout_ms=2000
    ) as servers:
        counters = await RedisCounters.open(
            RedisConfig.from_url(cluster_url(servers, "timeout=0.5&connect_timeout=0.5"))
        )
        try:
            assert isinstance(counters.client, RedisCluster)
            subjects = [f"f{i}" for i in range(24)]
            owner = {s: owner_port(counters.client, counter_key(s, quota)) for s in subjects}
            primaries = sorted(set(owner.values()))
            assert len(primaries) == 3
            victim = next(s for s in servers if s.port == primaries[-1])
            on_victim = {s for s in subjects if owner[s] == victim.port}
            assert on_victim and len(on_victim) < len(subjects)
            replica = next(s for s in servers if replication(s.port).get("master_port") == victim.port)

            # phase one: some units each, replicated (the replica's offset caught up with its primary's)
            for _ in range(phase_one):
                results = await counters.evaluate([evaluation(s, quota, loose) for s in subjects])
                assert all(counted(r).allowed for r in results)
            offset = replication(victim.port)["master_repl_offset"]
            await eventually(
                lambda: replication(replica.port)["slave_repl_offset"] >= offset, within_s=HANG_S
            )

            # phase two: a stream of batches spanning every node; the victim's primary killed under it
            stream = Stream(counters, subjects, (quota, loose))
            tasks = [asyncio.create_task(stream.run()) for _ in range(4)]
            try:
                await eventually(lambda: stream.full_batches >= 20 or bool(stream.escaped), within_s=HANG_S)
                stream.killed = True
                victim.process.kill()
                victim.process.wait()
                # the replica is promoted and the cluster is whole again (Redis decides when: node timeout)
                await eventually(lambda: replication(replica.port)["role"] == "master", within_s=HANG_S)
                await eventually(lambda: cluster_ok(servers), within_s=HANG_S)
                # and the same RedisCounters serves every subject again
                served = stream.full_batches
                await eventually(lambda: stream.full_batches >= served + 20 or bool(stream.escaped), HANG_S)
            finally:
                stream.stop = True
                await asyncio.gather(*tasks)
            assert not stream.escaped, stream.escaped
            assert sum(stream.unavailable[s] for s in on_victim) > 0  # the failover was felt...
            assert isinstance(counters.client, ClusterClient)
            assert counters.client.topology_refreshes > 0  # ...and the slot map reloaded (the kit's client)

            peek = [evaluation(s, quota, loose, consume=False) for s in subjects]
            final = {
                s: counted(r).counts[0].counted
                for s, r in zip(subjects, await counters.evaluate(peek), strict=True)
            }
            for s in subjects:
                admitted = phase_one + stream.admitted[s]
                # nothing counted that was not asked for (a lost reply may have been counted: all of it)
                assert final[s] <= admitted + stream.unavailable[s], s
                # what replication had before the kill is kept
                assert final[s] >= phase_one, s
                if s in on_victim:
                    # more admitted than the limit only by what the lost writes (made before the kill) explain
                    assert admitted <= limit_count + phase_one + stream.admitted_before_kill[s], s
                else:
                    assert admitted <= limit_count, s  # the surviving nodes lost nothing
                    assert final[s] >= admitted, s
        finally:
            await counters.close()
