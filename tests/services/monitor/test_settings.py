"""The monitor's settings through the kit's reader: defaults (the packaged configuration when none is installed,
the registry's targets, the credentials file under secrets/), an installed configuration preferred, and refusals
naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.monitor.service import SERVICE
from services.monitor.settings import credentials_file, packaged_config
from tradeguard.service import read_settings
from tradeguard.settings import SettingsError


def test_defaults(tmp_path: Path) -> None:
    settings = read_settings(SERVICE, {"TRADEGUARD_HOME": str(tmp_path)})
    assert settings.config_file == packaged_config()
    assert settings.audit_target == "127.0.0.1:50053" and settings.auth_target == "127.0.0.1:50051"
    assert settings.trading_target == "127.0.0.1:50055"
    assert settings.kill_switch_credentials == credentials_file(tmp_path.resolve())
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'monitor.db'}"
    assert (settings.max_batch, settings.replay_entries, settings.webhook_url) == (500, 10_000, "")
    assert settings.server.port == 50056


def test_an_installed_configuration_is_preferred(tmp_path: Path) -> None:
    installed = tmp_path / "config" / "monitor.yaml"
    installed.parent.mkdir()
    installed.write_text("version: 1\n")
    assert read_settings(SERVICE, {"TRADEGUARD_HOME": str(tmp_path)}).config_file == installed.resolve() or (
        read_settings(SERVICE, {"TRADEGUARD_HOME": str(tmp_path)}).config_file.resolve()
        == installed.resolve()
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("WEBHOOK_URL", "ftp://x", "TRADEGUARD_MONITOR_WEBHOOK_URL must be an http:// or https:// URL"),
        ("WEBHOOK_URL", "https://hooks.example/tg", "needs TRADEGUARD_MONITOR_WEBHOOK_SECRET_FILE"),
        ("SYSLOG_TARGET", "siem", "TRADEGUARD_MONITOR_SYSLOG_TARGET must be host:port"),
        ("MAX_BATCH", "0", "TRADEGUARD_MONITOR_MAX_BATCH must be an integer"),
        ("REPLAY_ENTRIES", "-1", "TRADEGUARD_MONITOR_REPLAY_ENTRIES must be an integer"),
        ("CONFIG_FILE", " x.yaml", "TRADEGUARD_MONITOR_CONFIG_FILE must be a path without outer spaces"),
    ],
)
def test_bad_values_are_refused_by_name(tmp_path: Path, variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        read_settings(SERVICE, {"TRADEGUARD_HOME": str(tmp_path), f"TRADEGUARD_MONITOR_{variable}": value})


def test_the_webhook_secret_is_read_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("a-webhook-secret-0123\n")
    secret.chmod(0o600)
    settings = read_settings(
        SERVICE,
        {
            "TRADEGUARD_HOME": str(tmp_path),
            "TRADEGUARD_MONITOR_WEBHOOK_URL": "https://hooks.example/tg",
            "TRADEGUARD_MONITOR_WEBHOOK_SECRET_FILE": str(secret),
        },
    )
    assert settings.webhook_secret == "a-webhook-secret-0123"
    assert "a-webhook-secret-0123" not in repr(settings)  # the settings may be logged; the secret never is
