"""The limits file (services/ratelimit/limits_file.py): every refusal names its line and field; the packaged file
parses; random valid configs rendered to YAML read back as the same config; garbage and mutations of a good file
raise nothing but LimitsError."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ratelimit.limits_file import MAX_BYTES, LimitsError, parse_limits, parse_window
from services.ratelimit.model import (
    DEFAULT_BUCKETS,
    MAX_BUCKETS,
    MAX_COST,
    MAX_COUNT,
    Limit,
    LimitsConfig,
    Operation,
    Override,
    Tier,
)
from tradeguard.ratelimit.names import NAME_PATTERN, OPERATION_PATTERN, SUBJECT_PATTERN

PACKAGED = Path(__file__).resolve().parents[3] / "services" / "ratelimit" / "limits.yaml"
PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
S = 1_000_000

# The line numbers in the refusal cases below are this text's.
BASE = """\
version: 1
default_tier: standard
operations:
  default: {requests: 1}
  /tradeguard.trading.v1.TradingService/PlaceOrder: {requests: 1, orders: 2}
tiers:
  standard:
    requests:
      - {name: per-second, limit: 20, window: 1s}
    orders:
      - {name: per-second, limit: 10, window: second}
      - {name: per-day, limit: 1000, window: 1d, buckets: 48}
  pro:
    requests: []
    orders:
      - {name: per-second, limit: 50, window: 1s, fail: open, shadow: true, consume_refused: true}
overrides:
  "key:tgk_abc": {tier: pro}
  user:u-1:
    groups:
      orders: [{name: per-second, limit: 5, window: 1s}]
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def refusal(text: str) -> str:
    with pytest.raises(LimitsError) as caught:
        parse_limits(text, "limits.yaml")
    return str(caught.value)


def test_the_base_text_parses_to_the_config_it_says() -> None:
    config = parse_limits(BASE, "limits.yaml")
    assert config.source == "limits.yaml"
    assert config.sha256 == hashlib.sha256(BASE.encode()).hexdigest()
    assert config.default_tier == "standard"
    assert config.default_operation == Operation("default", {"requests": 1})
    assert config.operations == {PLACE: Operation(PLACE, {"requests": 1, "orders": 2})}
    assert config.tiers["standard"] == Tier(
        "standard",
        {
            "requests": (Limit("per-second", "requests", 20, 1 * S),),
            "orders": (
                Limit("per-second", "orders", 10, 1 * S),
                Limit("per-day", "orders", 1000, 86_400 * S, buckets=48),
            ),
        },
    )
    assert config.tiers["pro"].groups["requests"] == ()
    assert config.tiers["pro"].groups["orders"] == (
        Limit("per-second", "orders", 50, S, shadow=True, fail_open=True, consume_refused=True),
    )
    assert config.overrides == {
        "key:tgk_abc": Override("key:tgk_abc", tier="pro"),
        "user:u-1": Override("user:u-1", groups={"orders": (Limit("per-second", "orders", 5, S),)}),
    }


