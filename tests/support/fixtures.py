"""Fixtures shared by several test folders; import them into a conftest or test module."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The small models of these tests run several times faster on one thread than on two busy
    cores (the 2-core machine runs other work too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
