"""Callback URL policy: the pre-check, and the resolver that checks the address connected to."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from cancelflow import callbacks
from cancelflow.callbacks import CallbackRetryable, PolicyResolver, UnsafeCallbackUrl, check_url
from cancelflow.settings import CallbackSettings, Settings
from producers.submit import validate_request
from sandboxes import azotte
from sandboxes.receiver import DEMO_CALLBACK_SECRET, EVENTS_PATH, Receiver, create_app

PUBLIC = "93.184.215.14"


def check(url: str, *, allow_http: bool = False, allowed: tuple[str, ...] = ()) -> None:
    asyncio.run(check_url(url, allow_http=allow_http, allowed_hosts=allowed))


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://127.8.9.10/hook",
        "https://10.0.0.1/hook",
        "https://10.255.255.254/hook",
        "https://172.16.5.4/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://0.0.0.0/hook",
        "https://[::1]/hook",
        "https://[fe80::1]/hook",
        "https://[fd12:3456::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://localhost/hook",
        "https://2130706433/hook",  # 127.0.0.1 as one number
        "https://0x7f.1/hook",  # hex and short forms, resolved as names
        "https://0x7f000001/hook",
        "https://0177.0.0.1/hook",  # octal
        "https://127.1/hook",
        "https://[::ffff:7f00:1]/hook",
        "https://100.100.100.200/hook",
        "https://[fec0::1]/hook",
        "https://[2002:a9fe:a9fe::]/hook",
    ],
)
def test_private_loopback_and_link_local_addresses_are_refused(url: str) -> None:
    with pytest.raises(UnsafeCallbackUrl, match="CANCELFLOW_CALLBACKS__ALLOWED_HOSTS"):
        check(url)


def test_public_https_passes() -> None:
    check(f"https://{PUBLIC}/hook")
    check(f"https://{PUBLIC}:8443/hook?x=1")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "example.com/hook", "https:///hook", "file:///etc/passwd"]
)
def test_only_absolute_http_urls(url: str) -> None:
    with pytest.raises(UnsafeCallbackUrl, match="absolute https"):
        check(url)


def test_http_needs_allow_http() -> None:
    with pytest.raises(UnsafeCallbackUrl, match="ALLOW_HTTP"):
        check(f"http://{PUBLIC}/hook")
    check(f"http://{PUBLIC}/hook", allow_http=True)


def test_allow_listed_by_name_or_by_address() -> None:
    check("https://127.0.0.1/hook", allowed=("127.0.0.1",))
    check("https://localhost/hook", allowed=("LOCALHOST",))
    check("https://10.1.2.3/hook", allowed=("10.1.2.3",))
    # Only what is listed: a neighbour is still refused.
    with pytest.raises(UnsafeCallbackUrl):
        check("https://10.1.2.4/hook", allowed=("10.1.2.3",))


def test_an_unresolvable_name_is_retried_not_refused() -> None:
    with pytest.raises(CallbackRetryable, match="cannot resolve"):
        check("https://no-such-host.invalid/hook")


# --- the connection itself: DNS rebinding --------------------------------------------------


class StaticResolver(AbstractResolver):
    """Resolves every name to the addresses given: a DNS server that answers what it likes."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


def resolve(resolver: PolicyResolver, host: str = "hooks.example.com") -> list[str]:
    async def go() -> list[str]:
        return [r["host"] for r in await resolver.resolve(host, 443)]

    return asyncio.run(go())


def test_the_resolver_refuses_an_internal_answer_even_among_public_ones() -> None:
    assert resolve(PolicyResolver(allowed_hosts=[], resolver=StaticResolver(PUBLIC))) == [PUBLIC]
    for answer in ("127.0.0.1", "10.0.0.7", "169.254.169.254", "::1"):
        with pytest.raises(UnsafeCallbackUrl, match=answer):
            resolve(PolicyResolver(allowed_hosts=[], resolver=StaticResolver(PUBLIC, answer)))


