"""A task's egress policy: which hosts its agent may reach through the egress proxy. No I/O.

Entries of ``network.allow``:

- ``example.com``: that host exactly; ``*.example.com``: its subdomains (not itself);
- an optional ``:port`` (``github.com:443``); without one, ports 80 and 443;
- an IP address (``203.0.113.7``, ``[2001:db8::1]:8443``): only when listed exactly; a name
  never allows its addresses by IP, and an address is never reached by a name not allowed;
- ``preset:<name>``: the entries ``SANDSTREAM_EGRESS_PRESETS`` gives that name.

Default deny: a task without ``network`` has no proxy at all. Whatever a name resolves to,
the proxy refuses loopback, private, link-local, multicast and reserved addresses, unless
``SANDSTREAM_EGRESS_HOSTS`` pins the name to an address (mirrors, tests on loopback).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import msgspec

DEFAULT_PORTS: Final = (80, 443)
MAX_ENTRIES: Final = 64
_NAME = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
HOST_RE: Final = re.compile(rf"^(?:\*\.)?{_NAME}(?:\.{_NAME})*$")
PRESET_PREFIX: Final = "preset:"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Rule(msgspec.Struct, frozen=True):
    host: str
    """A lowercase name, ``*.suffix``, or an IP address's text."""
    port: int | None = None

    def allows(self, host: str, port: int) -> bool:
        if self.port is None and port not in DEFAULT_PORTS:
            return False
        if self.port is not None and port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and host != self.host[2:]
        return host == self.host


def parse_entry(entry: str) -> Rule:
    """One ``network.allow`` entry (not a preset); ``ValueError`` naming what is wrong."""
    text = entry.strip().lower()
    host, port = text, None
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{entry!r}: an IPv6 address is written [address]")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r}: only :port may follow [address]")
            port = _port(entry, rest[1:])
        ipaddress.IPv6Address(host)
        return Rule(str(ipaddress.IPv6Address(host)), port)
    if text.count(":") == 1:
        host, raw = text.split(":")
        port = _port(entry, raw)
    if ip := as_ip(host):
        return Rule(str(ip), port)
    if not HOST_RE.fullmatch(host) or len(host) > 253:
        raise ValueError(f"{entry!r} is not a host name, *.domain, or IP address")
    return Rule(host, port)


def _port(entry: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"{entry!r}: a port is 1-65535")
    return int(raw)


def as_ip(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def parse_presets(raw: str) -> dict[str, list[str]]:
    """``SANDSTREAM_EGRESS_PRESETS``: a JSON object of name → entries; ``ValueError``."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(e, str) for e in v) for v in data.values()
    ):
        raise ValueError('a JSON object of name -> list of entries, e.g. {"pypi": ["pypi.org"]}')
    for entries in data.values():
        for entry in entries:
            parse_entry(entry)
    return {str(k): list(v) for k, v in data.items()}


class Pin(msgspec.Struct, frozen=True):
    """A name the proxy sends to a fixed address, on ``port`` only (without one: 80, 443)."""

    address: str
    port: int | None = None

    def covers(self, port: int) -> bool:
        return port == self.port if self.port is not None else port in DEFAULT_PORTS


def parse_pins(raw: str) -> dict[str, Pin]:
    """``SANDSTREAM_EGRESS_HOSTS``: ``name=ip`` or ``name=ip:port``, comma-separated;
    ``ValueError`` naming a bad one. A pin opens its address on its port(s) only: a task
    cannot name another port of a pinned address (this machine's NATS, say)."""
    pins: dict[str, Pin] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, target = item.partition("=")
        name = name.strip().lower()
        address, port = target.strip(), None
        if address.count(":") == 1:  # ip:port (an IPv6 pin has no port)
            address, raw_port = address.split(":")
            port = _port(item, raw_port)
        if not HOST_RE.fullmatch(name) or name.startswith("*.") or as_ip(address) is None:
            raise ValueError(f"{item!r} is not name=ip or name=ip:port")
        pins[name] = Pin(str(as_ip(address)), port)
    return pins


def rules(allow: Iterable[str], presets: Mapping[str, Sequence[str]]) -> list[Rule]:
    """The rules of a task's ``network.allow``, presets expanded; ``ValueError`` naming the
    first entry that is wrong (an unknown preset included)."""
    out: list[Rule] = []
    for entry in allow:
        if entry.startswith(PRESET_PREFIX):
            name = entry[len(PRESET_PREFIX) :]
            if name not in presets:
                known = ", ".join(sorted(presets)) or "none are set"
                raise ValueError(f"{entry!r}: no such preset (SANDSTREAM_EGRESS_PRESETS: {known})")
            out.extend(parse_entry(e) for e in presets[name])
        else:
            out.append(parse_entry(entry))
    return out


def allowed(rules: Sequence[Rule], host: str, port: int) -> bool:
    """Whether the task may reach ``host:port`` (``host`` as the client asked for it)."""
    host = host.strip().lower().rstrip(".")
    ip = as_ip(host)
    if ip is not None:
        host = str(ip)
        return any(r.host == host and r.allows(host, port) for r in rules)
    return any(as_ip(r.host) is None and r.allows(host, port) for r in rules)


_GLOBAL_UNICAST: Final = ipaddress.ip_network("2000::/3")
_NOT_PLAIN_V6: Final = (
    ipaddress.ip_network("2001::/23"),  # IETF protocol assignments (Teredo, ORCHID, ...)
    ipaddress.ip_network("2002::/16"),  # 6to4: an IPv4 address inside
)


def public(ip: IpAddress) -> bool:
    """Whether an address may be reached without a pin: not this machine's, not a private
    network's, not link-local, multicast, reserved or unspecified. IPv6 only as global
    unicast (2000::/3) that does not carry an IPv4 address (6to4, Teredo, NAT64 and the
    IPv4-compatible forms are refused: they can lead to a private IPv4 address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return public(ip.ipv4_mapped)
        if ip not in _GLOBAL_UNICAST or any(ip in net for net in _NOT_PLAIN_V6):
            return False
    return ip.is_global and not ip.is_multicast
