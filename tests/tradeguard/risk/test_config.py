"""The risk file (tradeguard/risk/config.py): the example parses to the limits it says; every refusal names its
line and field; random valid files read as the data they were made from; garbage raises nothing but
RiskFileError; the file in force is hot-reloaded and a bad edit keeps the last good limits."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tradeguard.risk import config as config_module
from tradeguard.risk.config import MAX_THROTTLE_MESSAGES, RiskFile, RiskFileError, parse_risk
from tradeguard.risk.model import AccountLimits, RiskConfig, Throttle
from tradeguard.testing import FakeClock, LogCapture

BASE = """\
version: 1
restricted_symbols: [GME, XYZ/USD]
defaults:
  max_quantity: 100000
  max_notional: 5000000.50
  price_collar_bps: 500
  credit_limit: "2e7"
  duplicate_window: 500ms
  throttle: {messages: 100, window: 1s}
  restricted_symbols: [DOGE-USD]
accounts:
  acct-1:
    max_quantity: 500
    credit_limit: null
    restricted_symbols: []
  acct_2: {throttle: null, duplicate_window: 0}
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def refusal(text: str) -> str:
    with pytest.raises(RiskFileError) as caught:
        parse_risk(text, "risk.yaml")
    return str(caught.value)


def test_the_base_text_parses_to_the_limits_it_says() -> None:
    config = parse_risk(BASE, "risk.yaml")
    assert (config.source, config.sha256) == ("risk.yaml", hashlib.sha256(BASE.encode()).hexdigest())
    assert config.restricted_symbols == {"GME", "XYZ/USD"}
    assert config.defaults == AccountLimits(
        max_quantity=Decimal(100000),
        max_notional=Decimal("5000000.50"),
        price_collar=Decimal("0.05"),
        credit_limit=Decimal("2e7"),
        restricted_symbols=frozenset({"DOGE-USD", "GME", "XYZ/USD"}),
        duplicate_window_us=500_000,
        throttle=Throttle(messages=100, window_us=1_000_000),
    )
    # an account takes the defaults' values but for what it sets; null lifts a limit; the global list stays
    assert config.accounts["acct-1"] == AccountLimits(
        max_quantity=Decimal(500),
        max_notional=Decimal("5000000.50"),
        price_collar=Decimal("0.05"),
        credit_limit=None,
        restricted_symbols=frozenset({"GME", "XYZ/USD"}),
        duplicate_window_us=500_000,
        throttle=Throttle(messages=100, window_us=1_000_000),
    )
    acct_2 = config.accounts["acct_2"]
    assert (acct_2.throttle, acct_2.duplicate_window_us, acct_2.max_quantity) == (None, 0, Decimal(100000))
    assert config.limits_for("anyone") is config.defaults
    assert config.max_duplicate_window_us == 500_000


def test_the_packaged_example_parses() -> None:
    path = Path(config_module.__file__).with_name("risk.yaml")
    config = parse_risk(path.read_text(), str(path))
    assert config.defaults.max_quantity == Decimal(1_000_000)
    assert config.defaults.price_collar == Decimal("0.1")
    assert config.defaults.throttle == Throttle(messages=200, window_us=1_000_000)
    assert config.accounts == {}
    # the README's example order (BTC-USD at 64000.25) is inside the collar around the static price
    assert config.reference_prices == {"BTC-USD": Decimal(64000), "ETH-USD": Decimal(3200)}


def test_the_smallest_file_has_no_limits() -> None:
    config = parse_risk("version: 1\ndefaults: {}\n", "risk.yaml")
    assert (config.defaults, config.accounts, config.restricted_symbols) == (AccountLimits(), {}, frozenset())
    assert config.reference_prices == {}