def test_the_resolver_honours_the_allow_list() -> None:
    inner = StaticResolver("10.0.0.7")
    assert resolve(PolicyResolver(allowed_hosts=["hooks.example.com"], resolver=inner)) == [
        "10.0.0.7"
    ]
    assert resolve(PolicyResolver(allowed_hosts=["10.0.0.7"], resolver=inner)) == ["10.0.0.7"]


def test_a_name_that_rebinds_to_loopback_is_refused_at_connection_time() -> None:
    """The name passed a check elsewhere; at connection time it resolves to 127.0.0.1, where a
    receiver listens. The callbacks session refuses to connect; allow-listed, it delivers."""

    async def scenario() -> None:
        receiver = Receiver()
        runner = web.AppRunner(create_app(receiver))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        url = f"http://rebind.example.com:{port}{EVENTS_PATH}"
        event = {"id": "evt_" + "0" * 32, "type": "cancellation.succeeded", "data": {}}
        try:
            for allowed, refused in (([], True), (["rebind.example.com"], False)):
                session = callbacks.open_session(
                    CallbackSettings(allow_http=True, allowed_hosts=allowed),
                    resolver=StaticResolver("127.0.0.1"),
                )
                async with session:
                    if refused:
                        with pytest.raises(UnsafeCallbackUrl, match=r"127\.0\.0\.1"):
                            await callbacks.deliver(
                                session, url, event, secrets=[DEMO_CALLBACK_SECRET], timeout_s=2
                            )
                        assert receiver.requests == []
                    else:
                        status, _, _ = await callbacks.deliver(
                            session, url, event, secrets=[DEMO_CALLBACK_SECRET], timeout_s=2
                        )
                        assert status == 200 and receiver.requests[-1].verified
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("url", "allowed", "refused"),
    [
        ("https://10.0.0.1/hook", (), True),
        ("https://[fe80::1]/hook", (), True),
        ("http://example.com/hook", (), True),
        ("example.com/hook", (), True),
        ("https://10.0.0.1/hook", ("10.0.0.1",), False),
        (f"https://{PUBLIC}/hook", (), False),
        # A name is not resolved at submission: its addresses are checked at delivery.
        ("https://localhost/hook", (), False),
    ],
)
def test_the_form_check_at_submission_needs_no_resolver(
    url: str, allowed: tuple[str, ...], refused: bool
) -> None:
    if refused:
        with pytest.raises(UnsafeCallbackUrl):
            callbacks.check_url_form(url, allow_http=False, allowed_hosts=allowed)
    else:
        callbacks.check_url_form(url, allow_http=False, allowed_hosts=allowed)


# --- the address table ----------------------------------------------------------------------


def teredo(server: str, client: str) -> str:
    """A Teredo address (2001::/32) for that server and (obfuscated) client."""
    n = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    n |= ~int(ipaddress.IPv4Address(client)) & 0xFFFFFFFF
    return str(ipaddress.IPv6Address(n))


