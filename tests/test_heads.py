"""Heads on a pretrained model: add_heads, targets, frozen and joint training, the train_heads job."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multitoken.checkpoint import load_run, save_checkpoint, write_run_config
from multitoken.data.tokenizers import ByteTokenizer
from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE, DraftVocab
from multitoken.generate.speculative import speculative_generate
from multitoken.heads import (
    BF16_GAIN,
    HeadsConfig,
    TrunkFeatures,
    add_heads,
    build_heads_optimizer,
    choose_precision,
    configure_trainable,
    default_heads_train_config,
    draft_heads_backward,
    frozen_heads_backward,
    frozen_trunk,
    generate_self_data,
    head1_choice,
    heads_backward,
    heads_update,
    self_distilled_targets,
    train_heads,
    window_schedule,
)
from multitoken.loss import IGNORE_INDEX, LossReport, shift_targets, summed_loss
from tests.conftest import make_model
from tests.tolerance import loss_tolerance, model_atol, sum_rtol


def next_token_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random 1-head model standing in for a pretrained LM (3 blocks: 2 trunk + head 1)."""
    return make_model(seed, n_future=1, n_layers=3, **overrides)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# add_heads


@pytest.mark.parametrize("tie", [False, True])
def test_add_heads_keeps_head1_exactly_and_copies_it(tie: bool) -> None:
    old = next_token_model(tie_embeddings=tie)
    new = add_heads(old, 3)
    assert new.cfg.n_future == 3 and new.cfg.n_layers == 5 and new.cfg.n_trunk_layers == old.cfg.n_trunk_layers
    tokens = torch.randint(0, old.cfg.vocab_size, (2, 17))
    with torch.no_grad():
        before = old(tokens)[:, :, 0]  # (B, T, V)
        after = new(tokens)  # (B, T, 3, V)
    assert torch.equal(after[:, :, 0], before)  # bitwise: the verifier is the pretrained model
    # Copies of head 1: at step 0 every head predicts the next token.
    assert torch.equal(after[:, :, 1], before) and torch.equal(after[:, :, 2], before)
    # Copies, not shared storage: training a new head must leave head 1 alone.
    assert new.heads[1].attention.wq.weight.data_ptr() != new.heads[0].attention.wq.weight.data_ptr()
    if tie:
        assert new.output.weight is new.tok_embeddings.weight
    assert old.cfg.n_future == 1  # the source model is untouched


def test_add_heads_random_init_and_refusals() -> None:
    old = next_token_model()
    new = add_heads(old, 2, init="random", seed=3)
    assert not torch.equal(new.heads[1].attention.wq.weight, new.heads[0].attention.wq.weight)
    assert torch.equal(new.heads[0].attention.wq.weight, old.heads[0].attention.wq.weight)
    with pytest.raises(UserError, match="cannot reduce"):
        add_heads(new, 1)
    with pytest.raises(UserError, match="unknown head init"):
        add_heads(old, 2, init="zeros")
    with pytest.raises(UserError, match="causal"):
        add_heads(make_model(head_type="causal"), 4)
    grown = add_heads(new, 4)  # 2 heads -> 4: the existing heads are kept, the new ones copy head 1
    assert torch.equal(grown.heads[1].attention.wq.weight, new.heads[1].attention.wq.weight)
    assert torch.equal(grown.heads[3].attention.wq.weight, new.heads[0].attention.wq.weight)


