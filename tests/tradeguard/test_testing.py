"""The kit's testing support that the other tests lean on without asserting it."""

from __future__ import annotations

from tradeguard.testing import free_port


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    """Two servers configured in one go once got the same port (the kernel offered it to both askings, the first
    socket being closed): Envoy's listener and admin could not both bind. 2,000 askings, among about 28,000
    ephemeral ports, repeat about 130 of them when each is only asked of the kernel; here none repeats."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
