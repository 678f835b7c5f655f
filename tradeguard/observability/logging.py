"""structlog configuration: one JSON object per line (or a console rendering on a TTY), secrets redacted.

Pipeline: context variables (request id, method), level, ISO-8601 UTC timestamp, exceptions rendered to text,
*then* redaction (so that exception messages and tracebacks are redacted too), then the renderer.
"""

from __future__ import annotations

import logging as _stdlib_logging
import sys
from typing import Any, TextIO, cast

import structlog
from structlog._config import BoundLoggerLazyProxy  # public as structlog.get_logger()'s return type
from structlog.typing import FilteringBoundLogger, Processor

from tradeguard.observability.redact import redact_processor

__all__ = ["configuration_generation", "configure_logging", "get_logger"]


class _State:
    generation = 0


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
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        context_class=dict,
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Not cached: module-level loggers must follow a later reconfiguration (tests, CLI flags).
        # Hot paths bind a concrete logger and refresh it when configuration_generation() changes.
        cache_logger_on_first_use=False,
    )
    _State.generation += 1


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