def test_static_reference_prices_are_read_exactly() -> None:
    text = "version: 1\ndefaults: {}\nreference_prices: {BTC-USD: 64000.25, ETH/USD: '3200.5'}\n"
    config = parse_risk(text, "risk.yaml")
    assert config.reference_prices == {"BTC-USD": Decimal("64000.25"), "ETH/USD": Decimal("3200.5")}


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        ("{btc: 1}", "risk.yaml:3: reference_prices.btc: not a valid symbol"),
        ("{BTC-USD: 0}", "risk.yaml:3: reference_prices.BTC-USD: a reference price must be greater than 0"),
        ("{BTC-USD: -1}", "risk.yaml:3: reference_prices.BTC-USD:"),
        ("{BTC-USD: x}", "risk.yaml:3: reference_prices.BTC-USD: 'x' is not a decimal number"),
        ("[1]", "risk.yaml:3: reference_prices:"),
    ],
)
def test_bad_reference_prices_are_refused(prices: str, expected: str) -> None:
    with pytest.raises(RiskFileError) as error:
        parse_risk(f"version: 1\ndefaults: {{}}\nreference_prices: {prices}\n", "risk.yaml")
    assert str(error.value).startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (edit("version: 1", "version: 2"), "risk.yaml:1: version: 2 is not a version"),
        (edit("version: 1\n", ""), "risk.yaml:1: version: missing"),
        (edit("defaults:", "default:"), "risk.yaml:3: default: unknown key (allowed: version,"),
        (
            edit("  max_quantity: 100000", "  max_quantity: lots"),
            "risk.yaml:4: defaults.max_quantity: 'lots' is not",
        ),
        (
            edit("  max_quantity: 100000", "  max_quantity: -1"),
            "risk.yaml:4: defaults.max_quantity: '-1' is out of",
        ),
        (
            edit("  max_quantity: 100000", "  max_quantity: 1e25"),
            "risk.yaml:4: defaults.max_quantity: '1e25' is out",
        ),
        (
            edit("  max_quantity: 100000", "  max_quantity: .nan"),
            "risk.yaml:4: defaults.max_quantity: '.nan' is not",
        ),
        (
            edit("  max_quantity: 100000", "  max_quantity: true"),
            "risk.yaml:4: defaults.max_quantity: 'true' is not",
        ),
        (
            edit("  max_quantity: 100000", "  max_quantity: [1]"),
            "risk.yaml:4: defaults.max_quantity: a list is not",
        ),
        (
            edit("price_collar_bps: 500", "price_collar_bps: 0.05"),
            "risk.yaml:6: defaults.price_collar_bps: '0.05' is a number",
        ),
        (
            edit("price_collar_bps: 500", "price_collar_bps: 10001"),
            "risk.yaml:6: defaults.price_collar_bps: 10001 is out of range",
        ),
        (
            edit("duplicate_window: 500ms", "duplicate_window: 2h"),
            "risk.yaml:8: defaults.duplicate_window: '2h' is out of range",
        ),
        (
            edit("duplicate_window: 500ms", "duplicate_window: soon"),
            "risk.yaml:8: defaults.duplicate_window: 'soon' is not a duration",
        ),
        (
            edit("{messages: 100, window: 1s}", "{messages: 100}"),
            "risk.yaml:9: defaults.throttle.window: missing",
        ),
        (
            edit("{messages: 100, window: 1s}", f"{{messages: {MAX_THROTTLE_MESSAGES + 1}, window: 1s}}"),
            f"risk.yaml:9: defaults.throttle.messages: {MAX_THROTTLE_MESSAGES + 1} is out of range",
        ),
        (edit("window: 1s}", "window: 0}"), "risk.yaml:9: defaults.throttle.window: '0' is out of range"),
        (edit("window: 1s}", "window: 1s, burst: 2}"), "risk.yaml:9: defaults.throttle.burst: unknown key"),
        (
            edit("[DOGE-USD]", "[doge]"),
            "risk.yaml:10: defaults.restricted_symbols[0]: 'doge' is not a valid symbol",
        ),
        (edit("[GME, XYZ/USD]", "[GME, GME]"), "risk.yaml:2: restricted_symbols[1]: 'GME' is listed twice"),
        (edit("[GME, XYZ/USD]", "GME"), "risk.yaml:2: restricted_symbols: 'GME' where a list is expected"),
        (edit("  acct-1:", "  -bad:"), "risk.yaml:12: accounts.-bad: not a valid account id"),
        (edit("  acct-1:", '  "acct 1":'), 'risk.yaml:12: accounts["acct 1"]: not a valid account id'),
        (
            edit("    max_quantity: 500", "    max_quantity: 500\n    max_quantity: 501"),
            "risk.yaml:14: accounts.acct-1.max_quantity: duplicate key",
        ),
        (
            edit("    credit_limit: null", "    credit: null"),
            "risk.yaml:14: accounts.acct-1.credit: unknown key",
        ),
        (
            edit("    restricted_symbols: []", "    restricted_symbols: null"),
            "risk.yaml:15: accounts.acct-1.restricted_symbols: 'null' where a list",
        ),
        # only plain, safe YAML
        (
            edit("version: 1", "version: !!python/object/apply:os.system [echo]"),
            "risk.yaml:1: version: the tag tag:yaml.org,2002:python/object/apply:os.system is not allowed",
        ),
        (edit("  acct_2: {throttle: null, duplicate_window: 0}", "  acct_2: *a"), "risk.yaml:16: (syntax): "),
        (
            edit("defaults:", "<<: {}\ndefaults:"),
            "risk.yaml:3: (root): the tag tag:yaml.org,2002:merge is not allowed",
        ),
        ("", "risk.yaml:1: (root): the file is empty"),
        ("- 1\n", "risk.yaml:1: (root): a list where a mapping is expected"),
        ("a:" + " [" * 40, "risk.yaml:1: (syntax): nested more than 16 levels deep"),
    ],
)
def test_a_refusal_names_the_line_and_the_field(text: str, expected: str) -> None:
    assert refusal(text).startswith(expected)


