"""ApiKeyCredentials with an Ed25519 seed: the key is loaded once, and signs exactly as the seed does."""

from __future__ import annotations

import os

import pytest

from tradeguard import signing
from tradeguard.guard.client import ApiKeyCredentials

PATH = "/tradeguard.trading.v1.TradingService/PlaceOrder"


def test_an_ed25519_key_signs_as_its_seed_does_and_verifies() -> None:
    seed = os.urandom(32)
    key_id = signing.new_key_id(os.urandom)
    credentials = ApiKeyCredentials(key_id, ed25519_seed=seed)
    body = b"\x0a\x04bench"
    for _ in range(2):  # the loaded key is reused: every call signs the same way
        headers = credentials.headers(1_764_000_000_000, "n" * 22, PATH, body)
        # Ed25519 signatures are deterministic (RFC 8032): the loaded key and the raw seed give the same headers
        assert headers == signing.signed_headers(
            signing.Scheme.ED25519, seed, key_id, 1_764_000_000_000, "n" * 22, PATH, body
        )
        fields = dict(headers)
        assert signing.verify_ed25519(
            signing.ed25519_public_key(seed),
            fields[signing.HEADER_SIGNATURE],
            key_id,
            fields[signing.HEADER_TIMESTAMP],
            fields[signing.HEADER_NONCE],
            PATH,
            signing.body_digest(body),
        )


def test_the_loaded_key_is_never_shown_nor_compared() -> None:
    seed = os.urandom(32)
    key_id = signing.new_key_id(os.urandom)
    credentials = ApiKeyCredentials(key_id, ed25519_seed=seed)
    shown = repr(credentials)
    assert seed.hex() not in shown and "Ed25519" not in shown and "_ed25519_key" not in shown
    assert credentials == ApiKeyCredentials(key_id, ed25519_seed=seed)
    with pytest.raises(ValueError, match="32 bytes"):
        ApiKeyCredentials(key_id, ed25519_seed=seed[:31])