@pytest.mark.parametrize(("tie", "calibrated"), [(False, False), (True, False), (False, True)])
def test_token_conditioned_modules_added_to_a_next_token_model(tie: bool, calibrated: bool) -> None:
    old = next_token_model(tie_embeddings=tie)
    tokens = torch.randint(0, old.cfg.vocab_size, (2, 17))
    new = add_heads(old, 3, head_type="mtp", sample=tokens if calibrated else None)
    assert new.cfg.head_type == "mtp" and new.cfg.n_layers == 5 and new.cfg.n_trunk_layers == old.cfg.n_trunk_layers
    with torch.no_grad():
        h = old.embed_and_trunk(tokens, old.attention_context(17))  # (B, T, D)
        scale = (torch.linalg.vector_norm(h, dim=-1) / math.sqrt(h.shape[-1])).median() if calibrated else 1.0
        for k in (1, 2):  # the hidden input is read at the trunk output's own median scale (the squares of
            # its D elements summed in another order here)
            expected = torch.full_like(h[0, 0], float(scale))
            torch.testing.assert_close(new.heads[k].hidden_norm.weight, expected, rtol=sum_rtol(h.shape[-1]), atol=0)
        before = old(tokens)[:, :, 0]
        after = new(tokens)  # (B, T, 3, V)
        assert torch.equal(after[:, :, 0], before)  # the verifier is the pretrained model, bitwise
        # Each module starts as head 1's block on the normalised output of depth k-1, the token half at zero.
        ctx = new.attention_context(17)
        z = new.heads[0](new.embed_and_trunk(tokens, ctx), ctx)
        for k in (1, 2):
            module = new.heads[k]
            assert torch.equal(module.block.attention.wq.weight, old.heads[0].attention.wq.weight)
            assert module.block.attention.wq.weight.data_ptr() != new.heads[0].attention.wq.weight.data_ptr()
            z = new.heads[0](module.hidden_norm(z), ctx)
            torch.testing.assert_close(after[:, : 17 - k, k], new.unembed(z)[:, : 17 - k])
    with pytest.raises(UserError, match="anticausal heads cannot be added"):
        add_heads(old, 3, head_type="anticausal")
    with pytest.raises(UserError, match="cannot add mtp heads to a model of 3 parallel"):
        add_heads(add_heads(old, 3), 4, head_type="mtp")


def test_frozen_training_of_token_conditioned_modules_is_their_summed_loss() -> None:
    """The frozen step (head 1 feeding the chained modules, one module's backward at a time) against the summed
    losses of the modules and one backward: the same losses and gradients, and only the modules learn."""
    model = add_heads(next_token_model(), 4, head_type="mtp").train()
    configure_trainable(model, "frozen")
    V, gen = model.cfg.vocab_size, torch.Generator().manual_seed(0)
    inputs, targets = shift_targets(torch.randint(0, V, (2, 16), generator=gen), 4, context=14)
    report = frozen_heads_backward(model, inputs, targets, chunk=5)
    grads = take_grads(model)
    total, oracle = summed_loss(model, inputs, targets, weights=[0.0, 1.0, 1.0, 1.0])
    total.backward()
    expected = take_grads(model)
    with torch.no_grad():
        tol = loss_tolerance(model(inputs), model.cfg, targets.numel())
    assert math.isnan(report.per_head[0]) and report.per_head[1:] == pytest.approx(oracle.per_head[1:], **tol)
    assert set(grads) == set(expected) and all(k.startswith(("heads.1.", "heads.2.", "heads.3.")) for k in grads)
    assert {k.split(".")[2] for k in grads} == {"hidden_norm", "embed_norm", "proj", "block"}
    for name, grad in grads.items():
        assert_same_grad(grad, expected[name], model)


# --------------------------------------------------------------------------------------------------
# targets


def test_self_distilled_targets_hand_checked() -> None:
    # Head 1's argmax at positions 0..3 (the token it wants at 1..4).
    choice = torch.tensor([[10, 11, 12, 13]])
    targets = self_distilled_targets(choice, 3)
    x = IGNORE_INDEX
    # Head 2 at t drafts position t+2, which head 1 decides from t+1: choice[t+1]. Head 3: choice[t+2].
    assert targets.tolist() == [[[10, 11, 12, 13], [11, 12, 13, x], [12, 13, x, x]]]


def test_self_targets_match_head1_argmax_of_the_model() -> None:
    model = add_heads(next_token_model(), 3)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        choice = model(tokens, heads=[0])[:, :, 0].argmax(-1)  # (B, T)
    targets = self_distilled_targets(choice, 3)
    # What plain greedy decoding of head 1 would verify after the prefix tokens[:, :t+2].
    assert torch.equal(targets[:, 2, :10], choice[:, 2:])


# --------------------------------------------------------------------------------------------------
# training steps


