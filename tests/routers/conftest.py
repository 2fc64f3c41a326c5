from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test: on a busy 2-core machine two threads run many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
