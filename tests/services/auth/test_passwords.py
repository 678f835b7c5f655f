"""Passwords (services/auth/passwords.py): the policy, Argon2id with the OWASP parameters, verification off the
event loop, the dummy hash for unknown users, rehash detection."""

from __future__ import annotations

import asyncio
import threading
from typing import Literal

import argon2
import pytest
from argon2 import PasswordHasher, Type
from hypothesis import given, settings
from hypothesis import strategies as st

from services.auth.passwords import (
    DUMMY_HASH,
    MAX_LENGTH,
    MIN_LENGTH,
    Passwords,
    check_password_policy,
    new_hasher,
    normalize_password,
)
from tradeguard.errors import InvalidArgument

GOOD = "correct horse battery staple"


def refused(password: str, username: str = "alice") -> str:
    with pytest.raises(InvalidArgument) as error:
        check_password_policy(password, username)
    assert [v.field for v in error.value.violations] == ["password"]
    assert password not in error.value.message or len(password) < 3  # the password itself is never echoed
    return error.value.violations[0].description


def test_length_is_counted_after_nfkc() -> None:
    assert check_password_policy("x" * 5 + "yz1234567", "alice")  # 14 characters, fine
    assert "at least 12" in refused("short pass1")  # 11
    assert check_password_policy("a" * 3 + "b" * 2 + "c" * 251, "alice")  # exactly 256
    assert "at most 256" in refused("ab" * 128 + "c")  # 257
    # "ﬀ" (U+FB00) is one character that NFKC turns into two: 6 ligatures count as 12 characters
    assert normalize_password("\ufb00" * 6) == "ff" * 6
    assert check_password_policy("\ufb00" * 3 + "tradexyz!", "alice") == "ff" * 3 + "tradexyz!"
    assert "at least 12" in refused("\u2460\u2461\u2462abcdefg")  # circled digits → 1 2 3: 10 characters


def test_no_composition_rules() -> None:
    """NIST 800-63B: no "one digit, one capital" rules: a long lowercase passphrase is fine, so is Unicode."""
    assert check_password_policy("correct horse battery staple", "alice")
    assert check_password_policy("пароль для торговли", "alice")
    assert check_password_policy("🦊🦊🦊 long emoji phrase", "alice")


def test_the_username_is_refused() -> None:
    assert "username" in refused("alice.trader", "alice.trader")
    assert "username" in refused("ALICE.TRADER", "alice.trader")  # case-folded
    assert "username" in refused("alice.trader1", "alice.trader")  # the username plus a little
    assert "username" in refused("alicealicealice", "alice")  # repeated
    assert check_password_policy("alice likes long walks", "alice")  # the username inside a real passphrase


def test_runs_and_common_passwords_are_refused() -> None:
    assert "repeated" in refused("aaaaaaaaaaaa")
    assert "repeated" in refused("123456789012")
    assert "repeated" in refused("abcdefghijklm")
    assert "repeated" in refused("zyxwvutsrqpo")
    assert "common" in refused("Password1234")
    assert "common" in refused("qwerty123456")


def test_the_parameters_are_owasps_argon2id() -> None:
    parameters = argon2.extract_parameters(asyncio.run(Passwords().hash(GOOD)))
    assert parameters.type is Type.ID
    assert (parameters.memory_cost, parameters.time_cost, parameters.parallelism) == (19 * 1024, 2, 1)
    assert (parameters.salt_len, parameters.hash_len) == (16, 32)


def test_the_dummy_hash_costs_what_a_real_one_costs() -> None:
    """The dummy hash has exactly the parameters of the hashes the service makes (else unknown users would
    answer faster or slower than known ones)."""
    ours = argon2.extract_parameters(new_hasher().hash(GOOD))
    assert argon2.extract_parameters(DUMMY_HASH) == ours
    assert not Passwords().needs_rehash(DUMMY_HASH)


async def test_hash_and_verify() -> None:
    passwords = Passwords()
    stored = await passwords.hash(GOOD)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert GOOD not in stored
    assert await passwords.verify(stored, GOOD)
    assert not await passwords.verify(stored, GOOD + " ")
    assert not await passwords.verify(stored, "")
    assert await passwords.hash(GOOD) != stored  # salted


async def test_verification_is_on_the_nfkc_form() -> None:
    passwords = Passwords()
    stored = await passwords.hash("\ufb00" * 3 + "tradexyz!")
    assert await passwords.verify(stored, "ffffff" + "tradexyz!")


class RecordingHasher(PasswordHasher):
    """argon2-cffi's hasher recording which hash each verification ran against, and on which thread."""

    def __init__(self) -> None:
        hasher = new_hasher()
        super().__init__(
            time_cost=hasher.time_cost,
            memory_cost=hasher.memory_cost,
            parallelism=hasher.parallelism,
            hash_len=hasher.hash_len,
            salt_len=hasher.salt_len,
            type=hasher.type,
        )
        self.verified: list[tuple[str, str]] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified.append((str(hash), threading.current_thread().name))
        return super().verify(hash, password)

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.verified.append(("hash", threading.current_thread().name))
        return super().hash(password, salt=salt)


async def test_unknown_users_run_the_same_argon2id_off_the_event_loop() -> None:
    hasher = RecordingHasher()
    passwords = Passwords(hasher)
    stored = await passwords.hash(GOOD)
    assert not await passwords.verify(None, GOOD)  # unknown user: the dummy hash, and never True
    assert not await passwords.verify(
        stored, "x" * 5000
    )  # far too long: not normalised, still one Argon2id run
    assert not await passwords.verify("not a phc string", GOOD)  # a broken record: refused, the dummy runs
    assert await passwords.verify(stored, GOOD)
    loop_thread = threading.current_thread().name
    assert [h for h, _ in hasher.verified] == [
        "hash",
        DUMMY_HASH,
        DUMMY_HASH,
        "not a phc string",
        DUMMY_HASH,
        stored,
    ]
    assert all(
        thread != loop_thread for _, thread in hasher.verified
    )  # every Argon2id run in a worker thread


async def test_the_event_loop_keeps_running_while_hashing() -> None:
    passwords = Passwords()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.gather(*(passwords.verify(None, GOOD) for _ in range(4)))
    task.cancel()
    assert ticks > 10  # the loop turned while four Argon2id verifications ran


def test_rehash_is_needed_for_other_parameters() -> None:
    passwords = Passwords()
    weaker = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1, type=Type.ID).hash(GOOD)
    argon2i = PasswordHasher(type=Type.I, time_cost=2, memory_cost=19 * 1024, parallelism=1).hash(GOOD)
    assert passwords.needs_rehash(weaker)
    assert passwords.needs_rehash(argon2i)
    assert passwords.needs_rehash("$2b$12$notargon")
    assert not passwords.needs_rehash(new_hasher().hash(GOOD))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=20))
def test_policy_never_crashes_and_answers_the_normalised_password(password: str, username: str) -> None:
    try:
        normalized = check_password_policy(password, username)
    except InvalidArgument as error:
        assert [v.field for v in error.violations] == ["password"]
        return
    assert normalized == normalize_password(password)
    assert MIN_LENGTH <= len(normalized) <= MAX_LENGTH
