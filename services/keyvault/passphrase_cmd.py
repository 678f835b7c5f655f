"""`python -m services.keyvault change-passphrase`: seal the local root key under a new passphrase.

Run on the vault's host by whoever holds the current passphrase (Vault calls this a rekey). The root key itself
does not change, so no key or secret is re-encrypted and a running vault carries on; the next unseal takes the
new passphrase. Passphrases come from the terminal (the new one typed twice) or, without one, from stdin: the
current passphrase on the first line, the new one on the second. Never from the command line, where `ps` shows
them. `--update-file` also writes the new passphrase (0600, atomically) to the file the vault is started with,
e.g. the one `tradeguard up` made for the embedded default.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from services.keyvault.prompt import MIN_PASSPHRASE_LEN, read_secret
from services.keyvault.root import LocalSealedRoot, WrongPassphrase
from services.keyvault.settings import local_root_path, scrypt_n
from tradeguard.files import atomic_write


def main(argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m services.keyvault change-passphrase", description=__doc__
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="the sealed root file (default: as the vault)"
    )
    parser.add_argument("--update-file", type=Path, default=None, help="also write the new passphrase here")
    args = parser.parse_args(argv)
    home = Path(env.get("TRADEGUARD_HOME") or ".tradeguard")
    path: Path = args.root or local_root_path(env, home)
    if not path.exists():
        print(f"change-passphrase: no sealed root key at {path}", file=sys.stderr)
        return 2
    try:
        old = read_secret("current passphrase: ")
        new = read_secret("new passphrase: ", confirm=True)
        if len(new) < MIN_PASSPHRASE_LEN:
            raise ValueError(f"the new passphrase must have at least {MIN_PASSPHRASE_LEN} characters")
        if new == old:
            raise ValueError("the new passphrase is the current one")
        LocalSealedRoot.change_passphrase(path, old, new, scrypt_n=scrypt_n(env))
    except WrongPassphrase:
        print("change-passphrase: the current passphrase does not unseal the root key", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"change-passphrase: {error}", file=sys.stderr)
        return 2
    if args.update_file is not None:
        atomic_write(args.update_file, (new + "\n").encode(), 0o600)
    print(f"{path}: sealed under the new passphrase; the next unseal takes it")
    return 0
