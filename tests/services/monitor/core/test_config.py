"""The configuration file: the packaged default parses with every detector on; a missing section is off;
every refusal names the line and the field (unknown keys, bad values, duplicate actions, bad versions, YAML
the kit's reader refuses); hot reload keeps the last good configuration (the kit's WatchedFile)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.monitor.config_file import MonitorFile
from services.monitor.core.config import ConfigError, parse_config
from services.monitor.model import ActionKind, Severity
from services.monitor.settings import packaged_config


def test_the_packaged_default_turns_every_detector_on() -> None:
    config = parse_config(packaged_config().read_text(), "monitor.yaml")
    assert config.rate_spike.enabled and config.geography.enabled
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
