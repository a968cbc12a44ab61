"""Shared test settings.

The tests run tiny networks on 2-core machines; for tensors this small one intra-op thread is
faster than two fighting over the cores, and it makes timings steadier under load.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
