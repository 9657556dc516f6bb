"""Speculative sampling is lossless: its output is distributed exactly as plain sampling from head 1.

A stub model with hand-set bigram logits makes the exact law of the first tokens computable: under plain
sampling, P(x1..x4) = prod_t p(x_t | x_{t-1}) with p head 1's processed distribution. Many rows of one
batch, each its own independent run, give the empirical law under speculative sampling; a chi-square test
with a fixed seed compares them, and the same test must fail when the residual is broken.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

import multitoken.generate.speculative as speculative
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.sampling import SamplingConfig, probabilities, residual_distribution
from multitoken.generate.speculative import speculative_generate
from multitoken.generate.tree import Tree
from tests.conftest import make_model
from tests.generate.test_speculative import StubModel

V, N_TOKENS, ROWS = 3, 4, 24_000


def bigram_stub() -> StubModel:
    """Three heads whose distributions differ clearly, so drafts are often rejected and the residual matters."""
    g = torch.Generator().manual_seed(0)
    return StubModel(2.0 * torch.randn(3, V, V, generator=g))


@functools.cache
def conditioned_model() -> torch.nn.Module:
    """A real model of token-conditioned modules over the V tokens, its logits scaled up so that head 1's and
    the modules' distributions are far from uniform and from each other: drafts are often rejected."""
    model = make_model(
        seed=3, head_type="mtp", vocab_size=V, dim=16, n_heads=2, n_kv_heads=1, n_future=3, n_layers=5, max_seq_len=16
    )
    with torch.no_grad():
        model.output.weight.mul_(11.0)
    return model.requires_grad_(False)


def exact_law(model, first: int, cfg: SamplingConfig) -> dict[tuple[int, ...], float]:
    """P(x1..x4) under plain sampling: from the stub's bigram table, or a real model's full forwards."""
    seqs = list(itertools.product(range(V), repeat=N_TOKENS))
    if isinstance(model, StubModel):
        p = probabilities(model.table[0], cfg).tolist()  # (V, V): head 1's processed p(next | last)
        law = {}
        for seq in seqs:
            prob, last = 1.0, first
            for x in seq:
                prob, last = prob * p[last][x], x
            law[seq] = prob
        return law
    x = torch.tensor([[first, *seq] for seq in seqs])  # (V^4, 1 + N_TOKENS)
    with torch.no_grad():
        p = probabilities(model(x, heads=[0])[:, :N_TOKENS, 0], cfg)  # (V^4, N_TOKENS, V): p(x_t+1 | x_<=t)
    chosen = p.gather(-1, x[:, 1:, None])[..., 0].double().prod(-1)  # (V^4,)
    return dict(zip(seqs, chosen.tolist(), strict=True))


def chi_square(
    model: StubModel,
    cfg: SamplingConfig,
    seed: int = 0,
    k: int | None = 3,
    vocab: DraftVocab | None = None,
    tree: Tree | None = None,
) -> tuple[float, int, int]:
    """Chi-square statistic, its degrees of freedom, and samples that fell where the law puts no mass."""
    gen = torch.Generator().manual_seed(seed)
    result = speculative_generate(
        model, [[0]] * ROWS, N_TOKENS, heads_used=k, sampling=cfg, generator=gen, draft_vocab=vocab, tree=tree
    )
    counts: dict[tuple[int, ...], int] = {}
    for t in result.tokens:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    law = exact_law(model, 0, cfg)
    impossible = sum(c for s, c in counts.items() if law[s] == 0)
    # Pool the cells expected to hold fewer than 5 samples, as the chi-square approximation asks.
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for seq, prob in law.items():
        expected, observed = ROWS * prob, counts.get(seq, 0)
        if expected >= 5:
            stat += (observed - expected) ** 2 / expected
            cells += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1, impossible


def chi_square_quantile(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal score z (3.72: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


CONFIGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7, top_k=2),
    SamplingConfig(temperature=1.3, top_p=0.8),
]


LAW_MODELS = {"stub": bigram_stub, "mtp": conditioned_model}  # hand-set heads; token-conditioned modules


@pytest.mark.parametrize("kind", LAW_MODELS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["t1", "topk", "topp"])
def test_speculative_sampling_matches_plain_law(cfg, kind):
    model = LAW_MODELS[kind]()
    stat, df, impossible = chi_square(model, cfg)
    assert impossible == 0
    assert stat < chi_square_quantile(df), (stat, df)


