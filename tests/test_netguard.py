"""SSRF address classification and the guarded resolver, without any network."""

import asyncio
import ipaddress
import socket

import pytest

from operators.netguard import AddressClass, AddressPolicy, GuardedResolver, SSRFBlocked, DNSFailure, classify, parse_ip


@pytest.mark.parametrize("host,expected", [
    ("169.254.169.254", AddressClass.METADATA),
    ("fd00:ec2::254", AddressClass.METADATA),
    ("169.254.1.1", AddressClass.LINK_LOCAL),
    ("10.0.0.1", AddressClass.PRIVATE),
    ("192.168.1.1", AddressClass.PRIVATE),
    ("172.16.5.4", AddressClass.PRIVATE),
    ("100.64.0.1", AddressClass.PRIVATE),
    ("::1", AddressClass.LOOPBACK),
    ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
    ("::ffff:169.254.169.254", AddressClass.METADATA),
    ("0x7f000001", AddressClass.LOOPBACK),
    ("2130706433", AddressClass.LOOPBACK),
    ("127.1", AddressClass.LOOPBACK),
    ("017700000001", AddressClass.LOOPBACK),
    ("127.0.0.2", AddressClass.LOOPBACK),
    ("[::1]", AddressClass.LOOPBACK),
    ("fe80::1", AddressClass.LINK_LOCAL),
    ("fc00::1", AddressClass.PRIVATE),
    ("224.0.0.1", AddressClass.MULTICAST),
    ("ff02::1", AddressClass.MULTICAST),
    ("0.0.0.0", AddressClass.RESERVED),
    ("240.0.0.1", AddressClass.RESERVED),
    ("192.0.2.1", AddressClass.PRIVATE),  # documentation range: ipaddress counts it as private
    ("8.8.8.8", AddressClass.PUBLIC),
    ("2606:4700::1111", AddressClass.PUBLIC),
    ("not-an-ip", AddressClass.RESERVED),
])
def test_classify(host, expected):
    assert classify(host) is expected


def test_parse_ip_forms():
    assert parse_ip("0x7f000001") == ipaddress.ip_address("127.0.0.1")
    assert parse_ip("2130706433") == ipaddress.ip_address("127.0.0.1")
    assert parse_ip("127.1") == ipaddress.ip_address("127.0.0.1")
    assert parse_ip("example.com") is None
    assert parse_ip("deadbeef.com") is None


def test_policy_defaults_refuse_everything_but_public():
    p = AddressPolicy()
    for host in ("169.254.169.254", "10.0.0.1", "192.168.1.1", "::1", "::ffff:127.0.0.1", "0x7f000001",
                 "2130706433", "127.1"):
        assert p.check(host) is not None, host
    assert p.check("8.8.8.8") is None


def test_policy_allow_loopback_never_allows_metadata():
    p = AddressPolicy.build(allow_loopback=True, allow_private=True)
    assert p.check("127.0.0.1") is None
    assert p.check("10.1.2.3") is None
    assert p.check("169.254.169.254") is AddressClass.METADATA


def test_policy_allow_networks():
    p = AddressPolicy.build(allow_networks=["127.0.0.3/32"])
    assert p.check("127.0.0.3") is None
    assert p.check("127.0.0.1") is AddressClass.LOOPBACK


class _FixedResolver(GuardedResolver):
    """System DNS replaced by a fixed table: a real lookup could leave loopback."""

    def __init__(self, policy, table):
        super().__init__(policy)
        self.table = table

    async def _getaddrinfo(self, host, port, family):
        if host not in self.table:
            raise DNSFailure(f"cannot resolve {host!r}")
        self.lookups += 1
        return [{"hostname": host, "host": ip, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
                for ip in self.table[host]]


def test_resolver_filters_and_caches():
    r = _FixedResolver(AddressPolicy(), {"meta.example": ["169.254.169.254"],
                                         "mixed.example": ["10.0.0.1", "93.184.216.34"]})
    with pytest.raises(SSRFBlocked):
        asyncio.run(r.resolve("meta.example", 80))
    out = asyncio.run(r.resolve("mixed.example", 80))
    assert [o["host"] for o in out] == ["93.184.216.34"]
    asyncio.run(r.resolve("mixed.example", 80))
    assert r.lookups == 2  # the second mixed.example lookup came from the cache
    with pytest.raises(DNSFailure):
        asyncio.run(r.resolve("nowhere.example", 80))


def test_real_resolver_on_localhost_with_loopback_denied():
    # 'localhost' resolves from /etc/hosts: no packet leaves the machine.
    r = GuardedResolver(AddressPolicy())
    with pytest.raises(SSRFBlocked):
        asyncio.run(r.resolve("localhost", 80))
