import os

import pytest
import torch

from multitoken.config import ModelConfig
from multitoken.model import MultiTokenModel

# Decoding chooses its few-row kernels by measuring (multitoken/kernels.py). The suite, its subprocesses
# included, keeps the choices in memory so that it never writes the user's cache; tests/test_kernels.py tests
# the cache in a temporary directory.
os.environ.setdefault("MULTITOKEN_KERNEL_CACHE", "off")


def make_model(seed: int = 0, **overrides) -> MultiTokenModel:
    """A small random fp32 model; any ModelConfig field can be overridden."""
    fields = dict(vocab_size=61, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, n_future=3, max_seq_len=96)
    fields.update(overrides)
    torch.manual_seed(seed)
    return MultiTokenModel(ModelConfig(**fields)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Test models are tiny: a second thread only adds synchronisation, which is ruinous when other
    processes share the 2 cores (a 3 s training run took 47 s with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> MultiTokenModel:
    return make_model()
