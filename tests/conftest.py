"""Shared test set-up (STYLE.md rule 13: seeded)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    """Same random state for every test; one intra-op thread, because the test tensors are tiny and
    thread hand-offs on a loaded 2-core machine cost 100x more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
