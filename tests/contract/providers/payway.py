from cancelflow.contract import OutcomeType
from sandboxes.payway import CAN_CANCEL_PATH, DEMO, PaywayRef
from tests.contract.providers import ContractFixture


def _ref(ref: PaywayRef) -> dict[str, str]:
    return {**ref.as_json(), "cancellation_reason_id": DEMO.reason_id}


CONTRACT = ContractFixture(
    success=_ref(DEMO.end_of_period),
    cancel_key=DEMO.end_of_period.user_product_id,
    already_cancelled=_ref(DEMO.already_cancelled),
    # Payway has no "not found" answer: an unknown product is not eligible with a reason.
    not_found=_ref(DEMO.user_product_not_found),
    not_found_outcome=OutcomeType.NOT_ELIGIBLE,
    bad_credentials={"client_secret": "not-the-secret"},
    probe=("GET", CAN_CANCEL_PATH),
    token_route="access_token",
    token_path="/api/authorization/access_token",
)