@pytest.mark.parametrize("targets", ["corpus", "self"])
def test_frozen_training_changes_only_the_draft_heads(targets: str) -> None:
    model = add_heads(next_token_model(), 3).train()
    cfg = default_heads_train_config(batch_size=2, context=16, lr=1e-2, loss_chunk=5)
    before = snapshot(model)
    optimizer = build_heads_optimizer(model, "frozen", cfg, trunk_lr_scale=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        window = torch.randint(0, model.cfg.vocab_size, (2, 16 + 3), generator=gen)
        report = heads_backward(model, window, "frozen", targets, cfg)
        heads_update(optimizer, report, cfg.lr, cfg)
        assert torch.isnan(torch.tensor(report.per_head[0])) and all(x > 0 for x in report.per_head[1:])
    after = model.state_dict()
    for name, tensor in after.items():
        if name.startswith(("heads.1.", "heads.2.")):
            continue
        assert torch.equal(tensor, before[name]), name  # trunk, head 1, embedding, norm, unembedding
    for i in (1, 2):
        assert not torch.equal(after[f"heads.{i}.feed_forward.w1.weight"], before[f"heads.{i}.feed_forward.w1.weight"])


def test_head1_choice_is_the_first_of_tied_maxima() -> None:
    model = next_token_model()
    z = torch.randn(3, 7, model.cfg.dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.unembed(z)  # bf16: ties are common
        choice = head1_choice(model, z, chunk=5)
    assert torch.equal(choice, logits.argmax(-1))


def take_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grad(grad: torch.Tensor, oracle: torch.Tensor, model: torch.nn.Module) -> None:
    """Two evaluations of one backward agree up to rounding, at the gradient's own scale (tests/tolerance.py)."""
    torch.testing.assert_close(grad, oracle, rtol=0, atol=model_atol(oracle, model.cfg, floor=0.0))


def assert_grads_are_the_oracles(grads: dict[str, torch.Tensor], total: torch.Tensor, model: torch.nn.Module) -> None:
    """`grads` (heads 2 and 3 only) equal the gradients of the oracle's loss `total`, which this backpropagates."""
    total.backward()
    oracle = take_grads(model)
    assert set(grads) == set(oracle) and all(k.startswith(("heads.1.", "heads.2.")) for k in grads)
    for name, grad in grads.items():
        assert_same_grad(grad, oracle[name], model)


def test_draft_vocab_training_is_cross_entropy_over_its_tokens() -> None:
    model = add_heads(next_token_model(), 3).train()
    configure_trainable(model, "frozen")
    V, gen = model.cfg.vocab_size, torch.Generator().manual_seed(0)
    inputs = torch.randint(0, V, (2, 12), generator=gen)
    targets = torch.randint(0, V, (2, 3, 12), generator=gen)
    targets[:, :, -2:] = IGNORE_INDEX
    full = frozen_heads_backward(model, inputs, targets, chunk=5)
    full_grads = take_grads(model)
    # Every token, in another order: the same loss and gradients as the full vocabulary.
    everything = DraftVocab(torch.randperm(V, generator=gen), V)
    permuted = frozen_heads_backward(model, inputs, targets, chunk=5, vocab=everything)
    with torch.no_grad():
        tol = loss_tolerance(model(inputs), model.cfg, targets.numel())
    assert permuted.per_head[1:] == pytest.approx(full.per_head[1:], **tol)
    for name, grad in take_grads(model).items():
        assert_same_grad(grad, full_grads[name], model)
    # Every third token: the oracle is the plain cross-entropy of the restricted logits, outside targets skipped.
    vocab = DraftVocab(torch.arange(0, V, 3), V)
    report = frozen_heads_backward(model, inputs, targets, chunk=5, vocab=vocab)
    grads = take_grads(model)
    ctx = model.attention_context(inputs.shape[1])
    with torch.no_grad():
        h = model.embed_and_trunk(inputs, ctx)
    total = torch.zeros(())
    for i in (1, 2):
        logits = vocab.restrict(model.unembed(model.heads[i](h, ctx)))  # (2, 12, K)
        t = targets[:, i]
        inside = vocab.position()[t.clamp_min(0)]
        t = torch.where((t == IGNORE_INDEX) | (inside < 0), IGNORE_INDEX, inside)
        loss = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX)
        assert report.per_head[i] == pytest.approx(loss.item(), **tol)
        total = total + loss
    assert_grads_are_the_oracles(grads, total, model)


@pytest.mark.parametrize(
    ("head_type", "soft", "draft", "corpus"),
    [
        ("parallel", 1.0, False, False), ("mtp", 0.3, True, False), ("parallel", 0.6, True, True),
        ("mtp", 0.0, True, True), ("parallel", 0.0, False, True),
    ],
)
def test_soft_targets_are_cross_entropy_against_head1s_distribution(
    head_type: str, soft: float, draft: bool, corpus: bool
) -> None:
    """The oracle: every head's logits at once, each target the mixture soft * softmax(head 1's logits t+i-1
    positions on) + (1 - soft) * one-hot(self or corpus target), one mean per head over the positions whose
    t+i-1 lies in the window, summed, one backward."""
    model = add_heads(next_token_model(), 3, head_type=head_type).train()
    configure_trainable(model, "frozen")
    V, T, gen = model.cfg.vocab_size, 12, torch.Generator().manual_seed(0)
    window = torch.randint(0, V, (2, T + 3), generator=gen)
    inputs, corpus_targets = shift_targets(window, 3, T)
    labels = corpus_targets if corpus else None
    vocab = DraftVocab(torch.arange(0, V, 2), V) if draft else None
    report = frozen_heads_backward(model, inputs, labels, chunk=5, vocab=vocab, soft=soft)
    grads = take_grads(model)

    ctx = model.attention_context(T)
    with torch.no_grad():
        h = model.embed_and_trunk(inputs, ctx)
    outputs = model.run_heads(h, ctx, tokens=inputs)  # (B, T, D) per head, graphs kept
    restrict = vocab.restrict if vocab is not None else (lambda logits: logits)
    teacher = restrict(model.unembed(outputs[0])).detach().float().softmax(-1)  # (B, T, K)
    choice = model.unembed(outputs[0]).argmax(-1)  # (B, T): the self targets, over the full vocabulary
    total = torch.zeros(())
    for i in (1, 2):
        # The positions whose t+i lies in the window: head 1's output is there, and mtp module i's token. Corpus
        # targets reach further, but soft ones stop there; hard ones go on for heads that read no token.
        n_valid = T if corpus and soft == 0 and head_type != "mtp" else T - i
        # head 1's choice at t+i-1 (0-based head i: at t+i), or the corpus token
        target = corpus_targets[:, i, :n_valid] if corpus else choice[:, i : i + n_valid]
        index = vocab.position()[target] if vocab is not None else target
        keep = index >= 0  # a target outside the draft vocabulary is skipped
        one_hot = F.one_hot(index.clamp_min(0), teacher.shape[-1]).float()
        mix = one_hot if soft == 0 else soft * teacher[:, i : i + n_valid] + (1 - soft) * one_hot
        logits = restrict(model.unembed(outputs[i]))[:, :n_valid].float()
        loss = -(mix * logits.log_softmax(-1)).sum(-1)[keep].mean()
        with torch.no_grad():
            tol = loss_tolerance(model.unembed(outputs[i]), model.cfg, int(keep.sum()))
        assert report.per_head[i] == pytest.approx(loss.item(), **tol)
        total = total + loss
    assert_grads_are_the_oracles(grads, total, model)


def test_joint_mode_scales_the_pretrained_learning_rate() -> None:
    model = add_heads(next_token_model(), 2).train()
    lr, scale = 1e-2, 0.1
    cfg = default_heads_train_config(batch_size=2, context=16, lr=lr, weight_decay=0.0, grad_clip=1e9)
    before = snapshot(model)
    optimizer = build_heads_optimizer(model, "joint", cfg, trunk_lr_scale=scale)
    window = torch.randint(0, model.cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(1))
    heads_update(optimizer, heads_backward(model, window, "joint", "corpus", cfg), lr, cfg)
    # Adam's first step moves every parameter with a non-negligible gradient by exactly its LR (m/sqrt(v) =
    # sign(g)), so the largest move of a tensor reads off the LR it was given.
    moved = {k: float((v - before[k]).abs().max()) for k, v in model.state_dict().items()}
    for name in ("trunk.0.attention.wq.weight", "heads.0.feed_forward.w2.weight", "tok_embeddings.weight"):
        assert moved[name] == pytest.approx(lr * scale, rel=1e-3), name
    for name in ("heads.1.attention.wq.weight", "heads.1.feed_forward.w2.weight"):
        assert moved[name] == pytest.approx(lr, rel=1e-3), name


def test_a_diverged_loss_drops_the_gradients_and_says_so() -> None:
    model = add_heads(next_token_model(), 2).train()
    cfg = default_heads_train_config(batch_size=2, context=16)
    optimizer = build_heads_optimizer(model, "frozen", cfg, trunk_lr_scale=0.1)
    before = snapshot(model)
    report = heads_backward(model, torch.randint(0, model.cfg.vocab_size, (2, 18)), "frozen", "corpus", cfg)
    with pytest.raises(UserError, match="diverged"):
        heads_update(optimizer, LossReport(float("nan"), report.per_head), cfg.lr, cfg)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------
# trunk features


def test_window_schedule_visits_epochs_and_replays_each_window_about_reuse_times() -> None:
    B, N = 4, 1000
    # reuse 1: epochs without replacement, each a different shuffle.
    steps = N // B  # per epoch
    epochs = [sum((window_schedule(s, B, N, 1, seed=3) for s in range(e * steps, (e + 1) * steps)), []) for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N)) and epochs[0] != epochs[1]
    # reuse 4, a pool of 8 batches (32 windows): all new windows until the pool is full, then one per step.
    R, P, S = 4, 8, 600
    batches = [window_schedule(s, B, N, R, seed=3, pool_batches=P) for s in range(S)]
    assert all(len(b) == B for b in batches)
    order, first_seen = [], {}
    for s, batch in enumerate(batches):
        new = [w for w in dict.fromkeys(batch) if w not in first_seen]
        for w in new:
            first_seen[w] = s
        order += new
    assert [len(set(sum(batches[:s], []))) for s in (1, 8, 9, 12, 100)] == [4, 32, 33, 36, 124]
    for s, batch in enumerate(batches):  # every window drawn is one of the last P * B visited by then
        seen = [w for w in order if first_seen[w] <= s]
        assert set(batch) <= set(seen[-P * B :])
    counts = np.bincount(sum(batches, []), minlength=N)
    settled = [w for w, s in first_seen.items() if 2 * P < s < S - 2 * P]  # in and out of the full pool
    assert abs(counts[settled].mean() - R) < 0.25  # 1 + (B - B/R) draws over its P*B/(B/R) steps in the pool
    assert window_schedule(123, B, N, R, seed=3, pool_batches=P) == batches[123]  # a pure function of the step
    assert window_schedule(123, B, N, R, seed=4, pool_batches=P) != batches[123]


