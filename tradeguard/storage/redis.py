"""Redis for the services that keep hot state there (nonces, lockout counters, revocations, rate limits).

**The URL.** `redis://[user[:password]@]host[:port][/db][?options]`; `rediss://` for TLS; `redis+cluster://` or
`rediss+cluster://` (or the option `cluster=true`) for a Redis Cluster, any node of which is named. Options:
`ca` (CA file for the server's certificate; else the system's), `cert` and `key` (the client certificate, for
servers that require one), `server_name` (the name the server's certificate must carry when it is not the host,
as for our PKI's workload certificates on a loopback address; not with a cluster), `connect_timeout` and
`timeout` (seconds, connect and read/write; default 2), `max_connections` (default 64), `client_name`. An
unknown option, a repeated one, or a bad value is refused with an error naming it. TLS is 1.3 only (`tls_min`
`1.2` allows 1.2), and the server's certificate is always verified.

**The password** comes from the URL (percent-encoded) or from the `password` argument, which a service reads as a
`_FILE` secret (`RedisConfig.from_env`: `<PREFIX>_REDIS_URL` and `<PREFIX>_REDIS_PASSWORD`, each with `_FILE`);
both at once is an error. It is never logged and never shown: `str`/`repr` of a `RedisConfig` and every error
of this module give the URL with the password as `***`.

**Scripts.** `Script` is a Lua script known by its SHA1: called with EVALSHA (one round trip, the script's text
never re-sent), and loaded (SCRIPT LOAD, on every primary of a cluster) only when a server answers NOSCRIPT (a
restart, a failover, SCRIPT FLUSH); the call is then repeated, which is safe because a NOSCRIPT call did not run.
redis-py's `register_script` does the same for a single call, on a client and on a cluster; in a pipeline it
sends SCRIPT EXISTS before every execution (one more round trip), and in a cluster pipeline it refuses script
calls altogether ("evalsha is blocked"). `RoundTrip` is the pipeline that does what those lack, on a client and
on a cluster: script calls and commands in one round trip, and only the calls that got NOSCRIPT sent again,
once, after loading their scripts (so they run after the rest of that round trip).

**A Redis Cluster** (`ClusterClient`: what `client` and `connect` make for a cluster URL) never sends a command
again after a failure. redis-py's own cluster retries are turned off: after a connection error or a timeout they
send the command again — for a pipeline, every command without a result yet, on the healthy nodes too, whose
commands may have run or still be running — so a script that counts, increments or publishes could run twice. A
failed command is failed and its caller decides (a lost reply may hide one run, never a second). What replaces
the retries: a failure that may mean a node is gone or was failed over (a connection error, a timeout, a cluster
error; not a command's own error, which a node answered) starts reloading the map of slots to nodes in the
background (one reload at a time; `topology_refreshes` counts them), so that the calls after a failover reach the
promoted replica; connections are made again on the next call; MOVED and ASK redirections are still followed
(those commands had not run).

**Health.** `healthy(client)`: PING answered (and for a cluster `cluster_state:ok`) within the timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from tradeguard.settings import Env, SettingsError

__all__ = [
    "Client",
    "ClusterClient",
    "RedisConfig",
    "RedisUnavailable",
    "RoundTrip",
    "Script",
    "client",
    "connect",
    "healthy",
    "topology_suspect",
]

Client = aioredis.Redis | RedisCluster
"""A standalone client or a cluster client: the commands the services use are the same on both."""

DEFAULT_PORT = 6379
_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class RedisUnavailable(ConnectionError):
    """Redis did not answer as it should (unreachable, refused our credentials or certificate, cluster not ok)."""


@dataclass(frozen=True)
class RedisConfig:
    """Where and how to reach Redis; `str()` and `repr()` show the URL with the password masked."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    tls_min: str = "1.3"
    cluster: bool = False
    connect_timeout_s: float = 2.0
    timeout_s: float = 2.0
    max_connections: int = 64
    client_name: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError(f"{self}: no host")
        if not 0 < self.port < 65536:
            raise ValueError(f"{self}: port {self.port} out of range")
        if self.db < 0 or (self.cluster and self.db != 0):
            raise ValueError(f"{self}: database {self.db} (a cluster has only database 0)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(f"{self}: a client certificate needs both cert and key")
        if not self.tls and (self.ca_file or self.cert_file or self.server_name):
            raise ValueError(f"{self}: ca, cert, key and server_name need TLS (rediss://)")
        if self.cluster and self.server_name:
            raise ValueError(
                f"{self}: server_name is not supported with a cluster (nodes are found by address)"
            )
        if self.tls_min not in _TLS_VERSIONS:
            raise ValueError(f"{self}: tls_min must be 1.2 or 1.3")
        if self.connect_timeout_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"{self}: timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError(f"{self}: max_connections must be at least 1")

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None) -> RedisConfig:
        """Parse `url` (see the module); `password`, if given, is the password (then the URL must carry none)."""
        masked = _mask(url)
        try:
            parts = urlsplit(url)
            scheme_tls, scheme_cluster = _SCHEMES[parts.scheme.lower()]
            host, port = parts.hostname, parts.port
        except KeyError:
            raise ValueError(f"{masked}: the scheme must be one of {', '.join(_SCHEMES)}") from None
        except ValueError:  # urllib's message may quote a piece of a malformed password: never shown
            raise ValueError(f"{masked}: the port must be a number from 1 to 65535") from None
        if host is None:
            raise ValueError(f"{masked}: no host")
        if parts.fragment:
            raise ValueError(f"{masked}: a fragment (#…) is not allowed")
        url_password = None if parts.password is None else unquote(parts.password)
        if url_password is not None and password is not None:
            raise ValueError(f"{masked}: a password in the URL and another one given: use one")
        path = parts.path.strip("/")
        options: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if name in options:
                raise ValueError(f"{masked}: option {name!r} given twice")
            options[name] = value
        try:
            values: dict[str, Any] = {
                "host": host,
                "port": DEFAULT_PORT if port is None else port,
                "db": int(path) if path else 0,
                "username": unquote(parts.username) if parts.username else None,
                "password": url_password if url_password is not None else password,
                "tls": scheme_tls,
                "cluster": scheme_cluster,
            }
            values.update(_options(options))
        except ValueError as error:
            raise ValueError(f"{masked}: {error}") from None
        if scheme_cluster and values["cluster"] is False:
            raise ValueError(f"{masked}: a {parts.scheme}:// URL is a cluster; cluster=false contradicts it")
        values["cluster"] = values["cluster"] or scheme_cluster
        return cls(**values)

    @classmethod
    def from_env(cls, env: Env, key: str = "REDIS", default_url: str | None = None) -> RedisConfig | None:
        """`<prefix>_<KEY>_URL` (or `…_URL_FILE`: a URL with a password is a secret) and the password
        `<prefix>_<KEY>_PASSWORD` (or `…_PASSWORD_FILE`, preferred); None when no URL is set or defaulted."""
        url = env.secret(f"{key}_URL") or default_url
        password = env.secret(f"{key}_PASSWORD")
        if url is None:
            if password is not None:
                raise SettingsError(f"{env.name(key)}_PASSWORD is set but {env.name(key)}_URL is not")
            return None
        try:
            return cls.from_url(url, password=password)
        except ValueError as error:
            raise SettingsError(f"{env.name(key)}_URL: {error}") from None

    @property
    def url(self) -> str:
        """The URL, password masked (`***`): for logs and errors."""
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        user = quote(self.username, safe="") if self.username else ""
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        db = f"/{self.db}" if self.db else ""
        query = "&".join(
            f"{name}={value}"
            for name, value in (
                ("ca", self.ca_file),
                ("cert", self.cert_file),
                ("key", self.key_file),
                ("server_name", self.server_name),
            )
            if value is not None
        )
        return f"{scheme}://{auth}{host}:{self.port}{db}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RedisConfig({self.url!r})"

    def with_password(self, password: str | None) -> RedisConfig:
        return replace(self, password=password)


