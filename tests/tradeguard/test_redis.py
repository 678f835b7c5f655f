"""The Redis helper (tradeguard/storage/redis.py) against real servers: the machine's Redis at 127.0.0.1:6379, a
TLS server with an ACL user that the test starts (certificates from the project's PKI), and a three-node Redis
Cluster that the test starts. No mocks: every command here reaches a redis-server.

The machine's shared Redis is never flushed (other suites use it): NOSCRIPT is reached there with a script no
server has seen (a random comment in it), and SCRIPT FLUSH is run on the servers these tests own.

A cluster that fails: a script call that timed out while its script ran on, and a round trip across two nodes one
of which is down, are never sent again by the kit's client (the script ran once; redis-py's own cluster client,
retrying the round trip, runs it twice); the same client serves again once the node is back, and after a primary
is killed and its replica takes over (its slot map reloaded in the background).
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from tests.support import RedisServer, free_cluster_port, free_port, redis_cluster, start_redis
from tradeguard.mesh import pki
from tradeguard.settings import Env, SettingsError
from tradeguard.storage.redis import (
    Client,
    ClusterClient,
    RedisConfig,
    RedisUnavailable,
    RoundTrip,
    Script,
    client,
    connect,
    healthy,
)
from tradeguard.testing import eventually

LOCAL = "redis://127.0.0.1:6379"
INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


def fresh(source: str) -> str:
    """`source` with a random comment: a script no server has loaded yet (so the first EVALSHA gets NOSCRIPT)."""
    return f"-- {secrets.token_hex(8)}\n{source}"


def key(tag: str = "") -> str:
    return f"tg-test:{tag}{secrets.token_hex(6)}"


# --- the URL, the password, the masking (no server needed) ---------------------------------------------------


def test_url_with_every_option() -> None:
    config = RedisConfig.from_url(
        "rediss://alice:p%40ss%3Aword@cache.internal:7000/2?ca=/pki/ca.crt&cert=/pki/a.crt&key=/pki/a.key"
        "&server_name=redis&connect_timeout=0.5&timeout=1.5&max_connections=8&client_name=auth&tls_min=1.2"
    )
    assert (config.host, config.port, config.db, config.username) == ("cache.internal", 7000, 2, "alice")
    assert config.password == "p@ss:word"
    assert config.tls and not config.cluster
    assert (config.ca_file, config.cert_file, config.key_file) == (
        Path("/pki/ca.crt"),
        Path("/pki/a.crt"),
        Path("/pki/a.key"),
    )
    assert (config.server_name, config.tls_min, config.client_name) == ("redis", "1.2", "auth")
    assert (config.connect_timeout_s, config.timeout_s, config.max_connections) == (0.5, 1.5, 8)


def test_defaults_and_cluster_spellings() -> None:
    plain = RedisConfig.from_url("redis://127.0.0.1")
    assert (plain.port, plain.db, plain.tls, plain.cluster, plain.password) == (6379, 0, False, False, None)
    assert plain.timeout_s == plain.connect_timeout_s == 2.0 and plain.tls_min == "1.3"
    assert RedisConfig.from_url("redis+cluster://10.0.0.1:7000").cluster
    assert RedisConfig.from_url("redis://10.0.0.1:7000?cluster=true").cluster
    tls_cluster = RedisConfig.from_url("rediss+cluster://10.0.0.1:7000")
    assert tls_cluster.cluster and tls_cluster.tls


def test_the_password_is_masked_everywhere() -> None:
    config = RedisConfig.from_url("rediss://alice:hunter2@cache:7000/1?ca=/ca.crt")
    for shown in (str(config), repr(config), config.url, f"{config}", f"{config!r}"):
        assert "hunter2" not in shown
    assert config.url == "rediss://alice:***@cache:7000/1?ca=/ca.crt"
    given = RedisConfig.from_url("redis://bob@cache", password="from-a-file")
    assert given.password == "from-a-file" and "from-a-file" not in repr(given)
    assert str(given) == "redis://bob:***@cache:6379"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "scheme must be one of"),
        ("redis://:hunter2@h:99999", "port must be a number from 1 to 65535"),
        ("redis://:hunter2@h?colour=blue", "unknown option 'colour'"),
        ("redis://:hunter2@h?timeout=1&timeout=2", "option 'timeout' given twice"),
        ("redis://:hunter2@h?timeout=-1", "option timeout must be between"),
        ("redis://:hunter2@h?timeout=soon", "option timeout must be a number"),
        ("redis://:hunter2@h?cluster=maybe", "option cluster must be true or false"),
        ("redis://:hunter2@h?max_connections=0", "max_connections must be between"),
        ("redis://:hunter2@h?ca=/ca.crt", "need TLS"),
        ("rediss://:hunter2@h?cert=/a.crt", "needs both cert and key"),
        ("redis+cluster://:hunter2@h/3", "a cluster has only database 0"),
        ("redis+cluster://:hunter2@h?cluster=false", "contradicts"),
        ("rediss+cluster://:hunter2@h?server_name=redis", "server_name is not supported with a cluster"),
        ("rediss://:hunter2@h?tls_min=1.1", "tls_min must be 1.2 or 1.3"),
        ("redis://:hunter2@h/db", "invalid literal"),
        ("redis://:hunter2@h#frag", "fragment"),
        ("redis://u:hun/ter2@h:99999", "redis://u:\\*\\*\\*@h:99999"),  # an unencoded "/" in the password
        ("redis://u:hunter2@x@h:99999", "redis://u:\\*\\*\\*@h:99999"),  # an unencoded "@" in the password
    ],
)
def test_bad_urls_are_refused_naming_the_problem_never_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        RedisConfig.from_url(url)
    assert "hunter2" not in str(refused.value) and "hun" not in str(refused.value)


def test_a_password_in_the_url_and_another_given_is_refused() -> None:
    with pytest.raises(ValueError, match="use one") as refused:
        RedisConfig.from_url("redis://:in-url@h", password="in-file")
    assert "in-url" not in str(refused.value) and "in-file" not in str(refused.value)


def test_from_env_reads_the_password_from_a_file_secret(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret-from-file\n")
    secret.chmod(0o600)
    environ = {
        "TG_TEST_REDIS_URL": "redis://alice@127.0.0.1:6379",
        "TG_TEST_REDIS_PASSWORD_FILE": str(secret),
    }
    config = RedisConfig.from_env(Env("TG_TEST", environ))
    assert config is not None and config.password == "s3cret-from-file" and config.username == "alice"

    plain = {"TG_TEST_REDIS_URL": "redis://127.0.0.1", "TG_TEST_REDIS_PASSWORD": "in-the-environment"}
    config = RedisConfig.from_env(Env("TG_TEST", plain))
    assert config is not None and config.password == "in-the-environment"
    assert "TG_TEST_REDIS_PASSWORD" not in plain  # taken out, so no child process inherits it

    assert RedisConfig.from_env(Env("TG_TEST", {})) is None
    assert RedisConfig.from_env(Env("TG_TEST", {}), default_url=LOCAL) == RedisConfig("127.0.0.1")
    with pytest.raises(SettingsError, match=r"TG_TEST_REDIS_URL: .*unknown option") as refused:
        RedisConfig.from_env(Env("TG_TEST", {"TG_TEST_REDIS_URL": "redis://:pw-in-url@h?x=1"}))
    assert "pw-in-url" not in str(refused.value)
    with pytest.raises(SettingsError, match="TG_TEST_REDIS_URL is not"):
        RedisConfig.from_env(Env("TG_TEST", {"TG_TEST_REDIS_PASSWORD": "orphan"}))


# --- the machine's Redis ---------------------------------------------------------------------------------


@pytest.fixture
async def local() -> AsyncIterator[Client]:
    client = await connect(RedisConfig.from_url(LOCAL + "?timeout=5&client_name=tg-test"))
    yield client
    await client.aclose()


async def test_connect_and_health(local: Client) -> None:
    assert isinstance(local, aioredis.Redis)
    assert await healthy(local)
    name = key()
    await local.set(name, b"v", ex=60)
    assert await local.get(name) == b"v"
    assert await local.client_getname() == "tg-test"
    await local.delete(name)


async def test_unreachable_redis_is_refused_at_connect_with_the_password_masked() -> None:
    closed = free_port()  # nothing listens there
    with pytest.raises(RedisUnavailable, match=rf"redis://:\*\*\*@127.0.0.1:{closed}") as refused:
        await connect(RedisConfig.from_url(f"redis://:hunter2@127.0.0.1:{closed}?connect_timeout=1"))
    assert "hunter2" not in str(refused.value)


async def test_wrong_credentials_are_refused_with_the_password_masked() -> None:
    with pytest.raises(RedisUnavailable, match="alice:\\*\\*\\*@") as refused:
        await connect(RedisConfig.from_url(LOCAL.replace("//", "//alice:not-her-password@")))
    assert "not-her-password" not in str(refused.value)


async def test_a_script_is_called_by_sha_and_loaded_only_after_noscript(local: Client) -> None:
    script = Script(fresh(INCR), name="incr")
    counter = key()
    assert await local.script_exists(script.sha) == [False]
    assert await script(local, [counter], [2]) == 2  # NOSCRIPT, SCRIPT LOAD, EVALSHA
    assert await script(local, [counter], [3]) == 5  # by SHA, nothing loaded
    assert script.loads == 1
    assert await local.script_exists(script.sha) == [True]
    with pytest.raises(ResponseError, match="not an integer"):
        await script(local, [counter], ["x"])  # the script's own error reaches the caller
    await local.delete(counter)


async def test_a_round_trip_runs_scripts_and_commands_and_reloads_only_what_got_noscript(
    local: Client,
) -> None:
    known, unknown = Script(fresh(INCR), name="known"), Script(fresh("return ARGV[1]"), name="unknown")
    await known.load(local)
    counter, text = key(), key()
    await local.set(text, "not a number", ex=60)
    trip = (
        RoundTrip(local)
        .script(known, [counter], [1])
        .script(unknown, args=["a"])
        .command("INCRBY", counter, 10)
    )
    trip.script(unknown, args=["b"]).script(known, [counter], [100])
    assert await trip.execute() == [1, b"a", 11, b"b", 111]
    assert (known.loads, unknown.loads) == (1, 1)  # the known one was not reloaded; the unknown one once

    failing = RoundTrip(local).command("INCR", text).script(known, [counter], [1])
    results = await failing.execute(raise_on_error=False)
    assert isinstance(results[0], ResponseError) and results[1] == 112  # the error in its place, the rest ran
    with pytest.raises(ResponseError, match="not an integer"):
        await RoundTrip(local).command("INCR", text).execute()
    with pytest.raises(RuntimeError, match="once"):
        await failing.execute()
    assert await RoundTrip(local).execute() == []
    await local.delete(counter, text)


# --- a TLS server with an ACL user, started by the test -------------------------------------------------


def _redis_has_tls() -> bool:
    """redis-server built with TLS rejects our bogus certificate; one built without it rejects the directive."""
    port = free_port()
    out = subprocess.run(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", "/nonexistent",
         "--tls-key-file", "/nonexistent", "--tls-ca-cert-file", "/nonexistent"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    return "Bad directive" not in out.stdout + out.stderr and "TLS" in out.stdout + out.stderr


class TlsRedis:
    def __init__(self, server: RedisServer, paths: pki.PkiPaths) -> None:
        self.server = server
        self.paths = paths

    def url(
        self, *, user: str = "alice:a-long-acl-password", name: str = "redis", client: str = "trading"
    ) -> str:
        query = f"ca={self.paths.ca_bundle}&server_name={name}&connect_timeout=2"
        if client:
            query += f"&cert={self.paths.cert(client)}&key={self.paths.key(client)}"
        return f"rediss://{user}@127.0.0.1:{self.server.port}?{query}"


@pytest.fixture
async def tls_redis(tmp_path: Path, pki_paths: pki.PkiPaths) -> AsyncIterator[TlsRedis]:
    if not _redis_has_tls():
        pytest.skip("this redis-server was built without TLS")
    pki.issue(pki_paths, "redis")
    directory = tmp_path / "tls-redis"
    directory.mkdir()
    acl = directory / "users.acl"  # the default user off: only alice, with her password
    acl.write_text("user default off\nuser alice on >a-long-acl-password ~* &* +@all\n")
    server = start_redis(
        directory,
        "--tls-cert-file", str(pki_paths.cert("redis")),
        "--tls-key-file", str(pki_paths.key("redis")),
        "--tls-ca-cert-file", str(pki_paths.ca_bundle),
        "--tls-auth-clients", "yes",
        "--tls-protocols", "TLSv1.3",
        "--aclfile", str(acl),
        tls=True,
    )  # fmt: skip
    options = {
        "ssl": True,
        "ssl_ca_certs": str(pki_paths.ca_bundle),
        "ssl_certfile": str(pki_paths.cert("trading")),
        "ssl_keyfile": str(pki_paths.key("trading")),
        "ssl_check_hostname": False,
        "username": "alice",
        "password": "a-long-acl-password",
    }
    try:
        await eventually(lambda: server.answers(**options), within_s=30)
        yield TlsRedis(server, pki_paths)
    finally:
        server.stop()


async def test_tls_with_client_certificate_and_acl_user(tls_redis: TlsRedis) -> None:
    client = await connect(RedisConfig.from_url(tls_redis.url()))
    try:
        assert await client.acl_whoami() == "alice"
        assert await healthy(client)
        await client.set("k", "v")
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


async def test_tls_refusals(tls_redis: TlsRedis) -> None:
    # The server's certificate names "redis": a client expecting another service refuses it.
    with pytest.raises(RedisUnavailable, match=r"certificate verify failed|hostname mismatch|not valid for"):
        await connect(RedisConfig.from_url(tls_redis.url(name="keyvault")))
    # No client certificate: the server refuses the handshake.
    with pytest.raises(RedisUnavailable):
        await connect(RedisConfig.from_url(tls_redis.url(client="")))
    # Wrong ACL password: refused, and the password never shown.
    with pytest.raises(RedisUnavailable, match="alice:\\*\\*\\*@") as refused:
        await connect(RedisConfig.from_url(tls_redis.url(user="alice:wrong-password")))
    assert "wrong-password" not in str(refused.value)
    # Plain TCP to the TLS port: no answer that parses as Redis.
    with pytest.raises(RedisUnavailable):
        await connect(
            RedisConfig.from_url(f"redis://127.0.0.1:{tls_redis.server.port}?timeout=1&connect_timeout=1")
        )


async def test_script_reload_after_script_flush_and_health_after_the_server_stops(
    tls_redis: TlsRedis,
) -> None:
    client = await connect(RedisConfig.from_url(tls_redis.url()))
    try:
        script = Script(INCR, name="incr")
        assert await script(client, ["c"], [1]) == 1
        assert await client.script_flush() is True
        assert await script(client, ["c"], [1]) == 2  # NOSCRIPT after the flush: loaded again, then run
        assert script.loads == 2
        trip = RoundTrip(client).script(script, ["c"], [1]).script(script, ["c"], [1])
        await client.script_flush()
        assert await trip.execute() == [3, 4]
        assert script.loads == 3  # once for both calls of the round trip
        tls_redis.server.stop()
        await eventually(lambda: tls_redis.server.process.poll() is not None)
        assert not await healthy(client)
    finally:
        await client.aclose()


# --- a Redis Cluster, started by the test -----------------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[RedisServer]]:
    async with redis_cluster(tmp_path / "cluster") as servers:
        yield servers


def _flush_scripts(servers: list[RedisServer]) -> None:
    for server in servers:
        with redis.Redis(port=server.port) as node:
            node.script_flush()


async def test_cluster_by_url_scheme_or_option(cluster: list[RedisServer]) -> None:
    for url in (
        f"redis+cluster://127.0.0.1:{cluster[0].port}",
        f"redis://127.0.0.1:{cluster[1].port}?cluster=true",
    ):
        client = await connect(RedisConfig.from_url(url))
        try:
            assert isinstance(client, RedisCluster)
            assert await healthy(client)
            names = [f"k{i}" for i in range(30)]  # spread over the slots of all three nodes
            for name in names:
                await client.set(name, name)
            assert [await client.get(name) for name in names] == [name.encode() for name in names]
            owners = {client.get_node_from_key(name).port for name in names}  # type: ignore[union-attr]
            assert owners == {server.port for server in cluster}
        finally:
            await client.aclose()


async def test_cluster_scripts_reload_after_script_flush_single_calls_and_round_trips(
    cluster: list[RedisServer],
) -> None:
    client = await connect(RedisConfig.from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}"))
    try:
        script = Script(INCR, name="incr")
        counters = [f"{{tag{i}}}:n" for i in range(12)]  # hash tags on every node
        assert [await script(client, [c], [1]) for c in counters] == [1] * 12
        _flush_scripts(cluster)
        assert [await script(client, [c], [1]) for c in counters] == [2] * 12
        assert script.loads == 2  # SCRIPT LOAD goes to every primary: one load serves every node

        _flush_scripts(cluster)
        trip = RoundTrip(client)
        for c in counters:
            trip.script(script, [c], [10]).command("GET", c)
        results = await trip.execute()
        assert results[0::2] == [12] * 12
        # The calls that got NOSCRIPT had not run: they were sent again after the rest of the round trip had run
        # (the GETs saw the values before them), as RoundTrip documents.
        assert results[1::2] == [b"2"] * 12
        assert [await client.get(c) for c in counters] == [b"12"] * 12
        assert script.loads == 3
    finally:
        await client.aclose()


async def test_what_redis_py_alone_does_with_scripts_on_a_cluster(cluster: list[RedisServer]) -> None:
    """Why RoundTrip exists: redis-py reloads a registered script for a single call on a cluster, but refuses
    script calls in a cluster pipeline altogether."""
    client = await connect(RedisConfig.from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}"))
    try:
        registered = client.register_script(INCR)
        assert await registered(keys=["{a}:n"], args=[1]) == 1
        _flush_scripts(cluster)
        assert await registered(keys=["{a}:n"], args=[1]) == 2  # a single call does reload
        with pytest.raises(RedisClusterException, match="evalsha is blocked"):
            await registered(keys=["{a}:n"], args=[1], client=client.pipeline())  # type: ignore[arg-type]
    finally:
        await client.aclose()


# --- a cluster that fails: nothing sent twice, the slot map reloaded ------------------------------------------

HANG_S = 60  # a hang detector only
# Counts its runs, then keeps its node busy for ARGV[1] ms (a node runs one script at a time, whatever the client).
SLOW = """
local runs = redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + ARGV[1] * 1000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return runs
"""
CLUSTER_NODE = ("--cluster-enabled", "yes")


def node_args(server: RedisServer) -> tuple[str, ...]:
    """How tests/support.py's `redis_cluster` started `server` (to start it again as the same node)."""
    return (*CLUSTER_NODE, "--cluster-config-file", f"nodes-{server.port}.conf")


