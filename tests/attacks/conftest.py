"""Fixtures for the attack tests."""

import pytest


@pytest.fixture
def one_torch_thread():
    """Run tiny torch ops on one thread: on a loaded 2-core machine, intra-op threads on 40x200 matrices
    spin against other processes and turn milliseconds into seconds. Restores the previous setting."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
