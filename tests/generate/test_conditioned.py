"""Token-conditioned modules (head type mtp) in decoding: their caches against a full recompute, their drafts
against the full forward over the drafted text, the plan of rows a tree gives each module.

Exactness against plain decoding, batches, trees, sampling's law, draft vocabularies and CUDA graphs are the
shared tests of test_speculative.py, test_tree.py, test_spec_sampling.py, test_draft_vocab.py and
test_graphs.py, which run this kind too."""

from __future__ import annotations

import pytest
import torch

from multitoken.generate.conditioned import ConditionedDrafter, ModulePlan
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.session import root_of
from multitoken.generate.speculative import HeadDrafter
from multitoken.generate.tree import Tree, TreeIndex
from tests.conftest import make_model
from tests.generate.test_speculative import held_out_prompts, random_prompts, trained_model
from tests.tolerance import twin_atol

TREE = Tree(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (1, 0, 0)))


def decode_steps(model, prompts, tree, steps, sampling=SamplingConfig(), generator=None):
    """The session's loop without its stop rule: the cache, each row's whole sequence (its last token the pending
    root) and the last proposal after `steps` steps."""
    drafter = HeadDrafter(tree=tree).prepare(model, sampling, torch.device("cpu"))
    assert isinstance(drafter, ConditionedDrafter)
    cache = model.make_cache(len(prompts))
    root, pos, proposal = drafter.start(model, cache, prompts, sampling, generator)
    seqs = [[*p, r] for p, r in zip(prompts, root.tolist(), strict=True)]
    index = TreeIndex.build(drafter.tree)
    constants = dict(sampling=sampling, generator=generator, **drafter.constants())
    for _ in range(steps):
        new, n_new, pos, *proposal = drafter.step(
            model, cache, index, root, pos, *proposal, kv_len=model.cfg.max_seq_len, **constants
        )
        for b, (row, n) in enumerate(zip(new.tolist(), n_new.tolist(), strict=True)):
            seqs[b] += row[:n]
        root = root_of(new, n_new)
    assert pos.tolist() == [len(s) - 1 for s in seqs]
    return cache, seqs, proposal


def full_recompute(model, seq):
    """Every block's keys and values and every head's output over `seq` from one forward into a fresh cache: what
    a cache without holes holds. Module k's entries are meaningful up to position len(seq) - 1 - k."""
    cache = model.make_cache(1)
    x = torch.tensor([seq])
    positions = torch.arange(len(seq))[None]
    ctx = model.attention_context(len(seq), positions, cache)
    z = model.run_heads(model.embed_and_trunk(x, ctx, cache), ctx, cache, tokens=x)
    return cache, z


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("tree", [None, TREE], ids=["chain", "tree"])
def test_module_caches_equal_a_full_recompute_after_rejections(trained, tree, sampled):
    # Rows of different lengths (one of a single token, so the first steps reach before position 0) accept
    # different counts; after every step each module's cache up to its last final position, and what the next
    # module reads there, equal a recompute over the decoded text.
    model = trained_model("mtp") if trained else make_model(head_type="mtp", n_future=4, n_layers=6)
    prompts = [[3], *(held_out_prompts(2) if trained else random_prompts(2, 61, seed=4))]
    if tree is not None:  # as deep as the model's heads reach
        tree = Tree(tuple(p for p in tree.paths if len(p) < model.cfg.n_future))
    sampling = SamplingConfig(temperature=1.0) if sampled else SamplingConfig()
    for steps in (0, 1, 6):
        generator = torch.Generator().manual_seed(steps)
        cache, seqs, _ = decode_steps(model, prompts, tree, steps, sampling, generator)
        for b, seq in enumerate(seqs):
            final = {k: max(len(seq) - k, 0) for k in range(1, model.cfg.n_future)}  # module k's final positions

            def recompute(m, seq=seq, final=final):
                fresh, z = full_recompute(m, seq)
                parts = []
                for k, n in final.items():
                    parts += [fresh.heads[k].k[0, :, :n].flatten(), fresh.heads[k].v[0, :, :n].flatten()]
                    parts.append(z[k - 1][0, :n].flatten())  # what module k read
                return torch.cat(parts)

            got = []
            for k, n in final.items():
                got += [cache.heads[k].k[b, :, :n].flatten(), cache.heads[k].v[b, :, :n].flatten()]
                got.append(cache.states[k - 1][b, :n].flatten())
            atol = twin_atol(recompute, model)
            torch.testing.assert_close(torch.cat(got), recompute(model), rtol=0, atol=atol, msg=f"row {b}, {steps}")
            assert cache.tokens[b, : len(seq)].tolist() == seq


@pytest.mark.parametrize("tree", [None, TREE], ids=["chain", "tree"])
def test_drafts_are_the_modules_choices_on_the_drafted_text(tree):
    """Each node's children are its module's top candidates in a full forward over the text followed by the
    node's path: each node feeds its own token to the next depth."""
    model = make_model(head_type="mtp", n_future=4, n_layers=6)
    prompts = random_prompts(3, 61, seed=7)
    _, seqs, (drafts, _) = decode_steps(model, prompts, tree, steps=3)
    tree = tree or Tree.chain(4)
    nodes = [(), *tree.paths]
    for b, seq in enumerate(seqs):
        token = {(): seq[-1], **{p: int(drafts[b, i]) for i, p in enumerate(tree.paths)}}
        for parent in nodes:
            children = [p for p in tree.paths if p[:-1] == parent]
            if not children:
                continue
            text = seq + [token[parent[:d]] for d in range(1, len(parent) + 1)]
            k = len(parent) + 1  # the module that drafts the children, at the position before the root
            with torch.no_grad():
                logits = model(torch.tensor([text]))[0, len(seq) - 2, k]  # (V,)
            ranked = logits.topk(tree.max_rank).indices.tolist()
            assert [token[c] for c in children] == [ranked[c[-1]] for c in children], (b, parent)


def test_plan_gives_each_module_the_nodes_above_its_drafting_depth():
    plan = ModulePlan.build(TREE)
    # Nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0), 6 (0,0,0), 7 (1,0,0).
    one, two, three = plan.modules
    assert one.nodes.tolist() == [] and one.drafting.tolist() == [0] and one.children.tolist() == [1, 2]
    assert one.rank.tolist() == [0, 1] and one.child_of.tolist() == [0, 0]
    assert two.nodes.tolist() == [1, 2] and two.from_root.tolist() == [True, True]
    assert two.drafting.tolist() == [1, 2] and two.drafting_row.tolist() == [0, 1]
    assert two.children.tolist() == [3, 4, 5] and two.child_of.tolist() == [0, 0, 1] and two.rank.tolist() == [0, 1, 0]
    assert three.nodes.tolist() == [1, 2, 3, 4, 5] and three.depth.tolist() == [1, 1, 2, 2, 2]
    assert three.parent_row.tolist()[2:] == [0, 0, 1]  # (0,0) and (0,1) read module 2 at (0,), (1,0) at (1,)
    assert three.sees[2].tolist() == [True, False, True, False, False]  # (0,0) sees (0,) and itself
    assert three.drafting.tolist() == [3, 4, 5] and three.children.tolist() == [6, 7]
    assert three.child_of.tolist() == [0, 2]
