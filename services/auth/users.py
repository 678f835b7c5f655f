"""Users: creation and roles (operators), TOTP enrolment, and login with a password then a second factor.

Login, step by step (`login`, then `verify_mfa` when a second factor is due):
1. The username is NFKC-normalised and looked up. Whatever the answer, the lockout is consulted and one Argon2id
   verification is run (against the user's hash, or the constant dummy hash for a user nobody has), so an unknown
   user, a wrong password and a locked account take the same time and raise the same `Unauthenticated` (its
   `cause`, for the log, tells them apart; the caller sees one fixed message).
2. A user needs a second factor if they enrolled TOTP or if one of their roles holds a permission that requires
   it (`Rbac.mfa_required`). With none due, tokens are issued (amr ["pwd"]). With one due, `login` returns an
   opaque `mfa_token` (32 random bytes, base64url) whose SHA-256 is kept in the hot state for the settings'
   `mfa_token_ttl_s` (5 minutes); a user who needs one but has not enrolled gets no tokens:
   `FailedPrecondition` MFA_ENROLLMENT_REQUIRED, only after a correct password (so it reveals nothing to anyone
   else); they enrol with `begin_totp` / `confirm_totp`, which take the password.
3. `verify_mfa` takes the challenge (once: a wrong code means logging in again, so each guess costs a password
   check) and checks a TOTP code or a recovery code. A TOTP code is accepted only through
   `HotState.advance_totp_step`: each code once, never an older one after a newer, across replicas. Tokens carry
   amr ["pwd", "otp"].
Every failure is counted and logged by the lockout (`services/auth/lockout.py`) with its cause; a full success
clears the (user, source) pair's failures.

Secrets: passwords are never kept or logged (only their Argon2id hash is stored); TOTP seeds are sealed by the key
vault with the user id as associated data; recovery codes are stored as SHA-256 (`services/auth/recovery.py`);
the mfa_token is kept only as its SHA-256.

Record updates are compare-and-swap on the user's version (re-read and retried on a conflict). The user's
version is also the lockout's pair epoch: `unlock` bumps it, which releases every (user, source) lock at once.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Final, NoReturn, Protocol

from services.auth import recovery
from services.auth.hot import HotState
from services.auth.lockout import (
    Lock,
    Lockout,
    LockoutPolicy,
    LockoutSettingsView,
    account_principal,
    unknown_account,
)
from services.auth.model import TokenPair, User
from services.auth.passwords import Passwords, check_password_policy
from services.auth.ports import Sealer, TokenIssuer
from services.auth.rbac import Rbac
from services.auth.store import AuthStore
from services.auth.totp import Totp, new_seed
from tradeguard.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from tradeguard.observability.logging import get_logger

__all__ = ["LoginResult", "UserService", "UserSettings", "normalize_username"]

Clock = Callable[[], int]  # microseconds since the epoch
Random = Callable[[int], bytes]

_log = get_logger("auth.users")
_USERNAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{2,63}")
_ACCOUNT_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_USER_ID: Final = re.compile(r"usr_[0-9a-z]{26}")
_MFA_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_CROCKFORD: Final = "0123456789abcdefghjkmnpqrstvwxyz"
MFA_TOKEN_BYTES: Final = 32
CAS_ATTEMPTS: Final = 5


class UserSettings(Protocol):
    """What the user core reads of the service's settings (services/auth/settings.py `Settings`)."""

    @property
    def mfa_token_ttl_s(self) -> int: ...
    @property
    def totp_issuer(self) -> str: ...
    @property
    def lockout(self) -> LockoutSettingsView: ...


@dataclass(frozen=True, slots=True)
class LoginResult:
    """Tokens when no second factor is due; otherwise the mfa_token to present to `verify_mfa`."""

    tokens: TokenPair | None = field(default=None, repr=False)
    mfa_token: str | None = field(default=None, repr=False)
    mfa_expires_in_us: int = 0


def normalize_username(username: str) -> str | None:
    """The NFKC normalisation of `username` if it is a valid one (3-64 of letters, digits and `._@+-`, starting
    with a letter or digit), else None."""
    if len(username) > 256:
        return None
    normalized = unicodedata.normalize("NFKC", username)
    return normalized if _USERNAME.fullmatch(normalized) else None


def _challenge_hash(mfa_token: str) -> str:
    return hashlib.sha256(mfa_token.encode("ascii")).hexdigest()


