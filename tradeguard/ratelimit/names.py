"""What the rate limiter and its callers (the guard's quota stage, Envoy's RLS) must agree on, defined once.

Subjects (who is counted), operation names, tier/group/limit names, and a limit's text as QuotaFailure and the logs
show it ("orders/per-second: 10 per 1s"). Plain data: no grpc, no protobuf (the rate-limit service's pure model
imports it).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["NAME_PATTERN", "OPERATION_PATTERN", "SUBJECT_PATTERN", "limit_text", "subject_for", "window_text"]

SUBJECT_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")  # no braces: a subject is a Redis hash tag
OPERATION_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")  # a full gRPC method, or a name
NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # tiers, groups, limit names


def subject_for(user_id: str, key_id: str | None) -> str:
    """Who is counted for a call: the API key for a signed call (`key:<id>`), else the user (`user:<id>`)."""
    return f"key:{key_id}" if key_id else f"user:{user_id}"


def window_text(window_us: int) -> str:
    """A window's length as people write it: 1s, 10s, 5m, 1h, 1d (whole units when it is one), 0.5s."""
    seconds = window_us / 1_000_000
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def limit_text(group: str, name: str, count: int, window_us: int) -> str:
    """A limit as QuotaFailure and the logs name it: "orders/per-second: 10 per 1s"."""
    return f"{group}/{name}: {count} per {window_text(window_us)}"
