"""Self-speculative decoding, chain and greedy: exactness against plain decoding, batches, stubs, limits."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.bench import bench_generate, bench_one_at_a_time, time_blocks
from multitoken.generate.speculative import speculative_generate
from multitoken.generate.stats import result_json
from multitoken.generate.tree import Tree
from multitoken.head_kinds import HEAD_TYPES
from multitoken.kv_cache import KVCache, ModelCache
from multitoken.loss import sequential_backward, shift_targets
from tests.conftest import make_model

# ------------------------------------------------------------------------------------------------
# shared helpers (also used by test_tree.py and test_spec_sampling.py)


def word_stream(n: int, seed: int, vocab: int = 61) -> torch.Tensor:
    """A synthetic language: 6 fixed 4-token words, each followed by one of two words (65% / 35%).

    Inside a word every head can be right; at word ends the draft heads must guess, so acceptance is
    high but not total, and a second candidate per head is sometimes the right one.
    """
    g = torch.Generator().manual_seed(0)  # the language itself is fixed
    words = torch.randint(vocab, (6, 4), generator=g)
    successors = torch.randint(6, (6, 2), generator=g)
    g = torch.Generator().manual_seed(seed)  # the text drawn from it varies
    branch = (torch.rand(n // 4 + 1, generator=g) < 0.35).long().tolist()
    order, w = [], 0
    for b in branch:
        order.append(w)
        w = int(successors[w, b])
    return words[torch.tensor(order)].flatten()[:n]


@functools.cache
def trained_model(head_type: str = "parallel") -> torch.nn.Module:
    """make_model's shape trained for a few seconds on `word_stream`, so the heads accept often."""
    return train_briefly(make_model(seed=1, head_type=head_type), word_stream(20_000, seed=0), steps=30)


def train_briefly(model: torch.nn.Module, stream: torch.Tensor, steps: int) -> torch.nn.Module:
    """`model` (3 heads) trained `steps` AdamW steps on random 51-token windows of `stream`, then frozen."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        starts = torch.randint(len(stream) - 51, (8,), generator=g).tolist()
        inputs, targets = shift_targets(torch.stack([stream[s : s + 51] for s in starts]), 3)
        opt.zero_grad()
        sequential_backward(model, inputs, targets)
        opt.step()
    return model.eval().requires_grad_(False)


def held_out_prompts(n: int, seed: int = 5) -> list[list[int]]:
    text = word_stream(2000, seed=seed)
    return [text[50 * i : 50 * i + 3 + 2 * i].tolist() for i in range(n)]


def random_prompts(n: int, vocab: int, seed: int, max_len: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(vocab, (m,), generator=g).tolist() for m in lengths]


class StubModel:
    """The decoder's view of a model, with hand-set logits: head i's logits depend on the last token only.

    table (n, V, V): table[i, x] are head i+1's logits after token x. No attention, no real cache: it
    tests the acceptance logic and bookkeeping, not the cache (the real models do that).
    """

    def __init__(self, table: torch.Tensor, max_seq_len: int = 64) -> None:
        n, V, _ = table.shape
        self.table = table
        self.cfg = SimpleNamespace(n_future=n, vocab_size=V, max_seq_len=max_seq_len, head_type="parallel")
        # Row v of the "unembedding" names token v, so a draft vocabulary's rows (K, 1) are its token ids.
        self.output = SimpleNamespace(weight=torch.arange(V)[:, None])

    def attention_context(self, T, positions=None, cache=None, attn_mask=None, kv_len=None, slots=None):
        return None

    def embed_and_trunk(self, tokens, ctx, cache=None):
        return tokens[..., None].float()  # (B, T, 1): the "hidden state" is the token

    def run_heads(self, h, ctx, cache=None, heads=None, tokens=None):
        V = self.cfg.vocab_size
        heads = range(self.cfg.n_future) if heads is None else heads
        return {i: h + i * V for i in heads}  # head i's output names (head, token)

    def unembed(self, z, rows=None):
        logits = self.table.flatten(0, 1)[z[..., 0].long()]  # (..., V)
        return logits if rows is None else logits[..., rows[:, 0]]  # (..., K)

    def make_cache(self, batch_size, max_len=None, dtype=None):
        return ModelCache(trunk=[KVCache.empty(batch_size, 1, self.cfg.max_seq_len, 2)], heads=[])


def shift_table(V: int, shifts: list[list[int]]) -> torch.Tensor:
    """Greedy stub logits: head i's ranked guesses after token x are x + s for s in shifts[i]."""
    table = torch.zeros(len(shifts), V, V)
    x = torch.arange(V)
    for i, ranked in enumerate(shifts):
        for r, s in enumerate(ranked):
            table[i, x, (x + s) % V] = 10.0 - r
    return table


# ------------------------------------------------------------------------------------------------
# exactness against plain greedy decoding


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_chain_greedy_equals_plain_random_model(head_type):
    model = make_model(head_type=head_type)
    for seed, max_new in [(0, 1), (1, 7), (2, 25)]:
        prompts = random_prompts(3, model.cfg.vocab_size, seed)
        plain = generate(model, prompts, max_new)
        for k in (1, 2, 3):
            spec = speculative_generate(model, prompts, max_new, heads_used=k)
            assert spec.tokens == plain.tokens, (seed, k)
            assert spec.stop_reasons == plain.stop_reasons


