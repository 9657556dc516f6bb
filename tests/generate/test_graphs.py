"""The decode step replayed from CUDA graphs: bad input on any machine, decoding itself on a CUDA device."""

from __future__ import annotations

import copy

import pytest
import torch

import multitoken.generate.graphs as graphs
import multitoken.generate.session as decoding_session
from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.numerics import divergence_report, format_report
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.speculative import speculative_generate
from multitoken.generate.tree import Tree
from tests.conftest import make_model
from tests.generate.test_speculative import held_out_prompts, random_prompts, trained_model, word_stream

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(UserError, match="CUDA device; it is on cpu"):
        speculative_generate(make_model(), [[1, 2, 3]], 4, cuda_graphs=True)


def test_cuda_graphs_are_greedy_only():
    with pytest.raises(UserError, match="greedy decoding only"):
        speculative_generate(make_model(), [[1, 2, 3]], 4, sampling=SamplingConfig(temperature=1.0), cuda_graphs=True)


def fake_capture(run):
    """capture() on the CPU: the step runs once more (rewriting the same cache slots with the same values, which
    leaves the cache as it was), and each replay runs it into the recorded output tensors, overwriting them
    as a graph's replay does."""
    outputs = run()

    def replay():
        for out, new in zip(outputs, run(), strict=True):
            if out is not None:
                out.copy_(new)

    return replay, outputs


@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
@pytest.mark.parametrize("tree", [None, Tree(((0,), (1,), (0, 0), (1, 0)))], ids=["chain", "tree"])
def test_graph_plumbing_on_the_cpu(monkeypatch, tree, head_type):
    # Everything around the graph itself: inputs copied into the captured buffers, outputs reused and
    # overwritten by the next replay (so the loop must read them first), one graph per tree size near the
    # context limit, rows of a batch stopping at different steps.
    monkeypatch.setattr(graphs, "warm_up", lambda run: run())
    monkeypatch.setattr(graphs, "capture", fake_capture)
    monkeypatch.setattr(decoding_session, "check_cuda_graphs", lambda model, sampling: None)
    model = trained_model(head_type)
    prompts = [*held_out_prompts(3), word_stream(90, seed=9).tolist()]  # the last one reaches the context limit
    plain = generate(model, prompts, 40)
    for batch in (prompts, [prompts[0]], [prompts[-1]]):
        graphed = speculative_generate(model, batch, 40, tree=tree, cuda_graphs=True)
        eager = speculative_generate(model, batch, 40, tree=tree)
        assert graphed.tokens == [plain.tokens[prompts.index(p)] for p in batch]
        assert graphed.n_forwards == eager.n_forwards and graphed.stop_reasons == eager.stop_reasons
    assert "context" in graphed.stop_reasons
    plain_graphed = generate(model, prompts, 40, cuda_graphs=True)  # the next-token step captured the same way
    assert plain_graphed.tokens == plain.tokens and plain_graphed.n_forwards == plain.n_forwards


def test_a_graph_session_replays_later_generations_without_capturing(monkeypatch):
    captures = []
    monkeypatch.setattr(graphs, "warm_up", lambda run: run())
    monkeypatch.setattr(graphs, "capture", lambda run: captures.append(1) or fake_capture(run))
    monkeypatch.setattr(decoding_session, "check_cuda_graphs", lambda model, sampling: None)
    model, prompts = trained_model(), held_out_prompts(3)
    session = graphs.GraphSession()
    for p in prompts:  # same shape: one capture, then replays; each output still exact
        result = speculative_generate(model, [p], 30, cuda_graphs=True, graph_session=session)
        assert result.tokens == generate(model, [p], 30).tokens
    assert len(captures) == 1
    result = speculative_generate(model, prompts[:2], 30, cuda_graphs=True, graph_session=session)
    assert result.tokens == generate(model, prompts[:2], 30).tokens  # another batch size: captured afresh
    assert len(captures) == 2 and session.key[1] == 2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("head_type", ["parallel", "mtp"])
@pytest.mark.parametrize("tree", [None, Tree(((0,), (1,), (0, 0), (1, 0)))], ids=["chain", "tree"])
def test_cuda_graphs_decode_exactly_on_a_trained_model(tree, head_type):
    # The trained word model's choices have wide margins: in fp32 nothing can flip, so graph replay must
    # give plain decoding's tokens exactly, one prompt at a time and as a batch of different lengths.
    model = copy.deepcopy(trained_model(head_type)).to("cuda")
    prompts = held_out_prompts(4)
    plain = generate(model, prompts, 40).tokens
    session = graphs.GraphSession()  # the one-prompt calls after the first replay its graphs and reuse its cache
    for batch in (prompts, *([p] for p in prompts)):
        graphed = speculative_generate(model, batch, 40, tree=tree, cuda_graphs=True, graph_session=session)
        assert graphed.tokens == [plain[prompts.index(p)] for p in batch]
    graphed = speculative_generate(model, prompts, 40, tree=tree, cuda_graphs=True)
    eager = speculative_generate(model, prompts, 40, tree=tree)
    assert graphed.n_forwards == eager.n_forwards and graphed.stats["tokens_per_forward"] > 1.5


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_diverge_only_at_near_ties(dtype):
    # A random model up to its context limit: the tree shrinks to prefixes there, each captured as its own
    # graph, and rows stop at different steps while the batch keeps replaying.
    model = make_model(seed=0, dim=128, vocab_size=256, n_heads=4, n_kv_heads=4, max_seq_len=64).to("cuda", dtype)
    prompts = random_prompts(8, 256, seed=3, max_len=30)
    for tree in (None, Tree(((0,), (1,), (0, 0)))):
        report = divergence_report(model, prompts, 60, tree=tree, cuda_graphs=True)
        print(format_report(report))
        assert report["diverged_at_near_tie"] == report["diverged"]
    result = speculative_generate(model, prompts, 60, cuda_graphs=True)
    assert "context" in result.stop_reasons
