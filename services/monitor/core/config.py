"""The monitor's configuration file (YAML, `version: 1`), parsed strictly into a `MonitorConfig` or refused with
the line and the field (`ConfigError("monitor.yaml:12: auth_failures.subjects.api_key.threshold: 0 is out of
range (1..1000000)")`). services/monitor/monitor.yaml is the packaged, commented default.

The format:

    version: 1
    exclude_recorders: [monitor]          # workloads whose entries are not read (the monitor's own actions)
    budgets: {notify: 600, revoke_key: 20, kill_switch: 2}   # actions per minute per kind; the rest suppressed
    rate_spike:                           # request-rate baselines (services/monitor/core/baseline.py)
      enabled: true
      bucket: 10s                         # the counting interval
      alpha: 0.1                          # EWMA weight of a new bucket (0 < alpha <= 1)
      warmup_buckets: 30                  # buckets a subject is observed before it may alert
      sigmas: 6                           # a spike: count > mean + sigmas x max(spread, sqrt(mean), 1)
      max_subjects: 100000                # bound per subject kind (least recently seen evicted)
      subjects:                           # subject kind -> rule; threshold = the least count that can alert
        api_key: {threshold: 50, severity: critical, actions: [notify, revoke_key]}
    order_volume:                         # order volume baselines: the sum of the quantities of the OK PlaceOrder
                                          # calls per bucket (services/monitor/core/orders.py); the same keys as
                                          # rate_spike, but a threshold is an amount (a decimal: 2500, 0.5)
      subjects:
        api_key: {threshold: 10000, severity: warning, actions: [notify]}
    order_notional:                       # the same for notional: the sum of quantity x price (priced orders)
      sigmas: 10
      subjects:
        account: {threshold: 5000000, severity: critical, actions: [notify, kill_switch], kill_scope: account}
    geography:                            # services/monitor/core/geography.py
      enabled: true
      max_keys: 100000                    # keys remembered (least recently seen evicted)
      max_countries: 16                   # countries remembered per key (oldest forgotten)
      max_speed_kmh: 1000                 # faster than an airliner is impossible travel
      slack_km: 2000                      # subtracted from centroid distances (a country is not a point)
      new_country: {severity: warning, actions: [notify]}
      impossible_travel: {severity: critical, actions: [notify, revoke_key]}
    auth_failures:                        # bursts of DENIED_AUTHENTICATION (services/monitor/core/bursts.py)
      enabled: true
      window: 60s
      max_subjects: 100000
      subjects:
        api_key: {threshold: 10, severity: critical, actions: [notify, revoke_key]}
        source_ip: {threshold: 30, severity: warning, actions: [notify]}
    permission_scan: ...                  # the same keys: threshold = distinct methods refused in the window
    risk_rejections: ...                  # the same keys: threshold = DENIED_RISK outcomes in the window;
                                          # a rule may add kill_scope: account | api_key (default account)

Subject kinds: `api_key`, `account`, `source_ip`, `principal`. Actions: `notify`, `revoke_key`, `kill_switch`.
Severities: `info`, `warning`, `critical`. A detector or section left out is off. Refused: unknown and duplicate
keys, values out of range, and whatever the kit's safe YAML reader refuses (tradeguard/yamlfile.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from yaml.nodes import Node

from services.monitor.model import ActionKind, Severity
from tradeguard.yamlfile import Reader, YamlError, check_size, compose, key_path

__all__ = [
    "ACTIONS",
    "MAX_AMOUNT",
    "SUBJECT_KINDS",
    "BurstConfig",
    "ConfigError",
    "GeoConfig",
    "MonitorConfig",
    "RateConfig",
    "Rule",
    "parse_config",
]

SUBJECT_KINDS: Final = ("api_key", "account", "source_ip", "principal")
ACTIONS: Final = {
    "notify": ActionKind.NOTIFY,
    "revoke_key": ActionKind.REVOKE_KEY,
    "kill_switch": ActionKind.KILL_SWITCH,
}
SEVERITIES: Final = {"info": Severity.INFO, "warning": Severity.WARNING, "critical": Severity.CRITICAL}
MAX_SUBJECTS: Final = 10_000_000
MAX_AMOUNT: Final = Decimal("1e15")  # the largest amount threshold (order volume, notional)
_WORKLOAD: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOUR_US: Final = 3_600_000_000


class ConfigError(YamlError):
    """A monitor configuration refused: "<source>:<line>: <path>: <problem>"."""


@dataclass(frozen=True, slots=True)
class Rule:
    """What a detector does for one subject kind (or one kind of finding)."""

    threshold: int = 1
    severity: Severity = Severity.WARNING
    actions: tuple[ActionKind, ...] = (ActionKind.NOTIFY,)
    kill_scope: str = "account"
    amount: Decimal = Decimal(
        0
    )  # the least amount that can alert (order_volume, order_notional; threshold: 1)


@dataclass(frozen=True, slots=True)
class RateConfig:
    enabled: bool = False
    bucket_us: int = 10_000_000
    alpha: float = 0.1
    warmup_buckets: int = 30
    sigmas: float = 6.0
    max_subjects: int = 100_000
    subjects: Mapping[str, Rule] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GeoConfig:
    enabled: bool = False
    max_keys: int = 100_000
    max_countries: int = 16
    max_speed_kmh: float = 1000.0
    slack_km: float = 2000.0
    new_country: Rule | None = None
    impossible_travel: Rule | None = None


@dataclass(frozen=True, slots=True)
class BurstConfig:
    enabled: bool = False
    window_us: int = 60_000_000
    max_subjects: int = 100_000
    subjects: Mapping[str, Rule] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    exclude_recorders: frozenset[str] = frozenset({"monitor"})
    budgets: Mapping[ActionKind, int] = field(
        default_factory=lambda: {ActionKind.NOTIFY: 600, ActionKind.REVOKE_KEY: 20, ActionKind.KILL_SWITCH: 2}
    )
    rate_spike: RateConfig = RateConfig()
    order_volume: RateConfig = RateConfig()
    order_notional: RateConfig = RateConfig()
    geography: GeoConfig = GeoConfig()
    auth_failures: BurstConfig = BurstConfig()
    permission_scan: BurstConfig = BurstConfig()
    risk_rejections: BurstConfig = BurstConfig()
    source: str = ""
    sha256: str = ""


_TOP: Final = (
    "version",
    "exclude_recorders",
    "budgets",
    "rate_spike",
    "order_volume",
    "order_notional",
    "geography",
    "auth_failures",
    "permission_scan",
    "risk_rejections",
)


def parse_config(text: str, source: str) -> MonitorConfig:
    """The validated configuration of a monitor file's text; `ConfigError` naming the line and field otherwise."""
    data = check_size(text, source, ConfigError)
    root = compose(text, source, ConfigError)
    reader = _Parser(source)
    if root is None:
        reader.fail(None, "", "the file is empty")
    top = reader.fields(root, "", _TOP, ("version",))
    if reader.integer(top["version"], "version", 0, 1_000_000) != 1:
        reader.fail(top["version"], "version", "not a version this reader reads (1)")
    defaults = MonitorConfig()
    excluded = defaults.exclude_recorders
    if "exclude_recorders" in top:
        excluded = frozenset(
            reader.name(item, f"exclude_recorders[{i}]", _WORKLOAD, "workload name")
            for i, item in enumerate(reader.sequence(top["exclude_recorders"], "exclude_recorders"))
        )
    budgets = dict(defaults.budgets)
    if "budgets" in top:
        for name, _, value in reader.mapping(top["budgets"], "budgets", tuple(ACTIONS)):
            budgets[ACTIONS[name]] = reader.integer(value, key_path("budgets", name), 0, 100_000)
    return MonitorConfig(
        exclude_recorders=excluded,
        budgets=budgets,
        rate_spike=reader.rate(top, "rate_spike"),
        order_volume=reader.rate(top, "order_volume", amounts=True),
        order_notional=reader.rate(top, "order_notional", amounts=True),
        geography=reader.geo(top["geography"]) if "geography" in top else GeoConfig(),
        auth_failures=reader.burst(top, "auth_failures"),
        permission_scan=reader.burst(top, "permission_scan"),
        risk_rejections=reader.burst(top, "risk_rejections"),
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
    )


