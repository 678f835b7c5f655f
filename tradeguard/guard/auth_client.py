"""The guard's calls to the auth service (tradeguard.auth.v1.AuthService) over a mesh channel, as plain types.

- `jwks()`: GetJwks → the JWKS JSON (for `JwksCache`);
- `open(since_sequence)`: WatchRevocations → `Revoked` items (for `RevocationWatcher`); the call carries a long
  deadline (`stream_timeout_s`, default 300 s) and the watcher resumes after it, since a call without a deadline
  would get the channel's default of a few seconds;
- `verify_batch(requests)`: VerifySignedRequests for a whole batch → one `Outcome` per request (for the guard's
  `Batcher`): the principal, `PermissionDenied` (authentic, but the key's scopes lack the permission) or
  `Unauthenticated` (the cause is in the auth service's log).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import grpc
from google.protobuf import timestamp_pb2

from tradeguard.auth.v1 import auth_pb2, auth_pb2_grpc
from tradeguard.batching import Outcome
from tradeguard.errors import PermissionDenied, Unauthenticated
from tradeguard.guard.revocations import Kind, Revoked
from tradeguard.principal import Principal
from tradeguard.signing import SignedRequest

__all__ = ["STREAM_READY", "AuthClient", "StreamRefused", "principal_from_proto"]

#: The initial metadata the auth service sends when a revocation stream is really open. A refused call (a caller
#: the policy denies, a failure before the handler) also ends `initial_metadata()`, with no such entry: the guard
#: counts the stream up only on this one, so a stream refused again and again never passes for a live one.
STREAM_READY: Final = ("x-tg-revocations", "open")

DEFAULT_TIMEOUT_S: Final = 2.0
DEFAULT_STREAM_TIMEOUT_S: Final = 300.0

_KINDS: Final = {"jti": Kind.JTI, "family_id": Kind.FAMILY, "user_id": Kind.USER, "key_id": Kind.KEY}


def _us(stamp: timestamp_pb2.Timestamp) -> int:
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def principal_from_proto(principal: auth_pb2.Principal) -> Principal:
    return Principal(
        user_id=principal.user_id,
        account_id=principal.account_id,
        scopes=frozenset(principal.scopes),
        tier=principal.tier,
        key_id=principal.key_id or None,
    )


def revoked_from_proto(message: auth_pb2.WatchRevocationsResponse) -> Revoked:
    which = message.WhichOneof("revoked")
    if which is None:
        return Revoked(message.sequence, None)
    return Revoked(
        sequence=message.sequence,
        kind=_KINDS[which],
        value=getattr(message, which),
        revoke_time_us=_us(message.revoke_time),
        expire_time_us=_us(message.expire_time),
    )


class StreamRefused(ConnectionError):
    """The revocation stream ended or was refused before the auth service opened it."""


class _Stream:
    def __init__(self, call: Any) -> None:
        self._call = call

    async def ready(self) -> None:
        metadata = await self._call.initial_metadata()
        if STREAM_READY in tuple(metadata or ()) and not self._call.done():
            return
        code = (await self._call.code()).name if self._call.done() else "no open marker"
        self._call.cancel()
        raise StreamRefused(f"the revocation stream was not opened ({code})")

    async def _items(self) -> AsyncIterator[Revoked]:
        async for message in self._call:
            yield revoked_from_proto(message)

    def __aiter__(self) -> AsyncIterator[Revoked]:
        return self._items()

    def cancel(self) -> None:
        self._call.cancel()


class AuthClient:
    """The auth service as the guard uses it (see the module)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S,
    ) -> None:
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._timeout_s = timeout_s
        self._stream_timeout_s = stream_timeout_s
        self.verify_calls = 0  # VerifySignedRequests RPCs made

    async def jwks(self) -> str:
        reply = await self._stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=self._timeout_s)
        return reply.jwks_json

    def open(self, since_sequence: int) -> _Stream:
        call = self._stub.WatchRevocations(
            auth_pb2.WatchRevocationsRequest(since_sequence=since_sequence), timeout=self._stream_timeout_s
        )
        return _Stream(call)

    async def verify_batch(self, requests: Sequence[SignedRequest]) -> list[Outcome[Principal]]:
        self.verify_calls += 1
        reply = await self._stub.VerifySignedRequests(
            auth_pb2.VerifySignedRequestsRequest(
                requests=[
                    auth_pb2.SignedRequest(
                        key_id=r.key_id,
                        timestamp=r.timestamp,
                        nonce=r.nonce,
                        signature=r.signature,
                        path=r.path,
                        body_sha256=r.body_sha256,
                        source_ip=r.source_ip,
                        required_permission=r.required_permission,
                    )
                    for r in requests
                ]
            ),
            timeout=self._timeout_s,
        )
        if len(reply.results) != len(requests):
            raise RuntimeError(f"auth answered {len(reply.results)} results for {len(requests)} requests")
        outcomes: list[Outcome[Principal]] = []
        for result in reply.results:
            if result.HasField("principal"):
                outcomes.append(Outcome.ok(principal_from_proto(result.principal)))
            elif result.permission_denied:
                outcomes.append(Outcome.failed(PermissionDenied("the API key lacks the method's permission")))
            else:
                outcomes.append(Outcome.failed(Unauthenticated("auth refused the signed request")))
        return outcomes
