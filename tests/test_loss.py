import pytest
import torch
import torch.nn.functional as F

from multitoken.head_kinds import HEAD_TYPES
from multitoken.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy_backward,
    evaluate_heads,
    sequential_backward,
    shift_targets,
    summed_loss,
)
from tests.conftest import make_model
from tests.tolerance import loss_tolerance, model_atol, network_atol, sum_rtol

X = IGNORE_INDEX


def test_shift_targets_hand_written():
    window = torch.tensor([[10, 11, 12, 13, 14, 15]])
    inputs, targets = shift_targets(window, n_future=3)  # context = 6 - 3 = 3: every head has targets
    assert inputs.tolist() == [[10, 11, 12]]
    assert targets.tolist() == [[[11, 12, 13], [12, 13, 14], [13, 14, 15]]]
    # With the whole window as input, targets past the end are ignored, never wrapped around.
    inputs, targets = shift_targets(window, n_future=3, context=6)
    assert inputs.tolist() == [[10, 11, 12, 13, 14, 15]]
    assert targets.tolist() == [[[11, 12, 13, 14, 15, X], [12, 13, 14, 15, X, X], [13, 14, 15, X, X, X]]]


def test_shift_targets_rejects_bad_context():
    with pytest.raises(ValueError):
        shift_targets(torch.zeros(1, 4, dtype=torch.long), n_future=2, context=5)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("tie", [False, True])
def test_sequential_step_equals_summed_loss(head_type, chunk, tie):
    """Loss and every parameter's gradient of the memory-efficient step equal the summed-loss oracle."""
    model = make_model(head_type=head_type, n_future=4, n_layers=6, tie_embeddings=tie).train()
    window = torch.randint(0, 61, (3, 24))
    inputs, targets = shift_targets(window, 4, context=22)  # some targets ignored at the end
    weights = [1.0, 0.5, 0.25, 2.0]

    total, oracle = summed_loss(model, inputs, targets, weights)
    (0.5 * total).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    report = sequential_backward(model, inputs, targets, weights, chunk=chunk, loss_scale=0.5)
    got = grads(model)
    with torch.no_grad():
        tol = loss_tolerance(model(inputs), model.cfg, targets.numel())
    assert report.total == pytest.approx(oracle.total, **tol)
    assert report.per_head == pytest.approx(oracle.per_head, **tol)
    assert set(got) == set(expected) == {n for n, _ in model.named_parameters()}
    for name in expected:
        atol = model_atol(expected[name], model.cfg, floor=0.0)
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def test_chunked_equals_full_cross_entropy():
    model = make_model()
    z = torch.randn(2, 13, 32)
    targets = torch.randint(0, 61, (2, 13))
    targets[0, 3] = IGNORE_INDEX
    full_leaf = z.clone().requires_grad_()
    full = F.cross_entropy(model.unembed(full_leaf).flatten(0, 1), targets.flatten(), reduction="sum")
    full.backward()
    full_grads = grads(model)
    model.zero_grad(set_to_none=True)

    leaf = z.clone().requires_grad_()
    value = chunked_cross_entropy_backward(model, leaf, targets, scale=1.0, chunk=4)
    # One product over dim (the logits), then the backward's over V (dz) and over the 26 positions (dW).
    with torch.no_grad():
        logit_atol = network_atol(model.unembed(z), 32, depth=1)
    assert value == pytest.approx(full.item(), rel=sum_rtol(26), abs=26 * 2 * logit_atol)
    k = max(61, 26, 32)
    torch.testing.assert_close(leaf.grad, full_leaf.grad, rtol=0, atol=network_atol(full_leaf.grad, k, 2, floor=0))
    for name, g in grads(model).items():
        torch.testing.assert_close(g, full_grads[name], rtol=0, atol=network_atol(full_grads[name], k, 2, floor=0))


def test_evaluate_heads_matches_summed_loss():
    model = make_model()
    inputs, targets = shift_targets(torch.randint(0, 61, (2, 20)), 3, context=20)
    stats = evaluate_heads(model, inputs, targets, chunk=6)
    _, report = summed_loss(model, inputs, targets)
    with torch.no_grad():
        tol = loss_tolerance(model(inputs), model.cfg, targets.numel())
    assert (stats["loss_sum"] / stats["count"]).tolist() == pytest.approx(report.per_head, **tol)
    assert stats["count"].tolist() == [38, 36, 34]  # 2 rows x (20 - i) targets
    logits = model(inputs)
    top1 = logits.argmax(-1)  # (B, T, n)
    assert stats["correct"][0] == (top1[:, :19, 0] == targets[:, 0, :19]).sum()
    # Head 2 at t agrees with head 1 at t+1.
    assert stats["agree"][1] == (top1[:, :19, 1] == top1[:, 1:, 0]).sum()
    assert stats["agree"][0] == stats["agree_count"][0] == 40
