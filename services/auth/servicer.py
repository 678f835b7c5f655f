"""AuthService over gRPC: proto ↔ core, nothing else. Errors are the cores' DomainErrors (the kit maps them).

The mesh's authorisation interceptor has already checked the caller against services/auth/policy.py. What the
servicer adds from the call itself:
- the source IP (services/auth/peer.py): the connection's, or for a call the HTTP edge forwards, the client's;
- the client certificate's RFC 8705 thumbprint, to which Login, VerifyMfa and RefreshToken bind the tokens
  (`cnf.x5t#S256`): the verified peer certificate of the mesh connection, except from the edge (its certificate
  is the edge's own, not the client's: such tokens are not certificate-bound).

WatchRevocations is a server stream over `HotState.revocations_after` in a loop: first every unexpired
revocation at or after `since_sequence`, then each new one as it is published; a message without `revoked`
every `heartbeat_s` when nothing happened (the guards count it as the stream being up). It ends when the caller
cancels or its deadline passes (the guards resume from the sequence after the last one they applied), or with
UNAVAILABLE when the hot state fails. Known limit: at shutdown an open stream is ended only by the server's grace
period (`TRADEGUARD_AUTH_GRACE_S`), as the runner has no drain hook for long-lived streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

from google.protobuf import duration_pb2, timestamp_pb2

from services.auth import peer
from services.auth.hot import HotState
from services.auth.keys import ApiKeyService, LoadOwner
from services.auth.model import ApiKey, ApiKeyKind, Revocation, RevocationKind, Role, TokenPair, User
from services.auth.rbac import Rbac
from services.auth.tokens import TokenService
from services.auth.users import UserService
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.errors import FieldViolation, InvalidArgument, Unavailable
from tradeguard.guard.auth_client import STREAM_READY
from tradeguard.mesh.identity import caller_name
from tradeguard.observability.annotations import annotate
from tradeguard.signing import SignedRequest

__all__ = ["DEFAULT_TIER", "MAX_VERIFY_BATCH", "AuthServicer"]

Context = Any  # grpc.aio.ServicerContext

DEFAULT_TIER: Final = "default"  # an API key created without a tier
DEFAULT_GRACE_US: Final = 24 * 3600 * 1_000_000  # RotateApiKey without a grace period
MAX_VERIFY_BATCH: Final = 1024  # signed requests per VerifySignedRequests
MAX_DURATION_S: Final = 3 * 366 * 86400  # durations beyond this are refused before the core sees them
_MAX_TEXT: Final = 256  # characters of a jti, family id or user id to revoke

_KINDS: Final = {pb.API_KEY_KIND_HMAC: ApiKeyKind.HMAC, pb.API_KEY_KIND_ED25519: ApiKeyKind.ED25519}
_KIND_PROTO: Final = {kind: number for number, kind in _KINDS.items()}
_REVOKED_FIELD: Final = {
    RevocationKind.JTI: "jti",
    RevocationKind.FAMILY: "family_id",
    RevocationKind.USER: "user_id",
    RevocationKind.KEY: "key_id",
}
# The cores' names for fields whose proto names differ.
_FIELD_NAMES: Final = {"public_key": "ed25519_public_key"}


def timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, us = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=us * 1000)


def duration(micros: int) -> duration_pb2.Duration:
    seconds, us = divmod(micros, 1_000_000)
    return duration_pb2.Duration(seconds=seconds, nanos=us * 1000)


def micros(value: duration_pb2.Duration, field: str) -> int:
    """A request's Duration in microseconds; InvalidArgument naming `field` when negative or absurdly long."""
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument.field(field, "must not be negative")
    if value.seconds > MAX_DURATION_S:
        raise InvalidArgument.field(field, "is too long")
    return value.seconds * 1_000_000 + value.nanos // 1000


def _renamed(error: InvalidArgument) -> InvalidArgument:
    """The core's violations under the request's proto field names."""
    if not any(v.field in _FIELD_NAMES for v in error.violations):
        return error
    return InvalidArgument(
        [FieldViolation(_FIELD_NAMES.get(v.field, v.field), v.description) for v in error.violations],
        reason=error.reason,
    )


