"""Reading passphrases and PINs for the vault's operator commands: from the terminal (never echoed; a new one
typed twice) or, for scripts, one line each from stdin. Never from the command line, where `ps` shows them."""

from __future__ import annotations

import getpass
import sys

__all__ = ["MIN_PASSPHRASE_LEN", "read_secret"]

MIN_PASSPHRASE_LEN = 12


def read_secret(prompt: str, *, confirm: bool = False) -> str:
    """One secret: prompted on a terminal (twice when `confirm`), else the next line of stdin."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass(prompt.rstrip(": ") + " again: ") != value:
        raise ValueError("the two entries differ")
    return value
