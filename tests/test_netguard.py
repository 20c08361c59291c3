"""SSRF address classification and the guarded resolver, without any network."""

import asyncio
import ipaddress
import socket

import pytest

from operators.netguard import (AddressClass, AddressPolicy, DNSFailure, GuardedResolver, GuardedSocketFactory, SSRFBlocked,
                                classify, is_ssrf_block, parse_ip, url_host)


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


# --- the host as the HTTP client normalises it (yarl: IDNA / UTS 46), no network ----------------
@pytest.mark.parametrize("url,host", [
    ("http://127\u30020\u30020\u30021:8080/x.png", "127.0.0.1"),      # U+3002 ideographic full stop
    ("http://127\uff610\uff610\uff611/x", "127.0.0.1"),               # U+FF61 halfwidth ideographic
    ("http://127\uff0e0\uff0e0\uff0e1/x", "127.0.0.1"),               # U+FF0E fullwidth full stop
    ("http://\uff11\uff12\uff17.0.0.1/x", "127.0.0.1"),               # fullwidth digits
    ("http://\uff11\uff12\uff17\u30020\uff0e0\uff611/x", "127.0.0.1"),  # mixed
    ("http://169\u3002254\u3002169\u3002254/latest/meta-data", "169.254.169.254"),
    ("http://127.0.0.1./x", "127.0.0.1"),                              # trailing dot
    ("http://[::ffff:127.0.0.1]:80/x", "::ffff:7f00:1"),
    ("http://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com/x", "example.com"),
    ("http://Example.COM./x", "example.com"),
    ("http:///x", None),
    ("not a url", None),
])
def test_url_host_normalises_as_the_client_does(url, host):
    assert url_host(url) == host


def test_normalised_spellings_classify_as_their_address():
    loose = AddressPolicy.build(allow_loopback=True, allow_private=True)
    assert AddressPolicy().check(parse_ip(url_host("http://127\u30020\u30020\u30021/"))) is AddressClass.LOOPBACK
    assert loose.check(parse_ip(url_host("http://169\uff0e254\uff0e169\uff0e254/"))) is AddressClass.METADATA
    assert loose.check(parse_ip(url_host("http://[::ffff:169.254.169.254]/"))) is AddressClass.METADATA


def test_socket_factory_refuses_forbidden_addresses_before_a_socket_exists():
    factory = GuardedSocketFactory(AddressPolicy())
    for sockaddr, family in ((("127.0.0.1", 80), socket.AF_INET), (("::1", 80, 0, 0), socket.AF_INET6),
                             (("::ffff:127.0.0.1", 80, 0, 0), socket.AF_INET6),
                             (("169.254.169.254", 80), socket.AF_INET), (("10.1.2.3", 443), socket.AF_INET)):
        with pytest.raises(SSRFBlocked) as info:
            factory((family, socket.SOCK_STREAM, 6, "", sockaddr))
        assert is_ssrf_block(info.value)
    assert factory.refused == 5
    sock = factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80)))  # created, never connected
    try:
        assert sock.family == socket.AF_INET
    finally:
        sock.close()
    assert not is_ssrf_block(ConnectionRefusedError(111, "Connection refused"))
