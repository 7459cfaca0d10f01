"""The throwaway provider's contract table (as ``tests/contract/providers/<key>.py``)."""

from cancelflow.contract import OutcomeType
from tests.contract.providers import ContractFixture
from tests.contract.throwaway.provider import MEMBER_PATH
from tests.contract.throwaway.sandbox import DEMO

CONTRACT = ContractFixture(
    success={"member_id": DEMO.active},
    cancel_key=DEMO.active,
    already_cancelled={"member_id": DEMO.cancelled},
    not_found={"member_id": DEMO.not_found},
    not_found_outcome=OutcomeType.NOT_FOUND,
    bad_credentials={"api_key": "not-the-key"},
    probe=("GET", MEMBER_PATH.format(member_id=DEMO.active)),
)