def test_heads_used_one_is_plain_decoding():
    model = make_model()
    prompts = random_prompts(2, 61, seed=3)
    spec = speculative_generate(model, prompts, 12, heads_used=1)
    assert spec.tokens == generate(model, prompts, 12).tokens
    assert spec.n_forwards == 12 and spec.stats["tokens_per_forward"] == 1.0


@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
def test_trained_model_accepts_often_and_stays_exact(head_type):
    model = trained_model(head_type)
    prompts = held_out_prompts(4)
    plain = generate(model, prompts, 40)
    spec = speculative_generate(model, prompts, 40)
    assert spec.tokens == plain.tokens
    assert spec.stats["tokens_per_forward"] > 1.5
    assert spec.n_forwards < plain.n_forwards
    hist = spec.stats["accept_histogram"]
    assert len(hist) == 3 and sum(hist) > 0 and hist[2] > hist[0]


@pytest.mark.parametrize("head_type", ["parallel", "causal", "mtp"])
def test_batch_equals_each_alone(head_type):
    """Rows of different lengths accept different counts and still decode as if alone."""
    model = trained_model(head_type) if head_type in ("parallel", "mtp") else make_model(head_type=head_type)
    prompts = held_out_prompts(4) + [[3, 1, 4, 1, 5, 9, 2, 6]]
    batch = speculative_generate(model, prompts, 30)
    alone = [speculative_generate(model, [p], 30).tokens[0] for p in prompts]
    assert batch.tokens == alone == generate(model, prompts, 30).tokens


# ------------------------------------------------------------------------------------------------
# stub models: accept all, reject all, partial


def test_stub_accept_all():
    model = StubModel(shift_table(11, [[1], [2], [3]]))  # every head right
    result = speculative_generate(model, [[0]], 10)
    assert result.tokens == [list(range(1, 11))]
    assert result.n_forwards == 4  # prefill gives 1 token, then 3 per forward
    assert result.stats["accept_histogram"] == [0, 0, 3]
    assert result.stats["head_acceptance"] == [1.0, 1.0]


def test_stub_reject_all():
    model = StubModel(shift_table(11, [[1], [3], [4]]))  # drafts always off by one
    result = speculative_generate(model, [[0]], 10)
    assert result.tokens == [list(range(1, 11))]
    assert result.n_forwards == 10
    assert result.stats["accept_histogram"] == [9, 0, 0]
    assert result.stats["tokens_per_forward"] == 1.0


def test_stub_partial_acceptance():
    model = StubModel(shift_table(11, [[1], [2], [4]]))  # head 2 right, head 3 wrong
    result = speculative_generate(model, [[0], [5]], 9)
    assert result.tokens == [list(range(1, 10)), [(5 + i) % 11 for i in range(1, 10)]]
    assert result.n_forwards == 5  # 1 + 2 + 2 + 2 + 2
    assert result.stats["accept_histogram"] == [0, 8, 0]
    assert result.stats["head_acceptance"] == [1.0, 0.0]


def test_stub_tree_accepts_second_candidates():
    """Head 2's top guess is wrong and its second right; head 3 likewise: only a tree path (1, 1) wins."""
    model = StubModel(shift_table(11, [[1], [3, 2], [4, 3]]))
    chain = speculative_generate(model, [[0]], 9)
    tree = speculative_generate(model, [[0]], 9, tree=Tree(((0,), (1,), (1, 0), (1, 1))))
    assert chain.tokens == tree.tokens == [list(range(1, 10))]
    assert chain.stats["accept_histogram"] == [8, 0, 0]
    assert tree.stats["accept_histogram"] == [0, 0, 3] and tree.n_forwards == 4


# ------------------------------------------------------------------------------------------------
# limits, stops, records, bad input


@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
@pytest.mark.parametrize("k", [2, 3])
def test_stops_cleanly_at_context_limit(k, head_type):
    """Near the end the block shrinks, so no draft slot falls past the cache; lengths match plain."""
    model = make_model(max_seq_len=20, head_type=head_type)
    prompts = [[1] * 15, [2] * 3, [4] * 18]
    plain = generate(model, prompts, 50)
    spec = speculative_generate(model, prompts, 50, heads_used=k)
    assert [len(t) for t in spec.tokens] == [5, 17, 2]
    assert spec.stop_reasons == ["context"] * 3
    assert spec.tokens == plain.tokens
    stub = speculative_generate(StubModel(shift_table(11, [[1], [2], [3]]), max_seq_len=20), [[0] * 5], 50)
    assert stub.tokens == [[(i % 11) for i in range(1, 16)]] and stub.stop_reasons == ["context"]


