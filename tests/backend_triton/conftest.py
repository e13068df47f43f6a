import pytest

import vgmr_fast.triton as VT


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Every buffer a kernel must write starts as NaN: an unwritten element fails the test.
    monkeypatch.setitem(VT.CONFIG, "poison_outputs", True)