NOT_GLOBAL = {
    "shared (CGNAT) low": "100.64.0.1",
    "shared (CGNAT)": "100.100.100.200",
    "shared (CGNAT) high": "100.127.255.254",
    "this network": "0.1.2.3",
    "IETF protocol assignments": "192.0.0.8",
    "documentation v4": "198.51.100.7",
    "benchmarking": "198.18.0.1",
    "6to4 relay anycast": "192.88.99.1",
    "multicast v4": "224.0.0.251",
    "reserved v4": "240.0.0.1",
    "broadcast": "255.255.255.255",
    "site-local": "fec0::1",
    "site-local high": "feff::1",
    "unique-local fc": "fc00::1",
    "unique-local fd": "fd00:ec2::254",
    "6to4 of metadata": "2002:a9fe:a9fe::",
    "6to4 of 10/8": "2002:a00:1::1",
    "6to4 of loopback": "2002:7f00:1::",
    "6to4 of CGNAT": "2002:6464:64c8::1",
    "teredo, private client": teredo("65.54.227.120", "10.0.0.1"),
    "teredo, metadata client": teredo("65.54.227.120", "169.254.169.254"),
    "teredo, loopback server": teredo("127.0.0.1", "93.184.215.14"),
    "NAT64 of metadata": "64:ff9b::a9fe:a9fe",
    "NAT64 of loopback": "64:ff9b::7f00:1",
    "NAT64 of 192.168/16": "64:ff9b::c0a8:101",
    "local-use NAT64": "64:ff9b:1::a00:1",
    "IPv4-compatible": "::7f00:1",
    "IPv4-mapped CGNAT": "::ffff:100.100.100.200",
    "discard": "100::1",
    "documentation v6": "2001:db8::1",
    "documentation v6 (3fff)": "3fff::1",
    "IETF protocol assignments v6": "2001:2::1",
    "multicast v6": "ff02::1",
    "unallocated v6": "4000::1",
    "unspecified v6": "::",
}
GLOBAL = {
    "public v4": PUBLIC,
    "just below CGNAT": "100.63.255.255",
    "just above CGNAT": "100.128.0.1",
    "just above 172.16/12": "172.32.0.1",
    "public v6": "2606:4700:4700::1111",
    "6to4 of a public address": "2002:5db8:d70e::1",
    "NAT64 of a public address": "64:ff9b::5db8:d70e",
    "teredo, public both": teredo("65.54.227.120", PUBLIC),
    "IPv4-mapped public": f"::ffff:{PUBLIC}",
}


def literal(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@pytest.mark.parametrize("address", NOT_GLOBAL.values(), ids=NOT_GLOBAL.keys())
def test_addresses_that_are_not_globally_routable_are_refused(address: str) -> None:
    assert not callbacks.address_public(address)
    url = f"https://{literal(address)}/hook"
    # As a literal: at submission, and before delivery ...
    with pytest.raises(UnsafeCallbackUrl, match="CANCELFLOW_CALLBACKS__ALLOWED_HOSTS"):
        callbacks.check_url_form(url, allow_http=False, allowed_hosts=())
    with pytest.raises(UnsafeCallbackUrl):
        check(url)
    # ... by the socket about to connect to it ...
    sockets = callbacks.PolicySockets(
        allowed_hosts=(), resolver=PolicyResolver(allowed_hosts=(), resolver=StaticResolver())
    )
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with pytest.raises(UnsafeCallbackUrl, match=re.escape(address)):
        sockets((family, socket.SOCK_STREAM, 6, "", (address, 443)))
    # ... and as what a name resolves to.
    with pytest.raises(UnsafeCallbackUrl, match=re.escape(address)):
        resolve(PolicyResolver(allowed_hosts=[], resolver=StaticResolver(address)))
    # Allow-listed by itself, it passes.
    check(url, allowed=(address,))


@pytest.mark.parametrize("address", GLOBAL.values(), ids=GLOBAL.keys())
def test_globally_routable_addresses_pass(address: str) -> None:
    assert callbacks.address_public(address)
    callbacks.check_url_form(f"https://{literal(address)}/hook", allow_http=False, allowed_hosts=())
    assert resolve(PolicyResolver(allowed_hosts=[], resolver=StaticResolver(address))) == [address]
    sockets = callbacks.PolicySockets(
        allowed_hosts=(), resolver=PolicyResolver(allowed_hosts=(), resolver=StaticResolver())
    )
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockets((family, socket.SOCK_STREAM, 6, "", (address, 443))).close()


def test_the_table_does_not_lean_on_ipaddress_is_global() -> None:
    """Where ``ipaddress`` answers differently across patch releases, the table answers."""
    assert not callbacks.address_public("2001:2::1")  # is_global varied for 2001::/23
    assert not callbacks.address_public("192.0.0.9")  # and for 192.0.0.0/24
    assert not callbacks.address_public("::ffff:10.0.0.1")  # mapped: is_private varied


# --- the connection itself: IP literals -----------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]"])
def test_an_ip_literal_is_refused_at_connection_time(host: str) -> None:
    """No pre-check here: the callbacks session alone refuses to connect to a loopback
    literal, where a receiver listens; with the address allow-listed, it delivers."""

    async def scenario() -> None:
        receiver = Receiver()
        runner = web.AppRunner(create_app(receiver))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        url = f"http://{host}:{port}{EVENTS_PATH}"
        event = {"id": "evt_" + "0" * 32, "type": "cancellation.succeeded", "data": {}}
        try:
            session = callbacks.open_session(CallbackSettings(allow_http=True))
            async with session:
                with pytest.raises(UnsafeCallbackUrl, match=r"127\.0\.0\.1|::ffff:7f00:1"):
                    await callbacks.deliver(
                        session, url, event, secrets=[DEMO_CALLBACK_SECRET], timeout_s=2
                    )
            assert receiver.requests == []
            allowed = CallbackSettings(allow_http=True, allowed_hosts=[host.strip("[]")])
            async with callbacks.open_session(allowed) as session:
                status, _, _ = await callbacks.deliver(
                    session, url, event, secrets=[DEMO_CALLBACK_SECRET], timeout_s=2
                )
            assert status == 200 and receiver.requests[-1].verified
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


# --- credentials in the URL ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pass@hooks.example.com/hook",
        "https://user@hooks.example.com/hook",
        "https://hooks.example.com/hook?token=abc",
        "https://hooks.example.com/hook?x=1&access_token=abc",
        "https://hooks.example.com/hook?apiKey=abc",
        "https://hooks.example.com/hook?api-key=abc",
        "https://hooks.example.com/hook?X-Amz-Signature=abc",
        "https://hooks.example.com/hook?sig=1&signature=abc",
        "https://hooks.example.com/hook?password=abc",
        "https://hooks.example.com/hook?auth=abc",
        "https://hooks.example.com/hook?client_secret=abc",
        "https://hooks.example.com/hook?%74oken=abc",  # "token", percent-encoded
        "https://hooks.example.com/hook#access_token=abc",
        "ftp://user:pass@hooks.example.com/hook",
    ],
)
def test_credentials_in_the_url_are_refused_without_being_echoed(url: str) -> None:
    with pytest.raises(UnsafeCallbackUrl, match="must not carry credentials") as caught:
        callbacks.check_url_form(url, allow_http=False, allowed_hosts=())
    assert "abc" not in str(caught.value) and "pass" not in str(caught.value).replace(
        "password", ""
    )
    # Allow-listing the host does not make a secret in its URL acceptable.
    with pytest.raises(UnsafeCallbackUrl, match="must not carry credentials"):
        check(url, allowed=("hooks.example.com",))


