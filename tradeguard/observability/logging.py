"""structlog configuration: one JSON object per line (or a console rendering on a TTY), secrets redacted.

Pipeline: context variables (request id, method), level, ISO-8601 UTC timestamp, exceptions rendered to text,
*then* redaction (so that exception messages and tracebacks are redacted too), then the renderer.

The per-RPC line has a fast path (:func:`json_lines`): while the configuration is the JSON one this module
installed, the telemetry interceptor renders its line through :class:`JsonLines` — the same steps (context
variables, level filter, level, timestamp, redaction, JSON, one write) without structlog's bound-logger
machinery, which measured about as much per RPC as everything else the line costs. Lines with an exception,
a console rendering, or a configuration someone else installed (``structlog.testing.capture_logs``) go
through structlog as before.
"""

from __future__ import annotations

import json as _json
import logging as _stdlib_logging
import sys
import threading
import time
from typing import Any, Final, TextIO, cast

import structlog
from structlog import _config as _structlog_config
from structlog._config import BoundLoggerLazyProxy  # public as structlog.get_logger()'s return type
from structlog.contextvars import _CONTEXT_VARS as _STRUCTLOG_VARS  # every var bind_contextvars ever made
from structlog.typing import FilteringBoundLogger, Processor

from tradeguard.observability.redact import redact_processor

__all__ = [
    "JsonLines",
    "configuration_generation",
    "configure_logging",
    "get_logger",
    "json_lines",
    "json_string",
]

# One encoder, as json.dumps(default=...) would build per call; the same output as structlog's JSONRenderer.
_ENCODER: Final = _json.JSONEncoder(default=repr)
_encode_string: Final = _json.encoder.encode_basestring_ascii
_LEVEL_NUMBERS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# The context variables the telemetry interceptor binds (structlog's names for request_id and method): when they
# are the only ones that exist and the caller's trusted fields carry both, merging the context adds nothing.
_KIT_VARS: Final = frozenset({"structlog_request_id", "structlog_method"})
_KIT_FIELDS: Final = frozenset({"request_id", "method"})


class _VarsSeen:
    """How many context variables structlog had when last looked at, and whether they were only the kit's:
    structlog only ever adds to its dict of them, so the same count means the same variables and the subset
    test runs once per new variable instead of once per line."""

    count = -1
    only_kit = False


def _only_kit_vars() -> bool:
    """Whether every structlog context variable that exists is one of the two the telemetry layer binds."""
    count = len(_STRUCTLOG_VARS)
    if count != _VarsSeen.count:
        _VarsSeen.only_kit = _STRUCTLOG_VARS.keys() <= _KIT_VARS
        _VarsSeen.count = count
    return _VarsSeen.only_kit


class JsonLines:
    """Writes one event as one JSON line, as the pipeline `configure_logging(json=True)` installs would
    (context variables under the event's own fields, level, ISO-8601 UTC timestamp with microseconds,
    redaction, JSON), for events without exception info. Thread-safe; one write and one flush per line."""

    def __init__(self, stream: TextIO, min_level: int) -> None:
        self._stream = stream
        self._min_level = min_level
        self._lock = threading.Lock()
        self._second = -1
        self._prefix = ""

    def enabled(self, level: str) -> bool:
        return _LEVEL_NUMBERS[level] >= self._min_level

    @staticmethod
    def context_free() -> bool:
        """Whether no structlog context variable exists beyond the request id and method the telemetry layer
        binds: a line of the kit's own fields then takes nothing from the context."""
        return _only_kit_vars()

    def _timestamp(self) -> str:
        now = time.time_ns()  # integers only: no float rounding per line
        second = now // 1_000_000_000
        if second != self._second:  # the date and time to the second, formatted once per second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{now // 1000 % 1_000_000:06d}Z"

    def write(
        self,
        level: str,
        event: dict[str, Any],
        trusted_json: str = "",
        trusted_keys: frozenset[str] = frozenset(),
    ) -> None:
        """Write `event` (no exc_info) at `level` ("info", "warning", ...), filtered by the configured level.
        `event` is consumed (redacted in place).

        `trusted_json`: fields the kit rendered itself, as the inside of a JSON object (``"code": "OK", ...``),
        written as they are — only for values the kit produced (never caller data) and rendered with
        :func:`json_string`; `trusted_keys` are their keys, which win over the same keys in `event` and in
        the context variables."""
        if _LEVEL_NUMBERS[level] < self._min_level:
            return
        if event or not (_only_kit_vars() and trusted_keys >= _KIT_FIELDS):
            structlog.contextvars.merge_contextvars(None, level, event)
        parts = [trusted_json] if trusted_json else []
        if event:
            for key in trusted_keys.intersection(event):
                del event[key]
            redact_processor(None, level, event)
            body = _ENCODER.encode(event)
            if len(body) > 2:
                parts.append(body[1:-1])
        parts.append(f'"level": "{level}", "timestamp": "{self._timestamp()}"')
        line = "{" + ", ".join(parts) + "}\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()


def json_string(value: str) -> str:
    """`value` as a JSON string literal, exactly as the JSON renderer writes it (ASCII, escaped)."""
    return _encode_string(value)


class _State:
    generation = 0
    # what configure_logging installed: the fast path is valid only while structlog still has exactly these
    # (a copy: structlog.testing.capture_logs changes the installed list in place)
    processors: list[Processor] | None = None
    factory: Any = None
    json_lines: JsonLines | None = None


def json_lines() -> JsonLines | None:
    """The fast JSON line writer, or None when the current structlog configuration is not the JSON one that
    :func:`configure_logging` installed (a console rendering, or reconfigured since, e.g. by a test's
    ``capture_logs``): then log through structlog."""
    writer = _State.json_lines
    if writer is None:
        return None
    config = _structlog_config._CONFIG  # read directly: structlog.get_config() builds a dict per call
    if config.logger_factory is not _State.factory or config.default_processors != _State.processors:
        return None
    return writer


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _level_number(level: str) -> int:
    number = _stdlib_logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(*, json: bool | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide; safe to call again (tests reconfigure onto a ``StringIO``).

    ``json=None`` chooses JSON when ``stream`` (default ``sys.stderr``) is not a terminal.
    """
    out = stream if stream is not None else sys.stderr
    use_json = (not _is_tty(out)) if json is None else json
    renderer: Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
        renderer,
    ]
    factory = structlog.WriteLoggerFactory(file=out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        context_class=dict,
        logger_factory=factory,
        # Not cached: module-level loggers must follow a later reconfiguration (tests, CLI flags).
        # Hot paths bind a concrete logger and refresh it when configuration_generation() changes.
        cache_logger_on_first_use=False,
    )
    _State.generation += 1
    _State.processors, _State.factory = list(processors), factory
    _State.json_lines = JsonLines(out, _level_number(level)) if use_json else None


def configuration_generation() -> int:
    """Incremented by every :func:`configure_logging`; lets hot paths cache a bound logger safely."""
    return _State.generation


def get_logger(name: str, **initial_values: Any) -> FilteringBoundLogger:
    """A lazy logger (structlog's ``BoundLoggerLazyProxy``) following the current configuration.

    ``name`` is bound as the ``logger`` field.
    """
    proxy = BoundLoggerLazyProxy(
        None, initial_values={"logger": name, **initial_values}, logger_factory_args=(name,)
    )
    return cast(FilteringBoundLogger, proxy)
