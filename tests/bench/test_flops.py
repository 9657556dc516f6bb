"""The analytic FLOP count against torch's own count of a real forward + backward."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from multitoken.bench.flops import attention_flops_per_token, flop_ratio, train_flops_per_token
from multitoken.config import ModelConfig
from multitoken.loss import sequential_backward, shift_targets, summed_loss
from multitoken.model import MultiTokenModel


def _counted_flops_per_token(cfg: ModelConfig, context: int, sequential: bool) -> float:
    """FlopCounterMode over one training forward + backward, per input token.

    The math attention backend decomposes attention into matmuls the counter sees (it has no formula for
    the CPU flash kernel).
    """
    torch.manual_seed(0)
    model = MultiTokenModel(cfg)
    window = torch.randint(0, cfg.vocab_size, (2, context + cfg.n_future))
    inputs, targets = shift_targets(window, cfg.n_future)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if sequential:
            sequential_backward(model, inputs, targets, chunk=16)
        else:
            loss, _ = summed_loss(model, inputs, targets)
            loss.backward()
    return counter.get_total_flops() / inputs.numel()


@pytest.mark.parametrize(
    ("head_type", "n_future", "sequential"),
    [("parallel", 1, False), ("parallel", 3, False), ("parallel", 3, True), ("causal", 2, True),
     ("linear", 2, False)],
)  # fmt: skip
def test_formula_matches_flop_counter(head_type: str, n_future: int, sequential: bool) -> None:
    cfg = ModelConfig(
        vocab_size=300, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, n_future=n_future, head_type=head_type,
        max_seq_len=64,
    )  # fmt: skip
    counted = _counted_flops_per_token(cfg, 48, sequential)
    assert train_flops_per_token(cfg, 48) == pytest.approx(counted, rel=1e-12)  # the same count, exactly


def test_unembedding_counted_once_per_head() -> None:
    base = ModelConfig(vocab_size=32000, dim=256, n_layers=8, n_heads=4, n_future=1, max_seq_len=512)
    n4 = base.replace(n_future=4)
    extra = train_flops_per_token(n4, 512) - train_flops_per_token(base, 512)
    assert extra == 6 * 3 * 32000 * 256  # same depth: only three more unembeddings
    assert flop_ratio(n4, base, 512) > 1.0
    assert attention_flops_per_token(n4, 512) == attention_flops_per_token(base, 512)
