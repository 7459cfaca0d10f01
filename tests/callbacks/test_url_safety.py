"""Callback URL policy: the pre-check, and the resolver that checks the address connected to."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from cancelflow import callbacks
from cancelflow.callbacks import CallbackRetryable, PolicyResolver, UnsafeCallbackUrl, check_url
from cancelflow.settings import CallbackSettings
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
                        status, _ = await callbacks.deliver(
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
