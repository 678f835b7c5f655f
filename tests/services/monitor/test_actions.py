"""The monitor's API-key file for the kill switch: absent is None (the action is skipped), readable by others or
out of shape is refused (the service does not start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.monitor.actions import load_credentials

KEY_ID = "tgk_gdkniBsblHGWTJ6lyotTomU8F8jXK66t1dxrre"  # a well-formed key id (its checksum valid)


def test_the_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "monitor-key.json"
    assert load_credentials(path) is None and load_credentials(None) is None
    path.write_text(json.dumps({"key_id": KEY_ID, "secret": "tgs_y"}))
    path.chmod(0o600)
    credentials = load_credentials(path)
    assert credentials is not None and (credentials.key_id, credentials.secret) == (KEY_ID, "tgs_y")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="owner only"):
        load_credentials(path)
    path.chmod(0o600)
    path.write_text(json.dumps({"key_id": KEY_ID}))
    with pytest.raises(ValueError, match="must hold"):
        load_credentials(path)
    path.write_text(json.dumps({"key_id": "tgk_forged", "secret": "tgs_y"}))
    with pytest.raises(ValueError, match="not an API key id"):
        load_credentials(path)
