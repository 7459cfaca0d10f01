"""Console session cookies: signed, expiring, and naming no token secret."""

from __future__ import annotations

from producers.console import sessions

KEY = sessions.signing_key("a console secret")


def test_a_session_reads_back_until_it_expires() -> None:
    value = sessions.open_session(KEY, who="token:abc", scope="write", now=1000.0)
    found = sessions.read_session(KEY, value, now=1000.0 + sessions.LIFETIME_S - 1)
    assert found is not None
    assert (found.who, found.scope, found.can_act) == ("token:abc", "write", True)
    assert found.expires == 1000 + sessions.LIFETIME_S
    assert sessions.read_session(KEY, value, now=1000.0 + sessions.LIFETIME_S) is None


def test_a_forged_or_foreign_cookie_is_no_session() -> None:
    value = sessions.open_session(KEY, who="token:abc", scope="read", now=1000.0)
    body, mac = value.split(".")
    other = sessions.open_session(KEY, who="token:abc", scope="write", now=1000.0)
    assert sessions.read_session(KEY, f"{other.split('.')[0]}.{mac}", now=1000.0) is None
    assert sessions.read_session(KEY, f"{body}.{mac[:-2]}xx", now=1000.0) is None
    assert sessions.read_session(sessions.signing_key("another"), value, now=1000.0) is None
    for junk in ("", "nodot", "a.b.c", "é.é", None):
        assert sessions.read_session(KEY, junk, now=1000.0) is None


def test_keys_come_from_the_setting_or_are_random_per_process() -> None:
    assert sessions.signing_key("s") == sessions.signing_key("s")
    assert sessions.signing_key(None) != sessions.signing_key(None)


def test_each_session_has_its_own_csrf_token_compared_in_full() -> None:
    first = sessions.read_session(KEY, sessions.open_session(KEY, who="w", scope="read"))
    second = sessions.read_session(KEY, sessions.open_session(KEY, who="w", scope="read"))
    assert first is not None and second is not None and first.csrf != second.csrf
    assert sessions.csrf_matches(first.csrf, first.csrf)
    assert not sessions.csrf_matches(first.csrf, second.csrf)
    assert not sessions.csrf_matches(first.csrf, first.csrf[:-1])
    assert not sessions.csrf_matches(first.csrf, None)
    assert not sessions.csrf_matches(first.csrf, "")


def test_a_token_is_named_by_a_hash_prefix() -> None:
    who = sessions.token_id("s3cret-token")
    assert who.startswith("token:") and len(who) == len("token:") + 12
    assert "s3cret" not in who
