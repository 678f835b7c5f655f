"""`python -m services.keyvault migrate-root`: move the key ring to another root key (see `migration`).

    python -m services.keyvault migrate-root --to local --new-root PATH
    python -m services.keyvault migrate-root --to pkcs11 --token LABEL [--module LIB] [--key-label LABEL]

The current root is the vault's, from the same environment the vault runs with (TRADEGUARD_KEYVAULT_ROOT, …, and
its passphrase or PIN file, else asked for). Then the new root's passphrase (typed twice) or PIN is asked for; on
stdin, one line each. Stop every replica of the vault first: the command refuses while the vault's own port
answers, and a replica elsewhere that was left running refuses its next write or key load (ROOT_KEY_MOVED) and
seals itself, as the store fences every write of wrapped material on the root it was unsealed with. Afterwards,
point the vault at the new root (it prints the settings) and destroy the old one.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from services.keyvault.migration import NotThisRing, migrate_root
from services.keyvault.prompt import MIN_PASSPHRASE_LEN, read_secret
from services.keyvault.root import LocalSealedRoot, Pkcs11Root, RootKey, WrongPassphrase
from services.keyvault.settings import DEFAULT_KEY_LABEL, DEFAULT_PKCS11_MODULE, Settings
from services.keyvault.store import RootChanged

PROG = "python -m services.keyvault migrate-root"


def _serving(host: str, port: int) -> bool:
    if port == 0:
        return False
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _new_root(args: argparse.Namespace, settings: Settings) -> tuple[RootKey, str]:
    """The new root key and the settings that point the vault at it."""
    if args.to == "local":
        if args.new_root is None:
            raise ValueError("--to local needs --new-root PATH (a file that does not exist yet)")
        if args.new_root.exists():
            raise ValueError(f"{args.new_root} exists: a new root never overwrites a file")
        passphrase = read_secret("new passphrase: ", confirm=True)
        if len(passphrase) < MIN_PASSPHRASE_LEN:
            raise ValueError(f"the new passphrase must have at least {MIN_PASSPHRASE_LEN} characters")
        local = LocalSealedRoot.create(args.new_root, passphrase, scrypt_n=settings.scrypt_n)
        return local, f"TRADEGUARD_KEYVAULT_ROOT=local TRADEGUARD_KEYVAULT_ROOT_PATH={args.new_root}"
    if not args.token:
        raise ValueError("--to pkcs11 needs --token LABEL")
    pin = read_secret("new token PIN: ")
    hsm = Pkcs11Root.open(args.module, args.token, pin, args.key_label)
    return hsm, (
        f"TRADEGUARD_KEYVAULT_ROOT=pkcs11 TRADEGUARD_KEYVAULT_PKCS11_MODULE={args.module} "
        f"TRADEGUARD_KEYVAULT_PKCS11_TOKEN={args.token} TRADEGUARD_KEYVAULT_PKCS11_KEY_LABEL={args.key_label}"
    )


def _current_root(settings: Settings, secret: str) -> RootKey:
    """The vault's root key, opened without creating one (the vault's own unsealer would)."""
    if settings.root_mode == "pkcs11":
        return Pkcs11Root.open(
            settings.pkcs11_module, settings.pkcs11_token, secret, settings.pkcs11_key_label, create=False
        )
    if not settings.root_path.exists():
        raise ValueError(f"no sealed root key at {settings.root_path}: nothing to migrate")
    return LocalSealedRoot.unseal(settings.root_path, secret)


async def _migrate(settings: Settings, old: RootKey, new: RootKey) -> str:
    from services.keyvault.service import SERVICE  # the declaration names this command: import late

    store = await SERVICE.stores.open(settings.database_url)
    try:
        moved = await migrate_root(store, old, new)
    finally:
        await store.close()
    return f"re-wrapped {moved.versions} key versions and {moved.data_keys} secret data keys"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--to", choices=["local", "pkcs11"], required=True)
    parser.add_argument("--new-root", type=Path, default=None, help="local: the new sealed root file")
    parser.add_argument("--token", default="", help="pkcs11: the token label")
    parser.add_argument("--module", default=DEFAULT_PKCS11_MODULE, help="pkcs11: the PKCS#11 library")
    parser.add_argument("--key-label", default=DEFAULT_KEY_LABEL, help="pkcs11: the root key's label")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        server = settings.server
        if _serving(server.host, server.port):
            raise ValueError(f"the vault answers on {server.host}:{server.port}: stop every replica first")
        current = settings.startup.take() or read_secret("current passphrase or PIN: ")
        old = _current_root(settings, current)
        del current
    except WrongPassphrase:
        print(f"{PROG}: the current passphrase or PIN does not open the root key", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    new: RootKey | None = None
    created: Path | None = None
    try:
        new, settings_line = _new_root(args, settings)
        created = args.new_root if args.to == "local" else None
        print(asyncio.run(_migrate(settings, old, new)))
    except (NotThisRing, RootChanged, ValueError, OSError, WrongPassphrase) as error:
        if created is not None:
            created.unlink(missing_ok=True)  # nothing refers to a root the ring never moved to
        print(f"{PROG}: {type(error).__name__}: {error}; nothing changed", file=sys.stderr)
        return 1
    finally:
        old.close()
        if new is not None:
            new.close()
    print(f"start the vault with: {settings_line}")
    print("then destroy the old root (its file or HSM key): it opens nothing any more")
    return 0
