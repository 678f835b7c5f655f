"""The one reader of settings from the environment: types and ranges checked, the variable named in every error.

A service reads its settings once, at start-up, through an `Env` with its one prefix (`TRADEGUARD_<NAME>_`; see
`tradeguard.registry.env_prefix`); the settings every service shares (`TRADEGUARD_HOME`, `TRADEGUARD_HOST`,
`TRADEGUARD_OTLP_ENDPOINT`) are read through `Env("TRADEGUARD")`. An empty variable counts as unset.

Secrets follow the `_FILE` convention: `<VAR>_FILE` names a regular file owned by this user and readable by it
only (preferred: the value never sits in the process environment); `<VAR>` itself is accepted but weaker (it
stays readable in /proc/<pid>/environ), and is removed from the environment once read so that no child process
inherits it. Both at once is an error. A secret's value never appears in an error message.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Final, TypeVar

__all__ = ["Env", "SettingsError", "read_secret_file"]

E = TypeVar("E", bound=str)

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_WORKLOAD: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # a DNS label, as SPIFFE IDs here use
_FALSE: Final = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the variable and says what is expected."""


def read_secret_file(path: Path, variable: str) -> str:
    """The secret in `path` (without its trailing newline); only from a regular file of ours, owner-only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise SettingsError(f"{variable}: cannot open {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise SettingsError(f"{variable}: {path} is not a regular file")
        if info.st_uid != os.getuid():
            raise SettingsError(
                f"{variable}: {path} must be owned by this process's user (uid {os.getuid()})"
            )
        if mode & 0o077:
            raise SettingsError(
                f"{variable}: {path} is readable by others (mode {mode:04o}); refusing it: chmod 600 {path}"
            )
        try:
            text = file.read().decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise SettingsError(f"{variable}: {path} is not UTF-8 text") from None
    if not text:
        raise SettingsError(f"{variable}: {path} is empty")
    return text


class Env:
    """Typed reads of `<prefix>_<KEY>` variables. Every method takes the KEY (without the prefix) and a default
    returned when the variable is unset or empty; a set but invalid value raises `SettingsError`."""

    def __init__(self, prefix: str, environ: MutableMapping[str, str] | None = None) -> None:
        self.prefix = prefix.rstrip("_")
        self.environ: MutableMapping[str, str] = os.environ if environ is None else environ

    def name(self, key: str) -> str:
        return f"{self.prefix}_{key}"

    def raw(self, key: str) -> str | None:
        value = self.environ.get(self.name(key))
        return value if value else None

    def text(self, key: str, default: str) -> str:
        value = self.raw(key)
        return default if value is None else value

    def optional_text(self, key: str) -> str | None:
        return self.raw(key)

    def integer(self, key: str, default: int, *, low: int | None = None, high: int | None = None) -> int:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise SettingsError(
                f"{self.name(key)} must be an integer{_range(low, high)}, got {raw!r}"
            ) from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise SettingsError(f"{self.name(key)} must be an integer{_range(low, high)}, got {value}")
        return value

    def number(
        self, key: str, default: float, *, low: float | None = None, high: float | None = None
    ) -> float:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(
                f"{self.name(key)} must be a number{_range(low, high)}, got {raw!r}"
            ) from None
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise SettingsError(f"{self.name(key)} must be a finite number{_range(low, high)}, got {raw!r}")
        return value

    def port(self, key: str, default: int) -> int:
        return self.integer(key, default, low=0, high=65535)

    def optional_port(self, key: str) -> int | None:
        return None if self.raw(key) is None else self.port(key, 0)

    def flag(self, key: str, default: bool) -> bool:
        raw = self.raw(key)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{self.name(key)} must be true or false (1/0, yes/no, on/off), got {raw!r}")

    def choice(self, key: str, default: E, choices: Iterable[E]) -> E:
        allowed = tuple(choices)
        raw = self.raw(key)
        if raw is None:
            return default
        for option in allowed:
            if raw == option:
                return option
        raise SettingsError(f"{self.name(key)} must be one of {', '.join(allowed)}, got {raw!r}")

    def target(self, key: str, default: str) -> str:
        """A `host:port` to connect to (a port from 1 to 65535, a host of printable characters without spaces)."""
        value = self.text(key, default).strip()
        host, sep, port = value.rpartition(":")
        if (
            not sep
            or not host
            or not port.isdigit()
            or not 1 <= int(port) <= 65535
            or not host.isprintable()
            or any(c.isspace() for c in host)
        ):
            raise SettingsError(
                f"{self.name(key)} must be host:port (for example 127.0.0.1:50054), got {value!r}"
            )
        return value

    def workloads(self, key: str) -> frozenset[str]:
        """Workload names (the `<name>` of `spiffe://<trust domain>/svc/<name>`), comma-separated; none by default."""
        names = frozenset(part.strip() for part in self.text(key, "").split(",") if part.strip())
        for name in names:
            if _WORKLOAD.fullmatch(name) is None:
                raise SettingsError(
                    f"{self.name(key)} must be workload names separated by commas, got {name!r}"
                )
        return names

    def path(self, key: str, default: Path) -> Path:
        raw = self.raw(key)
        return default if raw is None else Path(raw)

    def optional_path(self, key: str) -> Path | None:
        raw = self.raw(key)
        return None if raw is None else Path(raw)

    def secret(self, key: str) -> str | None:
        """`<KEY>_FILE` (preferred) or `<KEY>`; the plain variable is removed from the environment once read,
        whatever the outcome, so that child processes never inherit it."""
        try:
            path = self.raw(key + "_FILE")
            value = self.raw(key)
            if path is not None:
                if value is not None:
                    raise SettingsError(f"set {self.name(key)}_FILE or {self.name(key)}, not both")
                return read_secret_file(Path(path), self.name(key) + "_FILE")
            return value
        finally:
            self.environ.pop(self.name(key), None)


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" between {_show(low)} and {_show(high)}"
    if low is not None:
        return f" of at least {_show(low)}"
    if high is not None:
        return f" of at most {_show(high)}"
    return ""


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"