def tags_on(cluster_client: RedisCluster, port: int, other: bool = False) -> str:
    """A hash tag whose slot is on the primary at `port` (or, `other`, on another one)."""
    for i in range(1000):
        tag = f"{{t{i}}}"
        owner = cluster_client.get_node_from_key(tag)
        assert owner is not None
        if (owner.port == port) != other:
            return tag
    raise AssertionError(f"no tag found for port {port}")


async def until(attempt: Callable[[], Awaitable[bool]], within_s: float = HANG_S) -> None:
    """Call `attempt` until it returns True (a few ms apart): a wait for a state, the deadline a hang detector."""
    async with asyncio.timeout(within_s):
        while not await attempt():  # noqa: ASYNC110 - the states waited for have no event to wait on
            await asyncio.sleep(0.005)


async def runs(control: Client, key: str) -> int:
    """The count `SLOW` keeps at `key` (read after every script already sent to its node has run)."""
    return int(await control.get(key) or 0)


async def twice(control: Client, key: str) -> bool:
    runs_now = await runs(control, key)
    assert runs_now <= 2
    return runs_now == 2


@pytest.fixture
async def control(cluster: list[RedisServer]) -> AsyncIterator[Client]:
    """A kit client with generous timeouts, to set up and read what the tests' other clients did."""
    kit = await connect(RedisConfig.from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}?timeout=30"))
    yield kit
    await kit.aclose()


