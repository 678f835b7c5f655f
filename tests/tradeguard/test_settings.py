"""The settings reader: types, ranges and the variable named in every error; the _FILE secret convention."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradeguard.settings import Env, SettingsError


def env(**values: str) -> Env:
    return Env("TRADEGUARD_X", {f"TRADEGUARD_X_{k}": v for k, v in values.items()})


def test_unset_and_empty_take_the_default() -> None:
    assert env().integer("N", 7) == 7
    assert env(N="").integer("N", 7) == 7
    assert env().text("S", "d") == "d"
    assert env().optional_port("P") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "TRADEGUARD_X_PORT must be an integer between 0 and 65535, got 'abc'"),
        ("70000", "TRADEGUARD_X_PORT must be an integer between 0 and 65535, got 70000"),
        ("-1", "TRADEGUARD_X_PORT must be an integer between 0 and 65535, got -1"),
        ("1.5", "TRADEGUARD_X_PORT must be an integer between 0 and 65535, got '1.5'"),
    ],
)
def test_a_bad_port_names_the_variable(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as error:
        env(PORT=value).port("PORT", 1)
    assert str(error.value) == message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "x", "0.001", "61"])
def test_numbers_must_be_finite_and_in_range(value: str) -> None:
    with pytest.raises(SettingsError, match="TRADEGUARD_X_T must be a"):
        env(T=value).number("T", 1.0, low=0.01, high=60.0)


def test_flags_and_choices() -> None:
    assert env(F="yes").flag("F", False) is True
    assert env(F="OFF").flag("F", True) is False
    with pytest.raises(SettingsError, match="TRADEGUARD_X_F must be true or false"):
        env(F="maybe").flag("F", False)
    assert env(M="pkcs11").choice("M", "local", ("local", "pkcs11")) == "pkcs11"
    with pytest.raises(SettingsError, match="TRADEGUARD_X_M must be one of local, pkcs11, got 'hsm'"):
        env(M="hsm").choice("M", "local", ("local", "pkcs11"))


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_any_integer_in_range_reads_back_and_any_outside_is_refused(n: int) -> None:
    e = env(N=str(n))
    if 0 <= n <= 1000:
        assert e.integer("N", 0, low=0, high=1000) == n
    else:
        with pytest.raises(SettingsError, match="TRADEGUARD_X_N"):
            e.integer("N", 0, low=0, high=1000)


def _secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secret_from_an_owner_only_file(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "s3cret value\n")
    assert env(PASS_FILE=str(path)).secret("PASS") == "s3cret value"


def test_secret_file_readable_by_others_is_refused_and_the_value_never_shown(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "s3cret value", 0o644)
    with pytest.raises(SettingsError) as error:
        env(PASS_FILE=str(path)).secret("PASS")
    assert "chmod 600" in str(error.value) and "TRADEGUARD_X_PASS_FILE" in str(error.value)
    assert "s3cret" not in str(error.value)


def test_secret_file_that_is_a_symlink_or_empty_is_refused(tmp_path: Path) -> None:
    target = _secret_file(tmp_path, "s3cret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SettingsError, match="cannot open"):
        env(PASS_FILE=str(link)).secret("PASS")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(SettingsError, match="is empty"):
        env(PASS_FILE=str(empty)).secret("PASS")


def test_plain_secret_leaves_the_environment_and_both_forms_at_once_are_refused(tmp_path: Path) -> None:
    environ = {"TRADEGUARD_X_PASS": "plain s3cret"}
    assert Env("TRADEGUARD_X", environ).secret("PASS") == "plain s3cret"
    assert "TRADEGUARD_X_PASS" not in environ  # never inherited by a child process
    path = _secret_file(tmp_path, "s3cret")
    environ = {"TRADEGUARD_X_PASS": "plain s3cret", "TRADEGUARD_X_PASS_FILE": str(path)}
    with pytest.raises(SettingsError, match="not both") as error:
        Env("TRADEGUARD_X", environ).secret("PASS")
    assert "s3cret" not in str(error.value)
    assert "TRADEGUARD_X_PASS" not in environ


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEGUARD_X_N", "42")
    assert Env("TRADEGUARD_X").integer("N", 0) == 42
    assert Env("TRADEGUARD_X").environ is os.environ


@pytest.mark.parametrize(
    "value", ["127.0.0.1", ":50054", "host:0", "host:65536", "host:5x", "a b:1", "h\x00:1"]
)
def test_a_bad_target_names_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match=r"TG_X_AUDIT_TARGET must be host:port"):
        Env("TG_X", {"TG_X_AUDIT_TARGET": value}).target("AUDIT_TARGET", "127.0.0.1:1")


def test_targets_and_workloads() -> None:
    env = Env("TG_X", {"TG_X_T": " [::1]:50053 ", "TG_X_W": "desk, echo ,,desk"})
    assert env.target("T", "x:1") == "[::1]:50053" and env.target("UNSET", "127.0.0.1:9") == "127.0.0.1:9"
    assert env.workloads("W") == frozenset({"desk", "echo"}) and env.workloads("UNSET") == frozenset()
    with pytest.raises(SettingsError, match=r"TG_X_W must be workload names separated by commas, got 'Desk'"):
        Env("TG_X", {"TG_X_W": "Desk"}).workloads("W")
