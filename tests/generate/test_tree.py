"""Tree drafting: structure, mask, calibration, tree construction, and exactness of tree decoding."""

from __future__ import annotations

import pytest
import torch

from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.bench import seconds_per_step
from multitoken.generate.calibration import (
    build_tree,
    calibrate,
    calibrate_decoding,
    choose_tree,
    decoding_windows,
    round_weights,
)
from multitoken.generate.common import GenerationResult
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.speculative import speculative_generate, verify_sampled
from multitoken.generate.tree import Calibration, Tree, TreeIndex, tree_mask
from multitoken.kv_cache import causal_mask
from tests.conftest import make_model
from tests.generate.test_speculative import (
    HEAD_TYPES,
    StubModel,
    held_out_prompts,
    random_prompts,
    shift_table,
    trained_model,
    word_stream,
)

SMALL_TREE = Tree(((0,), (1,), (0, 0), (0, 1), (1, 0)))


# ------------------------------------------------------------------------------------------------
# structure and mask


def test_tree_structure():
    index = TreeIndex.build(SMALL_TREE)
    assert SMALL_TREE.size == 6 and SMALL_TREE.depth == 2 and SMALL_TREE.max_rank == 2
    assert index.parent.tolist() == [0, 0, 0, 1, 1, 2]
    assert index.depth.tolist() == [0, 1, 1, 2, 2, 2]
    assert index.head.tolist() == [0, 0, 1, 1, 1] and index.rank.tolist() == [0, 1, 0, 1, 0]
    assert index.path.tolist() == [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert Tree.chain(3).paths == ((0,), (0, 0)) and Tree.chain(3).is_chain and not SMALL_TREE.is_chain
    assert SMALL_TREE.prefix(3).paths == ((0,), (1,))


@pytest.mark.parametrize(
    "paths, message",
    [([(0, 0)], "before its parent"), ([(0,), (0,)], "listed twice"), ([(-1,)], "ranks >= 0"), ([()], "non-empty")],
)
def test_bad_trees(paths, message):
    with pytest.raises(UserError, match=message):
        Tree(tuple(paths))


def test_chain_mask_is_causal():
    pos = torch.tensor([3, 7])
    mask = tree_mask(TreeIndex.build(Tree.chain(4)), pos, 12)
    assert torch.equal(mask, causal_mask(pos[:, None] + torch.arange(4), 12))


def test_tree_mask_sees_prefix_ancestors_and_self():
    mask = tree_mask(TreeIndex.build(SMALL_TREE), torch.tensor([2]), 9)[0, 0]  # (N, S), root at slot 2
    expected = torch.tensor(
        [  # slots 0 1 | 2 (root) 3 4 5 6 7 (scratch) | 8 (beyond)
            [1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 1, 0, 0],
            [1, 1, 1, 0, 1, 0, 0, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


# ------------------------------------------------------------------------------------------------
# calibration and construction


def test_build_tree_maximises_expected_length():
    acc = torch.tensor([[0.6, 0.3, 0.05], [0.5, 0.2, 0.0]])
    tree = build_tree(acc, 5)
    # Path values: (0,) .6, (1,) .3, (0,0) .3, (0,1) .12, (1,0) .15, (2,) .05: the best four.
    assert set(tree.paths) == {(0,), (1,), (0, 0), (1, 0)}
    assert tree.expected_length(acc) == pytest.approx(1 + 0.6 + 0.3 + 0.3 + 0.15)
    assert Tree.chain(3).expected_length(acc) == pytest.approx(1 + 0.6 + 0.3)
    assert build_tree(acc, 1).paths == ()
    assert len(build_tree(acc, 100).paths) == 9  # 3 + 3 * 2: nodes worth 0 are never added
    for size in range(1, 6):  # every prefix is the best tree of its size
        assert set(tree.prefix(size).paths) == set(build_tree(acc, size).paths)


def test_joint_calibration_sees_drafts_that_are_right_together():
    # 60 % of positions: heads 2-4 all right at rank 0 (a loop); 40 %: head 2's second guess, then misses.
    miss = 2
    ranks = torch.tensor([[0, 0, 0]] * 6 + [[1, miss, miss]] * 4)
    calibration = Calibration.from_ranks(ranks, max_rank=2)
    torch.testing.assert_close(calibration.acceptance, torch.tensor([[0.6, 0.4], [0.6, 0.0], [0.6, 0.0]]))
    assert calibration.path_probability((0, 0, 0)) == pytest.approx(0.6)  # independence would say 0.216
    assert calibration.path_probability((1, 0)) == 0.0
    joint, independent = build_tree(calibration, 4), build_tree(calibration.acceptance, 4)
    assert joint.paths == ((0,), (0, 0), (0, 0, 0)) and independent.paths == ((0,), (1,), (0, 0))
    assert joint.expected_length(calibration) == pytest.approx(2.8)
    assert independent.expected_length(calibration) == pytest.approx(2.6)  # what the product's pick is worth


def test_choose_tree_weighs_accepted_tokens_against_measured_cost():
    miss = 2
    calibration = Calibration.from_ranks(torch.tensor([[0, 0, 0]] * 6 + [[1, miss, miss]] * 4), max_rank=2)
    # Expected tokens per forward by budget: 1 node 1.0, 2: 1.6, 3: 2.2, 4: 2.8, 5: 3.2 (then nothing to add).
    timed = []

    def free(tree):  # a step costs a plain step whatever the tree
        timed.append(tree.size)
        return 1.0

    tree, rows = choose_tree(calibration, [2, 4, 5, 8], free, plain_seconds=1.0)
    assert tree.size == 5 and [r["chosen"] for r in rows] == [False, False, True, False]  # 8 adds nothing
    assert [r["expected_speedup"] for r in rows] == pytest.approx([1.6, 2.8, 3.2, 3.2])
    assert timed == [2, 4, 5]  # budget 8 builds the 5-node tree again, which is not timed twice
    tree, rows = choose_tree(calibration, [2, 4, 5], lambda t: t.size / 2, plain_seconds=1.0)  # cost in rows
    assert tree.size == 2 and rows[0]["chosen"] and rows[1]["expected_speedup"] == pytest.approx(1.4)
    with pytest.raises(UserError, match="no tree budget"):
        choose_tree(calibration, [], free, plain_seconds=1.0)


def test_seconds_per_step_leaves_the_prefill_out_and_interleaves_decoders():
    calls: list[tuple[str, int]] = []

    def decoder(name: str, step_seconds: float):
        def decode(n):  # a prefill of 5 s, then a step of 2 tokens; calls 3-4 fall in a slow spell
            calls.append((name, n))
            steps = (n + 1) // 2
            slow = 10.0 if len(calls) in (3, 4) else 1.0
            return GenerationResult([[0] * n], 1 + steps, ["length"], seconds=5.0 + steps * step_seconds * slow)

        return decode

    seconds = seconds_per_step({"a": decoder("a", 1.0), "b": decoder("b", 2.0)}, rounds=2)
    assert seconds == pytest.approx({"a": 1.0, "b": 2.0})  # the spell hit a's first round only
    assert calls == [("a", 8), ("b", 8)] + [("a", 16), ("a", 48), ("b", 16), ("b", 48)] * 2  # warm-ups, rounds


def test_calibrate_on_stub_and_trained_model():
    # Head 2's second guess is head 1's choice two steps on, head 3's first guess is right.
    stub = StubModel(shift_table(11, [[1], [3, 2], [3, 4]]))
    windows = (torch.arange(12) + torch.tensor([[0], [5]])) % 11  # text that follows head 1
    acc = calibrate(stub, windows, max_rank=3).acceptance
    assert acc.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]

    acc = calibrate(trained_model(), word_stream(640, seed=9).view(10, 64), max_rank=4).acceptance
    assert acc.shape == (2, 4) and (acc.sum(1) <= 1 + 1e-6).all()
    assert (acc[:, 0] > 0.5).all() and (acc[:, 0] > acc[:, 1]).all()


def test_calibrate_on_decoding_windows_against_a_per_position_loop():
    model = trained_model()
    P, stream = 8, word_stream(400, seed=7)
    prompts = stream[: 3 * P].view(3, P)
    windows = decoding_windows(model, prompts, 24)
    assert windows[:, :P].equal(prompts)
    assert windows[:, P:].tolist() == generate(model, prompts.tolist(), 24).tokens
    # The slow twin: every head's logits from one full forward, ranks counted position by position.
    logits = model(windows)  # (B, T, n, V)
    n, R = model.cfg.n_future, 3
    hits, counts = torch.zeros(n - 1, R), torch.zeros(n - 1)
    paths: list[tuple[int, ...]] = []  # each position's accepted rank path: ranks until the first miss
    for b in range(windows.shape[0]):
        for t in range(P - 1, windows.shape[1] - n + 1):  # positions where every head's answer is known
            path: list[int] = []
            for d in range(1, n):
                right = logits[b, t + d, 0].argmax()  # head 1's choice for token t+d+1
                rank = int((logits[b, t, d] > logits[b, t, d, right]).sum())
                hits[d - 1, rank] += rank < R
                counts[d - 1] += 1
                path = path + [rank] if len(path) == d - 1 and rank < R else path
            paths.append(tuple(path))
    calibration = calibrate(model, windows, R, skip=P)
    torch.testing.assert_close(calibration.acceptance, hits / counts[:, None])
    for node in [(0,), (0, 0), (1,), (0, 1), (1, 0)]:  # joint: the share of positions whose path starts so
        share = sum(p[: len(node)] == node for p in paths) / len(paths)
        assert calibration.path_probability(node) == pytest.approx(share)
    # The model's own text is easier to draft than the data it continues, as in decoding.
    data = stream[: 3 * (P + 24)].view(3, P + 24)
    on_data = calibrate(model, data, R, skip=P)
    assert calibration.acceptance[:, 0].mean() > on_data.acceptance[:, 0].mean()


# ------------------------------------------------------------------------------------------------
# calibration for sampling


def test_round_weights_is_the_law_of_the_tree_walk():
    """The formula against the decoder's own walk: a root with 3 children drawn independently from q,
    many rows; the round that accepts and the token produced at depth 1, counted."""
    g = torch.Generator().manual_seed(0)
    V, B, R = 5, 200_000, 3
    p, q = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0]), torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    index = TreeIndex.build(Tree(tuple((r,) for r in range(R))))
    drafts = torch.multinomial(q.expand(B, V), R, replacement=True, generator=g)  # (B, R)
    tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), drafts], 1)  # (B, R + 1): the root, then its children
    accepted, bonus = verify_sampled(index, tokens, p.expand(B, R + 1, V), q.expand(B, 1, V), g)
    produced = torch.where(accepted > 0, tokens.gather(1, accepted[:, None])[:, 0], bonus)  # the depth-1 token
    rounds = torch.where(accepted > 0, accepted - 1, R)  # which draw was accepted; R: none
    counts = torch.zeros(V, R + 1).index_put_((produced, rounds), torch.ones(B), accumulate=True)
    weights = round_weights(p.expand(V, V), q.expand(V, V), torch.arange(V), R)  # (V, R + 1) given each token
    torch.testing.assert_close(weights.sum(1), torch.ones(V))
    expected = p[:, None] * weights  # P(token x, round r)
    assert (counts / B - expected).abs().max() < 0.005  # 5 standard deviations at most
    # Without the residual between rounds (each draw judged against p), the law is visibly different.
    naive = p[:, None] * torch.stack([torch.minimum(q, p) * (1 - torch.minimum(q, p).sum()) ** r for r in range(R)], 1)
    assert (naive - expected[:, :R]).abs().max() > 0.02
    assert weights[4].tolist() == [0.0] * R + [1.0]  # p(x) = 0: decoding never produces x