async def test_the_kit_makes_cluster_clients_that_never_retry(cluster: list[RedisServer]) -> None:
    kit = client(RedisConfig.from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}"))
    plain = RedisCluster(host="127.0.0.1", port=cluster[0].port)  # no I/O until used
    try:
        assert isinstance(kit, ClusterClient) and kit.retry.get_retries() == 0
        assert plain.retry.get_retries() > 0  # redis-py's default: what the kit turns off
    finally:
        await kit.aclose()
        await plain.aclose()


async def answers(caller: Client, name: str) -> bool:
    """`caller` reads `name` (so it has a connection to its node, and its slot map)."""
    try:
        await caller.get(name)
    except RedisError:
        return False
    return True


async def test_a_script_that_timed_out_on_a_cluster_is_never_sent_again(
    cluster: list[RedisServer], control: Client
) -> None:
    """The client gives up after 0.1 s, the script runs on for a second (on the node's clock, whatever the load):
    the kit's client fails the call and sends nothing more (redis-py's cluster client would retry a timeout), so
    the script ran once; the same client serves the node once it is free again."""
    slow = Script(SLOW, name="slow")
    await slow.load(control)
    kit = client(
        RedisConfig.from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}?timeout=0.1&connect_timeout=5")
    )
    counter = key("{slow}")
    try:
        await until(
            lambda: answers(kit, counter)
        )  # connected (a first call may time out on a loaded machine)
        with pytest.raises(RedisError, match="Timeout"):
            await slow(kit, [counter], [1000])
        assert await runs(control, counter) == 1  # read after the script ran: sent once
        assert isinstance(kit, ClusterClient) and kit.topology_refreshes > 0  # a timeout may mean a failover
        await until(lambda: answers(kit, counter))
        assert await runs(control, counter) == 1
        await control.delete(counter)
    finally:
        await kit.aclose()