def test_aliases_are_refused_at_the_first_one() -> None:
    text = edit("  acct_2: {throttle: null, duplicate_window: 0}", "  acct_2: &a {}\n  acct_3: *a")
    assert refusal(text).startswith("risk.yaml:17: (syntax): aliases (*name) are not allowed")


def test_a_file_larger_than_the_bound_is_refused_before_it_is_read() -> None:
    assert refusal(BASE + "#" * (1 << 20)).startswith("risk.yaml:1: (file): ")


# --- random valid files, and garbage -------------------------------------------------------------------------

decimals = st.decimals(
    min_value=0, max_value=Decimal("1e12"), places=4, allow_nan=False, allow_infinity=False
)
symbols = st.from_regex(r"[A-Z0-9]{1,12}(?:[-/][A-Z0-9]{1,12})?", fullmatch=True)
limit_data = st.fixed_dictionaries(
    {},
    optional={
        "max_quantity": decimals,
        "max_notional": decimals,
        "price_collar_bps": st.integers(1, 10_000),
        "credit_limit": st.none() | decimals,
        "duplicate_window": st.integers(0, 3600),
        "throttle": st.fixed_dictionaries(
            {
                "messages": st.integers(1, MAX_THROTTLE_MESSAGES),
                "window": st.sampled_from(["1ms", "1s", "2m", 60]),
            }
        ),
        "restricted_symbols": st.lists(symbols, unique=True, max_size=3),
    },
)
files = st.fixed_dictionaries(
    {"version": st.just(1), "defaults": limit_data},
    optional={
        "restricted_symbols": st.lists(symbols, unique=True, max_size=3),
        "accounts": st.dictionaries(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,10}", fullmatch=True), limit_data, max_size=3
        ),
    },
)