@pytest.mark.parametrize(
    ("self_targets", "reuse", "max_windows"), [(False, 1, 99), (True, 1, 99), (False, 1, 5), (True, 3, 2)]
)
def test_trunk_features_are_the_frozen_step_on_tiled_windows(self_targets: bool, reuse: int, max_windows: int) -> None:
    """The oracle: each batch's trunk output, targets and head gradients equal those of a frozen step run
    from scratch on the same windows; a window kept is not recomputed. With too little room, plain epochs keep
    the first windows and replay keeps the newest."""
    model = add_heads(next_token_model(), 3).train()
    configure_trainable(model, "frozen")
    context, n = 8, 3
    tokens = torch.randint(0, model.cfg.vocab_size, (100,), generator=torch.Generator().manual_seed(0)).numpy()
    teacher = reuse > 1  # head 1's output kept too: twice the bytes per window
    window_bytes = (1 + teacher) * context * model.cfg.dim * 4
    pool = 2  # batches: the replay pool fills by step 2 and then holds 6 of the 12 windows
    features = TrunkFeatures(
        model, tokens, context, self_targets, 5, 1, max_windows * window_bytes, reuse, teacher, pool_batches=pool
    )
    assert len(features) == 12  # starts 0, 8, ..., 88: the last window (11 tokens) ends at 99
    drawn = set()
    for step in range(12):
        index = window_schedule(step, 3, len(features), reuse, seed=1, pool_batches=pool)  # what the batch draws
        kept_before = list(features.kept)
        new = len(set(index) - set(kept_before))
        computed = features.computed
        h, targets, _, head1_out = features.batch(step, 3)
        assert features.computed == computed + new  # only windows not kept run the trunk
        after = kept_before + sorted(set(index) - set(kept_before))
        assert list(features.kept) == (after[-max_windows:] if reuse > 1 else after[:max_windows])
        drawn |= set(index)
        window = torch.from_numpy(np.stack([tokens[8 * i : 8 * i + context + n] for i in index]).astype(np.int64))
        inputs, corpus = shift_targets(window, n, context)
        oracle_h, oracle_targets, oracle_out = frozen_trunk(model, inputs, None if self_targets else corpus, 5, teacher)
        torch.testing.assert_close(h, oracle_h, rtol=0, atol=model_atol(oracle_h, model.cfg))
        if teacher:
            torch.testing.assert_close(head1_out, oracle_out, rtol=0, atol=model_atol(oracle_out, model.cfg))
        else:
            assert head1_out is None
        assert torch.equal(targets, oracle_targets)
        if step in (0, 11):
            report = draft_heads_backward(model, h, targets, chunk=5)
            grads = take_grads(model)
            oracle = frozen_heads_backward(model, inputs, None if self_targets else corpus, chunk=5)
            with torch.no_grad():
                tol = loss_tolerance(model(inputs), model.cfg, targets.numel())
            assert report.per_head[1:] == pytest.approx(oracle.per_head[1:], **tol)
            for name, grad in take_grads(model).items():
                assert_same_grad(grads[name], grad, model)
    assert len(features.kept) == min(len(drawn), max_windows)
    # No room: nothing is kept and every draw runs the trunk again.
    uncached = TrunkFeatures(model, tokens, context, self_targets, seed=1, max_bytes=0)
    uncached.batch(0, 3)
    uncached.batch(0, 3)
    assert uncached.computed == 2 * len(set(window_schedule(0, 3, 12, seed=1)))
    assert not uncached.kept
    with pytest.raises(UserError, match="cannot fill one window"):
        TrunkFeatures(model, tokens[:10], context, self_targets)


