"""Shared test setup: offline defaults for every test, and a one-thread torch fixture for tiny-tensor tests."""

import pytest
import torch

from darwinlm_core.environment import apply_offline_defaults

apply_offline_defaults()  # tests never reach a hub, whatever the shell exported


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one thread avoids OpenMP hand-off overhead on a shared, busy CPU (ms per op, not ~25)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
