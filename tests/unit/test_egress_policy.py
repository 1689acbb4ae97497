"""The egress policy, rule by rule (shared/egress.py)."""

from __future__ import annotations

import ipaddress

import pytest

from shared.egress import Pin, allowed, parse_entry, parse_pins, parse_presets, public, rules

PRESETS = {"python": ["pypi.org", "files.pythonhosted.org"], "git": ["github.com:443"]}


@pytest.mark.parametrize(
    ("allow", "host", "port", "ok"),
    [
        (["pypi.org"], "pypi.org", 443, True),
        (["pypi.org"], "PyPI.org.", 80, True),  # case and a trailing dot do not matter
        (["pypi.org"], "pypi.org", 8080, False),  # without a port: 80 and 443 only
        (["pypi.org:8080"], "pypi.org", 8080, True),
        (["pypi.org:8080"], "pypi.org", 443, False),
        (["pypi.org"], "evil-pypi.org", 443, False),
        (["pypi.org"], "pypi.org.evil.com", 443, False),
        (["*.npmjs.org"], "registry.npmjs.org", 443, True),
        (["*.npmjs.org"], "npmjs.org", 443, False),  # subdomains, not the domain itself
        (["*.npmjs.org"], "evilnpmjs.org", 443, False),
        (["preset:python"], "files.pythonhosted.org", 443, True),
        (["preset:git"], "github.com", 80, False),
        (["203.0.113.7"], "203.0.113.7", 443, True),
        (["pypi.org"], "151.101.0.223", 443, False),  # an address needs its own entry
        (["203.0.113.7"], "[::ffff:203.0.113.7]", 443, False),
        (["[2001:db8::1]:8443"], "[2001:db8::1]", 8443, True),
        ([], "pypi.org", 443, False),
    ],
)
def test_who_may_go_where(allow: list[str], host: str, port: int, ok: bool) -> None:
    assert allowed(rules(allow, PRESETS), host, port) is ok


@pytest.mark.parametrize(
    "entry", ["", "*", "*.", "a..b", "-a.com", "a.com:0", "a.com:99999", "a.com:x", "http://a.com",
              "a.com/path", "*.*.a.com", "[::1", "a b"],
)  # fmt: skip
def test_bad_entries_say_so(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_entry(entry)


def test_an_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="'preset:nope': no such preset"):
        rules(["preset:nope"], PRESETS)


def test_presets_and_pins_parse() -> None:
    assert parse_presets('{"a": ["x.org", "*.y.org:8443"]}') == {"a": ["x.org", "*.y.org:8443"]}
    for bad in ('{"a": "x.org"}', "[1]", "{", '{"a": ["http://x"]}'):
        with pytest.raises(ValueError):
            parse_presets(bad)
    pinned = parse_pins("mirror.test=127.0.0.1, nats.test=127.0.0.1:4222, v6.test=::1")
    assert pinned == {
        "mirror.test": Pin("127.0.0.1"),
        "nats.test": Pin("127.0.0.1", 4222),
        "v6.test": Pin("::1"),
    }
    assert pinned["mirror.test"].covers(443) and not pinned["mirror.test"].covers(4222)
    assert pinned["nats.test"].covers(4222) and not pinned["nats.test"].covers(443)
    for bad in ("x", "x=notanip", "*.x=1.2.3.4", "x=1.2.3.4:0", "x=1.2.3.4:y"):
        with pytest.raises(ValueError):
            parse_pins(bad)


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.17.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("2606:4700::1111", True),
        ("64:ff9b::a00:5", False),  # NAT64 of 10.0.0.5
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of the metadata address
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("2002:a00:5::1", False),  # 6to4 of 10.0.0.5
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ],
)
def test_only_public_addresses_without_a_pin(address: str, ok: bool) -> None:
    assert public(ipaddress.ip_address(address)) is ok
