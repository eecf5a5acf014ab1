"""Every merging call gives the results saved before merging/ was reorganised (see ``golden_merges.py``)."""

from __future__ import annotations

import pytest
import torch

import golden_merges

SAVED = torch.load(golden_merges.GOLDEN, weights_only=False)
#: Bit for bit on the machine kind the outputs were saved on; elsewhere BLAS may round differently.
EXACT = SAVED["machine"] == golden_merges.machine()


@pytest.mark.parametrize("name", sorted(SAVED["records"]))
def test_merge_matches_saved_output(name: str) -> None:
    actual = golden_merges.compute([name])[name]
    diffs = golden_merges.differences(SAVED["records"][name], actual)
    tolerance = 0.0 if EXACT else 1e-4
    assert not [d for d in diffs if d[1] > tolerance], f"{name} differs from its saved merge: {diffs[:5]}"


def test_saved_cases_are_all_still_run() -> None:
    assert sorted(SAVED["records"]) == sorted(golden_merges._cases())