def token_pair(tokens: TokenPair) -> pb.TokenPair:
    return pb.TokenPair(
        access_token=tokens.access_token,
        access_token_expires_in=duration(tokens.access_expires_in_us),
        refresh_token=tokens.refresh_token,
        refresh_token_expires_in=duration(tokens.refresh_expires_in_us),
    )


def role_proto(role: Role) -> pb.Role:
    return pb.Role(name=role.name, permissions=sorted(role.permissions))


def key_proto(key: ApiKey, now_us: int) -> pb.ApiKey:
    if key.revoke_time_us is not None:
        state = pb.API_KEY_STATE_REVOKED
    elif key.expire_time_us <= now_us:
        state = pb.API_KEY_STATE_EXPIRED
    else:
        state = pb.API_KEY_STATE_ACTIVE
    out = pb.ApiKey(
        key_id=key.key_id,
        user_id=key.user_id,
        account_id=key.account_id,
        kind=_KIND_PROTO[key.kind],
        scopes=sorted(key.scopes),
        ip_allow_list=list(key.ip_allow_list),
        tier=key.tier,
        create_time=timestamp(key.create_time_us),
        expire_time=timestamp(key.expire_time_us),
        state=state,
        label=key.label,
    )
    if key.previous_expire_time_us is not None:
        out.previous_secret_expire_time.CopyFrom(timestamp(key.previous_expire_time_us))
    return out


def revocation_proto(revocation: Revocation) -> pb.WatchRevocationsResponse:
    out = pb.WatchRevocationsResponse(
        sequence=revocation.sequence,
        expire_time=timestamp(revocation.expire_time_us),
        revoke_time=timestamp(revocation.revoke_time_us),
    )
    setattr(out, _REVOKED_FIELD[revocation.kind], revocation.value)
    return out


