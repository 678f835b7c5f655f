"""Client side of the guard: a grpc.aio client interceptor that authenticates every call, all four call kinds.

    channel = grpc.aio.secure_channel(target, creds, interceptors=signing_interceptors(
        ApiKeyCredentials(key_id="tgk_…", secret="tgs_…")))          # or ed25519_seed=<32 bytes>
    channel = grpc.aio.secure_channel(target, creds, interceptors=bearer_interceptors(lambda: token))

With an API key, each call gets the four signed-request headers (tradeguard.signing.signed_headers: the scheme of
the key, its id, the current Unix milliseconds, a fresh random nonce, the full method and the SHA-256 of the request
message as serialized for the wire), so client developers never build the signed string by hand. A client-streaming
call is signed over its FIRST request message (read before the call starts, so a bidirectional call whose first
request waits for a response cannot be signed; an empty stream signs the empty body).
A protobuf request is serialized with `SerializeToString()`, the very function the stub's serializer calls; a
request given as `bytes` is signed as is. Do not mutate a request while its call starts.

With a bearer token, each call gets `authorization: Bearer <token>` from the provider (called per call, so a
refreshed token is picked up). Metadata the caller already set under these names is replaced, never duplicated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc.aio import ClientCallDetails, Metadata

from tradeguard import signing
from tradeguard.mesh import tls
from tradeguard.mesh.client import DEFAULT_TIMEOUT_S, CallDefaults, details_interceptors

__all__ = [
    "ApiKeyCredentials",
    "authenticated_channel",
    "bearer_interceptors",
    "signing_interceptors",
]

_SIGNED = frozenset(
    {signing.HEADER_KEY, signing.HEADER_TIMESTAMP, signing.HEADER_NONCE, signing.HEADER_SIGNATURE}
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ApiKeyCredentials:
    """An API key as a client holds it: its id and either the HMAC secret (`tgs_…`, shown once at creation) or the
    32-byte Ed25519 private key seed whose public key was registered. Neither appears in its repr."""

    key_id: str
    secret: str | None = field(default=None, repr=False)
    ed25519_seed: bytes | None = field(default=None, repr=False)
    # the seed loaded once (loading it derives the public key: about half of each signature's CPU)
    _ed25519_key: signing.Ed25519PrivateKey | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.ed25519_seed is None):
            raise ValueError("an API key signs with its HMAC secret or its Ed25519 seed: give exactly one")
        if not signing.key_id_valid(self.key_id):
            raise ValueError("not an API key id (tgk_… with a valid checksum)")
        if self.ed25519_seed is not None:
            if len(self.ed25519_seed) != 32:
                raise ValueError("an Ed25519 private key seed is 32 bytes")
            object.__setattr__(self, "_ed25519_key", signing.ed25519_private_key(self.ed25519_seed))

    def headers(self, timestamp_ms: int, nonce: str, path: str, body: bytes) -> tuple[tuple[str, str], ...]:
        if self.secret is not None:
            return signing.signed_headers(
                signing.Scheme.HMAC_SHA256, self.secret, self.key_id, timestamp_ms, nonce, path, body
            )
        assert self._ed25519_key is not None
        return signing.signed_headers(
            signing.Scheme.ED25519, self._ed25519_key, self.key_id, timestamp_ms, nonce, path, body
        )


def _serialize(request: Any) -> bytes:
    if isinstance(request, bytes | bytearray | memoryview):
        return bytes(request)
    return bytes(request.SerializeToString())


def _body(first: Sequence[Any]) -> bytes:
    """What a call is signed over: its first request as serialized for the wire (an empty stream: no bytes)."""
    return _serialize(first[0]) if first else b""


def _method(details: ClientCallDetails) -> str:
    method: Any = details.method
    return method.decode("ascii") if isinstance(method, bytes) else str(method)


def _with(
    details: ClientCallDetails, extra: Iterable[tuple[str, str]], replaced: frozenset[str]
) -> ClientCallDetails:
    kept = [(k, v) for k, v in (details.metadata or ()) if k.lower() not in replaced]
    return ClientCallDetails(
        details.method, details.timeout, Metadata(*kept, *extra), details.credentials, details.wait_for_ready
    )


class _Signer:
    def __init__(
        self, credentials: ApiKeyCredentials, clock_ms: Callable[[], int], random: signing.Random
    ) -> None:
        self._credentials, self._clock_ms, self._random = credentials, clock_ms, random

    def details(self, details: ClientCallDetails, first: Sequence[Any]) -> ClientCallDetails:
        headers = self._credentials.headers(
            self._clock_ms(), signing.new_nonce(self._random), _method(details), _body(first)
        )
        return _with(details, headers, _SIGNED)


class _Bearer:
    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def details(self, details: ClientCallDetails, first: Sequence[Any]) -> ClientCallDetails:
        token = self._token()
        if not token or any(c in token for c in "\r\n "):
            raise ValueError("a bearer token is one non-empty word")
        return _with(details, [("authorization", f"Bearer {token}")], frozenset({"authorization"}))


def signing_interceptors(
    credentials: ApiKeyCredentials,
    *,
    clock_ms: Callable[[], int] = _now_ms,
    random: signing.Random = os.urandom,
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors (all four call kinds) that sign every call with `credentials` (see the module)."""
    return details_interceptors(_Signer(credentials, clock_ms, random).details, with_first_request=True)


def bearer_interceptors(token: Callable[[], str] | str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors (all four call kinds) that send `authorization: Bearer <token>` with every call; `token` is
    the token or a provider called per call."""
    provider = token if callable(token) else (lambda: token)
    return details_interceptors(_Bearer(provider).details, with_first_request=True)


def authenticated_channel(
    target: str,
    server_name: str,
    workload: tls.Workload,
    authentication: list[grpc.aio.ClientInterceptor],
    *,
    default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> grpc.aio.Channel:
    """A mutual-TLS channel to `server_name` at `target` as `workload` whose every call is authenticated by
    `authentication` (`signing_interceptors(...)` or `bearer_interceptors(...)`), with the kit's call defaults
    (request id, default deadline). Unlike `MeshChannel` it does not follow a rotated client certificate: open a
    new one after a rotation."""
    return grpc.aio.secure_channel(
        target,
        tls.channel_credentials(workload),
        options=[("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)],
        interceptors=[*CallDefaults(default_timeout_s).interceptors(), *authentication],
    )
