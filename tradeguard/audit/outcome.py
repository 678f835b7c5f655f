"""How an audited call ended: tradeguard.audit.v1.Outcome's values without the prefix, for the pure modules that
cannot import protobuf (the audit service's model, the monitor's). One definition: the numbers are the proto's."""

from __future__ import annotations

import enum

__all__ = ["Outcome"]


class Outcome(enum.IntEnum):
    """How an audited call ended (tradeguard.audit.v1.Outcome's numbers)."""

    UNSPECIFIED = 0
    OK = 1
    DENIED_AUTHENTICATION = 2
    DENIED_PERMISSION = 3
    DENIED_QUOTA = 4
    DENIED_RISK = 5
    INVALID = 6
    FAILED = 7
    UNKNOWN = 8
