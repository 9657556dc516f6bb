"""Draft vocabularies: the drafts come only from the K most frequent tokens, and decoding stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.calibration import calibrate
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.speculative import speculative_generate
from multitoken.generate.tree import Tree
from tests.conftest import make_model
from tests.generate.test_speculative import held_out_prompts, trained_model, word_stream
from tests.tolerance import sum_rtol


def stream_vocab(size: int) -> DraftVocab:
    """The `size` most frequent tokens of the trained model's language."""
    return DraftVocab.most_frequent(word_stream(20_000, seed=0), 61, size)


def test_most_frequent_orders_by_count_then_id():
    vocab = DraftVocab.most_frequent(np.array([5, 3, 3, 7, 5, 3, 1]), 8, 4)
    assert vocab.ids.tolist() == [3, 5, 1, 7]  # counts 3, 2, then ties (1 each) by id
    assert vocab.coverage(np.array([3, 5, 0, 2])) == 0.5
    assert DraftVocab.most_frequent(np.array([2]), 4, 4).ids.tolist() == [2, 0, 1, 3]  # unseen tokens last
    # A small sample first, a corpus behind it for the tokens the sample never shows.
    corpus = np.array([3, 3, 3, 1, 1, 0])
    assert DraftVocab.most_frequent(np.array([2, 2, 1]), 4, 4, then=corpus).ids.tolist() == [2, 1, 3, 0]


def test_restrict_expand_and_position_agree():
    vocab = DraftVocab(torch.tensor([4, 1, 2]), 6)
    logits = torch.arange(12.0).view(2, 6)
    assert vocab.restrict(logits).tolist() == [[4.0, 1.0, 2.0], [10.0, 7.0, 8.0]]
    q = torch.tensor([0.5, 0.3, 0.2])
    assert vocab.expand(q).tolist() == pytest.approx([0.0, 0.3, 0.2, 0.0, 0.5, 0.0])
    assert vocab.position().tolist() == [-1, 1, 2, -1, 0, -1]
    assert vocab.index(torch.tensor([[2, 3], [-100, 4]])).tolist() == [[2, -1], [-1, 0]]


def test_unembedding_rows_score_like_the_full_unembedding():
    model = make_model()
    vocab = DraftVocab(torch.tensor([7, 0, 33, 60]), 61)
    z = torch.randn(3, 5, model.cfg.dim)
    restricted = model.unembed(z, vocab.rows(model.output.weight))  # (3, 5, 4)
    torch.testing.assert_close(restricted, vocab.restrict(model.unembed(z)))
    for rows in (1, 2):  # the few-row paths of the product
        torch.testing.assert_close(
            model.unembed(z[0, :rows], vocab.rows(model.output.weight)), vocab.restrict(model.unembed(z[0, :rows]))
        )


@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
@pytest.mark.parametrize("tree", [None, Tree(((0,), (1,), (0, 0)))], ids=["chain", "tree"])
def test_greedy_with_a_draft_vocabulary_equals_plain(tree, head_type):
    model = trained_model(head_type)
    prompts = held_out_prompts(4)
    plain = generate(model, prompts, 40)
    full = speculative_generate(model, prompts, 40, tree=tree)
    frequent = speculative_generate(model, prompts, 40, tree=tree, draft_vocab=stream_vocab(24))
    # The rarest tokens of the language only: the drafts are (almost) always wrong, the output still exact.
    rare = DraftVocab(stream_vocab(61).ids.flip(0)[:4], 61)
    useless = speculative_generate(model, prompts, 40, tree=tree, draft_vocab=rare)
    assert frequent.tokens == useless.tokens == full.tokens == plain.tokens
    assert frequent.stats["draft_vocab_size"] == 24
    # The language has 24 distinct tokens: restricting to them loses nothing the heads would draft.
    assert frequent.stats["tokens_per_forward"] == pytest.approx(full.stats["tokens_per_forward"], abs=0.05)
    assert useless.stats["tokens_per_forward"] < 1.2 < frequent.stats["tokens_per_forward"]


def test_calibrate_ranks_among_the_draft_tokens():
    model = trained_model()
    windows = word_stream(640, seed=9).view(10, 64)
    # Every token, in another order: ranks do not depend on the order, so nothing changes.
    everything = DraftVocab(torch.randperm(61, generator=torch.Generator().manual_seed(0)), 61)
    assert calibrate(model, windows, 4, vocab=everything).weights.equal(calibrate(model, windows, 4).weights)
    sampling = SamplingConfig(0.8, top_k=20)  # nor do the distributions sampled drafts come from
    torch.testing.assert_close(
        calibrate(model, windows, 4, vocab=everything, sampling=sampling).weights,
        calibrate(model, windows, 4, sampling=sampling).weights,
    )
    # Counting every rank of a 3-token vocabulary, the hits add up to how often the answer is one of them.
    vocab = stream_vocab(3)
    acc = calibrate(model, windows, 3, vocab=vocab).acceptance
    with torch.no_grad():
        choice = model(windows, heads=[0])[:, :, 0].argmax(-1)  # (10, 64): head 1's answers
    inside = torch.isin(choice, vocab.ids)
    positions = 64 - 3 + 1  # drafts counted from positions 0..T-n, where every head's answer is in the window
    for d in (1, 2):
        expected = float(inside[:, d : d + positions].float().mean())
        assert float(acc[d - 1].sum()) == pytest.approx(expected, rel=sum_rtol(inside[:, d : d + positions].numel()))


def test_bad_draft_vocabularies(tmp_path):
    with pytest.raises(UserError, match="must lie in"):
        DraftVocab(torch.tensor([0, 61]), 61)
    with pytest.raises(UserError, match="twice"):
        DraftVocab(torch.tensor([3, 3]), 61)
    with pytest.raises(UserError, match="between 1 and 61"):
        DraftVocab.most_frequent(np.array([1, 2]), 61, 0)
    with pytest.raises(UserError, match="no draft vocabulary"):
        DraftVocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"ids": [1, 2]}')
    with pytest.raises(UserError, match="not a draft vocabulary file"):
        DraftVocab.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="vocabulary of 50"):
        speculative_generate(make_model(), [[1]], 4, draft_vocab=DraftVocab(torch.tensor([1]), 50))
    with pytest.raises(UserError, match="candidates per head"):
        tree = Tree(((0,), (1,)))  # two candidates of head 2, from a one-token draft vocabulary
        speculative_generate(make_model(), [[1]], 4, tree=tree, draft_vocab=DraftVocab(torch.tensor([1]), 61))


def test_save_and_load_round_trip(tmp_path):
    vocab = stream_vocab(10)
    vocab.save(tmp_path / "v.json", coverage=0.5)
    back = DraftVocab.load(tmp_path / "v.json")
    assert back.ids.tolist() == vocab.ids.tolist() and back.vocab_size == 61
