"""SSRF guard: classify addresses, resolve host names with a cache, refuse forbidden connections.

The URL list is untrusted (DESIGN.md, "Safety of the crawler"). The guard that cannot be
bypassed is :class:`GuardedSocketFactory`: the HTTP client creates every socket through it, with
the address it is about to connect to, so literal IPs, resolved names and every redirect hop
are checked on the connected address itself, whatever the URL spelled (Unicode dots and digits,
which yarl folds to ASCII by IDNA/UTS 46 before aiohttp connects to them as literals; trailing
dots; IPv4-mapped IPv6). :class:`GuardedResolver` filters resolved addresses earlier (a host with
both allowed and forbidden addresses still connects to an allowed one), and :func:`url_host`
gives the host as the client normalises it, for a fast check before any request. Host spellings
that C resolvers accept (``127.1``, ``0x7f000001``, ``2130706433``, ``017700000001``) are parsed
the same way here.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import time
from dataclasses import dataclass
from enum import Enum

# Cloud metadata endpoints (AWS, GCP, Azure, Alibaba, AWS IPv6).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)


class AddressClass(str, Enum):
    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link_local"
    METADATA = "metadata"
    MULTICAST = "multicast"
    RESERVED = "reserved"  # unspecified, reserved, documentation, shared address space, ...


def url_host(url: str) -> str | None:
    """The host of ``url`` as the HTTP client connects to it, or None if it has none.

    aiohttp parses URLs with yarl, which normalises the host by IDNA/UTS 46: ``127。0。0。1``
    (U+3002), ``127．0．0．1`` (U+FF0E), ``127｡0｡0｡1`` (U+FF61) and fullwidth digits all become
    ``127.0.0.1``, which aiohttp then connects to as a literal without asking a resolver.
    ``urlsplit(url).hostname`` keeps the original text, so a check on it misses them. A trailing
    dot (``127.0.0.1.``) is dropped here: it names the same address.
    """
    from yarl import URL

    try:
        host = URL(url).raw_host
    except (ValueError, UnicodeError, TypeError):
        return None
    if not host:
        return None
    return host.rstrip(".") or None


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse ``host`` as an IP address the way ``inet_aton``/``getaddrinfo`` would, else None."""
    h = host.strip().strip("[]")
    if "%" in h:  # IPv6 zone id
        h = h.split("%", 1)[0]
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if not h or any(c not in "0123456789abcdefxABCDEFX." for c in h):
        return None
    try:  # legacy IPv4 forms: 127.1, 0x7f000001, 2130706433, octal parts
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except OSError:
        return None


def classify(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> AddressClass:
    """Classify one address. Strings are parsed with :func:`parse_ip`; unparsable is RESERVED."""
    if isinstance(addr, str):
        parsed = parse_ip(addr)
        if parsed is None:
            return AddressClass.RESERVED
        addr = parsed
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in ipaddress.ip_network("64:ff9b::/96"):  # NAT64
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return classify(embedded)
    if addr in METADATA_ADDRESSES:
        return AddressClass.METADATA
    if addr.is_loopback:
        return AddressClass.LOOPBACK
    if addr.is_link_local:
        return AddressClass.LINK_LOCAL
    if addr.is_multicast:
        return AddressClass.MULTICAST
    if addr.is_unspecified or addr.is_reserved:
        return AddressClass.RESERVED
    if isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.ip_network("100.64.0.0/10"):
        return AddressClass.PRIVATE  # carrier-grade NAT, shared address space
    if addr.is_private:
        return AddressClass.PRIVATE
    if not addr.is_global:
        return AddressClass.RESERVED
    return AddressClass.PUBLIC


@dataclass(frozen=True)
class AddressPolicy:
    """Which address classes a crawl may connect to. Public only, unless a config allows more."""

    allow_loopback: bool = False
    allow_private: bool = False
    # Networks allowed whatever their class (an internal mirror, a test server on 127.0.0.3).
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def build(cls, allow_loopback=False, allow_private=False, allow_networks=()) -> "AddressPolicy":
        return cls(allow_loopback, allow_private, tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks))

    def allowed(self, cls: AddressClass) -> bool:
        if cls is AddressClass.PUBLIC:
            return True
        if cls is AddressClass.LOOPBACK:
            return self.allow_loopback
        if cls is AddressClass.PRIVATE:
            return self.allow_private
        return False  # link-local, metadata, multicast, reserved: never

    def check(self, addr) -> AddressClass | None:
        """None if allowed, else the forbidden class. Memoised: a crawl checks the same few addresses
        (a host's resolved addresses, a literal host) for every request, and ``ipaddress``'s class
        properties are slow."""
        return _check(self, addr)

    def _check(self, addr) -> AddressClass | None:
        if isinstance(addr, str):
            addr = parse_ip(addr) or addr
        if self.allow_networks and not isinstance(addr, str):
            if any(addr.version == n.version and addr in n for n in self.allow_networks):
                return None
        cls = classify(addr)
        return None if self.allowed(cls) else cls