async def test_a_round_trip_failing_on_a_node_is_never_sent_again_and_is_served_once_the_node_is_back(
    cluster: list[RedisServer], control: Client, tmp_path: Path
) -> None:
    """A round trip of a script on a live node (running a second) and a command on a stopped one: connecting to
    the stopped node fails the whole pipeline, after the script was sent. The kit's client sends nothing again:
    the script ran once. redis-py's cluster client with one retry closes its connections and sends again what
    had no answer yet: the script runs twice. Once the node is back (same port, same cluster identity) the same
    kit client serves it again."""
    slow, incr = Script(SLOW, name="slow"), Script(INCR, name="incr")
    for script in (slow, incr):
        await script.load(control)
    assert isinstance(control, RedisCluster)
    victim, entry = cluster[-1], cluster[0]
    live_tag, down_tag = tags_on(control, victim.port, other=True), tags_on(control, victim.port)
    victim.stop()
    # clients made now: no connection to the stopped node yet, so the round trip fails connecting to it
    kit = client(RedisConfig.from_url(f"redis+cluster://127.0.0.1:{entry.port}?timeout=30&connect_timeout=5"))
    plain = RedisCluster(host="127.0.0.1", port=entry.port, socket_timeout=30, retry=Retry(NoBackoff(), 1))
    back: list[RedisServer] = []
    try:
        counters = {}
        for caller in (kit, plain):
            counters[caller] = counter = key(live_tag)
            await until(lambda: answers(caller, counter))  # a connection to the live node, ready
            trip = RoundTrip(caller).script(slow, [counter], [1000]).script(incr, [key(down_tag)], [1])
            with pytest.raises(RedisError, match=r"[Cc]onnect"):
                await trip.execute(raise_on_error=False)
        assert await runs(control, counters[kit]) == 1  # read after the script ran: sent once
        await until(lambda: twice(control, counters[plain]))
        assert isinstance(kit, ClusterClient) and kit.topology_refreshes > 0

        back.append(start_redis(tmp_path / "cluster", *node_args(victim), port=victim.port))
        counter = key(down_tag)

        async def served() -> bool:
            try:
                await RoundTrip(kit).script(incr, [counter], [1]).execute()
            except RedisError:
                return False
            return True

        await until(
            served
        )  # the same client, reconnected to the node (its script loaded again after NOSCRIPT)
        assert await incr(kit, [counter], [1]) >= 2
        assert await runs(control, counters[kit]) == 1
        await control.delete(*counters.values())
    finally:
        await kit.aclose()
        await plain.aclose()
        for server in back:
            server.stop()