def test_heads_config_validation() -> None:
    with pytest.raises(UserError, match="mode"):
        HeadsConfig(mode="partial")
    with pytest.raises(UserError, match="targets"):
        HeadsConfig(targets="teacher")
    with pytest.raises(UserError, match="n_future"):
        HeadsConfig(n_future=1)
    with pytest.raises(UserError, match="frozen mode only"):
        HeadsConfig(mode="joint", draft_vocab=64)
    with pytest.raises(UserError, match="trunk_cache_gib"):
        HeadsConfig(trunk_cache_gib=-1)
    with pytest.raises(UserError, match="trunk_reuse > 1 needs frozen mode"):
        HeadsConfig(trunk_reuse=2, trunk_cache_gib=0)
    with pytest.raises(UserError, match="trunk_reuse > 1 needs frozen mode"):
        HeadsConfig(trunk_reuse=2, mode="joint")
    with pytest.raises(UserError, match="trunk_reuse must be >= 1"):
        HeadsConfig(trunk_reuse=0)
    with pytest.raises(UserError, match="soft_targets must be between 0 and 1"):
        HeadsConfig(soft_targets=1.5)
    with pytest.raises(UserError, match="soft targets need frozen mode"):
        HeadsConfig(soft_targets=0.5, mode="joint")
    with pytest.raises(UserError, match="unknown head type 'sideways'"):
        HeadsConfig(head_type="sideways")
    with pytest.raises(UserError, match="unknown head precision 'fp16'"):
        HeadsConfig(precision="fp16")