def _mask(url: str) -> str:
    """`url` with any password replaced by `***`, without parsing it strictly (it may be malformed)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(not a URL)"
    # Up to the LAST "@": a password may hold unencoded "@" or "/" (masking too much is safe, too little not).
    userinfo, at, after = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0] if ":" in userinfo else userinfo
    if "/" in user or "?" in user:  # not a user name: the "@" was further on; hide everything before it
        user = ""
    return f"{scheme}://{user}:***@{after}"


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"option {name} must be true or false, not {value!r}")


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"option {name} must be a number of seconds, not {value!r}") from None
    if not 0 < seconds <= 3600:
        raise ValueError(f"option {name} must be between 0 and 3600 seconds, not {value}")
    return seconds


def _options(options: Mapping[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {"cluster": None}
    for name, value in options.items():
        if not value:
            raise ValueError(f"option {name} is empty")
        if name in ("ca", "cert", "key"):
            parsed[{"ca": "ca_file", "cert": "cert_file", "key": "key_file"}[name]] = Path(value)
        elif name == "server_name":
            parsed["server_name"] = value
        elif name == "tls_min":
            parsed["tls_min"] = value
        elif name == "cluster":
            parsed["cluster"] = _flag(name, value)
        elif name == "connect_timeout":
            parsed["connect_timeout_s"] = _seconds(name, value)
        elif name == "timeout":
            parsed["timeout_s"] = _seconds(name, value)
        elif name == "max_connections":
            if not value.isdigit() or not 1 <= int(value) <= 10_000:
                raise ValueError(f"option max_connections must be between 1 and 10000, not {value!r}")
            parsed["max_connections"] = int(value)
        elif name == "client_name":
            parsed["client_name"] = value
        else:
            raise ValueError(
                f"unknown option {name!r} (known: ca, cert, key, server_name, tls_min, cluster, "
                "connect_timeout, timeout, max_connections, client_name)"
            )
    return parsed


class _NamedTLSConnection(SSLConnection):
    """An SSLConnection that verifies the server's certificate against a given name instead of the host."""

    def __init__(self, *, tls_server_name: str, **kwargs: Any) -> None:
        self.tls_server_name = tls_server_name
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "server_hostname": self.tls_server_name}


