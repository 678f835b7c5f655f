"""Who may do what: rules of (resource pattern, operations, caller service names). Deny by default.

A resource is `key/<key-name>` for key operations and `secret/<path>` for the secret store; patterns are
`fnmatch` globs (`*` also crosses `/`). Callers are the service names from the verified SPIFFE IDs of the mesh
(`spiffe://<trust-domain>/svc/<name>`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = ["DEFAULT_POLICY", "METHOD_RULES", "Operation", "Policy", "Rule"]


class Operation(enum.Enum):
    # Administration of keys and of the vault.
    CREATE_KEY = "create_key"
    READ_KEY = "read_key"  # GetKey, ListKeys: metadata only
    ROTATE_KEY = "rotate_key"
    CONFIGURE_KEY = "configure_key"
    DELETE_KEY = "delete_key"
    UNSEAL = "unseal"
    # Use of keys.
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    REWRAP = "rewrap"
    GENERATE_DATA_KEY = "generate_data_key"
    SIGN = "sign"
    VERIFY = "verify"
    HMAC = "hmac"
    # The secret store.
    PUT_SECRET = "put_secret"  # noqa: S105 - an operation name
    GET_SECRET = "get_secret"  # noqa: S105 - an operation name
    LIST_SECRET_VERSIONS = "list_secret_versions"  # noqa: S105 - an operation name
    DESTROY_SECRET_VERSION = "destroy_secret_version"  # noqa: S105 - an operation name


ADMIN = frozenset(
    {
        Operation.CREATE_KEY,
        Operation.READ_KEY,
        Operation.ROTATE_KEY,
        Operation.CONFIGURE_KEY,
        Operation.DELETE_KEY,
        Operation.UNSEAL,
    }
)


@dataclass(frozen=True)
class Rule:
    resource: str
    operations: frozenset[Operation]
    callers: frozenset[str]


class Policy:
    """Immutable; `allows` is memoised (the key names and callers of a deployment are few)."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._memo: dict[tuple[str, Operation, str], bool] = {}

    def allows(self, caller: str | None, operation: Operation, resource: str) -> bool:
        if not caller:
            return False
        memo_key = (caller, operation, resource)
        allowed = self._memo.get(memo_key)
        if allowed is None:
            allowed = any(
                caller in rule.callers
                and operation in rule.operations
                and fnmatchcase(resource, rule.resource)
                for rule in self.rules
            )
            if len(self._memo) > 65536:
                self._memo.clear()
            self._memo[memo_key] = allowed
        return allowed

    @classmethod
    def from_json(cls, text: str) -> Policy:
        """`[{"resource": "key/credentials/*", "operations": ["encrypt"], "callers": ["auth"]}, ...]`"""
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("a policy is a JSON list of rules")
        rules = []
        for item in raw:
            if not isinstance(item, Mapping):
                raise ValueError("each rule is a JSON object")
            rules.append(
                Rule(
                    resource=str(item["resource"]),
                    operations=frozenset(Operation(str(op)) for op in item["operations"]),
                    callers=frozenset(str(c) for c in item["callers"]),
                )
            )
        return cls(rules)


_USE_CREDENTIALS = frozenset(
    {Operation.ENCRYPT, Operation.DECRYPT, Operation.REWRAP, Operation.GENERATE_DATA_KEY, Operation.HMAC}
)
_SECRETS = frozenset(
    {
        Operation.PUT_SECRET,
        Operation.GET_SECRET,
        Operation.LIST_SECRET_VERSIONS,
        Operation.DESTROY_SECRET_VERSION,
    }
)

DEFAULT_POLICY = Policy(
    [
        # The auth service encrypts, decrypts and MACs credentials (API-key signing secrets, TOTP seeds), signs
        # its JWTs (reading the JWT key's public versions for its JWKS), and keeps its secrets in the secret store.
        Rule("key/credentials*", _USE_CREDENTIALS, frozenset({"auth"})),
        Rule(
            "key/auth/*",
            _USE_CREDENTIALS | {Operation.SIGN, Operation.VERIFY, Operation.READ_KEY},
            frozenset({"auth"}),
        ),
        Rule("secret/auth/*", _SECRETS, frozenset({"auth"})),
        # The trading service may seal credentials for the auth service, never open them; it may use its own keys.
        Rule("key/credentials*", frozenset({Operation.ENCRYPT}), frozenset({"trading"})),
        Rule(
            "key/trading/*",
            _USE_CREDENTIALS | {Operation.SIGN, Operation.VERIFY},
            frozenset({"trading"}),
        ),
        # The audit service signs its tree heads (reading its keys' public versions for the signed notes).
        Rule(
            "key/audit/*",
            frozenset({Operation.SIGN, Operation.VERIFY, Operation.READ_KEY}),
            frozenset({"audit"}),
        ),
        # Anyone in the mesh may check an Ed25519 signature. Checking an HMAC also needs the HMAC right on the
        # key (KeyVault.verify): an HMAC check would otherwise be an oracle for guesses of the MAC'd data.
        Rule(
            "key/*",
            frozenset({Operation.VERIFY}),
            frozenset({"auth", "audit", "trading", "ratelimit", "monitor", "ops"}),
        ),
        # Operators administer keys and the vault, list and destroy secret versions; they never read material.
        Rule("key/*", ADMIN, frozenset({"ops"})),
        Rule("vault", frozenset({Operation.UNSEAL}), frozenset({"ops"})),
        Rule(
            "secret/*",
            frozenset({Operation.LIST_SECRET_VERSIONS, Operation.DESTROY_SECRET_VERSION}),
            frozenset({"ops"}),
        ),
    ]
)


# --- the mesh's method allow-list (the first gate, by tradeguard.mesh.authz; the rules above are the second) ---
SERVICE = "/tradeguard.keyvault.v1.KeyVaultService"
MESH_CALLERS = frozenset({"auth", "audit", "trading", "ratelimit", "monitor", "ops"})
_ADMIN_METHODS = ("CreateKey", "RotateKey", "UpdateKeyConfig", "DeleteKey", "Unseal")
_USE_METHODS = (
    "GetKey",
    "ListKeys",
    "Encrypt",
    "Decrypt",
    "BatchEncrypt",
    "BatchDecrypt",
    "Rewrap",
    "GenerateDataKey",
    "Sign",
    "Verify",
    "Hmac",
    "PutSecret",
    "GetSecret",
    "ListSecretVersions",
    "DestroySecretVersion",
)
METHOD_RULES: dict[str, frozenset[str]] = {
    **{f"{SERVICE}/{m}": frozenset({"ops"}) for m in _ADMIN_METHODS},
    **{f"{SERVICE}/{m}": MESH_CALLERS for m in _USE_METHODS},
    f"{SERVICE}/GetSealStatus": frozenset({"*"}),
}
