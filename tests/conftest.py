import pytest
import torch

import hf_llama_mem  # noqa: F401  (registers the Auto classes)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run on CUDA when a device is present and are skipped, saying so, when it is not."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