def _common(config: RedisConfig) -> dict[str, Any]:
    common: dict[str, Any] = {
        "username": config.username,
        "password": config.password,
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.timeout_s,
        "client_name": config.client_name,
        "max_connections": config.max_connections,
    }
    if config.tls:
        common.update(
            ssl_ca_certs=None if config.ca_file is None else str(config.ca_file),
            ssl_certfile=None if config.cert_file is None else str(config.cert_file),
            ssl_keyfile=None if config.key_file is None else str(config.key_file),
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            ssl_min_version=_TLS_VERSIONS[config.tls_min],
        )
    return common


def topology_suspect(error: BaseException) -> bool:
    """A failure after which a cluster's map of slots to nodes may be stale (a node down, a failover): a
    connection error or timeout, or a cluster error; not a command's own error (a node answered it) nor this
    client's own pool being full."""
    if isinstance(error, ClusterError | RedisClusterException):
        return True
    return isinstance(error, RedisError | OSError | TimeoutError) and not isinstance(
        error, ResponseError | MaxConnectionsError
    )


class ClusterClient(RedisCluster):
    """redis-py's cluster client as the kit makes it: no retries, and the slot map reloaded in the background
    after a failure that may mean the cluster changed (see the module). Single commands and pipelines alike."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(retry=Retry(NoBackoff(), 0), **kwargs)
        self._refreshing: asyncio.Task[None] | None = None
        self.topology_refreshes = 0  # slot-map reloads started after a failure

    def failed(self, error: BaseException) -> None:
        """After `error` from a call: reload the slot map in the background if `topology_suspect(error)` (unless
        a reload is running already)."""
        if not topology_suspect(error) or (self._refreshing is not None and not self._refreshing.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - a call always fails inside a running loop
            return
        self.topology_refreshes += 1
        self._refreshing = loop.create_task(self._refresh(), name="redis-cluster-slot-map")

    async def _refresh(self) -> None:
        with contextlib.suppress(Exception):  # no node answers now: the next failure tries again
            await self.nodes_manager.initialize()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except Exception as error:
            self.failed(error)
            raise

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # as RedisCluster.pipeline does; redis-py's typing declares an attribute its base sets at run time
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]

    async def aclose(self) -> None:
        """Stop a running reload, then close every connection (redis-py also calls this to start afresh: the
        next call connects and loads the slot map again)."""
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None and refreshing is not asyncio.current_task():
            refreshing.cancel()
            await asyncio.wait([refreshing])
        await super().aclose()


class _ClusterPipeline(ClusterPipeline):
    """A `ClusterClient`'s pipeline: failures (raised, or in place of a command's result) reported to it."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        owner = self.cluster_client
        try:
            results: list[Any] = await super().execute(raise_on_error, allow_redirections)
        except Exception as error:
            if isinstance(owner, ClusterClient):
                owner.failed(error)
            raise
        if isinstance(owner, ClusterClient):
            suspect = next((r for r in results if isinstance(r, Exception) and topology_suspect(r)), None)
            if suspect is not None:
                owner.failed(suspect)
        return results


def client(config: RedisConfig) -> Client:
    """A client for `config` (no I/O yet: redis-py connects on first use); `connect` also checks it answers. For
    a cluster, a `ClusterClient`."""
    common = _common(config)
    if config.cluster:
        return ClusterClient(host=config.host, port=config.port, ssl=config.tls, **common)
    max_connections = common.pop("max_connections")
    if config.tls:
        if config.server_name is not None:
            pool = ConnectionPool(
                connection_class=_NamedTLSConnection,
                tls_server_name=config.server_name,
                host=config.host,
                port=config.port,
                db=config.db,
                max_connections=max_connections,
                **common,
            )
        else:
            pool = ConnectionPool(
                connection_class=SSLConnection,
                host=config.host,
                port=config.port,
                db=config.db,
                max_connections=max_connections,
                **common,
            )
    else:
        pool = ConnectionPool(
            host=config.host, port=config.port, db=config.db, max_connections=max_connections, **common
        )
    return aioredis.Redis.from_pool(pool)


