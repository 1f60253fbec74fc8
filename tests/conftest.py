import pytest
import torch

import hf_llama_mem  # noqa: F401  (registers the Auto classes)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