def test_sampled_calibration_predicts_speculative_sampling():
    """Expected tokens per verify step of a tree calibrated on sampled continuations matches what
    speculative sampling with it measures; the greedy calibration of the same model overestimates it."""
    model = trained_model()
    prompts = word_stream(16 * 8, seed=9).view(16, 8)
    text = word_stream(4000, seed=11)
    held_out = [text[60 * i : 60 * i + 8].tolist() for i in range(32)]
    greedy = calibrate_decoding(model, prompts, 48, max_rank=3)
    for temperature in (0.8, 1.5):
        sampling = SamplingConfig(temperature)
        generator = torch.Generator().manual_seed(0)
        calibration = calibrate_decoding(model, prompts, 48, 3, sampling=sampling, generator=generator)
        assert calibration.sampling == sampling
        for budget in (3, 6):
            tree = build_tree(calibration, budget)
            result = speculative_generate(
                model, held_out, 40, sampling=sampling, generator=torch.Generator().manual_seed(1), tree=tree
            )
            histogram = result.stats["accept_histogram"]
            measured = 1 + sum(i * c for i, c in enumerate(histogram)) / sum(histogram)  # tokens per verify step
            assert tree.expected_length(calibration) == pytest.approx(measured, abs=0.15), (temperature, tree)
            assert tree.expected_length(greedy) > measured + 0.2


