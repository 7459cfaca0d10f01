"""Billing rules files: the examples load, matching and templates, errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.billing_rules import MissingFields, RulesError, load_rules, render

EXAMPLES = Path(__file__).parents[2] / "examples"
PAYWAY_EVENT = {
    "id": "evt_1",
    "type": "payment.final_failure",
    "data": {
        "provider": "payway",
        "account_id": "a" * 24,
        "user_product_id": "b" * 24,
        "invoice_id": 7,
    },
}


@pytest.mark.parametrize("name", ["billing-rules.yaml", "billing-rules.toml"])
def test_the_examples_load_and_agree(name: str) -> None:
    rules = load_rules(EXAMPLES / name, configured=["payway", "azotte", "appdirect"])
    assert [r.name for r in rules.rules] == [
        "payway-payment-failed",
        "azotte-account-closed",
        "appdirect-expired",
    ]
    rule = rules.match(PAYWAY_EVENT)
    assert rule is not None and rule.name == "payway-payment-failed"
    assert rule.request_body(PAYWAY_EVENT) == {
        "provider": "payway",
        "subscription": {
            "account_id": "a" * 24,
            "user_product_id": "b" * 24,
            "cancellation_reason_id": "5cb80481c00000000000000a",
        },
        "reason": {"code": "payment_failed", "comment": "payment.final_failure on invoice 7"},
        "metadata": {},
    }
    closed = {
        "id": "e2",
        "type": "account.closed",
        "data": {"provider": "azotte", "order_id": "o-1", "customer_id": 9},
    }
    body = rules.match(closed).request_body(closed)  # type: ignore[union-attr]
    assert body["subscription"] == {"order_identifier": "o-1", "cancelation_method": "Immediate"}
    assert body["metadata"] == {"customer": 9}  # a lone placeholder keeps the field's type


def test_an_event_no_rule_matches_is_none() -> None:
    rules = load_rules(EXAMPLES / "billing-rules.yaml")
    assert rules.match({**PAYWAY_EVENT, "type": "invoice.paid"}) is None
    assert rules.match({**PAYWAY_EVENT, "data": {"provider": "azotte"}}) is None


def test_a_missing_field_is_named() -> None:
    rule = load_rules(EXAMPLES / "billing-rules.yaml").rules[0]
    event = {**PAYWAY_EVENT, "data": {"provider": "payway", "account_id": "a" * 24}}
    with pytest.raises(MissingFields) as caught:
        rule.request_body(event)
    assert ("subscription.user_product_id", "data.user_product_id") in caught.value.missing
    assert ("reason.comment", "data.invoice_id") in caught.value.missing


def test_templates() -> None:
    event = {"id": "x", "data": {"n": 3, "items": [{"sku": "A"}]}}
    assert render("{data.n}", event) == 3
    assert (
        render("n={data.n}, first {data.items.0.sku}, {{literal}}", event)
        == "n=3, first A, {literal}"
    )
    assert render(True, event) is True
    with pytest.raises(KeyError):
        render("{data.nope}", event)


BAD_YAML = """\
version: 1
rules:
  - name: one
    when:
      type: payment.final_failure
    cancel:
      provider: payway
      subscription:
        account_id: "{data.account_id}"
        user_product_id: not-hex
        cancellation_reason_id: "{data.x"
        colour: red
  - name: one
    when: {type: x, surprise: 1}
    cancel: {provider: nosuch, subscription: {}}
  - name: three
    when: {type: x}
    cancel:
      provider: payway
      method: Immediate
      subscription: {account_id: "{id}", user_product_id: "{id}", cancellation_reason_id: "{id}"}
  - name: four
    when: {type: x}
    cancel: {provider: azotte, subscription: {order_identifier: "{id}"}}
"""


def test_yaml_errors_name_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(BAD_YAML)
    with pytest.raises(RulesError) as caught:
        load_rules(path, configured=["payway"])
    message = str(caught.value)
    expected = [
        (10, "rules[0].cancel.subscription.user_product_id", "pattern"),
        (11, "rules[0].cancel.subscription.cancellation_reason_id", "stray '{'"),
        (12, "rules[0].cancel.subscription.colour", "no field 'colour'"),
        (14, "rules[1].when.surprise", "Extra inputs"),
        (20, "rules[2].cancel.method", "payway has no cancellation method"),
        (24, "rules[3].cancel.provider", "not configured"),
    ]
    for line, loc, text in expected:
        assert any(
            f"rules.yaml:{line}: {loc}: " in row and text in row for row in message.splitlines()
        ), (line, message)
    assert "rules[0].name: rule name 'one' is used more than once" in message


BAD_TOML = """\
version = 1

[[rules]]
name = "one"
when = { type = "x" }

[rules.cancel]
provider = "payway"

[rules.cancel.subscription]
account_id = "{data.account_id}"
user_product_id = "nothex"

[[rules]]
name = "two"

[rules.when]
type = "y"

[rules.cancel]
provider = "azotte"
method = "Sometimes"
subscription = { order_identifier = "{x}" }
"""


def test_toml_errors_name_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(BAD_TOML)
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    lines = str(caught.value).splitlines()
    assert any(
        "rules.toml:10: rules[0].cancel.subscription: missing 'cancellation_reason_id'" in x
        for x in lines
    ), lines
    assert any(
        "rules.toml:12: rules[0].cancel.subscription.user_product_id: String should match" in x
        for x in lines
    ), lines
    assert any(
        "rules.toml:22: rules[1].cancel.method: Input should be 'Normal'" in x for x in lines
    ), lines


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("rules.yaml", "rules:\n  - name: x\n   when: 1\n", "rules.yaml:3: not valid YAML"),
        ("rules.toml", "version = 1\nrules = [\n", "not valid TOML"),
        ("rules.json", "{}", "must be .yaml, .yml or .toml"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, text: str, where: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RulesError, match=where):
        load_rules(path)