class _Parser(Reader):
    def __init__(self, source: str) -> None:
        super().__init__(source, ConfigError)

    def number(self, node: Node, path: str, low: str, high: str) -> float:
        return float(self.decimal(node, path, Decimal(low), Decimal(high)))

    def rule(self, node: Node, path: str, *, threshold: bool, amounts: bool = False) -> Rule:
        allowed = (
            ("threshold", "severity", "actions", "kill_scope")
            if threshold
            else ("severity", "actions", "kill_scope")
        )
        items = self.fields(node, path, allowed, ("threshold",) if threshold else ())
        rule = Rule()
        count, amount = 1, Decimal(0)
        if amounts:
            amount = self.decimal(items["threshold"], f"{path}.threshold", Decimal(0), MAX_AMOUNT)
        elif threshold:
            count = self.integer(items["threshold"], f"{path}.threshold", 1, 1_000_000)
        severity = rule.severity
        if "severity" in items:
            word = self.string(items["severity"], f"{path}.severity")
            if word not in SEVERITIES:
                self.fail(
                    items["severity"], f"{path}.severity", f"{word!r} is not one of {', '.join(SEVERITIES)}"
                )
            severity = SEVERITIES[word]
        actions = rule.actions
        if "actions" in items:
            chosen: list[ActionKind] = []
            for i, item in enumerate(self.sequence(items["actions"], f"{path}.actions")):
                word = self.string(item, f"{path}.actions[{i}]")
                if word not in ACTIONS:
                    self.fail(item, f"{path}.actions[{i}]", f"{word!r} is not one of {', '.join(ACTIONS)}")
                if ACTIONS[word] in chosen:
                    self.fail(item, f"{path}.actions[{i}]", f"{word!r} is listed twice")
                chosen.append(ACTIONS[word])
            actions = tuple(chosen)
        scope = rule.kill_scope
        if "kill_scope" in items:
            scope = self.string(items["kill_scope"], f"{path}.kill_scope")
            if scope not in ("account", "api_key"):
                self.fail(items["kill_scope"], f"{path}.kill_scope", f"{scope!r} is not account or api_key")
        return Rule(count, severity, actions, scope, amount)

    def subjects(self, node: Node, path: str, amounts: bool = False) -> dict[str, Rule]:
        return {
            kind: self.rule(value, key_path(path, kind), threshold=True, amounts=amounts)
            for kind, _, value in self.mapping(node, path, SUBJECT_KINDS)
        }

    # A key of a section read when present, else the default: the key written once. `bounds`: (low, high).
    def integer_or(
        self, items: Mapping[str, Node], path: str, key: str, bounds: tuple[int, int], *, default: int
    ) -> int:
        return self.integer(items[key], f"{path}.{key}", *bounds) if key in items else default

    def number_or(
        self, items: Mapping[str, Node], path: str, key: str, bounds: tuple[str, str], *, default: float
    ) -> float:
        return self.number(items[key], f"{path}.{key}", *bounds) if key in items else default

    def duration_or(
        self, items: Mapping[str, Node], path: str, key: str, bounds: tuple[int, int], *, default: int
    ) -> int:
        return self.duration(items[key], f"{path}.{key}", *bounds) if key in items else default

    def enabled(self, items: Mapping[str, Node], path: str) -> bool:
        return self.boolean(items["enabled"], f"{path}.enabled") if "enabled" in items else True

    def rate(self, top: Mapping[str, Node], path: str, *, amounts: bool = False) -> RateConfig:
        if path not in top:
            return RateConfig()
        node = top[path]
        keys = ("enabled", "bucket", "alpha", "warmup_buckets", "sigmas", "max_subjects", "subjects")
        items = self.fields(node, path, keys, ("subjects",))
        base = RateConfig()
        return RateConfig(
            enabled=self.enabled(items, path),
            bucket_us=self.duration_or(items, path, "bucket", (100_000, _HOUR_US), default=base.bucket_us),
            alpha=self.number_or(items, path, "alpha", ("0.0001", "1"), default=base.alpha),
            warmup_buckets=self.integer_or(
                items, path, "warmup_buckets", (1, 100_000), default=base.warmup_buckets
            ),
            sigmas=self.number_or(items, path, "sigmas", ("0.1", "1000"), default=base.sigmas),
            max_subjects=self.integer_or(
                items, path, "max_subjects", (1, MAX_SUBJECTS), default=base.max_subjects
            ),
            subjects=self.subjects(items["subjects"], f"{path}.subjects", amounts),
        )

    def geo(self, node: Node) -> GeoConfig:
        path = "geography"
        keys = (
            "enabled",
            "max_keys",
            "max_countries",
            "max_speed_kmh",
            "slack_km",
            "new_country",
            "impossible_travel",
        )
        items = self.fields(node, path, keys, ())
        base = GeoConfig()
        return GeoConfig(
            enabled=self.enabled(items, path),
            max_keys=self.integer_or(items, path, "max_keys", (1, MAX_SUBJECTS), default=base.max_keys),
            max_countries=self.integer_or(items, path, "max_countries", (1, 300), default=base.max_countries),
            max_speed_kmh=self.number_or(
                items, path, "max_speed_kmh", ("1", "100000"), default=base.max_speed_kmh
            ),
            slack_km=self.number_or(items, path, "slack_km", ("0", "20000"), default=base.slack_km),
            new_country=self.rule(items["new_country"], f"{path}.new_country", threshold=False)
            if "new_country" in items
            else None,
            impossible_travel=self.rule(
                items["impossible_travel"], f"{path}.impossible_travel", threshold=False
            )
            if "impossible_travel" in items
            else None,
        )

    def burst(self, top: Mapping[str, Node], path: str) -> BurstConfig:
        if path not in top:
            return BurstConfig()
        items = self.fields(top[path], path, ("enabled", "window", "max_subjects", "subjects"), ("subjects",))
        base = BurstConfig()
        return BurstConfig(
            enabled=self.enabled(items, path),
            window_us=self.duration_or(
                items, path, "window", (1_000_000, 24 * _HOUR_US), default=base.window_us
            ),
            max_subjects=self.integer_or(
                items, path, "max_subjects", (1, MAX_SUBJECTS), default=base.max_subjects
            ),
            subjects=self.subjects(items["subjects"], f"{path}.subjects"),
        )