@pytest.mark.parametrize("kind", LAW_MODELS)
def test_the_check_catches_a_broken_residual(monkeypatch, kind):
    """Sampling from p instead of normalize(max(0, p - q)) after a rejection biases the output."""
    model = LAW_MODELS[kind]()
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    stat, df, _ = chi_square(model, CONFIGS[0])
    assert stat > 3 * chi_square_quantile(df), (stat, df)


@pytest.mark.parametrize("kind", LAW_MODELS)
def test_a_draft_vocabulary_keeps_the_law(kind):
    """Drafts only among tokens {2, 0}: q has no mass on token 1, which head 1 still samples."""
    vocab = DraftVocab(torch.tensor([2, 0]), V)
    stat, df, impossible = chi_square(LAW_MODELS[kind](), CONFIGS[0], seed=3, vocab=vocab)
    assert impossible == 0 and stat < chi_square_quantile(df), (stat, df)


@pytest.mark.parametrize("kind", LAW_MODELS)
def test_drafts_are_accepted_and_rejected(kind):
    """The law test only means something if both branches ran: some drafts kept, some rejected."""
    result = speculative_generate(
        LAW_MODELS[kind](), [[0]] * 200, 6, sampling=CONFIGS[0], generator=torch.Generator().manual_seed(1)
    )
    hist = result.stats["accept_histogram"]
    assert hist[0] > 0 and hist[1] + hist[2] > 0


def test_residual_distribution():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.1, 0.2])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    torch.testing.assert_close(residual_distribution(p, torch.zeros(4)), p)  # the bonus token
    torch.testing.assert_close(residual_distribution(p, p), p)  # no mass left: fall back to p


@pytest.mark.parametrize("kind", LAW_MODELS)
@pytest.mark.parametrize("k", [1, 2])
def test_few_heads_keep_the_law(k, kind):
    """One head is plain sampling through the speculative loop; two heads draft one token."""
    stat, df, impossible = chi_square(LAW_MODELS[kind](), CONFIGS[0], seed=2, k=k)
    assert impossible == 0 and stat < chi_square_quantile(df), (stat, df)


def test_seeded_sampling_is_reproducible_on_a_real_model():
    model = make_model()
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95)
    runs = [
        speculative_generate(model, [[1, 2], [3]], 15, sampling=cfg, generator=torch.Generator().manual_seed(4))
        for _ in range(2)
    ]
    assert runs[0].tokens == runs[1].tokens and all(len(t) == 15 for t in runs[0].tokens)


# Three candidates for the first draft, two after the first of them, one after the second: every node kind
# (several children, one child, a leaf) on the walk.
TREE = Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0)))


@pytest.mark.parametrize("kind", LAW_MODELS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["t1", "topk", "topp"])
def test_tree_sampling_matches_plain_law(cfg, kind):
    stat, df, impossible = chi_square(LAW_MODELS[kind](), cfg, seed=5, k=None, tree=TREE)
    assert impossible == 0 and stat < chi_square_quantile(df), (stat, df)


@pytest.mark.parametrize("kind", LAW_MODELS)
def test_tree_sampling_with_a_draft_vocabulary_keeps_the_law(kind):
    vocab = DraftVocab(torch.tensor([2, 0]), V)
    stat, df, impossible = chi_square(LAW_MODELS[kind](), CONFIGS[0], seed=6, k=None, vocab=vocab, tree=TREE)
    assert impossible == 0 and stat < chi_square_quantile(df), (stat, df)


@pytest.mark.parametrize("kind", LAW_MODELS)
def test_the_check_catches_a_tree_walk_without_residuals(monkeypatch, kind):
    """Trying the next sibling against the same distribution, as if the rejected one had not been drawn,
    over-samples the candidates' tokens."""
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    stat, df, _ = chi_square(LAW_MODELS[kind](), CONFIGS[0], seed=5, k=None, tree=TREE)
    assert stat > 3 * chi_square_quantile(df), (stat, df)


@pytest.mark.parametrize("kind", LAW_MODELS)
def test_tree_sampling_accepts_later_siblings(kind):
    """The law test only means something if the walk went past a rejected first child: a chain over the
    same heads accepts fewer tokens per forward."""
    model = LAW_MODELS[kind]()
    gen = torch.Generator().manual_seed(2)
    tree = speculative_generate(model, [[0]] * 400, 8, sampling=CONFIGS[0], generator=gen, tree=TREE)
    gen = torch.Generator().manual_seed(2)
    chain = speculative_generate(model, [[0]] * 400, 8, sampling=CONFIGS[0], generator=gen)
    assert tree.stats["tokens_per_forward"] > chain.stats["tokens_per_forward"] + 0.1