def test_choose_precision_times_both_on_the_cpu_unless_told() -> None:
    model = next_token_model()
    inputs = torch.randint(0, model.cfg.vocab_size, (1, 16))
    assert choose_precision(model, inputs, "bf16") == (True, {"precision": "bf16", "chosen_by": "config"})
    assert choose_precision(model, inputs, "fp32") == (False, {"precision": "fp32", "chosen_by": "config"})
    bf16, report = choose_precision(model, inputs, "auto", repeats=2)
    assert report["chosen_by"] == "timing" and report["fp32_s"] > 0 and report["bf16_s"] > 0
    assert bf16 == (report["bf16_s"] < BF16_GAIN * report["fp32_s"])
    assert report["precision"] == ("bf16" if bf16 else "fp32")


def test_generate_self_data_is_the_models_greedy_text() -> None:
    model = next_token_model()
    tokens = torch.randint(0, model.cfg.vocab_size - 1, (200,)).numpy()
    eos = model.cfg.vocab_size - 1
    flat = generate_self_data(model, tokens, n_prompts=3, prompt_tokens=5, new_tokens=6, eos_id=eos, batch_size=2)
    sequences = [s for s in " ".join(map(str, flat.tolist())).split(str(eos)) if s.strip()]
    assert len(sequences) == 3
    first = [int(x) for x in sequences[0].split()]
    assert generate(model, [first[:5]], 6).tokens[0][: len(first) - 5] == first[5:]


