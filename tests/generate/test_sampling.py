"""The top-p nucleus ranks only the top tokens; its slow, obvious twin ranks them all."""

from __future__ import annotations

import pytest
import torch

import multitoken.generate.sampling as sampling
from multitoken.generate.sampling import SamplingConfig, nucleus, probabilities


def nucleus_by_full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Every token ranked; a token is kept if the tokens ranked before it hold less than top_p."""
    ranked, order = probs.sort(dim=-1, descending=True)
    mass = ranked.cumsum(-1)
    before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)  # the mass ranked before each
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before < top_p)


@pytest.mark.parametrize("start", [1, 64, 10**9])  # grown from one token, the default, the whole row at once
@pytest.mark.parametrize("sharpness", [0.2, 1.0, 4.0])  # nuclei of thousands of tokens down to a few
def test_the_nucleus_is_the_full_sorts(monkeypatch, start: int, sharpness: float) -> None:
    monkeypatch.setattr(sampling, "NUCLEUS_START", start)
    gen = torch.Generator().manual_seed(int(10 * sharpness) + start % 7)
    probs = torch.softmax(sharpness * torch.randn(3, 3000, generator=gen), dim=-1)
    for top_p in (0.05, 0.5, 0.9, 0.95, 0.999):
        keep = nucleus(probs, top_p)
        assert torch.equal(keep, nucleus_by_full_sort(probs, top_p)), top_p
        assert float(probs[keep].sum()) >= top_p * probs.shape[0] - 1e-4  # each row keeps at least top_p


def test_top_p_keeps_the_nucleus_renormalised() -> None:
    logits = torch.randn(2, 5, 400, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0.7, top_p=0.8)
    p = probabilities(logits, cfg)  # (2, 5, V): leading dims of any shape
    full = torch.softmax(logits / 0.7, dim=-1)
    keep = nucleus(full.view(-1, 400), 0.8).view_as(full)
    assert torch.equal(p > 0, keep)
    torch.testing.assert_close(p, torch.where(keep, full, 0.0) / torch.where(keep, full, 0.0).sum(-1, keepdim=True))