def test_sampled_trees_try_their_draws_in_turn():
    """A sampling calibration's rank r is the r-th draw tried: a node's second child comes after its first,
    even where the second is worth more; greedy ranks are candidates of their own and may be skipped."""
    weights = torch.tensor([[[0.2, 0.5, 0.3]]]).expand(10, 1, 3)  # one draft head, 2 ranks + none
    assert build_tree(Calibration(weights, SamplingConfig(1.0)), 2).paths == ((0,),)
    assert build_tree(Calibration(weights, SamplingConfig(1.0)), 3).paths == ((0,), (1,))
    assert build_tree(Calibration(weights), 2).paths == ((1,),)


# ------------------------------------------------------------------------------------------------
# decoding with trees


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_tree_greedy_equals_plain_random_model(head_type):
    """Scratch slots, tree mask and the move of the accepted path leave every cache exact; batch rows
    of different lengths share one tree shape."""
    model = make_model(head_type=head_type)
    for seed, max_new in [(0, 3), (1, 20)]:
        prompts = random_prompts(3, model.cfg.vocab_size, seed)
        plain = generate(model, prompts, max_new)
        for tree in (SMALL_TREE, Tree(((0,), (1,), (2,)))):
            spec = speculative_generate(model, prompts, max_new, tree=tree)
            assert spec.tokens == plain.tokens, (seed, tree)


