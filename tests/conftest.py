"""Shared test set-up: deterministic seeds, few threads, and a private model cache per session."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # One thread: on 2 busy cores, tiny models run far slower with two.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never write into the user's model cache."""
    os.environ.setdefault("CCATOOLKIT_CACHE", str(tmp_path_factory.mktemp("ccatoolkit-cache")))


@pytest.fixture(scope="module")
def digits() -> tuple[list, list]:
    """scikit-learn digits as (train, test) lists of batches of 128 (modules may define their own)."""
    from toybox import digit_batches

    return digit_batches(128)


@pytest.fixture(scope="module")
def pair(digits: tuple[list, list]) -> tuple:
    """Two digits MLPs (2 x 32) trained from seeds 0 and 1 (modules may define their own)."""
    from toybox import digit_mlps

    return digit_mlps(digits[0])