def test_the_packaged_limits_file_parses_with_the_trading_methods_in_every_tier() -> None:
    config = parse_limits(PACKAGED.read_text(), str(PACKAGED))
    assert config.default_tier == "standard"
    assert set(config.tiers) == {"standard", "pro", "institutional"}
    service = "/tradeguard.trading.v1.TradingService/"
    assert set(config.operations) == {
        service + m for m in ("PlaceOrder", "CancelOrder", "GetOrder", "ListOrders")
    }
    assert config.operations[service + "PlaceOrder"].weights == {"requests": 1, "orders": 1}
    for tier in config.tiers.values():
        for group in ("requests", "orders"):
            windows = sorted(limit.window_us for limit in tier.groups[group])
            assert windows == [S, 86_400 * S], (tier.name, group)  # a burst and a daily quota
    # the tiers are graduated
    per_second = [config.tiers[t].groups["orders"][0].count for t in ("standard", "pro", "institutional")]
    assert per_second == sorted(per_second) and len(set(per_second)) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, anywhere
        (BASE + "extra: 1\n", "limits.yaml:22: extra: unknown key"),
        (
            edit("limit: 20, window: 1s}", "limit: 20, window: 1s, burst: 3}"),
            "limits.yaml:9: tiers.standard.requests[0].burst: unknown key",
        ),
        (
            edit("{tier: pro}", "{tier: pro, tiers: x}"),
            'limits.yaml:18: overrides["key:tgk_abc"].tiers: unknown key',
        ),
        # wrong types
        (
            edit("limit: 20,", "limit: yes,"),
            "limits.yaml:9: tiers.standard.requests[0].limit: 'yes' is a boolean, not an integer",
        ),
        (
            edit("limit: 20,", 'limit: "20",'),
            "limits.yaml:9: tiers.standard.requests[0].limit: '20' is a string, not an integer",
        ),
        (
            edit("limit: 20,", "limit: 20.5,"),
            "limits.yaml:9: tiers.standard.requests[0].limit: '20.5' is a number, not an integer",
        ),
        (
            edit("limit: 20,", "limit: [20],"),
            "limits.yaml:9: tiers.standard.requests[0].limit: a list where an integer is expected",
        ),
        (
            edit("shadow: true", "shadow: 1"),
            "limits.yaml:16: tiers.pro.orders[0].shadow: '1' is an integer, not a boolean",
        ),
        (
            edit("shadow: true", "shadow: yes"),
            "limits.yaml:16: tiers.pro.orders[0].shadow: 'yes' is ambiguous: write true or false",
        ),
        (edit("version: 1", "version: on"), "limits.yaml:1: version: 'on' is a boolean, not an integer"),
        (
            edit("  standard:\n", "  standard: 5\n  x:\n"),
            "limits.yaml:7: tiers.standard: '5' where a mapping",
        ),
        (
            edit("    requests: []\n", "    requests: {}\n"),
            "limits.yaml:14: tiers.pro.requests: a mapping where a list",
        ),
        (edit("default_tier: standard", "default_tier: 7"), "limits.yaml:2: default_tier: '7' is an integer"),
        # duplicate keys (YAML would keep the last)
        (
            edit("default_tier: standard\n", "default_tier: standard\ndefault_tier: pro\n"),
            "limits.yaml:3: default_tier: duplicate key",
        ),
        (
            edit("limit: 20, window: 1s}", "limit: 20, window: 1s, limit: 30}"),
            "limits.yaml:9: tiers.standard.requests[0].limit: duplicate key",
        ),
        (
            edit("  default: {requests: 1}\n", "  default: {requests: 1}\n  default: {orders: 1}\n"),
            "limits.yaml:5: operations.default: duplicate key",
        ),
        (edit("  pro:\n", "  standard:\n"), "limits.yaml:13: tiers.standard: duplicate key"),
        # missing required fields
        (edit("version: 1\n", ""), "limits.yaml:1: version: missing"),
        (edit("default_tier: standard\n", ""), "limits.yaml:1: default_tier: missing"),
        (edit("  default: {requests: 1}\n", ""), "limits.yaml:4: operations.default: missing"),
        (
            "version: 1\ndefault_tier: standard\noperations: {default: {requests: 1}}\n",
            "limits.yaml:1: tiers: missing",
        ),
        (
            edit("{name: per-second, limit: 20, window: 1s}", "{name: per-second, window: 1s}"),
            "limits.yaml:9: tiers.standard.requests[0].limit: missing",
        ),
        (
            edit("{name: per-second, limit: 20, window: 1s}", "{limit: 20, window: 1s}"),
            "limits.yaml:9: tiers.standard.requests[0].name: missing",
        ),
        (
            edit("{name: per-second, limit: 20, window: 1s}", "{name: a, limit: 20}"),
            "limits.yaml:9: tiers.standard.requests[0].window: missing",
        ),
        # version, default tier
        (edit("version: 1", "version: 2"), "limits.yaml:1: version: 2 is not a version this service reads"),
        (
            edit("default_tier: standard", "default_tier: gold"),
            "limits.yaml:2: default_tier: 'gold' is not a tier",
        ),
        # names
        (edit("  pro:\n", "  Pro:\n"), "limits.yaml:13: tiers.Pro: not a valid tier name"),
        (
            edit("{name: per-second, limit: 20", "{name: Per Second, limit: 20"),
            "limits.yaml:9: tiers.standard.requests[0].name: 'Per Second' is not a valid name",
        ),
        (
            edit("{requests: 1, orders: 2}", "{requests: 1, Orders: 2}"),
            f'limits.yaml:5: operations["{PLACE}"].Orders: not a valid group name',
        ),
        (
            edit("name: per-day", "name: per-second"),
            "limits.yaml:12: tiers.standard.orders[1].name: 'per-second' is",
        ),
        # limits out of range
        (
            edit("limit: 20,", "limit: 0,"),
            "limits.yaml:9: tiers.standard.requests[0].limit: 0 is out of range",
        ),
        (
            edit("limit: 20,", "limit: -3,"),
            "limits.yaml:9: tiers.standard.requests[0].limit: -3 is out of range",
        ),
        (
            edit("limit: 20,", f"limit: {MAX_COUNT + 1},"),
            f"limits.yaml:9: tiers.standard.requests[0].limit: {MAX_COUNT + 1} is out of range (1..{MAX_COUNT})",
        ),
        (
            edit("limit: 20,", f"limit: {'9' * 5000},"),
            "limits.yaml:9: tiers.standard.requests[0].limit: '9999",
        ),
        # windows
        (
            edit("window: 1d, buckets: 48", "window: 3x, buckets: 48"),
            "limits.yaml:12: tiers.standard.orders[1].window: '3x' is not a duration",
        ),
        (
            edit("window: 1d,", "window: 32d,"),
            "limits.yaml:12: tiers.standard.orders[1].window: '32d' is longer than 31",
        ),
        (
            edit("window: 1d,", "window: 2678401,"),
            "limits.yaml:12: tiers.standard.orders[1].window: 2678401 is out of range",
        ),
        (
            edit("window: 1d,", "window: 0,"),
            "limits.yaml:12: tiers.standard.orders[1].window: 0 is out of range",
        ),
        (
            edit("window: 1d,", "window: 0s,"),
            "limits.yaml:12: tiers.standard.orders[1].window: '0s' is not a duration",
        ),
        (
            edit("window: 1d,", "window: 1.5,"),
            "limits.yaml:12: tiers.standard.orders[1].window: '1.5' is not a duration",
        ),
        (
            edit("window: 1d,", "window: true,"),
            "limits.yaml:12: tiers.standard.orders[1].window: 'true' is not a duration",
        ),
        (
            edit("window: 1d,", "window: 1 d,"),
            "limits.yaml:12: tiers.standard.orders[1].window: '1 d' is not a duration",
        ),
        (
            edit("window: 1d,", "window: 1ms,"),
            "limits.yaml:12: tiers.standard.orders[1].window: '1ms' is not a duration",
        ),
        # buckets, fail, weights
        (
            edit("buckets: 48", "buckets: 0"),
            "limits.yaml:12: tiers.standard.orders[1].buckets: 0 is out of range",
        ),
        (
            edit("buckets: 48", f"buckets: {MAX_BUCKETS + 1}"),
            "limits.yaml:12: tiers.standard.orders[1].buckets: 121 is out of range",
        ),
        (
            edit("fail: open", "fail: maybe"),
            "limits.yaml:16: tiers.pro.orders[0].fail: 'maybe' is not open or closed",
        ),
        (edit("fail: open", "fail: false"), "limits.yaml:16: tiers.pro.orders[0].fail: 'false' is a boolean"),
        (edit("orders: 2}", "orders: 0}"), f'limits.yaml:5: operations["{PLACE}"].orders: 0 is out of range'),
        (
            edit("orders: 2}", f"orders: {MAX_COST + 1}}}"),
            f'limits.yaml:5: operations["{PLACE}"].orders: {MAX_COST + 1} is out of range',
        ),
        (
            edit("{requests: 1, orders: 2}", "{}"),
            f'limits.yaml:5: operations["{PLACE}"]: an operation counts',
        ),
        # operations
        (
            edit(PLACE, "/trading Place Order"),
            'limits.yaml:5: operations["/trading Place Order"]: not a valid operation',
        ),
        # groups and tiers
        (
            edit("    requests: []\n", ""),
            "limits.yaml:14: tiers.pro.requests: missing: an operation counts against it",
        ),
        (
            edit("    requests: []\n", "    requests: []\n    extra: []\n"),
            "limits.yaml:15: tiers.pro.extra: unknown group",
        ),
        (
            "version: 1\ndefault_tier: a\noperations: {default: {requests: 1}}\ntiers: {}\n",
            "limits.yaml:4: tiers: at least one tier is needed",
        ),
        # overrides
        (
            edit('"key:tgk_abc"', '"key:{tgk_abc}"'),
            'limits.yaml:18: overrides["key:{tgk_abc}"]: not a valid subject',
        ),
        (
            edit("{tier: pro}", "{tier: gold}"),
            "limits.yaml:18: overrides[\"key:tgk_abc\"].tier: 'gold' is not a tier",
        ),
        (
            edit("      orders: [", "      bids: ["),
            'limits.yaml:21: overrides["user:u-1"].groups.bids: unknown group',
        ),
        (edit("{tier: pro}", "{}"), 'limits.yaml:18: overrides["key:tgk_abc"]: an override sets a tier'),
        (
            edit("limit: 5, window: 1s}]", "limit: 5, window: 1w}]"),
            "limits.yaml:21: overrides[\"user:u-1\"].groups.orders[0].window: '1w' is not a duration",
        ),
        # only plain, safe YAML
        (
            edit("default_tier: standard", "default_tier: !!python/object/apply:os.system [echo]"),
            "limits.yaml:2: default_tier: the tag tag:yaml.org,2002:python/object/apply:os.system is not allowed",
        ),
        (
            edit("limit: 20,", "limit: !!binary aGk=,"),
            "limits.yaml:9: tiers.standard.requests[0].limit: the tag tag:yaml.org,2002:binary is not allowed",
        ),
        (edit("tiers:\n", "tiers: !custom\n"), "limits.yaml:6: tiers: the tag !custom is not allowed"),
        (
            edit("    requests: []\n", "    requests: &r []\n    orders: *r\n"),
            "limits.yaml:15: (syntax): aliases (*name) are not allowed",
        ),
        (
            edit("version: 1", "<<: {version: 1}"),
            "limits.yaml:1: (root): the tag tag:yaml.org,2002:merge is not allowed",
        ),
        (edit("version: 1", "1: 1"), "limits.yaml:1: (root): the key '1' is not a string (quote it)"),
        (edit("version: 1", "[a]: 1"), "limits.yaml:1: (root): the key a list is not a string"),
        # not YAML, not a mapping
        (edit("  pro:\n", " pro:\n"), "limits.yaml:13: (syntax): "),
        (BASE + "---\nversion: 1\n", "limits.yaml:22: (syntax): "),
        ("", "limits.yaml:1: (root): the file is empty"),
        ("# nothing\n", "limits.yaml:1: (root): the file is empty"),
        ("- 1\n", "limits.yaml:1: (root): a list where a mapping is expected"),
        ("version: 1\x07\n", "limits.yaml:1: (syntax): "),
        ("a:" + " [" * 40, "limits.yaml:1: (syntax): nested more than 16 levels deep"),
    ],
)
def test_a_refusal_names_the_line_and_the_field(text: str, expected: str) -> None:
    assert refusal(text).startswith(expected)