@pytest.mark.parametrize(
    "url",
    [
        f"https://{PUBLIC}/hook?tenant=acme&id=42",
        f"https://{PUBLIC}/hook?author=me&monkey=1",
        f"https://{PUBLIC}/hooks/token/42",  # a path is not a parameter
    ],
)
def test_ordinary_query_parameters_pass(url: str) -> None:
    check(url)


def test_credentials_are_refused_at_submission_naming_callback_url() -> None:
    settings = Settings(
        providers={
            "azotte": {
                "base_url": "http://127.0.0.1:9/azotte",
                "api_key": azotte.DEMO_API_KEY,
                "tenant": azotte.DEMO_TENANT,
                "callback_secret": "whsec_Y2FuY2VsZmxvdy10ZXN0LXNlY3JldC1udW1iZXItMDE=",
            }
        }
    )
    body = {"provider": "azotte", "subscription": {"order_identifier": "o-1"}}
    for url in ("https://u:hunter2@hooks.example.com/h", "https://hooks.example.com/h?token=t0k"):
        errors = validate_request({**body, "callback_url": url}, settings)
        assert isinstance(errors, list), errors
        assert [e["field"] for e in errors] == ["callback_url"]
        assert "hunter2" not in errors[0]["message"] and "t0k" not in errors[0]["message"]
    ok = validate_request({**body, "callback_url": "https://hooks.example.com/h?id=1"}, settings)
    assert not isinstance(ok, list), ok
