"""`tradeguard auth …`: users, roles, TOTP enrolment (with a QR code), login sessions, API keys, revocation and
the public keys of the auth service, over the mesh as `ops` unless --as says otherwise.

Passwords are read from the terminal (asked twice for a new one, never echoed) or from a file (`--password-file
F`, its first line; `-` for stdin), never from the command line where `ps` and the shell history would show them.
A new HMAC API key's secret is shown once, or with `--save` written to $TRADEGUARD_HOME/credentials/<key_id>.secret
(0600) and shown nowhere. `auth login` keeps the token pair in $TRADEGUARD_HOME/credentials/<username>.json (0600);
`tradeguard orders --login USERNAME` uses it and refreshes it when it expires; `auth logout` ends it.

Every action prints a short text answer, or with `--json` every field of the service's answer (for scripts);
creating actions take `--quiet` to print only the new id. A refused call is one line on stderr (code, message,
reason, the fields at fault) and exit status 1; a problem on this side (a missing file, no terminal to ask on) is
one line and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import io
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import grpc
import segno
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.cli import common, credentials
from tradeguard.cli.common import CliError
from tradeguard.cli.credentials import Session
from tradeguard.cli.mesh_call import Hint, call_service, describe, to_json
from tradeguard.mesh.channel import MeshChannel
from tradeguard.rpc.status import RichStatus, rich_status

__all__ = ["PERMISSIONS", "fresh_session", "qr_text", "register"]

T = TypeVar("T")
if TYPE_CHECKING:  # the typed stub exists only in the generated .pyi
    Stub = auth_pb2_grpc.AuthServiceAsyncStub

TIMEOUT_S: Final = 15.0  # Argon2id runs on the service (about 20 ms each); generous for a loaded machine
PERMISSIONS: Final = ("orders:read", "orders:write", "withdraw", "keys:manage", "users:manage")
KINDS: Final = {pb.API_KEY_KIND_HMAC: "hmac", pb.API_KEY_KIND_ED25519: "ed25519"}
STATES: Final = {
    pb.API_KEY_STATE_ACTIVE: "active",
    pb.API_KEY_STATE_REVOKED: "revoked",
    pb.API_KEY_STATE_EXPIRED: "expired",
}


# --- the command line ----------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    auth = subparsers.add_parser(
        "auth",
        help="users, roles, TOTP, logins and API keys on the auth service",
        description=__doc__,
        formatter_class=common.HelpFormatter,
    )
    common.add_identity_options(auth, "auth", top=True)
    common.add_home_option(auth)
    groups = auth.add_subparsers(dest="group", metavar="ACTION", required=True)

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        parser = groups.add_parser(
            name, help=help_text, description=help_text, formatter_class=common.HelpFormatter
        )
        common.add_identity_options(parser, "auth")
        common.add_home_option(parser)
        return parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def leaf(
        where: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help_text: str,
        handler: Callable[[argparse.Namespace], Awaitable[int]],
        *,
        quiet: str | None = None,
    ) -> argparse.ArgumentParser:
        parser = where.add_parser(
            name, help=help_text, description=help_text, formatter_class=common.HelpFormatter
        )
        common.add_identity_options(parser, "auth")
        common.add_home_option(parser)
        output = parser.add_mutually_exclusive_group()
        output.add_argument(
            "--json",
            action="store_true",
            help="print every field of the service's answer as JSON (for scripts)",
        )
        if quiet is not None:
            output.add_argument("-q", "--quiet", action="store_true", help=f"print only {quiet}")
        parser.set_defaults(handler=handler, quiet=False)
        return parser

    users = group("user", "create, show, change the roles of and unlock users (operators)")
    create = leaf(
        users,
        "create",
        "create a user of an account with roles and a password",
        _user_create,
        quiet="the new user id",
    )
    create.add_argument("username", help="3-64 letters, digits and ._@+-, starting with a letter or digit")
    create.add_argument("--account", required=True, help="the trading account the user acts for")
    create.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help="a role (repeat for more): trader, viewer, admin, …",
    )
    _password_option(create, "asked twice on the terminal")
    get = leaf(users, "get", "show a user (never the password or the TOTP seed)", _user_get)
    get.add_argument("user_id", help="usr_… as `user create` printed it")
    roles = leaf(users, "roles", "replace a user's roles (their tokens are revoked)", _user_roles)
    roles.add_argument("user_id", help="usr_…")
    roles.add_argument(
        "--role", action="append", required=True, metavar="ROLE", help="a role (repeat for more)"
    )
    unlock = leaf(users, "unlock", "clear a user's lockout after failed logins", _user_unlock)
    unlock.add_argument("user_id", help="usr_…")

    role_group = group("role", "list roles and set what a role may do (operators)")
    leaf(role_group, "list", "every role and its permissions", _role_list)
    role_set = leaf(role_group, "set", "replace a role's permissions (creates the role if new)", _role_set)
    role_set.add_argument("role", help="the role's name, e.g. trader")
    role_set.add_argument(
        "--permission",
        action="append",
        required=True,
        metavar="PERMISSION",
        help=f"a permission (repeat for more): {', '.join(PERMISSIONS)}",
    )

    totp = group("totp", "enrol a TOTP authenticator (the user's own password)")
    enroll = leaf(
        totp,
        "enroll",
        "start enrolment: prints the otpauth:// URI and its QR code (shown once)",
        _totp_enroll,
    )
    enroll.add_argument("username", help="the user who enrols")
    enroll.add_argument(
        "--qr", action=argparse.BooleanOptionalAction, default=True, help="print the QR code in the terminal"
    )
    _password_option(enroll, "asked on the terminal")
    confirm = leaf(
        totp, "confirm", "confirm enrolment with a first code; prints the recovery codes once", _totp_confirm
    )
    confirm.add_argument("username", help="the user who enrols")
    confirm.add_argument("code", help="the 6-digit code the authenticator app shows now")
    _password_option(confirm, "asked on the terminal")

    login = leaf(
        groups,
        "login",
        "log in (password, then a second factor) and keep the tokens for `orders --login`",
        _login,
    )
    login.add_argument("username", help="who logs in")
    factor = login.add_mutually_exclusive_group()
    factor.add_argument(
        "--totp",
        metavar="CODE",
        help="the authenticator's current code (asked on the terminal when needed and not given)",
    )
    factor.add_argument(
        "--recovery",
        metavar="CODE",
        nargs="?",
        const="",
        help="log in with a one-time recovery code instead (without CODE: asked on the terminal, not echoed)",
    )
    _password_option(login, "asked on the terminal")
    refresh = leaf(groups, "refresh", "exchange the stored refresh token for a new token pair now", _refresh)
    refresh.add_argument("username", help="whose stored login")
    logout = leaf(groups, "logout", "end the stored login (its tokens are revoked) and delete it", _logout)
    logout.add_argument("username", help="whose stored login")

    keys = group("key", "API keys: create, rotate, revoke, list (operators)")
    key_create = leaf(
        keys,
        "create",
        "create an API key for a user (an HMAC secret shown once, or your Ed25519 public key)",
        _key_create,
        quiet="the new key id",
    )
    key_create.add_argument("user_id", help="the owner, usr_…")
    key_create.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="PERMISSION",
        help="what the key may do (repeat for more; within its owner's permissions): orders:read, orders:write, withdraw",
    )
    key_create.add_argument(
        "--ip",
        action="append",
        metavar="CIDR",
        help="allow calls only from this network (repeat for more; IPv4 or IPv6)",
    )
    key_create.add_argument("--tier", default="default", help="the rate limiter's tier for the key")
    key_create.add_argument(
        "--days",
        type=float,
        default=None,
        help="lifetime in days (default 90; at most 90 without --ip, 730 with)",
    )
    key_create.add_argument("--label", default="", help="a note for people reading `key list`")
    key_create.add_argument(
        "--ed25519-public-key-file",
        metavar="FILE",
        help="register this Ed25519 public key (PEM) instead of getting an HMAC secret; the private key stays with you",
    )
    _save_option(key_create)
    rotate = leaf(
        keys,
        "rotate",
        "give a key a new secret (or public key); the old one works for the grace period",
        _key_rotate,
    )
    rotate.add_argument("key_id", help="tgk_…")
    rotate.add_argument(
        "--grace-hours",
        type=float,
        default=24.0,
        help="how long the previous secret keeps working (at most 168)",
    )
    rotate.add_argument(
        "--ed25519-public-key-file",
        metavar="FILE",
        help="the new Ed25519 public key (PEM), for an Ed25519 key",
    )
    _save_option(rotate)
    revoke_key = leaf(
        keys, "revoke", "revoke a key at once (every guard refuses it within a second)", _key_revoke
    )
    revoke_key.add_argument("key_id", help="tgk_…")
    key_list = leaf(keys, "list", "a user's keys (never their secrets)", _key_list)
    key_list.add_argument("user_id", help="usr_…")

    revoke = leaf(
        groups,
        "revoke",
        "revoke access tokens: one (by jti), a login's family, or every token of a user",
        _revoke,
    )
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--jti", help="one access token's jti claim")
    target.add_argument(
        "--family", help="a login's refresh family (the fam claim): every token of that login"
    )
    target.add_argument("--user", metavar="USER_ID", help="every token issued to the user so far")
    leaf(groups, "jwks", "the public keys that verify access tokens (RFC 7517 JSON)", _jwks)
    auth.set_defaults(func=lambda args: asyncio.run(args.handler(args)))


def _password_option(parser: argparse.ArgumentParser, otherwise: str) -> None:
    parser.add_argument(
        "--password-file",
        metavar="FILE",
        help=f"read the password from the first line of FILE (- for stdin); without it: {otherwise}",
    )


def _save_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--save",
        action="store_true",
        help="write the HMAC secret to $TRADEGUARD_HOME/credentials/<key_id>.secret (0600) instead of printing it",
    )


# --- reading what is never given on the command line -------------------------------------------------------


def _ask(prompt: str) -> str:
    """A secret from the terminal, not echoed; CliError when there is no terminal."""
    if not sys.stdin.isatty():
        raise CliError(f"no terminal to ask for the {prompt.rstrip(': ')} on: give it in a file (see --help)")
    return getpass.getpass(prompt)


def _password(args: argparse.Namespace, *, new: bool = False) -> str:
    if args.password_file:
        return credentials.read_password_file(args.password_file)
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password on: give --password-file FILE (or - for stdin)")
    first = getpass.getpass("new password: " if new else "password: ")
    if not first:
        raise CliError("no password given")
    if new and getpass.getpass("the same password again: ") != first:
        raise CliError("the two passwords differ: nothing was created")
    return first


# --- calling the service -------------------------------------------------------------------------------------


async def _auth(
    args: argparse.Namespace, call: Callable[[Stub], Awaitable[T]], hint: Hint | None = None
) -> T | None:
    return await call_service(
        args, "auth", lambda channel: call(auth_pb2_grpc.AuthServiceStub(channel)), hint=hint
    )


def _login_hint(username: str) -> Hint:
    def hint(status: RichStatus) -> str | None:
        if status.reason == "MFA_ENROLLMENT_REQUIRED":
            return f"run `tradeguard auth totp enroll {username}`, then `tradeguard auth totp confirm {username} CODE`"
        if status.code == grpc.StatusCode.UNAUTHENTICATED:
            return (
                "a wrong username, password or code, or too many failures (wait, or an operator runs "
                "`tradeguard auth user unlock USER_ID`)"
            )
        return None

    return hint


def _print_message(args: argparse.Namespace, reply: Message, text: str | Callable[[], str]) -> int:
    print(to_json(reply) if args.json else (text() if callable(text) else text))
    return 0


# --- users and roles -----------------------------------------------------------------------------------------


def _when(value: timestamp_pb2.Timestamp) -> str:
    if not value.seconds and not value.nanos:
        return "-"
    return datetime.fromtimestamp(value.seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def _span(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def user_text(user: pb.User) -> str:
    mfa = "enrolled" if user.mfa_enrolled else ("required, not enrolled yet" if user.mfa_required else "off")
    return "\n".join(
        [
            f"user_id   {user.user_id}",
            f"username  {user.username}",
            f"account   {user.account_id}",
            f"roles     {' '.join(user.roles)}",
            f"mfa       {mfa}",
            f"locked    {'yes' if user.locked else 'no'}",
            f"created   {_when(user.create_time)}",
        ]
    )


async def _user_create(args: argparse.Namespace) -> int:
    username = credentials.username_file_name(args.username)
    password = _password(args, new=True)
    request = pb.CreateUserRequest(
        username=username, password=password, account_id=args.account, roles=args.role
    )
    reply = await _auth(args, lambda stub: stub.CreateUser(request, timeout=TIMEOUT_S))
    if reply is None:
        return 1
    if args.quiet:
        print(reply.user.user_id)
        return 0
    return _print_message(args, reply, lambda: user_text(reply.user))


async def _user_get(args: argparse.Namespace) -> int:
    reply = await _auth(
        args, lambda stub: stub.GetUser(pb.GetUserRequest(user_id=args.user_id), timeout=TIMEOUT_S)
    )
    return 1 if reply is None else _print_message(args, reply, lambda: user_text(reply.user))


async def _user_roles(args: argparse.Namespace) -> int:
    request = pb.SetUserRolesRequest(user_id=args.user_id, roles=args.role)
    reply = await _auth(args, lambda stub: stub.SetUserRoles(request, timeout=TIMEOUT_S))
    if reply is None:
        return 1
    return _print_message(args, reply, lambda: user_text(reply.user) + "\n(the user's tokens were revoked)")


async def _user_unlock(args: argparse.Namespace) -> int:
    request = pb.UnlockUserRequest(user_id=args.user_id)
    reply = await _auth(args, lambda stub: stub.UnlockUser(request, timeout=TIMEOUT_S))
    return 1 if reply is None else _print_message(args, reply, f"unlocked {args.user_id}")


def _roles_text(roles: Sequence[pb.Role]) -> str:
    width = max((len(role.name) for role in roles), default=4)
    return "\n".join(f"{role.name:<{width}}  {' '.join(role.permissions) or '-'}" for role in roles)


async def _role_list(args: argparse.Namespace) -> int:
    reply = await _auth(args, lambda stub: stub.ListRoles(pb.ListRolesRequest(), timeout=TIMEOUT_S))
    return 1 if reply is None else _print_message(args, reply, lambda: _roles_text(reply.roles))


async def _role_set(args: argparse.Namespace) -> int:
    request = pb.SetRolePermissionsRequest(role=args.role, permissions=args.permission)
    reply = await _auth(args, lambda stub: stub.SetRolePermissions(request, timeout=TIMEOUT_S))
    return 1 if reply is None else _print_message(args, reply, lambda: _roles_text([reply.role]))


# --- TOTP ----------------------------------------------------------------------------------------------------


def qr_text(uri: str) -> str:
    """`uri` as a QR code drawn with Unicode half blocks (two modules per character cell: it fits a terminal),
    dark modules as spaces on light blocks, with the standard quiet zone, error correction level M."""
    out = io.StringIO()
    segno.make(uri, error="m", micro=False).terminal(out=out, compact=True)
    return out.getvalue()


async def _totp_enroll(args: argparse.Namespace) -> int:
    username = credentials.username_file_name(args.username)
    password = _password(args)
    request = pb.BeginTotpEnrollmentRequest(username=username, password=password)
    reply = await _auth(
        args, lambda stub: stub.BeginTotpEnrollment(request, timeout=TIMEOUT_S), _login_hint(username)
    )
    if reply is None:
        return 1
    if args.json:
        print(to_json(reply))
        return 0
    lines = ["Scan this with an authenticator app (or enter the URI below); it is shown only now:"]
    if args.qr:
        lines.append(qr_text(reply.otpauth_uri))
    lines += [
        reply.otpauth_uri,
        "",
        f"Then confirm with the code the app shows: tradeguard auth totp confirm {username} CODE",
    ]
    print("\n".join(lines))
    return 0


async def _totp_confirm(args: argparse.Namespace) -> int:
    username = credentials.username_file_name(args.username)
    password = _password(args)
    request = pb.ConfirmTotpEnrollmentRequest(username=username, password=password, code=args.code)
    reply = await _auth(
        args, lambda stub: stub.ConfirmTotpEnrollment(request, timeout=TIMEOUT_S), _login_hint(username)
    )
    if reply is None:
        return 1
    text = [
        f"TOTP enrolled for {username}. Recovery codes: each logs in once in place of a code. Store them offline",
        "now: they are shown only this once.",
        "",
        *(f"  {code}" for code in reply.recovery_codes),
    ]
    return _print_message(args, reply, "\n".join(text))


# --- login sessions ------------------------------------------------------------------------------------------


def _session(
    username: str, workload: str, tokens: pb.TokenPair, auth_target: str | None, now: float
) -> Session:
    return Session(
        username=username,
        workload=workload,
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        access_expires_at=credentials.expiry(now, _seconds(tokens.access_token_expires_in)),
        refresh_expires_at=credentials.expiry(now, _seconds(tokens.refresh_token_expires_in)),
        auth_target=auth_target,
    )


def _tokens_json(reply: Message, path: Path) -> str:
    document = json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    document["credentials_file"] = str(path)
    return json.dumps(document, indent=2)


def _saved_text(session: Session, path: Path, now: float) -> str:
    return (
        f"logged in as {session.username}: the access token lasts {_span(session.access_expires_at - now)} "
        f"(`tradeguard orders --login {session.username}` refreshes it), the login "
        f"{_span(session.refresh_expires_at - now)}; kept in {path} (0600), usable with the certificate of "
        f"workload {session.workload!r} only"
    )


async def _second_factor(args: argparse.Namespace, username: str, stub: Stub, mfa_token: str) -> pb.TokenPair:
    if args.recovery is not None:
        code = args.recovery or _ask("recovery code: ")
        request = pb.VerifyMfaRequest(mfa_token=mfa_token, recovery_code=code)
    else:
        code = args.totp
        if code is None:
            if not sys.stdin.isatty():
                raise CliError(
                    f"{username} logs in with a second factor: add --totp CODE (the authenticator's current "
                    "code) or --recovery CODE"
                )
            code = getpass.getpass("TOTP code: ")
        request = pb.VerifyMfaRequest(mfa_token=mfa_token, totp_code=code)
    return (await stub.VerifyMfa(request, timeout=TIMEOUT_S)).tokens


async def _login(args: argparse.Namespace, clock: Callable[[], float] = time.time) -> int:
    username = credentials.username_file_name(args.username)
    password = _password(args)

    async def flow(stub: Stub) -> pb.TokenPair:
        first = await stub.Login(pb.LoginRequest(username=username, password=password), timeout=TIMEOUT_S)
        if first.HasField("tokens"):
            return first.tokens
        return await _second_factor(args, username, stub, first.mfa_token)

    tokens = await _auth(args, flow, _login_hint(username))
    if tokens is None:
        return 1
    now = clock()
    session = _session(username, args.identity, tokens, args.target, now)
    path = credentials.save_session(args.home, session)
    print(_tokens_json(tokens, path) if args.json else _saved_text(session, path, now))
    return 0


class SessionEnded(CliError):
    """The stored login cannot be refreshed any more: log in again."""


async def refresh_session(
    home: Path, session: Session, target: str, clock: Callable[[], float] = time.time
) -> Session:
    """Exchange the session's refresh token for a new pair at the auth service (as the session's workload: the
    tokens stay bound to its certificate) and store it. The caller holds `credentials.session_lock`."""
    login = f"run `tradeguard auth login {session.username}`"
    if not session.refresh_usable(clock()):
        raise SessionEnded(f"the login of {session.username} has expired: {login}")
    workload = common.workload(home, session.workload)
    async with MeshChannel(target, "auth", workload) as channel:
        try:
            reply = await auth_pb2_grpc.AuthServiceStub(channel).RefreshToken(
                pb.RefreshTokenRequest(refresh_token=session.refresh_token), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            status = rich_status(error)
            if status.code == grpc.StatusCode.UNAUTHENTICATED:
                credentials.delete_session(home, session.username)
                raise SessionEnded(
                    f"the login of {session.username} has ended (logged out, revoked, or its refresh token was "
                    f"used twice): {login}"
                ) from None
            raise CliError(f"refreshing the login of {session.username} failed: {describe(status)}") from None
    fresh = _session(session.username, session.workload, reply.tokens, session.auth_target, clock())
    credentials.save_session(home, fresh)
    return fresh


async def fresh_session(
    home: Path, username: str, identity: str, *, force: bool = False, clock: Callable[[], float] = time.time
) -> Session:
    """The stored login of `username` with an access token good for at least `credentials.REFRESH_MARGIN_S`,
    refreshed first if needed (or if `force`), under the session lock; re-read inside the lock, so concurrent
    commands refresh once. CliError when it cannot be used as `identity` or has ended."""
    with credentials.session_lock(home, username):
        session = credentials.load_session(home, username)
        if session.workload != identity:
            raise CliError(
                f"the login of {session.username} is bound to the certificate of workload {session.workload!r} "
                f"(it logged in as {session.workload}): use --as {session.workload}, or log in again as {identity}"
            )
        if force or not session.access_fresh(clock()):
            target = session.auth_target or common.target("auth")
            session = await refresh_session(home, session, target, clock)
        return session


async def _refresh(args: argparse.Namespace) -> int:
    username = credentials.username_file_name(args.username)
    now = time.time()
    session = await fresh_session(args.home, username, args.identity, force=True)
    path = credentials.session_path(args.home, username)
    if args.json:
        print(
            json.dumps(
                {
                    "username": session.username,
                    "credentials_file": str(path),
                    "access_token_expires_in_s": round(session.access_expires_at - now),
                    "refresh_token_expires_in_s": round(session.refresh_expires_at - now),
                },
                indent=2,
            )
        )
    else:
        print(_saved_text(session, path, now))
    return 0


async def _logout(args: argparse.Namespace) -> int:
    username = credentials.username_file_name(args.username)
    path = credentials.session_path(args.home, username)
    refused: list[RichStatus] = []

    def hint(status: RichStatus) -> str | None:
        if status.code != grpc.StatusCode.UNAUTHENTICATED:
            return "the login is kept: try again"
        refused.append(status)
        return f"the login had already ended (logged out, revoked or expired); {path} is deleted"

    with credentials.session_lock(args.home, username):
        session = credentials.load_session(args.home, username)
        request = pb.LogoutRequest(refresh_token=session.refresh_token)
        reply = await _auth(args, lambda stub: stub.Logout(request, timeout=TIMEOUT_S), hint)
        if reply is not None or refused:
            credentials.delete_session(args.home, username)
    if reply is None:
        return 0 if refused else 1
    print(
        to_json(reply)
        if args.json
        else f"logged out {username}: its tokens are revoked and {path} is deleted"
    )
    return 0


# --- API keys ------------------------------------------------------------------------------------------------


def key_text(key: pb.ApiKey) -> str:
    lines = [
        f"key_id     {key.key_id}",
        f"kind       {KINDS.get(key.kind, 'unknown')} (signs with TG1-{'HMAC-SHA256' if key.kind == pb.API_KEY_KIND_HMAC else 'ED25519'})",
        f"state      {STATES.get(key.state, 'unknown')}",
        f"user       {key.user_id} (account {key.account_id})",
        f"scopes     {' '.join(key.scopes)}",
        f"ip         {' '.join(key.ip_allow_list) or 'any address'}",
        f"tier       {key.tier}",
        f"expires    {_when(key.expire_time)}",
    ]
    if key.HasField("previous_secret_expire_time"):
        lines.append(f"previous   secret still works until {_when(key.previous_secret_expire_time)}")
    if key.label:
        lines.append(f"label      {key.label}")
    return "\n".join(lines)


def _secret_output(args: argparse.Namespace, reply: pb.CreateApiKeyResponse | pb.RotateApiKeyResponse) -> int:
    key, secret = reply.key, reply.secret
    saved = credentials.save_secret(args.home, key.key_id, secret) if args.save and secret else None
    if args.quiet:
        print(key.key_id)
        return 0
    if args.json:
        document = json_format.MessageToDict(
            reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        if saved is not None:
            document["secret"] = ""
            document["secret_file"] = str(saved)
        print(json.dumps(document, indent=2))
        return 0
    lines = [key_text(key)]
    if saved is not None:
        lines.append(f"secret     saved to {saved} (0600); it is shown nowhere else")
    elif secret:
        lines.append(f"secret     {secret}")
        lines.append("           shown only now: the service keeps it encrypted and cannot show it again")
    lines.append(
        f"sign with  tradeguard orders … --key-id {key.key_id} "
        + (
            f"--secret-file {saved or 'FILE'}"
            if key.kind == pb.API_KEY_KIND_HMAC
            else "--ed25519-key-file PRIVATE.pem"
        )
    )
    print("\n".join(lines))
    return 0


def _check_secret_options(args: argparse.Namespace, ed25519: bool) -> None:
    if ed25519 and args.save:
        raise CliError("--save: an Ed25519 key has no secret to save (the private key stays with you)")
    if args.quiet and not ed25519 and not args.save:
        raise CliError("--quiet would hide the secret, which is shown only once: add --save")


async def _key_create(args: argparse.Namespace) -> int:
    public_key = b""
    if args.ed25519_public_key_file:
        public_key = credentials.read_ed25519_public_key(args.ed25519_public_key_file)
    _check_secret_options(args, bool(public_key))
    request = pb.CreateApiKeyRequest(
        user_id=args.user_id,
        kind=pb.API_KEY_KIND_ED25519 if public_key else pb.API_KEY_KIND_HMAC,
        scopes=args.scope,
        ip_allow_list=args.ip or [],
        tier=args.tier,
        ed25519_public_key=public_key,
        label=args.label,
    )
    if args.days is not None:
        if not 0 < args.days <= 3660:
            raise CliError("--days must be a positive number of days")
        request.lifetime.CopyFrom(duration_pb2.Duration(seconds=round(args.days * 86400)))
    reply = await _auth(args, lambda stub: stub.CreateApiKey(request, timeout=TIMEOUT_S))
    return 1 if reply is None else _secret_output(args, reply)


async def _key_rotate(args: argparse.Namespace) -> int:
    public_key = b""
    if args.ed25519_public_key_file:
        public_key = credentials.read_ed25519_public_key(args.ed25519_public_key_file)
    _check_secret_options(args, bool(public_key))
    if args.save:
        credentials.secret_path(args.home, args.key_id)  # a bad key id is refused before the call
    request = pb.RotateApiKeyRequest(
        key_id=args.key_id,
        grace_period=duration_pb2.Duration(seconds=round(args.grace_hours * 3600)),
        ed25519_public_key=public_key,
    )
    reply = await _auth(args, lambda stub: stub.RotateApiKey(request, timeout=TIMEOUT_S))
    return 1 if reply is None else _secret_output(args, reply)


async def _key_revoke(args: argparse.Namespace) -> int:
    request = pb.RevokeApiKeyRequest(key_id=args.key_id)
    reply = await _auth(args, lambda stub: stub.RevokeApiKey(request, timeout=TIMEOUT_S))
    return 1 if reply is None else _print_message(args, reply, f"revoked {args.key_id}")


async def _key_list(args: argparse.Namespace) -> int:
    request = pb.ListApiKeysRequest(user_id=args.user_id)
    reply = await _auth(args, lambda stub: stub.ListApiKeys(request, timeout=TIMEOUT_S))
    if reply is None:
        return 1

    def table() -> str:
        if not reply.keys:
            return f"{args.user_id} has no API keys"
        rows = [("KEY_ID", "KIND", "STATE", "SCOPES", "IP", "TIER", "EXPIRES")]
        rows += [
            (
                key.key_id,
                KINDS.get(key.kind, "?"),
                STATES.get(key.state, "?"),
                ",".join(key.scopes),
                ",".join(key.ip_allow_list) or "any",
                key.tier,
                _when(key.expire_time),
            )
            for key in reply.keys
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        )

    return _print_message(args, reply, table)


# --- revocation and public keys ------------------------------------------------------------------------------


async def _revoke(args: argparse.Namespace) -> int:
    if args.jti:
        request, what = pb.RevokeTokensRequest(jti=args.jti), f"the token {args.jti}"
    elif args.family:
        request, what = (
            pb.RevokeTokensRequest(family_id=args.family),
            f"every token of the login {args.family}",
        )
    else:
        request, what = pb.RevokeTokensRequest(user_id=args.user), f"every token of {args.user} issued so far"
    reply = await _auth(args, lambda stub: stub.RevokeTokens(request, timeout=TIMEOUT_S))
    return 1 if reply is None else _print_message(args, reply, f"revoked {what}")


async def _jwks(args: argparse.Namespace) -> int:
    reply = await _auth(args, lambda stub: stub.GetJwks(pb.GetJwksRequest(), timeout=TIMEOUT_S))
    if reply is None:
        return 1
    return _print_message(args, reply, lambda: json.dumps(json.loads(reply.jwks_json), indent=2))