@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
def test_stops_at_eos_and_length(head_type):
    model = trained_model(head_type)
    prompts = held_out_prompts(2)
    first = generate(model, prompts, 12).tokens
    eos = first[0][5]
    spec = speculative_generate(model, prompts, 12, eos_id=eos)
    plain = generate(model, prompts, 12, eos_id=eos)
    assert spec.tokens == plain.tokens and spec.stop_reasons == plain.stop_reasons
    assert spec.stop_reasons[0] == "eos" and spec.tokens[0][-1] == eos
    assert speculative_generate(model, prompts, 0).tokens == [[], []]


def test_stats_and_json_record():
    result = speculative_generate(trained_model(), held_out_prompts(2), 20)
    record = result_json(result)
    assert record["generated_token_ids"] == result.tokens
    s = record["stats"]
    assert {"tokens_per_forward", "tokens_per_second", "accept_histogram", "forwards"} <= set(s)
    assert s["forwards"] == result.n_forwards and s["tokens_per_second"] > 0
    assert s["tokens_per_forward"] == pytest.approx(40 / (2 * result.n_forwards), rel=0.2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(heads_used=0), "heads_used must be between 1"),
        (dict(heads_used=4), "heads_used must be between 1"),
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[[1] * 96]), "context is 96"),
        (dict(prompts=[]), "no prompts"),
    ],
)
def test_bad_input(kwargs, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(UserError, match=message):
        speculative_generate(make_model(), **args)


def test_bench_generate_compares_decoders():
    model = trained_model()
    report = bench_generate(model, held_out_prompts(2), 24, tree=Tree(((0,), (1,), (0, 0))))
    rows = report["decoders"]
    assert list(rows) == ["plain", "chain", "tree"]
    assert all(r["exact"] == 1.0 for r in rows.values())
    assert rows["plain"]["tokens_per_forward"] == 1.0 and rows["plain"]["speedup"] == 1.0
    assert rows["chain"]["tokens_per_forward"] > 1.5
    assert rows["tree"]["efficiency"] == pytest.approx(rows["tree"]["speedup"] / rows["tree"]["tokens_per_forward"])
    assert "chain" in report["table"] and "tok/fwd" in report["table"]
    costs = time_blocks(model, [1, 4], context=10, repeats=2)
    assert set(costs) == {1, 4} and all(c > 0 for c in costs.values())


def test_bench_one_at_a_time_pools_tokens_and_forwards():
    model, prompts = trained_model(), held_out_prompts(3)
    report = bench_one_at_a_time(model, prompts, 20)
    alone = [speculative_generate(model, [p], 20) for p in prompts]
    assert report["outputs"]["chain"] == [r.tokens[0] for r in alone]
    assert report["outputs"]["plain"] == [generate(model, [p], 20).tokens[0] for p in prompts]
    chain = report["decoders"]["chain"]
    # Pooled: all tokens over all forwards, not a mean of per-prompt ratios.
    tokens = sum(len(r.tokens[0]) for r in alone)
    forwards = sum(len(r.tokens[0]) / r.stats["tokens_per_forward"] for r in alone)
    assert chain["tokens_per_forward"] == pytest.approx(tokens / forwards)
    assert chain["exact"] == 1.0 and chain["forwards"] == sum(r.n_forwards for r in alone)
    assert chain["efficiency"] == pytest.approx(chain["speedup"] / chain["tokens_per_forward"])


def test_bench_judges_compiled_decoders_against_compiled_plain(monkeypatch):
    # torch.compile as the identity: the "-c" rows then run the same step eagerly with a full-length cache
    # read, which is enough to check that they decode exactly and which baseline their efficiency uses.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    report = bench_generate(trained_model(), held_out_prompts(2), 16, step_modes=["c"])
    rows = report["decoders"]
    assert list(rows) == ["plain", "chain", "plain-c", "chain-c"]
    assert all(r["exact"] == 1.0 for r in rows.values())
    assert rows["plain-c"]["tokens_per_forward"] == 1.0
    assert rows["plain-c"]["efficiency"] == pytest.approx(1.0)
    chain_c = rows["chain-c"]
    relative = rows["plain-c"]["seconds"] / chain_c["seconds"]
    assert chain_c["efficiency"] == pytest.approx(relative / chain_c["tokens_per_forward"])
    assert chain_c["speedup"] == pytest.approx(rows["plain"]["seconds"] / chain_c["seconds"])


def test_bench_records_a_failing_step_mode_and_keeps_the_other_rows(monkeypatch):
    def broken_compile(fn, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    for bench in (bench_generate, bench_one_at_a_time):
        report = bench(trained_model(), held_out_prompts(2), 8, step_modes=["c"])
        rows = report["decoders"]
        assert list(rows) == ["plain", "chain", "plain-c", "chain-c"]
        assert rows["chain-c"] == {"error": "RuntimeError: no compiler here"}
        assert rows["chain"]["exact"] == 1.0 and "chain-c" not in report["outputs"]
        assert "chain-c  failed: RuntimeError: no compiler here" in report["table"]
    with pytest.raises(ValueError, match="step mode must be one of"):
        bench_generate(trained_model(), held_out_prompts(1), 8, step_modes=["x"])