def _as_yaml(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # quoted: exactly as written
    if isinstance(value, dict):
        return {k: _as_yaml(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_yaml(v) for v in value]
    return value


_DURATIONS = {"1ms": 1_000, "1s": 1_000_000, "2m": 120_000_000}


def _expected(data: dict[str, Any], base: AccountLimits, restricted: frozenset[str]) -> AccountLimits:
    fields = {name: getattr(base, name) for name in AccountLimits.__slots__}
    for key in ("max_quantity", "max_notional", "credit_limit"):
        if key in data:
            fields[key] = data[key]
    if "price_collar_bps" in data:
        fields["price_collar"] = Decimal(data["price_collar_bps"]) / 10_000
    if "duplicate_window" in data:
        fields["duplicate_window_us"] = data["duplicate_window"] * 1_000_000
    if "throttle" in data:
        window = data["throttle"]["window"]
        fields["throttle"] = Throttle(
            data["throttle"]["messages"],
            window * 1_000_000 if isinstance(window, int) else _DURATIONS[window],
        )
    if "restricted_symbols" in data:
        fields["restricted_symbols"] = frozenset(data["restricted_symbols"])
    fields["restricted_symbols"] = fields["restricted_symbols"] | restricted
    return AccountLimits(**fields)


@settings(max_examples=150, deadline=None)
@given(data=files, flow=st.booleans())
def test_a_random_valid_file_reads_as_its_data(data: dict[str, Any], flow: bool) -> None:
    text = yaml.safe_dump(_as_yaml(data), sort_keys=False, default_flow_style=flow)
    config = parse_risk(text, "random.yaml")
    restricted = frozenset(data.get("restricted_symbols", ()))
    defaults = _expected(data["defaults"], AccountLimits(), frozenset())
    assert config.defaults == _expected(data["defaults"], AccountLimits(), restricted)
    assert config.restricted_symbols == restricted
    assert config.accounts == {
        account: _expected(limits, defaults, restricted)
        for account, limits in data.get("accounts", {}).items()
    }


def _parse_or_refuse(text: str) -> None:
    try:
        parse_risk(text, "fuzz.yaml")
    except RiskFileError as error:
        assert str(error).startswith("fuzz.yaml:")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_garbage_raises_nothing_but_the_risk_file_error(text: str) -> None:
    _parse_or_refuse(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mangled_valid_file_raises_nothing_but_the_risk_file_error(data: st.DataObject) -> None:
    lines = BASE.splitlines(keepends=True)
    index = data.draw(st.integers(0, len(lines) - 1))
    junk = data.draw(
        st.sampled_from(["", "- ", "{", "]", ": ", "!!str ", "&a ", "*a", "  ", "null", "~", "1e999"])
    )
    cut = data.draw(st.integers(0, len(lines[index])))
    lines[index] = lines[index][:cut] + junk + lines[index][cut:]
    _parse_or_refuse("".join(lines))


# --- the file in force ----------------------------------------------------------------------------------------


def test_the_risk_file_is_hot_reloaded_and_a_bad_edit_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "risk.yaml"
    with pytest.raises(RiskFileError, match=r"risk\.yaml: cannot read the risk limits file"):
        RiskFile(path, FakeClock())
    path.write_text(BASE)
    logs = LogCapture()
    risk = RiskFile(path, FakeClock())
    first: RiskConfig = risk.current
    assert first.accounts["acct-1"].max_quantity == Decimal(500)
    (loaded,) = [line for line in logs.lines() if line.get("event") == "risk.limits_loaded"]
    assert (loaded["accounts"], loaded["restricted_symbols"], loaded["sha256"]) == (2, 2, risk.sha256)

    path.write_text(edit("    max_quantity: 500", "    max_quantity: five"))
    assert risk.check() is False
    assert risk.current is first
    assert risk.last_error.startswith(f"{path}:13: accounts.acct-1.max_quantity: 'five' is not a decimal")
    assert [line["event"] for line in logs.lines()].count("risk.limits_rejected") == 1

    path.write_text(edit("    max_quantity: 500", "    max_quantity: 700"))
    assert risk.check() is True
    assert (risk.current.accounts["acct-1"].max_quantity, risk.last_error) == (Decimal(700), "")

    path.unlink()
    assert risk.check() is False
    assert risk.last_error == f"{path}: the file is missing; the last good risk limits stay in force"
