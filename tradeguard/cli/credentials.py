"""What the command line keeps and reads for a person: login sessions, API key secrets, passwords and key files.

Kept under `$TRADEGUARD_HOME/credentials/` (a directory made 0700, tightened to 0700 if it was looser):
- `<username>.json`: a login session (the access and refresh tokens, when each expires, the workload certificate
  the tokens are bound to), written by `tradeguard auth login|refresh`, removed by `logout`;
- `<key_id>.secret`: an HMAC API key's secret, exactly the secret with no line break, written by `tradeguard auth
  key create|rotate --save`.
Each file is written 0600 and atomically (tradeguard.files.atomic_write): a reader sees the old file or the new.
A session is refreshed under an exclusive lock (`<username>.lock`, flock) and re-read inside it, so two commands
that find the access token expired at once spend the refresh token once (a second use of a spent refresh token
would revoke the whole login: RFC 9700 reuse detection).

Read from files the user names (never from the command line, where `ps` and the shell history show them): a
password (the first line), an HMAC secret, an Ed25519 private key (unencrypted PEM PKCS#8, as
`openssl genpkey -algorithm ed25519` writes it) or public key (PEM, `openssl pkey -pubout`). `-` reads standard
input. Every problem is a `CliError` naming the file and what to do, never its content.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from tradeguard import signing
from tradeguard.cli.common import CliError
from tradeguard.files import atomic_write

__all__ = [
    "REFRESH_MARGIN_S",
    "Session",
    "credentials_dir",
    "delete_session",
    "load_session",
    "read_ed25519_private_key",
    "read_ed25519_public_key",
    "read_password_file",
    "read_secret_file",
    "save_secret",
    "save_session",
    "secret_path",
    "session_lock",
    "session_path",
    "username_file_name",
]

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
REFRESH_MARGIN_S: Final = 30.0  # an access token with less left than this is refreshed before a call
MAX_FILE_BYTES: Final = 64 * 1024
_USERNAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{2,63}")  # the auth service's rule (services/auth)
_SESSION_VERSION: Final = 1


def credentials_dir(home: Path) -> Path:
    """`home/credentials`, created 0700 (its parents as needed); an existing one readable by others is
    tightened to 0700."""
    path = home / "credentials"
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def username_file_name(username: str) -> str:
    """The username as the auth service keeps it (NFKC) if it is a valid one, so it is a safe file name;
    CliError otherwise."""
    normalized = unicodedata.normalize("NFKC", username)
    if _USERNAME.fullmatch(normalized) is None:
        raise CliError(
            f"{username!r} is not a username (3-64 letters, digits and ._@+-, starting with a letter or digit)"
        )
    return normalized


# --- files the user names ----------------------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
            mode = os.fstat(handle.fileno()).st_mode
    except OSError as error:
        raise CliError(f"cannot read the {what} file {path}: {error.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CliError(f"the {what} file {path} is larger than {MAX_FILE_BYTES} bytes")
    if what != "public key" and stat.S_IMODE(mode) & 0o077:
        print(
            f"tradeguard: warning: the {what} file {path} is readable by others: chmod 600 {path}",
            file=sys.stderr,
        )
    return data


def read_password_file(path: str) -> str:
    """The first line of the file (without its line ending); CliError when it is empty."""
    text = _read(path, "password").decode("utf-8", "replace")
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise CliError(f"the password file {path} is empty (the password is its first line)")
    return lines[0]


def read_secret_file(path: str) -> str:
    """An HMAC API key secret (`tgs_…`), with or without a final line break; CliError when the file holds
    anything else."""
    text = _read(path, "secret").decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")
    if not signing.hmac_secret_valid(text):
        raise CliError(
            f"the secret file {path} does not hold an API key secret (tgs_ and 43 letters or digits, as "
            "`tradeguard auth key create --save` writes it)"
        )
    return text


def read_ed25519_private_key(path: str) -> bytes:
    """The 32-byte seed of the Ed25519 private key in the file (unencrypted PEM PKCS#8)."""
    try:
        return signing.ed25519_seed_from_pem(_read(path, "private key"))
    except ValueError as error:
        raise CliError(
            f"the key file {path}: {error} (make one with `openssl genpkey -algorithm ed25519 -out {path}`)"
        ) from None


def read_ed25519_public_key(path: str) -> bytes:
    """The raw 32-byte Ed25519 public key in the file (PEM); a private key file is refused (it never leaves the
    client)."""
    data = _read(path, "public key")
    try:
        return signing.ed25519_public_key_from_pem(data)
    except ValueError as error:
        raise CliError(
            f"the public key file {path}: {error} (from a private key: `openssl pkey -in KEY.pem -pubout "
            "-out KEY.pub`)"
        ) from None


# --- API key secrets -----------------------------------------------------------------------------------------


def secret_path(home: Path, key_id: str) -> Path:
    """Where `--save` keeps the secret of `key_id` (checked, so it is a safe file name)."""
    if not signing.key_id_valid(key_id):
        raise CliError(f"{key_id!r} is not an API key id (tgk_… with a valid checksum)")
    return home / "credentials" / f"{key_id}.secret"


def save_secret(home: Path, key_id: str, secret: str) -> Path:
    path = secret_path(home, key_id)
    credentials_dir(home)
    atomic_write(path, secret.encode("utf-8"), FILE_MODE)
    return path


# --- login sessions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """A login's token pair as stored, with absolute expiry times (Unix seconds) and the workload whose
    certificate the tokens are bound to (RFC 8705: they only work presented with that certificate)."""

    username: str
    workload: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_expires_at: float
    refresh_expires_at: float
    auth_target: str | None = None  # the auth service the login went to, when given explicitly

    def access_fresh(self, now: float) -> bool:
        return now + REFRESH_MARGIN_S < self.access_expires_at

    def refresh_usable(self, now: float) -> bool:
        return now < self.refresh_expires_at


def session_path(home: Path, username: str) -> Path:
    return home / "credentials" / f"{username_file_name(username)}.json"


def save_session(home: Path, session: Session) -> Path:
    path = session_path(home, session.username)
    credentials_dir(home)
    document = {"version": _SESSION_VERSION, **asdict(session)}
    atomic_write(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"), FILE_MODE)
    return path


def load_session(home: Path, username: str) -> Session:
    """The stored session of `username`; CliError saying to log in when there is none or it is unreadable."""
    path = session_path(home, username)
    login = f"`tradeguard auth login {username_file_name(username)}`"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.pop("version", None) != _SESSION_VERSION:
            raise ValueError("unknown version")
        session = Session(**document)
        if not (isinstance(session.access_token, str) and isinstance(session.refresh_token, str)):
            raise TypeError("tokens")
        float(session.access_expires_at)
        float(session.refresh_expires_at)
    except FileNotFoundError:
        raise CliError(f"{username!r} is not logged in here (no {path}): run {login}") from None
    except (OSError, ValueError, TypeError):
        raise CliError(f"the login file {path} is unreadable: run {login} again") from None
    return session


def delete_session(home: Path, username: str) -> bool:
    """Remove the stored session; False when there was none."""
    try:
        session_path(home, username).unlink()
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def session_lock(home: Path, username: str) -> Iterator[None]:
    """An exclusive lock on `username`'s session across processes (held while a refresh is in flight)."""
    lock = home / "credentials" / f"{username_file_name(username)}.lock"
    credentials_dir(home)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def expiry(now: float, seconds: float) -> float:
    """An absolute expiry `seconds` from `now` (the service gives lifetimes, not instants)."""
    return now + max(0.0, seconds)


Clock = Callable[[], float]
WALL_CLOCK: Final[Clock] = time.time
