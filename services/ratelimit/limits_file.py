"""The limits file (YAML, `version: 1`): parsed and validated into a `LimitsConfig`, or refused with an error that
names the line and the field: `LimitsError("limits.yaml:12: tiers.standard.orders[1].window: '3x' is not a
duration")`.

The format (services/ratelimit/limits.yaml is the packaged, commented example):

    version: 1                      # required, 1
    default_tier: standard          # required: a tier below; empty or unknown tiers get it
    operations:                     # required; operation -> {group: weight 1..MAX_COST}
      default: {requests: 1}        # required: every operation not listed
      /pkg.Service/Method: {requests: 1, orders: 1}
    tiers:                          # required, at least one; tier -> group -> list of limits
      standard:
        requests:                   # every group an operation counts against, in every tier ([] = unlimited)
          - {name: per-second, limit: 20, window: 1s}
    overrides:                      # optional; subject -> {tier: <tier>, groups: {group: [limits]}}
      "key:tgk_x": {tier: pro}

A limit: `name` (NAME_PATTERN, unique in its group), `limit` (1..MAX_COUNT), `window` (`second`, `minute`,
`hour`, `day`, `<n>s|m|h|d`, or an integer of seconds; at most 31 days), `buckets` (1..120, default 20),
`shadow` (bool), `fail` (`open` | `closed`, default closed), `consume_refused` (bool). Booleans are written
`true`/`false` (YAML 1.1's `yes`, `on`... are refused, as is a boolean where a number goes).

Refused as well: unknown keys anywhere, duplicate keys (YAML would silently keep the last), a group no operation
counts against, an operation's group missing from a tier, override subjects not SUBJECT_PATTERN, unknown tiers or
groups in overrides, empty overrides. Only plain YAML is read (the kit's reader, tradeguard/yamlfile.py): no tags
beyond the core schema's, no aliases (the billion-laughs bomb), at most `MAX_DEPTH` levels of nesting and
`MAX_BYTES` of text. The config's `sha256` is of the text's UTF-8 bytes; `source` (a path, usually) prefixes every
error and is shown by GetLimits.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Final, TypeVar

from yaml.nodes import Node, ScalarNode

from services.ratelimit.model import (
    DEFAULT_BUCKETS,
    MAX_BUCKETS,
    MAX_COST,
    MAX_COUNT,
    MAX_WINDOW_US,
    Limit,
    LimitsConfig,
    Operation,
    Override,
    Tier,
)
from tradeguard.ratelimit.names import NAME_PATTERN, OPERATION_PATTERN, SUBJECT_PATTERN
from tradeguard.yamlfile import (
    FLOAT,
    INT,
    MAX_BYTES,
    MAX_DEPTH,
    STR,
    Reader,
    YamlError,
    check_size,
    compose,
    key_path,
    short,
)

__all__ = ["DEFAULT_OPERATION", "MAX_BYTES", "MAX_DEPTH", "LimitsError", "parse_limits", "parse_window"]

DEFAULT_OPERATION: Final = "default"

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_NAMED_WINDOWS: Final = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
_DURATION = re.compile(r"([1-9][0-9]{0,9})([smhd])")
_LIMIT_KEYS: Final = ("name", "limit", "window", "buckets", "shadow", "fail", "consume_refused")

T = TypeVar("T")


class LimitsError(YamlError):
    """A limits file refused: "<source>:<line>: <path>: <problem>"."""


def parse_window(text: str) -> int | None:
    """A window's length in µs from `second|minute|hour|day` or `<n>s|m|h|d`; None if it is not one."""
    if text in _NAMED_WINDOWS:
        return _NAMED_WINDOWS[text] * 1_000_000
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2)] * 1_000_000


def parse_limits(text: str, source: str) -> LimitsConfig:
    """The validated config of a limits file's text; `LimitsError` naming the line and field otherwise."""
    data = check_size(text, source, LimitsError)
    root = compose(text, source, LimitsError)
    config = _Parser(source).config(root)
    return LimitsConfig(
        default_tier=config.default_tier,
        tiers=config.tiers,
        operations=config.operations,
        default_operation=config.default_operation,
        overrides=config.overrides,
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
    )


# --- validation ---------------------------------------------------------------------------------------------


