from cancelflow.contract import OutcomeType
from sandboxes.azotte import DEMO, REQUEST_PATH
from tests.contract.providers import ContractFixture

CONTRACT = ContractFixture(
    success={"order_identifier": DEMO.processed},
    cancel_key=DEMO.processed,
    already_cancelled={"order_identifier": DEMO.already_cancelled},
    not_found={"order_identifier": DEMO.not_found},
    not_found_outcome=OutcomeType.NOT_FOUND,
    bad_credentials={"api_key": "sk_sandbox_wrong_key"},
    probe=("POST", REQUEST_PATH),
)
