"""The pieces every decisive experiment rests on: the loss mask, the t interval, the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multitoken.config import ModelConfig, TrainConfig
from multitoken.experiments import polynomials as poly
from multitoken.experiments.common import ExamplePool, masked_step, masked_targets
from multitoken.experiments.induction import (
    COPY_LENGTH,
    WordTokenizer,
    copy_row_accuracy,
    copy_rows,
    generate_stories,
    mention_targets,
)
from multitoken.experiments.stats import (
    REFUTED,
    REPRODUCED,
    UNDECIDED,
    Rule,
    compare,
    t_interval,
    t_quantile,
    verdict,
)
from multitoken.loss import IGNORE_INDEX, sequential_backward
from multitoken.model import MultiTokenModel

# --------------------------------------------------------------------------------------------------
# the loss only where the task has something to predict


def _tiny(n_future: int) -> MultiTokenModel:
    model = MultiTokenModel(ModelConfig(vocab_size=11, dim=16, n_layers=3, n_heads=2, n_future=n_future))
    model.reset_parameters(seed=0)
    return model


def test_masked_targets_keep_only_flagged_tokens_for_every_head() -> None:
    tokens = torch.arange(10).view(1, 10)  # token j is j, so a target names its position
    flags = torch.zeros(1, 10, dtype=torch.bool)
    flags[0, [6, 7, 9]] = True
    inputs, targets = masked_targets(tokens, flags, n_future=3)
    assert inputs.tolist() == [list(range(9))]
    for i in range(3):  # head i at position t predicts token t + i + 1, scored only if flagged
        expected = [t + i + 1 if t + i + 1 in (6, 7, 9) else IGNORE_INDEX for t in range(9)]
        assert targets[0, i].tolist() == expected


EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("n_future", [1, 2])
def test_masked_loss_is_the_mean_over_answer_positions(n_future: int) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (3, 12), generator=gen)
    flags = torch.rand(3, 12, generator=gen) < 0.4
    flags[0, 5] = True  # at least one target for every head
    model = _tiny(n_future)
    inputs, targets = masked_targets(tokens, flags, n_future)
    report = sequential_backward(model, inputs, targets)
    with torch.no_grad():
        logits = model(tokens[:, :-1])  # (B, T, n, V)
    for i in range(n_future):  # the oracle: a plain loop over (row, position) pairs whose target is flagged
        losses = [
            F.cross_entropy(logits[b, t, i], tokens[b, t + i + 1]).item()
            for b in range(3)
            for t in range(11)
            if t + i + 1 < 12 and flags[b, t + i + 1]
        ]
        # Both sides are float32 means of the same cross-entropies, from the same weights by two forwards: each
        # term's log-softmax over 11 logits and the mean over the terms round at a few ulps per operation.
        rel = 4 * EPS32 * (len(losses) + 11)
        assert report.per_head[i] == pytest.approx(sum(losses) / len(losses), rel=rel)
    assert report.total == pytest.approx(sum(report.per_head), rel=2 * EPS32 * n_future)  # a float32 sum of n terms


def test_masked_step_moves_only_with_flagged_tokens() -> None:
    """A batch with no flagged token gives no gradient: the unscored tokens cannot train the model."""
    model = _tiny(2)
    before = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masked_step(model, opt, tokens, torch.zeros(2, 8, dtype=torch.bool), TrainConfig(), lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_example_pool_batches_are_seeded_and_cut_to_their_longest_row() -> None:
    pool = ExamplePool.pack([([1, 2, 3], [False, False, True]), ([4, 5], [False, True])], pad=0)
    assert pool.tokens.tolist() == [[1, 2, 3], [4, 5, 0]] and pool.target[1].tolist() == [False, True, False]
    a, fa = pool.batch(seed=3, step=7, batch_size=6)
    b, fb = pool.batch(seed=3, step=7, batch_size=6)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert a.shape[1] == (3 if (a[:, 0] == 1).any() else 2)
    assert not fa[a == 0].any()  # padding is never a target


def test_story_rows_flag_exactly_the_later_mentions() -> None:
    tok = WordTokenizer()
    for story in generate_stories(3, 20, tok):
        ids, flags = mention_targets(story, tok.eos_id, context=500)
        assert ids == [tok.eos_id, *story.ids]
        flagged = {p for p, f in enumerate(flags) if f}
        assert flagged == {j + 1 for j in story.later_mentions} | {j + 2 for j in story.later_mentions}
        assert all(ids[p] in ids[:p] for p in flagged)  # every scored token can be copied from the context


def test_copy_rows_flag_the_repeat_after_its_first_token() -> None:
    tok = WordTokenizer()
    pool = copy_rows(0, 8, tok)
    assert (pool.target[:, : COPY_LENGTH + 2] == False).all() and pool.target[:, COPY_LENGTH + 2 :].all()  # noqa: E712
    for row, flags in zip(pool.tokens, pool.target, strict=True):
        for p in np.flatnonzero(flags):  # the token after the previous occurrence of the current token
            assert row[p] == row[p - COPY_LENGTH]


class _Oracle(torch.nn.Module):
    """Head 1 says the true next token everywhere (a perfect copier and a perfect guesser)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(vocab_size, 1)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
        return F.one_hot(torch.roll(x, -1, 1), self.vocab_size).float()[:, :, None]  # (B, T, 1, V)