@functools.lru_cache(maxsize=65536)
def _check(policy: AddressPolicy, addr) -> AddressClass | None:
    return policy._check(addr)


class SSRFBlocked(OSError):
    """A host resolved only to addresses the policy forbids."""


class DNSFailure(OSError):
    """Name resolution failed."""


SSRF_MARK = "refused by the SSRF guard"


def is_ssrf_block(exc: BaseException | None) -> bool:
    """Whether a client error was caused by this module's guard (the resolver's or the socket
    factory's refusal, possibly wrapped by aiohttp or combined by happy eyeballs)."""
    for e in (exc, getattr(exc, "os_error", None), getattr(exc, "__cause__", None)):
        if isinstance(e, SSRFBlocked) or (e is not None and SSRF_MARK in str(e)):
            return True
    return False


class GuardedSocketFactory:
    """``socket_factory`` for aiohttp's ``TCPConnector``: refuses to create a socket for a
    forbidden address. aiohttp (through aiohappyeyeballs) calls it with the ``addr_info`` it will
    connect to, once per address tried, for literal hosts and resolved names alike, on every
    request and so on every redirect hop: no spelling of a host reaches a forbidden address."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        self.refused = 0

    def __call__(self, addr_info) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        forbidden = self.policy.check(sockaddr[0])
        if forbidden is not None:
            self.refused += 1
            raise SSRFBlocked(errno.EACCES, f"connection to {sockaddr[0]} {SSRF_MARK} ({forbidden.value} address)")
        return socket.socket(family=family, type=type_, proto=proto)


class GuardedResolver:
    """An aiohttp resolver: resolves through the system, caches answers, filters by policy.

    aiohttp connects only to the addresses this returns. Literal IP hosts never reach a resolver:
    :class:`GuardedSocketFactory` checks every address at connect time, literals included.
    """

    def __init__(self, policy: AddressPolicy, ttl_s: float = 300.0, max_entries: int = 100_000):
        self.policy = policy
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[tuple[str, int, int], tuple[float, list[dict]]] = {}
        self.lookups = 0

    async def _getaddrinfo(self, host: str, port: int, family: int) -> list[dict]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        except (socket.gaierror, UnicodeError) as exc:
            raise DNSFailure(f"cannot resolve {host!r}: {exc}") from exc
        self.lookups += 1
        out, seen = [], set()
        for fam, _, proto, _, sockaddr in infos:
            ip = sockaddr[0]
            if ip in seen:
                continue
            seen.add(ip)
            out.append({"hostname": host, "host": ip, "port": port, "family": fam, "proto": proto,
                        "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
        return out

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        key = (host.lower(), port, family)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            infos = hit[1]
        else:
            infos = await self._getaddrinfo(host, port, family)
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[key] = (now + self.ttl_s, infos)
        allowed = [i for i in infos if self.policy.check(i["host"]) is None]
        if not allowed:
            classes = sorted({classify(i["host"]).value for i in infos})
            raise SSRFBlocked(f"{host} resolves only to forbidden addresses ({', '.join(classes)}), {SSRF_MARK}")
        return allowed

    async def close(self) -> None:
        self._cache.clear()
