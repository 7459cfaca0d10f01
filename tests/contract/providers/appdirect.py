from cancelflow.contract import OutcomeType
from sandboxes.appdirect import API, DEMO
from tests.contract.providers import ContractFixture

CONTRACT = ContractFixture(
    success={"subscription_id": DEMO.active},
    cancel_key=DEMO.active,
    already_cancelled={"subscription_id": DEMO.cancelled},
    not_found={"subscription_id": DEMO.not_found},
    not_found_outcome=OutcomeType.NOT_FOUND,
    # A signature made with the wrong consumer secret.
    bad_credentials={"consumer_secret": "not-the-secret"},
    probe=("DELETE", f"{API}/subscriptions/{DEMO.active}"),
    # DELETE answers 204 without a body: only the read parses one.
    parses_body=("check",),
)
