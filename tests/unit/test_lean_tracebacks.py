"""``messaging.patches.LeanCode``: a task error's ``ExceptionInfo`` copies its frames' code
without a tuple per instruction, formats the same traceback, and pickles whole."""

from __future__ import annotations

import pickle
import traceback
import tracemalloc
from collections.abc import Iterator

import pytest
from billiard import einfo as billiard_einfo
from billiard.einfo import ExceptionInfo
from celery.app import trace

from messaging import patches

# A frame of Celery's tracer size: thousands of instructions.
BIG = compile("\n".join(f"x{i} = {i} * 2" for i in range(2000)) + "\n1 / 0", "big", "exec")


@pytest.fixture
def lean() -> Iterator[None]:
    before = billiard_einfo._Frame.Code
    patches.lean_tracebacks()
    yield
    billiard_einfo._Frame.Code = before


def raised() -> ExceptionInfo:
    try:
        exec(BIG)  # noqa: S102  # a constant of this module
    except ZeroDivisionError:
        return ExceptionInfo()
    raise AssertionError("unreachable")


def allocated(make: object) -> int:
    tracemalloc.start()
    try:
        kept = make()  # type: ignore[operator]
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return size


def test_a_copied_frame_reads_its_code_positions_from_the_code(lean: None) -> None:
    info = raised()
    frames = []
    tb = info.tb
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    assert all(isinstance(c, patches.LeanCode) for c in frames)
    real = BIG
    assert list(frames[-1].co_positions()) == list(real.co_positions())
    # Formatted from the copies as from the real traceback (the line, the caret).
    assert "".join(traceback.format_tb(info.tb)) in info.traceback


def test_it_holds_a_fraction_of_what_billiard_copies() -> None:
    before = billiard_einfo._Frame.Code  # LeanCode already, if a worker app was made here
    try:
        billiard_einfo._Frame.Code = billiard_einfo._Code
        full = allocated(raised)
        patches.lean_tracebacks()
        lean = allocated(raised)
    finally:
        billiard_einfo._Frame.Code = before
    assert lean < full / 4, (lean, full)


def test_a_pickled_copy_has_every_position(lean: None) -> None:
    info = raised()
    code = info.tb.tb_next.tb_frame.f_code
    copy = pickle.loads(pickle.dumps(code))  # noqa: S301  # our own bytes
    assert type(copy) is billiard_einfo._Code
    assert list(copy.co_positions()) == list(code.co_positions())


def test_the_worker_app_installs_it() -> None:
    from cancelflow.settings import Settings
    from worker.app import create_app  # imported for its effect

    create_app(Settings())
    assert billiard_einfo._Frame.Code is patches.LeanCode
    assert trace.ExceptionInfo is ExceptionInfo  # Celery's tracer makes billiard's
