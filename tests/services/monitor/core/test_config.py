"""The configuration file: the packaged default parses with every detector on; a missing section is off;
every refusal names the line and the field (unknown keys, bad values, duplicate actions, bad versions, YAML
the kit's reader refuses); hot reload keeps the last good configuration (the kit's WatchedFile)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.config_file import MonitorFile
from services.monitor.core.config import MAX_AMOUNT, ConfigError, parse_config
from services.monitor.model import ActionKind, Severity
from services.monitor.settings import packaged_config


def test_the_packaged_default_turns_every_detector_on() -> None:
    config = parse_config(packaged_config().read_text(), "monitor.yaml")
    assert config.rate_spike.enabled and config.geography.enabled
    assert config.order_volume.enabled and config.order_notional.enabled
    notional = config.order_notional.subjects["api_key"]
    assert (notional.amount, notional.kill_scope) == (Decimal(5_000_000), "account")
    assert notional.actions == (ActionKind.NOTIFY, ActionKind.KILL_SWITCH)
    assert config.auth_failures.enabled and config.permission_scan.enabled and config.risk_rejections.enabled
    assert config.auth_failures.subjects["api_key"].actions == (ActionKind.NOTIFY, ActionKind.REVOKE_KEY)
    assert config.risk_rejections.subjects["account"].actions == (ActionKind.NOTIFY, ActionKind.KILL_SWITCH)
    assert config.budgets[ActionKind.KILL_SWITCH] == 2
    assert config.exclude_recorders == frozenset({"monitor"})
    assert len(config.sha256) == 64


def test_a_section_left_out_is_off() -> None:
    config = parse_config(
        "version: 1\nauth_failures:\n  subjects:\n    source_ip: {threshold: 3}\n", "m.yaml"
    )
    assert config.auth_failures.enabled and not config.rate_spike.enabled and not config.geography.enabled
    assert not config.order_volume.enabled and not config.order_notional.enabled
    rule = config.auth_failures.subjects["source_ip"]
    assert (rule.threshold, rule.severity, rule.actions) == (3, Severity.WARNING, (ActionKind.NOTIFY,))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "m.yaml:1: (root): the file is empty"),
        ("version: 2\n", "m.yaml:1: version: not a version"),
        ("version: 1\nbogus: 1\n", "m.yaml:2: bogus: unknown key"),
        (
            "version: 1\nauth_failures:\n  subjects:\n    api_key: {threshold: 0}\n",
            "m.yaml:4: auth_failures.subjects.api_key.threshold: 0 is out of range",
        ),
        (
            "version: 1\nauth_failures:\n  subjects:\n    api_key: {threshold: 3, actions: [notify, notify]}\n",
            "auth_failures.subjects.api_key.actions[1]: 'notify' is listed twice",
        ),
        (
            "version: 1\nauth_failures:\n  subjects:\n    api_key: {threshold: 3, actions: [explode]}\n",
            "'explode' is not one of notify, revoke_key, kill_switch",
        ),
        (
            "version: 1\nauth_failures:\n  subjects:\n    host: {threshold: 3}\n",
            "auth_failures.subjects.host: unknown key",
        ),
        ("version: 1\nrate_spike:\n  alpha: 2\n  subjects: {}\n", "rate_spike.alpha: '2' is out of range"),
        (
            "version: 1\norder_notional:\n  subjects:\n    api_key: {threshold: lots}\n",
            "m.yaml:4: order_notional.subjects.api_key.threshold: 'lots' is not a decimal number",
        ),
        (
            "version: 1\norder_volume:\n  window: 60s\n  subjects: {}\n",
            "m.yaml:3: order_volume.window: unknown key",
        ),
        (
            "version: 1\norder_volume:\n  subjects:\n    api_key: {severity: info}\n",
            "order_volume.subjects.api_key",
        ),
        (
            "version: 1\ngeography:\n  new_country: {severity: loud}\n",
            "'loud' is not one of info, warning, critical",
        ),
        ("version: 1\nbudgets: {revoke_key: -1}\n", "budgets.revoke_key: -1 is out of range"),
        (
            "version: 1\nrisk_rejections:\n  subjects:\n    account: {threshold: 3, kill_scope: global}\n",
            "'global' is not account or api_key",
        ),
        (
            "version: 1\nexclude_recorders: [Not_A_Name]\n",
            "exclude_recorders[0]: 'Not_A_Name' is not a valid",
        ),
        ("version: 1\nauth_failures: &a\n  subjects: {}\npermission_scan: *a\n", "alias"),
    ],
)
def test_refusals_name_the_line_and_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(text, "m.yaml")
    assert message in str(refused.value)


def test_order_sections_read_amount_thresholds_exactly_with_the_rate_keys() -> None:
    config = parse_config(
        "version: 1\norder_notional:\n  bucket: 1m\n  sigmas: 10\n  warmup_buckets: 5\n  subjects:\n"
        "    account: {threshold: 2500000.50, severity: critical, actions: [kill_switch]}\n"
        "    api_key: {threshold: 0}\n"
        "order_volume:\n  enabled: false\n  subjects:\n    api_key: {threshold: 0.5}\n",
        "m.yaml",
    )
    notional = config.order_notional
    assert notional.enabled and (notional.bucket_us, notional.sigmas, notional.warmup_buckets) == (
        60_000_000,
        10,
        5,
    )
    account = notional.subjects["account"]
    assert account.amount == Decimal("2500000.50") and account.actions == (ActionKind.KILL_SWITCH,)
    assert account.kill_scope == "account" and notional.subjects["api_key"].amount == 0
    assert not config.order_volume.enabled and config.order_volume.subjects["api_key"].amount == Decimal(
        "0.5"
    )


@settings(max_examples=50, deadline=None)
@given(
    amount=st.decimals(
        min_value=-10, max_value=Decimal("2e15"), allow_nan=False, allow_infinity=False, places=2
    )
)
def test_an_amount_threshold_is_accepted_exactly_within_its_range(amount: Decimal) -> None:
    text = f"version: 1\norder_volume:\n  subjects:\n    api_key: {{threshold: {amount}}}\n"
    if Decimal(0) <= amount <= MAX_AMOUNT:
        assert parse_config(text, "m.yaml").order_volume.subjects["api_key"].amount == amount
    else:
        with pytest.raises(
            ConfigError, match=r"m.yaml:4: order_volume.subjects.api_key.threshold: .* out of range"
        ):
            parse_config(text, "m.yaml")


def test_a_bad_edit_keeps_the_last_good_configuration(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text("version: 1\nauth_failures:\n  subjects:\n    api_key: {threshold: 3}\n")
    watched = MonitorFile(path, lambda: 0)
    assert watched.current.auth_failures.subjects["api_key"].threshold == 3
    path.write_text("version: 1\nauth_failures:\n  subjects:\n    api_key: {threshold: nope}\n")
    watched.check()
    assert watched.current.auth_failures.subjects["api_key"].threshold == 3
    assert "threshold" in watched.last_error
    path.write_text("version: 1\nauth_failures:\n  subjects:\n    api_key: {threshold: 7}\n")
    watched.check()
    assert watched.current.auth_failures.subjects["api_key"].threshold == 7 and watched.last_error == ""