def test_the_billion_laughs_is_refused_at_its_first_alias() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    message = refusal("\n".join(lines) + "\n")
    assert message.startswith("limits.yaml:2: (syntax): aliases (*name) are not allowed")


def test_a_text_larger_than_the_bound_is_refused_before_it_is_read() -> None:
    text = BASE + "#" * MAX_BYTES + "\n"
    assert refusal(text).startswith(f"limits.yaml:1: (file): {len(text.encode())} bytes, more than the")


def test_the_source_prefixes_every_error() -> None:
    with pytest.raises(LimitsError, match=r"^/etc/tg/limits\.yaml:1: version: 2 is not"):
        parse_limits(edit("version: 1", "version: 2"), "/etc/tg/limits.yaml")


def test_yaml_integers_and_windows_as_yaml_writes_them() -> None:
    config = parse_limits(
        edit("limit: 1000, window: 1d, buckets: 48", "limit: 1_000_000, window: 86400, buckets: 0x30"), "x"
    )
    assert config.tiers["standard"].groups["orders"][1] == Limit(
        "per-day", "orders", 1_000_000, 86_400 * S, 48
    )
    assert config.tiers["standard"].groups["orders"][0].window_us == S  # `second`
    for text, seconds in [("second", 1), ("minute", 60), ("hour", 3600), ("day", 86_400), ("90s", 90)]:
        assert parse_window(text) == seconds * S
    assert (parse_window("15m"), parse_window("2h"), parse_window("31d")) == (
        900 * S,
        7200 * S,
        31 * 86_400 * S,
    )
    for bad in ("", "s", "1", "01s", "-1s", "1.5s", "1S", "1sec", " 1s"):
        assert parse_window(bad) is None, bad