class _Parser(Reader):
    def __init__(self, source: str) -> None:
        super().__init__(source, LimitsError)
        self.groups: set[str] = set()  # the groups operations count against
        self.tier_names: set[str] = set()

    def name(self, node: Node, path: str, pattern: re.Pattern[str] = NAME_PATTERN, what: str = "name") -> str:
        return super().name(node, path, pattern, what)

    # the format -------------------------------------------------------------------------------------------

    def config(self, root: Node | None) -> LimitsConfig:
        if root is None:
            self.fail(None, "", "the file is empty")
        top = self.fields(
            root,
            "",
            ("version", "default_tier", "operations", "tiers", "overrides"),
            ("version", "default_tier", "operations", "tiers"),
        )
        version_node = top["version"]
        if self.integer(version_node, "version", 0, MAX_COUNT) != 1:
            self.fail(
                version_node, "version", f"{version_node.value} is not a version this service reads (1)"
            )
        operations, default_operation = self.operations(top["operations"])
        tiers = self.tiers(top["tiers"])
        default_tier = self.string(top["default_tier"], "default_tier")
        if default_tier not in tiers:
            self.fail(top["default_tier"], "default_tier", f"{short(repr(default_tier))} is not a tier")
        overrides = self.overrides(top["overrides"]) if "overrides" in top else {}
        return LimitsConfig(
            default_tier=default_tier,
            tiers=tiers,
            operations=operations,
            default_operation=default_operation,
            overrides=overrides,
        )

    def operations(self, node: Node) -> tuple[dict[str, Operation], Operation]:
        operations: dict[str, Operation] = {}
        default: Operation | None = None
        for name, key_node, value in self.mapping(node, "operations"):
            path = key_path("operations", name)
            if name != DEFAULT_OPERATION and not OPERATION_PATTERN.fullmatch(name):
                self.fail(key_node, path, "not a valid operation (a gRPC method /pkg.Service/Method)")
            weights: dict[str, int] = {}
            for group, group_node, weight in self.mapping(value, path):
                group_path = key_path(path, group)
                if not NAME_PATTERN.fullmatch(group):
                    self.fail(group_node, group_path, "not a valid group name")
                weights[group] = self.integer(weight, group_path, 1, MAX_COST)
            if not weights:
                self.fail(value, path, "an operation counts against at least one group")
            self.groups.update(weights)
            operation = Operation(name=name, weights=weights)
            if name == DEFAULT_OPERATION:
                default = operation
            else:
                operations[name] = operation
        if default is None:
            self.fail(node, "operations.default", "missing (the weights of every unlisted operation)")
        return operations, default

    def tiers(self, node: Node) -> dict[str, Tier]:
        tiers: dict[str, Tier] = {}
        items = self.mapping(node, "tiers")
        if not items:
            self.fail(node, "tiers", "at least one tier is needed")
        for name, key_node, value in items:
            path = key_path("tiers", name)
            if not NAME_PATTERN.fullmatch(name):
                self.fail(key_node, path, "not a valid tier name")
            groups = self.groups_of(value, path)
            for group in sorted(self.groups - groups.keys()):
                self.fail(
                    value, key_path(path, group), "missing: an operation counts against it ([] = unlimited)"
                )
            tiers[name] = Tier(name=name, groups=groups)
        self.tier_names = set(tiers)
        return tiers

    def groups_of(self, node: Node, path: str) -> dict[str, tuple[Limit, ...]]:
        groups: dict[str, tuple[Limit, ...]] = {}
        for group, key_node, value in self.mapping(node, path):
            group_path = key_path(path, group)
            if group not in self.groups:
                self.fail(key_node, group_path, "unknown group: no operation counts against it")
            limits: list[Limit] = []
            names: set[str] = set()
            for index, item in enumerate(self.sequence(value, group_path)):
                limit = self.limit(item, f"{group_path}[{index}]", group)
                if limit.name in names:
                    self.fail(
                        item, f"{group_path}[{index}].name", f"{limit.name!r} is already a limit of {group}"
                    )
                names.add(limit.name)
                limits.append(limit)
            groups[group] = tuple(limits)
        return groups

    def limit(self, node: Node, path: str, group: str) -> Limit:
        items = self.fields(node, path, _LIMIT_KEYS, ("name", "limit", "window"))

        def optional(key: str, read: Callable[[Node, str], T], default: T) -> T:
            return read(items[key], f"{path}.{key}") if key in items else default

        fail_open = False
        if "fail" in items:
            fail = self.string(items["fail"], f"{path}.fail")
            if fail not in ("open", "closed"):
                self.fail(items["fail"], f"{path}.fail", f"{short(repr(fail))} is not open or closed")
            fail_open = fail == "open"
        return Limit(
            name=self.name(items["name"], f"{path}.name"),
            group=group,
            count=self.integer(items["limit"], f"{path}.limit", 1, MAX_COUNT),
            window_us=self.window(items["window"], f"{path}.window"),
            buckets=optional("buckets", lambda n, p: self.integer(n, p, 1, MAX_BUCKETS), DEFAULT_BUCKETS),
            shadow=optional("shadow", self.boolean, False),
            fail_open=fail_open,
            consume_refused=optional("consume_refused", self.boolean, False),
        )

    def window(self, node: Node, path: str) -> int:
        self.plain(node, path)
        if isinstance(node, ScalarNode) and node.tag == INT:
            window_us = self.integer(node, path, 1, MAX_WINDOW_US // 1_000_000) * 1_000_000
        else:
            if not isinstance(node, ScalarNode) or node.tag not in (STR, FLOAT):
                self.fail(node, path, f"{self.shown(node)} is not a duration (e.g. 1s, 5m, 1h, day, 30)")
            parsed = parse_window(str(node.value))
            if parsed is None:
                self.fail(node, path, f"{self.shown(node)} is not a duration (e.g. 1s, 5m, 1h, day, 30)")
            window_us = parsed
        if window_us > MAX_WINDOW_US:
            self.fail(node, path, f"{self.shown(node)} is longer than 31 days")
        return window_us

    def overrides(self, node: Node) -> dict[str, Override]:
        overrides: dict[str, Override] = {}
        for subject, key_node, value in self.mapping(node, "overrides"):
            path = key_path("overrides", subject)
            if not SUBJECT_PATTERN.fullmatch(subject):
                self.fail(key_node, path, "not a valid subject (key:<api key id>, user:<user id>, ...)")
            items = self.fields(value, path, ("tier", "groups"), ())
            if not items:
                self.fail(value, path, "an override sets a tier and/or groups")
            tier: str | None = None
            if "tier" in items:
                tier = self.string(items["tier"], f"{path}.tier")
                if tier not in self.tier_names:
                    self.fail(items["tier"], f"{path}.tier", f"{short(repr(tier))} is not a tier")
            groups = self.groups_of(items["groups"], f"{path}.groups") if "groups" in items else {}
            overrides[subject] = Override(subject=subject, tier=tier, groups=groups)
        return overrides
