from cancelflow.contract import OutcomeType
from sandboxes.axelspringer import DEMO, TOKEN_PATH
from tests.contract.providers import ContractFixture

CONTRACT = ContractFixture(
    success={"purchase_ref": DEMO.redeemed},
    cancel_key=DEMO.redeemed,
    already_cancelled={"purchase_ref": DEMO.canceled},
    not_found={"purchase_ref": DEMO.unknown},
    not_found_outcome=OutcomeType.NOT_FOUND,
    bad_credentials={"client_secret": "not-the-secret"},
    probe=("POST", TOKEN_PATH),
    token_route="token",
    token_path=TOKEN_PATH,
)
