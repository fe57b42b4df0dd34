"""Shared test set-up (STYLE.md rule 13: seeded).

The whole session runs torch on one intra-op thread: the test tensors are tiny, and on a loaded
2-core machine OpenMP thread hand-offs cost 100x more than the arithmetic (module-scoped
fixtures that train a model run before any function-scoped fixture, so this is set at import).
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Same random state for every test."""
    torch.manual_seed(0)
    yield