async def connect(config: RedisConfig) -> Client:
    """A client for `config` that has answered PING (and, for a cluster, reports `cluster_state:ok`); raises
    `RedisUnavailable` naming the masked URL otherwise (the client is closed again)."""
    redis_client = client(config)
    try:
        await _check(redis_client)
    except BaseException as error:
        await redis_client.aclose()
        if isinstance(error, RedisError | OSError | TimeoutError | ssl.SSLError):
            raise RedisUnavailable(f"{config.url}: {type(error).__name__}: {error}") from None
        raise
    return redis_client


async def _check(redis_client: Client) -> None:
    if not await redis_client.ping():
        raise RedisUnavailable("PING was not answered")
    if isinstance(redis_client, RedisCluster):
        info = await redis_client.cluster_info()
        state = info.get("cluster_state") if isinstance(info, dict) else None
        if state not in ("ok", b"ok"):
            raise RedisUnavailable(f"cluster_state is {state!r}")


async def healthy(redis_client: Client) -> bool:
    """True when Redis answers PING (and a cluster is `cluster_state:ok`) within the client's timeouts."""
    try:
        await _check(redis_client)
    except (RedisError, OSError, TimeoutError):
        return False
    return True


class Script:
    """A Lua script called by SHA (EVALSHA), loaded only after a server answered NOSCRIPT (see the module).

    Keys must be passed as keys (not arguments): a cluster routes the call by them, and they must all hash to
    one slot (use a `{hash tag}`). Safe to share between tasks and clients: it holds only the text and SHA."""

    def __init__(self, source: str, *, name: str = "script") -> None:
        self.source = source
        self.name = name
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
        self.loads = 0  # SCRIPT LOADs this process sent (a NOSCRIPT answer each, or an explicit `load`)

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:12]}…)"

    async def load(self, redis_client: Client) -> None:
        """SCRIPT LOAD (every primary of a cluster); a server-side SHA that differs is an error."""
        self.loads += 1
        sha = await redis_client.script_load(self.source)
        if isinstance(sha, bytes):
            sha = sha.decode("ascii")
        if sha != self.sha:
            raise RuntimeError(f"{self!r}: the server computed SHA {sha}")

    async def __call__(self, redis_client: Client, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        """EVALSHA; after NOSCRIPT, SCRIPT LOAD and EVALSHA once more."""
        try:
            return await redis_client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis_client)
            return await redis_client.evalsha(self.sha, len(keys), *keys, *args)


class RoundTrip:
    """Script calls and plain commands sent together (a pipeline without MULTI), each with its own result.

    `execute` sends them in one round trip; a script call answered NOSCRIPT did not run: its script is loaded
    and those calls alone are sent again (in their order, after the others had run). Results come back in the
    order queued; with `raise_on_error` (the default) the first error is raised, else errors are returned in
    place. Queue, execute once; a `RoundTrip` is not reusable.
    """

    def __init__(self, redis_client: Client) -> None:
        self._client = redis_client
        self._pipe: Any = redis_client.pipeline(transaction=False)
        self._queued: list[tuple[Script | None, tuple[Any, ...]]] = []
        self._done = False

    def __len__(self) -> int:
        return len(self._queued)

    def script(self, script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> RoundTrip:
        call = (script.sha, len(keys), *keys, *args)
        self._pipe.execute_command("EVALSHA", *call)
        self._queued.append((script, call))
        return self

    def command(self, *args: Any) -> RoundTrip:
        """Any command, as `execute_command` takes it (e.g. `.command("INCRBY", key, 2)`)."""
        self._pipe.execute_command(*args)
        self._queued.append((None, args))
        return self

    async def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        if self._done:
            raise RuntimeError("a RoundTrip is executed once")
        self._done = True
        if not self._queued:
            return []
        results: list[Any] = list(await self._pipe.execute(raise_on_error=False))
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            scripts = {id(s): s for s in (self._queued[i][0] for i in missing) if s is not None}
            for script in scripts.values():
                await script.load(self._client)
            again: Any = self._client.pipeline(transaction=False)
            for i in missing:
                again.execute_command("EVALSHA", *self._queued[i][1])
            for i, result in zip(missing, await again.execute(raise_on_error=False), strict=True):
                results[i] = result
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results
