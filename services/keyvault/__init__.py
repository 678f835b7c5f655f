"""The key vault: named AES-256-GCM / HMAC-SHA256 / Ed25519 keys with versions, a secret store, a sealed root."""
