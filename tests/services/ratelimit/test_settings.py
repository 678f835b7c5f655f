"""The rate-limit service's settings from the environment (TRADEGUARD_RATELIMIT_*): defaults, every value
range-checked, and every refusal naming its variable (a Redis password never shown)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ratelimit.service import SERVICE
from services.ratelimit.settings import Settings, default_limits_file
from tradeguard.service import read_settings
from tradeguard.settings import SettingsError

P = "TRADEGUARD_RATELIMIT_"


def read(tmp_path: Path, **variables: str) -> Settings:
    environ = {"TRADEGUARD_HOME": str(tmp_path), **{P + name: value for name, value in variables.items()}}
    return read_settings(SERVICE, environ)


def test_defaults(tmp_path: Path) -> None:
    settings = read(tmp_path)
    assert settings.limits_file == tmp_path.resolve() / "config" / "limits.yaml"
    assert settings.limits_file == default_limits_file(settings.server.home)
    assert settings.redis is None  # counters in process
    assert settings.store_timeout_s == 0.05
    assert settings.reload_interval_s == 1.0
    assert settings.max_counters == 1_000_000
    assert settings.guard_workloads == frozenset()
    assert settings.server.port == 50052 and settings.server.name == "ratelimit"


def test_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = read(
        tmp_path,
        LIMITS_FILE="etc/limits.yaml",
        REDIS_URL="redis+cluster://10.0.0.1:7000?timeout=1",
        STORE_TIMEOUT_MS="200",
        RELOAD_INTERVAL_S="0.5",
        MAX_COUNTERS="10",
        GUARD_WORKLOADS=" desk, echo ,",
    )
    assert settings.limits_file == tmp_path.resolve() / "etc" / "limits.yaml"  # relative: to the directory
    assert settings.redis is not None and settings.redis.cluster and settings.redis.port == 7000
    assert settings.store_timeout_s == 0.2
    assert settings.reload_interval_s == 0.5
    assert settings.max_counters == 10
    assert settings.guard_workloads == {"desk", "echo"}
    bounds = read(tmp_path, STORE_TIMEOUT_MS="1", RELOAD_INTERVAL_S="3600", MAX_COUNTERS="100000000")
    assert (bounds.store_timeout_s, bounds.reload_interval_s, bounds.max_counters) == (0.001, 3600, 10**8)
    assert read(tmp_path, STORE_TIMEOUT_MS="5000").store_timeout_s == 5.0


def test_the_redis_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis.password"
    secret.write_text("s3cret-pass\n")
    secret.chmod(0o600)
    settings = read(tmp_path, REDIS_URL="redis://127.0.0.1:6390", REDIS_PASSWORD_FILE=str(secret))
    assert settings.redis is not None and settings.redis.password == "s3cret-pass"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.redis)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("STORE_TIMEOUT_MS", "0", "between 1 and 5000"),
        ("STORE_TIMEOUT_MS", "5001", "between 1 and 5000"),
        ("STORE_TIMEOUT_MS", "0.05", "must be an integer"),
        ("RELOAD_INTERVAL_S", "0.01", "between 0.1 and 3600"),
        ("RELOAD_INTERVAL_S", "3601", "between 0.1 and 3600"),
        ("RELOAD_INTERVAL_S", "nan", "finite number"),
        ("RELOAD_INTERVAL_S", "soon", "must be a number"),
        ("MAX_COUNTERS", "0", "between 1 and 100000000"),
        ("MAX_COUNTERS", "100000001", "between 1 and 100000000"),
        ("GUARD_WORKLOADS", "desk,Bad_Name", "workload names"),
        ("GUARD_WORKLOADS", "-desk", "workload names"),
        ("LIMITS_FILE", " limits.yaml", "without outer spaces"),
        ("LIMITS_FILE", "limits\x1b.yaml", "without outer spaces"),
        ("REDIS_URL", "http://127.0.0.1:6379", "scheme must be one of"),
        ("REDIS_URL", "redis://127.0.0.1:6379?colour=blue", "colour"),
        ("REDIS_PASSWORD", "only-a-password", "REDIS_URL is not"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    with pytest.raises(SettingsError) as info:
        read(tmp_path, **{variable: value})
    message = str(info.value)
    assert P + variable in message
    assert says in message
    assert "only-a-password" not in message


def test_a_password_in_a_bad_url_is_never_shown(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        read(tmp_path, REDIS_URL="redis://:hunter2-secret@127.0.0.1:notaport")
    assert f"{P}REDIS_URL" in str(info.value) and "hunter2" not in str(info.value)
