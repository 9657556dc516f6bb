import pytest
import torch

from multitoken.config import ModelConfig
from multitoken.model import MultiTokenModel


def make_model(seed: int = 0, **overrides) -> MultiTokenModel:
    """A small random fp32 model; any ModelConfig field can be overridden."""
    fields = dict(vocab_size=61, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, n_future=3, max_seq_len=96)
    fields.update(overrides)
    torch.manual_seed(seed)
    return MultiTokenModel(ModelConfig(**fields)).eval()


@pytest.fixture
def model() -> MultiTokenModel:
    return make_model()