def test_copy_row_accuracy_scores_repeat_and_control() -> None:
    tok = WordTokenizer()
    scores = copy_row_accuracy(_Oracle(tok.vocab_size), copy_rows(1, 16, tok).tokens)
    assert scores["induction_accuracy"] == 1.0 and scores["first_mention_accuracy"] == 1.0


def test_polynomial_rows_flag_exactly_the_answer() -> None:
    pool = poly.answer_pool(5, 30, (1, 3))
    for row, flags, length in zip(pool.tokens, pool.target, pool.lengths, strict=True):
        assert flags.sum() == poly.D and flags[length - poly.D : length].all()
        assert row[length - poly.D - 1] == poly.EQ and row[0] == poly.EOS


# --------------------------------------------------------------------------------------------------
# intervals and the verdict


def test_t_interval_matches_a_hand_computed_value() -> None:
    ci = t_interval([1.0, 2.0, 3.0])  # mean 2, sample sd 1, t_{0.975, 2} = 4.303
    half = 4.303 / math.sqrt(3)
    assert (ci.mean, ci.sd, ci.n) == (2.0, 1.0, 3)
    assert ci.low == pytest.approx(2 - half) and ci.high == pytest.approx(2 + half)


def test_t_table_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 9, 20):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    assert t_quantile(27) >= stats.t.ppf(0.975, 27)  # between table rows: the conservative neighbour
    with pytest.raises(ValueError):
        t_interval([1.0])


def test_verdict_on_synthetic_numbers() -> None:
    rule = Rule(margin=0.05, baseline_floor=0.5)
    assert verdict([0.20, 0.25, 0.22], baseline_mean=0.7, rule=rule) == REPRODUCED
    assert verdict([0.00, 0.01, -0.01], baseline_mean=0.7, rule=rule) == REFUTED  # excludes +0.05
    assert verdict([-0.2, -0.25, -0.22], baseline_mean=0.7, rule=rule) == REFUTED  # the other way round
    assert verdict([0.3, -0.2, 0.1], baseline_mean=0.7, rule=rule) == UNDECIDED  # too wide to say
    assert verdict([0.20, 0.25, 0.22], baseline_mean=0.1, rule=rule) == UNDECIDED  # baseline did not learn
    assert verdict([0.20, 0.25, 0.22], baseline_mean=0.7, rule=rule, learned=False) == UNDECIDED
    lower = Rule(margin=0.02, baseline_floor=4.0, higher_is_better=False)  # bits per byte
    assert verdict([-0.10, -0.12, -0.11], baseline_mean=3.0, rule=lower) == REPRODUCED
    assert verdict([0.10, 0.12, 0.11], baseline_mean=3.0, rule=lower) == REFUTED
    assert verdict([-0.10, -0.12, -0.11], baseline_mean=6.0, rule=lower) == UNDECIDED


def test_compare_pairs_by_seed() -> None:
    c = compare("x", [0.9, 0.8, 0.85], [0.6, 0.55, 0.62], Rule(0.05, 0.5), "acc")
    diffs = np.array([0.3, 0.25, 0.23])
    assert c["diff"]["mean"] == pytest.approx(diffs.mean()) and c["verdict"] == REPRODUCED
    assert c["diff"]["sd"] == pytest.approx(diffs.std(ddof=1))
    with pytest.raises(ValueError):
        compare("x", [1.0, 2.0], [1.0], Rule(0.0, 0.0), "acc")
