"""CBIR_URL_ALLOW_TEST_HOSTS: host names the URL fetcher resolves to fixed addresses (test servers)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping


def parse_test_hosts(rules: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """{"fixture.test": "127.0.0.1:8123"} -> {"fixture.test": ("127.0.0.1", 8123)}."""
    parsed = {}
    for host, target in rules.items():
        ip, _, port = target.rpartition(":")
        address = ipaddress.ip_address(ip.strip("[]"))
        parsed[host.lower().rstrip(".")] = (str(address), int(port))
    return parsed