def _text(value: str, field: str) -> str:
    if not value or len(value) > _MAX_TEXT or not value.isprintable():
        raise InvalidArgument.field(field, f"1 to {_MAX_TEXT} printable characters")
    return value


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Every RPC of tradeguard.auth.v1.AuthService over the cores (see the module)."""

    def __init__(  # noqa: PLR0917 - the cores, in the order service.py builds them
        self,
        users: UserService,
        rbac: Rbac,
        tokens: TokenService,
        keys: ApiKeyService,
        hot: HotState,
        load_user: LoadOwner,
        trust_domain: str,
        *,
        clock_us: Any,
        heartbeat_s: float = 5.0,
    ) -> None:
        self._users, self._rbac, self._tokens, self._keys, self._hot = users, rbac, tokens, keys, hot
        self._load_user = load_user
        self._trust_domain = trust_domain
        self._clock = clock_us
        self._heartbeat_s = heartbeat_s

    # --- the call itself ---------------------------------------------------------------------------------------

    def _source(self, context: Context) -> str:
        return peer.source_ip(context, self._trust_domain)

    def _thumbprint(self, context: Context) -> str | None:
        """The client certificate to bind tokens to: the mesh peer's, unless the call comes through the edge."""
        if caller_name(context, self._trust_domain) == peer.EDGE:
            return None
        return peer.peer_thumbprint(context)

    async def _user(self, user: User) -> pb.User:
        return pb.User(
            user_id=user.user_id,
            username=user.username,
            account_id=user.account_id,
            roles=list(user.roles),
            mfa_enrolled=user.totp_seed is not None,
            mfa_required=await self._users.mfa_required(user),
            create_time=timestamp(user.create_time_us),
            locked=await self._users.locked(user),
        )

    # --- users and roles (operators) -------------------------------------------------------------------------

    async def CreateUser(self, request: pb.CreateUserRequest, context: Context) -> pb.CreateUserResponse:
        user = await self._users.create_user(
            request.username, request.password, request.account_id, list(request.roles)
        )
        annotate(user_id=user.user_id)
        return pb.CreateUserResponse(user=await self._user(user))

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        return pb.GetUserResponse(user=await self._user(await self._users.get_user(request.user_id)))

    async def SetUserRoles(
        self, request: pb.SetUserRolesRequest, context: Context
    ) -> pb.SetUserRolesResponse:
        await self._users.get_user(request.user_id)  # user_id checked (format, existence) before the roles
        user = await self._users.set_roles(request.user_id, list(request.roles))
        return pb.SetUserRolesResponse(user=await self._user(user))

    async def SetRolePermissions(
        self, request: pb.SetRolePermissionsRequest, context: Context
    ) -> pb.SetRolePermissionsResponse:
        await self._rbac.refresh_if_stale()
        role = await self._rbac.set_role(request.role, list(request.permissions))
        return pb.SetRolePermissionsResponse(role=role_proto(role))

    async def ListRoles(self, request: pb.ListRolesRequest, context: Context) -> pb.ListRolesResponse:
        await self._rbac.refresh_if_stale()
        return pb.ListRolesResponse(roles=[role_proto(role) for role in self._rbac.roles()])

    async def UnlockUser(self, request: pb.UnlockUserRequest, context: Context) -> pb.UnlockUserResponse:
        await self._users.get_user(request.user_id)
        await self._users.unlock(request.user_id)
        return pb.UnlockUserResponse()

    # --- TOTP enrolment ----------------------------------------------------------------------------------------

    async def BeginTotpEnrollment(
        self, request: pb.BeginTotpEnrollmentRequest, context: Context
    ) -> pb.BeginTotpEnrollmentResponse:
        uri = await self._users.begin_totp(request.username, request.password, self._source(context))
        return pb.BeginTotpEnrollmentResponse(otpauth_uri=uri)

    async def ConfirmTotpEnrollment(
        self, request: pb.ConfirmTotpEnrollmentRequest, context: Context
    ) -> pb.ConfirmTotpEnrollmentResponse:
        codes = await self._users.confirm_totp(
            request.username, request.password, request.code, self._source(context)
        )
        return pb.ConfirmTotpEnrollmentResponse(recovery_codes=codes)

    # --- login and tokens ------------------------------------------------------------------------------------

    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.LoginResponse:
        result = await self._users.login(
            request.username, request.password, self._source(context), self._thumbprint(context)
        )
        if result.tokens is not None:
            return pb.LoginResponse(tokens=token_pair(result.tokens))
        assert result.mfa_token is not None
        annotate(mfa="required")
        return pb.LoginResponse(
            mfa_token=result.mfa_token, mfa_token_expires_in=duration(result.mfa_expires_in_us)
        )

    async def VerifyMfa(self, request: pb.VerifyMfaRequest, context: Context) -> pb.VerifyMfaResponse:
        factor = request.WhichOneof("factor")
        tokens = await self._users.verify_mfa(
            request.mfa_token,
            request.totp_code if factor == "totp_code" else None,
            request.recovery_code if factor == "recovery_code" else None,
            self._source(context),
            self._thumbprint(context),
        )
        return pb.VerifyMfaResponse(tokens=token_pair(tokens))

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: Context
    ) -> pb.RefreshTokenResponse:
        tokens = await self._tokens.refresh(request.refresh_token, self._thumbprint(context), self._load_user)
        return pb.RefreshTokenResponse(tokens=token_pair(tokens))

    async def Logout(self, request: pb.LogoutRequest, context: Context) -> pb.LogoutResponse:
        await self._tokens.logout(request.refresh_token)
        return pb.LogoutResponse()

    async def RevokeTokens(
        self, request: pb.RevokeTokensRequest, context: Context
    ) -> pb.RevokeTokensResponse:
        target = request.WhichOneof("target")
        if target == "jti":
            await self._tokens.revoke_jti(_text(request.jti, "jti"))
        elif target == "family_id":
            await self._tokens.revoke_family(_text(request.family_id, "family_id"))
        elif target == "user_id":
            await self._users.get_user(request.user_id)  # format and existence checked
            await self._tokens.revoke_user(request.user_id)
        else:
            raise InvalidArgument.field("target", "give one of jti, family_id, user_id")
        annotate(revoked=target)
        return pb.RevokeTokensResponse()

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(jwks_json=await self._tokens.jwks_json())

    # --- API keys --------------------------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        kind = _KINDS.get(request.kind)
        if kind is None:
            raise InvalidArgument.field("kind", "must be API_KEY_KIND_HMAC or API_KEY_KIND_ED25519")
        await self._users.get_user(request.user_id)
        lifetime = micros(request.lifetime, "lifetime") if request.HasField("lifetime") else None
        try:
            key, secret = await self._keys.create(
                request.user_id,
                kind,
                list(request.scopes),
                list(request.ip_allow_list),
                request.tier or DEFAULT_TIER,
                lifetime,
                bytes(request.ed25519_public_key) or None,
                request.label,
            )
        except InvalidArgument as error:
            raise _renamed(error) from None
        annotate(key_id=key.key_id, user_id=key.user_id)
        return pb.CreateApiKeyResponse(key=key_proto(key, self._clock()), secret=secret or "")

    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: Context
    ) -> pb.RotateApiKeyResponse:
        grace = (
            micros(request.grace_period, "grace_period")
            if request.HasField("grace_period")
            else DEFAULT_GRACE_US
        )
        try:
            key, secret = await self._keys.rotate(
                request.key_id, grace, bytes(request.ed25519_public_key) or None
            )
        except InvalidArgument as error:
            raise _renamed(error) from None
        annotate(key_id=key.key_id)
        return pb.RotateApiKeyResponse(key=key_proto(key, self._clock()), secret=secret or "")

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        key = await self._keys.revoke(request.key_id)
        annotate(key_id=key.key_id)
        return pb.RevokeApiKeyResponse()

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        await self._users.get_user(request.user_id)
        now_us = self._clock()
        return pb.ListApiKeysResponse(
            keys=[key_proto(key, now_us) for key in await self._keys.list(request.user_id)]
        )

    # --- for the guards --------------------------------------------------------------------------------------

    async def VerifySignedRequests(
        self, request: pb.VerifySignedRequestsRequest, context: Context
    ) -> pb.VerifySignedRequestsResponse:
        if len(request.requests) > MAX_VERIFY_BATCH:
            raise InvalidArgument.field("requests", f"at most {MAX_VERIFY_BATCH} per call")
        verdicts = await self._keys.verify([_signed(item) for item in request.requests])
        results = []
        for verdict in verdicts:
            if verdict.principal is not None:
                p = verdict.principal
                results.append(
                    pb.SignedRequestResult(
                        principal=pb.Principal(
                            user_id=p.user_id,
                            account_id=p.account_id,
                            key_id=p.key_id or "",
                            scopes=sorted(p.scopes),
                            tier=p.tier,
                        )
                    )
                )
            else:
                results.append(pb.SignedRequestResult(permission_denied=verdict.permission_denied))
        annotate(batch=len(results), verified=sum(1 for v in verdicts if v.principal is not None))
        return pb.VerifySignedRequestsResponse(results=results)

    async def WatchRevocations(
        self, request: pb.WatchRevocationsRequest, context: Context
    ) -> AsyncIterator[pb.WatchRevocationsResponse]:
        sequence = max(request.since_sequence, 1) - 1  # "at or after since_sequence"
        await context.send_initial_metadata((STREAM_READY,))  # the guard counts the stream up only on this
        sent = 0
        try:
            while True:
                try:
                    found = await self._hot.revocations_after(sequence, wait_s=self._heartbeat_s)
                except Exception as error:  # Redis unreachable: retryable for the guard, the cause logged
                    annotate(revocations_sent=sent, cause=type(error).__name__)
                    raise Unavailable("revocations unavailable", reason="HOT_STATE_UNAVAILABLE") from None
                if not found:
                    yield pb.WatchRevocationsResponse(sequence=sequence)  # a heartbeat
                    continue
                for revocation in found:
                    yield revocation_proto(revocation)
                    sequence = max(sequence, revocation.sequence)
                    sent += 1
        except asyncio.CancelledError:  # the guard went away or its deadline passed: a normal end
            annotate(revocations_sent=sent, stream_end="cancelled")
            raise


def _signed(item: pb.SignedRequest) -> SignedRequest:
    return SignedRequest(
        key_id=item.key_id,
        timestamp=item.timestamp,
        nonce=item.nonce,
        signature=item.signature,
        path=item.path,
        body_sha256=item.body_sha256,
        source_ip=item.source_ip,
        required_permission=item.required_permission,
    )