async def test_a_killed_primary_taken_over_by_its_replica_is_served_again_by_the_same_client(
    cluster: list[RedisServer], control: Client, tmp_path: Path
) -> None:
    """A replica added to a primary; the primary killed (SIGKILL) under a client's round trips; its replica takes
    over (CLUSTER FAILOVER TAKEOVER). The failures reload the client's slot map in the background, so its next
    round trips and calls reach the new primary (without that, redis-py's pipeline would keep sending to the dead
    address)."""
    assert isinstance(control, RedisCluster)
    victim = next(s for s in cluster if s.port != cluster[0].port)
    port = free_cluster_port()
    replica = start_redis(
        tmp_path / "cluster", *CLUSTER_NODE, "--cluster-config-file", f"nodes-{port}.conf", port=port
    )
    try:
        await eventually(replica.answers, within_s=HANG_S)
        with redis.Redis(port=victim.port, decode_responses=True) as r:
            victim_id = r.cluster("MYID")
        add = ["redis-cli", "--cluster", "add-node", f"127.0.0.1:{replica.port}", f"127.0.0.1:{victim.port}"]
        add += ["--cluster-slave", "--cluster-master-id", victim_id]
        done = await asyncio.to_thread(subprocess.run, add, capture_output=True, text=True, timeout=HANG_S)
        assert done.returncode == 0, done.stdout + done.stderr

        def linked() -> bool:
            with redis.Redis(port=replica.port, decode_responses=True) as r:
                return bool(r.info("replication").get("master_link_status") == "up")

        await eventually(linked, within_s=HANG_S)

        kit = await connect(RedisConfig.from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}?timeout=2"))
        assert isinstance(kit, ClusterClient)
        incr = Script(INCR, name="incr")
        counter = key(tags_on(control, victim.port))
        try:
            assert await RoundTrip(kit).script(incr, [counter], [1]).execute() == [1]
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            with pytest.raises(RedisError):
                await RoundTrip(kit).script(incr, [counter], [1]).execute()
            with redis.Redis(port=replica.port) as r:
                r.cluster("FAILOVER", "TAKEOVER")

            async def served() -> bool:
                try:
                    await RoundTrip(kit).script(incr, [counter], [1]).execute()
                except RedisError:
                    return False
                return True

            await until(served)
            assert kit.topology_refreshes > 0
            assert kit.get_node_from_key(counter).port == replica.port  # type: ignore[union-attr]
            assert await incr(kit, [counter], [1]) >= 2  # single calls too
        finally:
            await kit.aclose()
    finally:
        replica.stop()