@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
def test_calibrated_tree_on_trained_model(head_type):
    model = trained_model(head_type)
    windows = word_stream(640, seed=9).view(10, 64)
    tree = build_tree(calibrate(model, windows, max_rank=4), budget=6)
    assert not tree.is_chain and tree.depth == 2
    prompts = held_out_prompts(4)
    plain = generate(model, prompts, 40)
    chain = speculative_generate(model, prompts, 40)
    spec = speculative_generate(model, prompts, 40, tree=tree)
    assert spec.tokens == chain.tokens == plain.tokens
    assert spec.stats["tokens_per_forward"] > 1.5
    assert [len(t) for t in spec.tokens] == [40] * 4


@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
def test_tree_stops_cleanly_at_context_limit(head_type):
    """Near the end the tree shrinks to a prefix so its scratch slots stay inside the cache."""
    model = make_model(max_seq_len=20, head_type=head_type)
    prompts = [[1] * 15, [2] * 3, [4] * 18]
    plain = generate(model, prompts, 50)
    spec = speculative_generate(model, prompts, 50, tree=SMALL_TREE)
    assert spec.tokens == plain.tokens and spec.stop_reasons == ["context"] * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tree=Tree(((0,), (0, 0), (0, 0, 0)))), "3 drafts deep"),
        (dict(tree=SMALL_TREE, heads_used=2), "disagrees with the tree"),
        (dict(tree=Tree(tuple((r,) for r in range(20)))), "does not fit the context"),
    ],
)
def test_bad_tree_input(kwargs, message):
    with pytest.raises(UserError, match=message):
        speculative_generate(make_model(max_seq_len=20), [[1, 2]], 4, **kwargs)
