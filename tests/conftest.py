"""Shared test setup: offline defaults for every test, a one-thread torch fixture for tiny-tensor tests, and a
moto S3 server for storage tests."""

import pytest
import torch

from darwinlm.flows.offline import apply_offline_defaults

apply_offline_defaults()  # tests never reach a hub, whatever the shell exported


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one thread avoids OpenMP hand-off overhead on a shared, busy CPU (ms per op, not ~25)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server with bucket 'darwinlm', and fsspec configured to reach it; all undone afterwards."""
    from tests.support.storage_faults import moto_s3

    with moto_s3() as endpoint:
        yield endpoint