def test_the_last_good_limit_window_is_exactly_31_days() -> None:
    config = parse_limits(edit("window: 1d,", "window: 31d,"), "x")
    assert config.tiers["standard"].groups["orders"][1].window_us == 31 * 86_400 * S


# --- properties ---------------------------------------------------------------------------------------------

names = st.from_regex(NAME_PATTERN, fullmatch=True)
subjects = st.from_regex(SUBJECT_PATTERN, fullmatch=True)
operation_names = st.from_regex(OPERATION_PATTERN, fullmatch=True).filter(lambda name: name != "default")


@st.composite
def windows(draw: st.DrawFn) -> tuple[Any, int]:
    """A window as the file may write it, and its length in µs."""
    seconds = draw(st.sampled_from([1, 60, 3600, 86_400]) | st.integers(1, 31 * 86_400))
    forms: list[Any] = [seconds, f"{seconds}s"]
    for unit, size in (("m", 60), ("h", 3600), ("d", 86_400)):
        if seconds % size == 0:
            forms.append(f"{seconds // size}{unit}")
    named = {1: "second", 60: "minute", 3600: "hour", 86_400: "day"}
    if seconds in named:
        forms.append(named[seconds])
    return draw(st.sampled_from(forms)), seconds * S


@st.composite
def limit_lists(draw: st.DrawFn, group: str) -> tuple[list[dict[str, Any]], tuple[Limit, ...]]:
    rendered: list[dict[str, Any]] = []
    limits: list[Limit] = []
    for name in draw(st.lists(names, max_size=3, unique=True)):
        window, window_us = draw(windows())
        count = draw(st.integers(1, MAX_COUNT))
        item: dict[str, Any] = {"name": name, "limit": count, "window": window}
        buckets = draw(st.none() | st.integers(1, MAX_BUCKETS))
        shadow = draw(st.none() | st.booleans())
        fail = draw(st.none() | st.sampled_from(["open", "closed"]))
        consume_refused = draw(st.none() | st.booleans())
        for key, value in (("buckets", buckets), ("shadow", shadow), ("fail", fail)):
            if value is not None:
                item[key] = value
        if consume_refused is not None:
            item["consume_refused"] = consume_refused
        rendered.append(item)
        limits.append(
            Limit(
                name=name,
                group=group,
                count=count,
                window_us=window_us,
                buckets=DEFAULT_BUCKETS if buckets is None else buckets,
                shadow=bool(shadow),
                fail_open=fail == "open",
                consume_refused=bool(consume_refused),
            )
        )
    return rendered, tuple(limits)


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict[str, Any], LimitsConfig]:
    """A valid limits file as data, and the config it must read as."""
    groups = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    weights = st.dictionaries(st.sampled_from(groups), st.integers(1, MAX_COST), min_size=1)
    default_weights = draw(weights)
    operations = draw(st.dictionaries(operation_names, weights, max_size=3))
    used = set(default_weights).union(*(w.keys() for w in operations.values()))
    tier_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    tiers_data: dict[str, Any] = {}
    tiers: dict[str, Tier] = {}
    for tier in tier_names:
        tier_groups: dict[str, tuple[Limit, ...]] = {}
        tiers_data[tier] = {}
        for group in sorted(used):
            rendered, limits = draw(limit_lists(group))
            tiers_data[tier][group], tier_groups[group] = rendered, limits
        tiers[tier] = Tier(tier, tier_groups)
    default_tier = draw(st.sampled_from(tier_names))
    overrides_data: dict[str, Any] = {}
    overrides: dict[str, Override] = {}
    for subject in draw(st.lists(subjects, max_size=3, unique=True)):
        override_tier = draw(st.none() | st.sampled_from(tier_names))
        own = draw(st.lists(st.sampled_from(sorted(used)), unique=True, min_size=0 if override_tier else 1))
        entry: dict[str, Any] = {}
        override_groups: dict[str, tuple[Limit, ...]] = {}
        if override_tier is not None:
            entry["tier"] = override_tier
        if own:
            entry["groups"] = {}
            for group in own:
                rendered, limits = draw(limit_lists(group))
                entry["groups"][group], override_groups[group] = rendered, limits
        overrides_data[subject] = entry
        overrides[subject] = Override(subject, tier=override_tier, groups=override_groups)
    data: dict[str, Any] = {
        "version": 1,
        "default_tier": default_tier,
        "operations": {"default": default_weights, **operations},
        "tiers": tiers_data,
    }
    written_empty: bool = draw(st.booleans())
    if overrides_data or written_empty:
        data["overrides"] = overrides_data
    config = LimitsConfig(
        default_tier=default_tier,
        tiers=tiers,
        operations={name: Operation(name, w) for name, w in operations.items()},
        default_operation=Operation("default", default_weights),
        overrides=overrides,
    )
    return data, config


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.booleans())
def test_a_valid_config_rendered_to_yaml_reads_back_as_itself(
    case: tuple[dict[str, Any], LimitsConfig], flow: bool
) -> None:
    data, expected = case
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=flow, allow_unicode=True)
    config = parse_limits(text, "random.yaml")
    assert config.default_tier == expected.default_tier
    assert config.tiers == expected.tiers
    assert config.operations == expected.operations
    assert config.default_operation == expected.default_operation
    assert config.overrides == expected.overrides
    assert (config.source, config.sha256) == ("random.yaml", hashlib.sha256(text.encode()).hexdigest())


def _parse_or_refuse(text: str) -> None:
    try:
        parse_limits(text, "fuzz.yaml")
    except LimitsError as error:
        assert str(error).startswith("fuzz.yaml:")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_garbage_raises_nothing_but_limits_error(text: str) -> None:
    _parse_or_refuse(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_of_a_good_file_raise_nothing_but_limits_error(data: st.DataObject) -> None:
    text = BASE
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 12)))
        insert = data.draw(
            st.sampled_from(["", "x", " ", "\n", ":", "- ", "[", "}", "*a", "&a ", "!!str ", "0", "yes"])
        )
        text = text[:start] + insert + text[end:]
    _parse_or_refuse(text)