def test_generate_self_data_gives_each_pool_an_equal_share() -> None:
    model = next_token_model()
    eos = model.cfg.vocab_size - 1
    big, small = np.arange(0, 1000) % 20, 40 + np.arange(30) % 10  # disjoint token ranges: 0-19, 40-49
    flat = generate_self_data(model, [big, small], n_prompts=5, prompt_tokens=4, new_tokens=3, eos_id=eos)
    starts = [0] + [i + 1 for i, t in enumerate(flat.tolist()) if t == eos][:-1]
    pools = ["small" if flat[s] >= 40 else "big" for s in starts]
    assert pools == ["big", "small", "big", "small", "big"]  # prompt j from pool j mod 2
    with pytest.raises(UserError, match="cannot give prompts"):
        generate_self_data(model, [big, small[:3]], n_prompts=2, prompt_tokens=4, new_tokens=3, eos_id=eos)


# --------------------------------------------------------------------------------------------------
# the job


def make_run(path, model) -> None:
    """A run directory holding `model` with the byte tokenizer, as `import_to_run` would write it."""
    write_run_config(path, model.cfg)
    ByteTokenizer().save(path)
    save_checkpoint(path, 0, model)


@pytest.mark.parametrize(
    ("targets", "steps", "max_ratio", "draft_vocab", "cache_gib", "head_type", "precision", "soft"),
    [
        ("corpus", 60, 0.7, None, 4.0, None, "fp32", 0.0), ("self", 30, 0.98, None, 4.0, None, "fp32", 0.0),
        ("generated", 30, 0.98, None, 4.0, None, "fp32", 0.0), ("corpus", 60, 0.7, 16, 4.0, None, "fp32", 0.0),
        ("corpus", 60, 0.7, None, 0.0, None, "fp32", 0.0), ("self", 30, 0.98, None, 0.0, None, "fp32", 0.0),
        ("corpus", 60, 0.7, 16, 4.0, "mtp", "fp32", 0.0), ("self", 30, 0.98, None, 0.0, "mtp", "fp32", 0.0),
        ("corpus", 60, 0.7, None, 4.0, None, "bf16", 0.0), ("corpus", 60, 0.7, None, 0.0, "mtp", "bf16", 0.0),
        ("self", 30, 0.98, None, 4.0, "mtp", "fp32", 0.5), ("corpus", 60, 0.7, 16, 0.0, None, "fp32", 1.0),
    ],
)  # fmt: skip
def test_train_heads_job_learns_and_writes_a_decodable_run(
    tmp_path, targets: str, steps: int, max_ratio: float, draft_vocab: int | None, cache_gib: float,
    head_type: str | None, precision: str, soft: float,
) -> None:
    """Corpus targets on repetitive text are easy to learn; the self-distilled targets of a random model
    (the argmax of nearly uniform logits) are close to a hash of the context, so there only some progress
    is asked for. A 16-token draft vocabulary leaves some of the text's bytes out. cache_gib 0: every step
    runs the trunk on windows at random offsets; otherwise tiled windows keep their trunk output. Generated
    targets draw their prompts from two groups of files. bf16 steps and soft targets (head 1's distribution
    mixed in) learn as well, and the frozen verifier they leave decodes exactly as before."""
    torch.manual_seed(0)
    base = make_model(0, vocab_size=257, n_future=1, n_layers=3, max_seq_len=128)
    with torch.no_grad():
        # The frozen unembedding bounds what the heads can say: at init scale (N(0, 0.02), after an RMSNorm
        # with frozen unit gains) its logits span well under one nat, so no head could become confident. A
        # trained LM's unembedding spans tens of nats; scale this one up to be like it.
        base.output.weight.mul_(25)
    make_run(tmp_path / "base", base)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(4):  # several documents, so that one is held out for the final evaluation
        corpus.joinpath(f"{part}.py").write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(80)))
    cfg = default_heads_train_config(batch_size=8, context=32, lr=3e-3, max_steps=steps, eval_batches=1)
    heads = HeadsConfig(
        n_future=3, targets=targets, generated_prompts=16, prompt_tokens=8, generated_tokens=40,
        draft_vocab=draft_vocab, trunk_cache_gib=cache_gib, head_type=head_type, precision=precision,
        soft_targets=soft,
    )  # fmt: skip
    prompt_data = [[corpus / "0.py"], [corpus / "1.py", corpus / "2.py"]] if targets == "generated" else []
    summary = train_heads(tmp_path / "base", tmp_path / "mtp", heads, cfg, [corpus], tmp_path / "cache", prompt_data)
    assert summary["steps"] == steps and summary["eval"] is not None
    assert summary["precision"] == {"precision": precision, "chosen_by": "config"}
    if cache_gib:  # 8 windows a step for 30-60 steps: every window is drawn, and computed only once
        assert summary["trunk_features"]["computed"] == summary["trunk_features"]["kept"] > 0
    else:
        assert "trunk_features" not in summary
    config = json.loads((tmp_path / "mtp" / "config.json").read_text())
    assert config["data"]["prompt_sources"] == [[str(p) for p in group] for group in prompt_data]
    losses = [json.loads(line) for line in (tmp_path / "mtp" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["loss"] for m in losses if m["kind"] == "train"]
    assert sum(train_losses[-10:]) < max_ratio * sum(train_losses[:10])
    run = load_run(tmp_path / "mtp")
    assert run.model.cfg.n_future == 3 and run.model.cfg.head_type == (head_type or "parallel")
    # Frozen mode: the verifier is the base model, so speculative greedy == the base model's greedy.
    prompt = list(b"def f7(x):\n    return")
    plain = generate(base.eval(), [prompt], 30).tokens
    spec = speculative_generate(run.model, [prompt], 30)
    assert spec.tokens == plain
    if draft_vocab is not None:
        vocab = DraftVocab.load(tmp_path / "mtp" / DRAFT_VOCAB_FILE)
        assert vocab.size == draft_vocab and 0.5 < summary["draft_vocab_coverage"] < 1.0
        # The verifier is a random model whose greedy text is no corpus text: what counts is exactness.
        assert speculative_generate(run.model, [prompt], 30, draft_vocab=vocab).tokens == plain
    with pytest.raises(UserError, match="already holds a run"):
        train_heads(tmp_path / "base", tmp_path / "mtp", heads, cfg, [corpus])
    if targets != "generated":
        with pytest.raises(UserError, match="prompt data only serves"):
            train_heads(tmp_path / "base", tmp_path / "other", heads, cfg, [corpus], prompt_data=[[corpus]])


@pytest.mark.slow
def test_add_heads_matches_import_of_smollm2() -> None:
    """import_hf(n_future=4) and add_heads(import_hf(n_future=1), 4) give the same weights."""
    from multitoken.interop.gguf import find_smollm2_gguf
    from multitoken.interop.hf import import_hf

    path = find_smollm2_gguf()
    one, _ = import_hf(path, 1, max_seq_len=256)
    four, _ = import_hf(path, 4, max_seq_len=256)
    grown = add_heads(one, 4)
    assert grown.cfg == four.cfg
    ours, theirs = grown.state_dict(), four.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