class UserService:
    """The user core: pure (no grpc, no database driver); the store, hot state, key vault and token issuer are
    handed in."""

    def __init__(  # noqa: PLR0917 - the service's dependencies, in the documented order
        self,
        store: AuthStore,
        hot: HotState,
        sealer: Sealer,
        tokens: TokenIssuer,
        rbac: Rbac,
        clock: Clock,
        random: Random,
        settings: UserSettings,
        *,
        passwords: Passwords | None = None,
    ) -> None:
        self._store = store
        self._hot = hot
        self._sealer = sealer
        self._tokens = tokens
        self._rbac = rbac
        self._clock = clock
        self._random = random
        self._mfa_ttl_us = settings.mfa_token_ttl_s * 1_000_000
        self._totp = Totp(issuer=settings.totp_issuer)
        self._lockout = Lockout(hot, clock, LockoutPolicy.from_settings(settings.lockout))
        self._passwords = passwords or Passwords()

    @property
    def lockout(self) -> Lockout:
        return self._lockout

    # --- operators -----------------------------------------------------------------------------------------

    async def create_user(self, username: str, password: str, account_id: str, roles: Iterable[str]) -> User:
        """A new user; InvalidArgument naming every bad field (username, password, account_id, roles[i]);
        AlreadyExists (USERNAME_TAKEN) when the username is taken."""
        await self._rbac.refresh_if_stale()
        violations: list[FieldViolation] = []
        name = normalize_username(username)
        if name is None:
            violations.append(
                FieldViolation(
                    "username", "must be 3 to 64 letters, digits or ._@+- starting with a letter or digit"
                )
            )
        try:
            check_password_policy(password, name or username, "password")
        except InvalidArgument as error:
            violations.extend(error.violations)
        if not _ACCOUNT_ID.fullmatch(account_id):
            violations.append(
                FieldViolation(
                    "account_id", "must be 1 to 64 letters, digits or ._:- starting with a letter or digit"
                )
            )
        checked_roles: tuple[str, ...] = ()
        try:
            checked_roles = self._rbac.check_roles(roles, "roles")
        except InvalidArgument as error:
            violations.extend(error.violations)
        if violations or name is None:
            raise InvalidArgument(violations)
        user = User(
            user_id=self._new_user_id(),
            username=name,
            account_id=account_id,
            roles=checked_roles,
            password_hash=await self._passwords.hash(password),
            create_time_us=self._clock(),
        )
        if not await self._store.insert_user(user):
            raise AlreadyExists(f"a user named {name!r} exists", reason="USERNAME_TAKEN")
        _log.info("auth.user_created", user_id=user.user_id, account_id=account_id, roles=list(checked_roles))
        return user

    async def get_user(self, user_id: str) -> User:
        """The user; InvalidArgument (user_id) when malformed, NotFound (USER_NOT_FOUND) when nobody has it."""
        if not _USER_ID.fullmatch(user_id):
            raise InvalidArgument.field("user_id", "must be usr_ followed by 26 lowercase letters or digits")
        user = await self._store.get_user(user_id)
        if user is None:
            raise NotFound("no such user", reason="USER_NOT_FOUND")
        return user

    async def set_roles(self, user_id: str, roles: Iterable[str]) -> User:
        """Replace the user's roles and revoke every token they hold (new tokens carry the new permissions)."""
        await self._rbac.refresh_if_stale()
        checked = self._rbac.check_roles(roles, "roles")
        user = await self._update(user_id, lambda current: replace(current, roles=checked))
        await self._tokens.revoke_user(user_id)
        _log.info("auth.roles_set", user_id=user_id, roles=list(checked), tokens_revoked=True)
        return user

    async def unlock(self, user_id: str) -> None:
        """Lift the user's lockout: their own lock and failures, and every (user, source) pair lock (by moving
        the pair epoch, the user's version)."""
        await self._update(user_id, lambda current: current)
        await self._lockout.unlock_principal(account_principal(user_id), cause="operator unlock")

    async def locked(self, user: User) -> bool:
        """Whether the user is locked out from every source (their own lock, not a pair's)."""
        principal = account_principal(user.user_id)
        return await self._hot.locked_until(principal, self._clock()) is not None

    async def mfa_required(self, user: User) -> bool:
        """Whether the user must pass a second factor to get tokens."""
        await self._rbac.refresh_if_stale()
        return user.totp_seed is not None or self._rbac.mfa_required(user.roles)

    # --- TOTP enrolment --------------------------------------------------------------------------------------

    async def begin_totp(self, username: str, password: str, source_ip: str) -> str:
        """After the password: a new seed, sealed (associated data: the user id) and kept pending; the
        otpauth:// URI holding it (show it once). A new call replaces a pending seed. FailedPrecondition
        MFA_ALREADY_ENROLLED once TOTP is confirmed: a password alone never replaces a second factor."""
        user = await self._authenticate_password(username, password, source_ip)
        seed = new_seed(self._random)
        sealed = await self._sealer.seal(seed, user.user_id.encode("utf-8"))

        def pending(current: User) -> User:
            if current.totp_seed is not None:
                raise FailedPrecondition("TOTP is already enrolled", reason="MFA_ALREADY_ENROLLED")
            return replace(current, totp_pending_seed=sealed)

        await self._update(user.user_id, pending)
        _log.info("auth.totp_enrolment_started", user_id=user.user_id)
        return self._totp.uri(seed, user.username)

    async def confirm_totp(self, username: str, password: str, code: str, source_ip: str) -> list[str]:
        """After the password and a first code of the pending seed: TOTP confirmed, and `recovery.COUNT` fresh
        recovery codes returned (shown once; their hashes replace any earlier ones)."""
        user = await self._authenticate_password(username, password, source_ip)
        if user.totp_seed is not None:
            raise FailedPrecondition("TOTP is already enrolled", reason="MFA_ALREADY_ENROLLED")
        if user.totp_pending_seed is None:
            raise FailedPrecondition(
                "no TOTP enrolment in progress: begin one first", reason="MFA_ENROLLMENT_NOT_STARTED"
            )
        seed = await self._sealer.open(user.totp_pending_seed, user.user_id.encode("utf-8"))
        await self._accept_totp(user, seed, code, source_ip, "at enrolment")
        codes = recovery.generate_codes(self._random)
        hashes = [recovery.stored_hash(code) for code in codes]
        confirmed = replace(
            user, totp_seed=user.totp_pending_seed, totp_pending_seed=None, version=user.version + 1
        )
        if not await self._store.confirm_totp(confirmed, user.version, hashes):
            raise FailedPrecondition(
                "the enrolment changed while it was confirmed: begin again", reason="MFA_ENROLLMENT_CHANGED"
            )
        await self._lockout.record_success(account_principal(user.user_id), confirmed.version, source_ip)
        _log.info("auth.totp_enrolled", user_id=user.user_id, recovery_codes=len(codes))
        return codes

    # --- login ------------------------------------------------------------------------------------------------

    async def login(
        self, username: str, password: str, source_ip: str, cnf_thumbprint: str | None = None
    ) -> LoginResult:
        """Password login: tokens (amr ["pwd"]) when no second factor is due, else an mfa_token."""
        user = await self._authenticate_password(username, password, source_ip)
        await self._rbac.refresh_if_stale()
        if user.totp_seed is None and not self._rbac.mfa_required(user.roles):
            await self._lockout.record_success(account_principal(user.user_id), user.version, source_ip)
            tokens = await self._issue(user, ("pwd",), cnf_thumbprint)
            _log.info("auth.login", user_id=user.user_id, amr=["pwd"], source=source_ip)
            return LoginResult(tokens=tokens)
        if user.totp_seed is None:
            _log.warning("auth.mfa_enrolment_required", user_id=user.user_id, source=source_ip)
            raise FailedPrecondition(
                "a second factor is required: enrol TOTP first", reason="MFA_ENROLLMENT_REQUIRED"
            )
        mfa_token = base64.urlsafe_b64encode(self._random(MFA_TOKEN_BYTES)).rstrip(b"=").decode("ascii")
        await self._hot.put_challenge(_challenge_hash(mfa_token), user.user_id, self._mfa_ttl_us)
        _log.info("auth.mfa_challenge", user_id=user.user_id, source=source_ip)
        return LoginResult(mfa_token=mfa_token, mfa_expires_in_us=self._mfa_ttl_us)

    async def verify_mfa(
        self,
        mfa_token: str,
        totp_code: str | None,
        recovery_code: str | None,
        source_ip: str,
        cnf_thumbprint: str | None = None,
    ) -> TokenPair:
        """The second factor of a login: exactly one of a TOTP code or a recovery code (InvalidArgument
        `factor` otherwise); tokens with amr ["pwd", "otp"]. The mfa_token is spent by this call whatever
        its outcome."""
        if (totp_code is None) == (recovery_code is None):
            raise InvalidArgument.field("factor", "give exactly one of totp_code and recovery_code")
        user_id = None
        if _MFA_TOKEN.fullmatch(mfa_token):
            user_id = await self._hot.take_challenge(_challenge_hash(mfa_token))
        if user_id is None:
            await self._lockout.record_source_failure(source_ip, "unknown, expired or spent mfa token")
            raise Unauthenticated("unknown, expired or spent mfa token")
        user = await self._store.get_user(user_id)
        if user is None or user.totp_seed is None:
            await self._lockout.record_source_failure(
                source_ip, "mfa token of a user deleted or not enrolled"
            )
            raise Unauthenticated("mfa token of a user deleted or not enrolled")
        principal = account_principal(user.user_id)
        lock = await self._lockout.locked(principal, user.version, source_ip)
        if lock is not None:
            await self._fail(user, source_ip, f"second factor while locked ({lock.kind})", lock, count=False)
        if totp_code is not None:
            seed = await self._sealer.open(user.totp_seed, user.user_id.encode("utf-8"))
            await self._accept_totp(user, seed, totp_code, source_ip, "at login")
            factor = "totp"
        else:
            assert recovery_code is not None
            code_hash = recovery.hash_code(recovery_code)
            if code_hash is None or not await self._store.use_recovery_code(
                user.user_id, code_hash, self._clock()
            ):
                await self._fail(user, source_ip, "wrong or spent recovery code")
            remaining = await self._store.unused_recovery_codes(user.user_id)
            _log.warning("auth.recovery_code_used", user_id=user.user_id, remaining=remaining)
            factor = "recovery_code"
        await self._lockout.record_success(principal, user.version, source_ip)
        tokens = await self._issue(user, ("pwd", "otp"), cnf_thumbprint)
        _log.info("auth.login", user_id=user.user_id, amr=["pwd", "otp"], factor=factor, source=source_ip)
        return tokens

    # --- helpers ----------------------------------------------------------------------------------------------

    async def _authenticate_password(self, username: str, password: str, source_ip: str) -> User:
        """The user whose password this is, not locked out; else Unauthenticated (counted and logged). One
        Argon2id verification runs in every case."""
        name = normalize_username(username)
        user = await self._store.get_user_by_name(name) if name is not None else None
        if user is not None:
            principal, epoch = account_principal(user.user_id), user.version
        else:
            principal, epoch = account_principal(unknown_account(name or username[:256])), 0
        lock = await self._lockout.locked(principal, epoch, source_ip)
        matches = await self._passwords.verify(user.password_hash if user is not None else None, password)
        if user is None:
            cause = "unknown user" if name is not None else "malformed username"
            await self._lockout.record_failure(principal, epoch, source_ip, cause, lock=lock)
            raise Unauthenticated(cause)
        if not matches:
            await self._fail(user, source_ip, "wrong password", lock)
        if lock is not None:
            await self._fail(user, source_ip, f"locked ({lock.kind})", lock, count=False)
        if self._passwords.needs_rehash(user.password_hash):
            user = await self._rehash(user, password)
        return user

    async def _fail(
        self, user: User, source_ip: str, cause: str, lock: Lock | None = None, *, count: bool = True
    ) -> NoReturn:
        await self._lockout.record_failure(
            account_principal(user.user_id),
            user.version,
            source_ip,
            cause,
            lock=lock,
            count=count,
            user_id=user.user_id,
        )
        raise Unauthenticated(cause)

    async def _accept_totp(self, user: User, seed: bytes, code: str, source_ip: str, when: str) -> None:
        step = self._totp.verify(seed, code, self._clock())
        if step is None:
            await self._fail(user, source_ip, f"wrong totp code {when}")
        if not await self._hot.advance_totp_step(user.user_id, step, self._totp.replay_ttl_us):
            await self._fail(user, source_ip, f"reused or outdated totp code {when}")

    async def _rehash(self, user: User, password: str) -> User:
        """The stored hash remade with today's parameters (best effort: a concurrent update wins)."""
        rehashed = replace(user, password_hash=await self._passwords.hash(password), version=user.version + 1)
        if await self._store.update_user(rehashed, user.version):
            _log.info("auth.password_rehashed", user_id=user.user_id)
            return rehashed
        return user

    async def _issue(self, user: User, amr: tuple[str, ...], cnf_thumbprint: str | None) -> TokenPair:
        return await self._tokens.issue(user, self._rbac.permissions_of(user.roles), amr, cnf_thumbprint)

    async def _update(self, user_id: str, change: Callable[[User], User]) -> User:
        """Apply `change` to the current record and store it with the next version (compare-and-swap, re-read
        and retried on a conflict)."""
        for _ in range(CAS_ATTEMPTS):
            current = await self.get_user(user_id)
            updated = replace(change(current), version=current.version + 1)
            if await self._store.update_user(updated, current.version):
                return updated
        raise Unavailable("the user is being changed concurrently: retry", reason="CONCURRENT_UPDATE")

    def _new_user_id(self) -> str:
        number = int.from_bytes(self._random(16), "big")  # 128 bits in 26 base32 characters
        return "usr_" + "".join(_CROCKFORD[(number >> shift) & 31] for shift in range(125, -1, -5))
