import pytest
import torch
import torch.nn.functional as F

from multitoken import kernels
from multitoken.config import PRESETS, ModelConfig, param_count, preset
from multitoken.errors import UserError
from multitoken.head_kinds import HEAD_TYPES
from multitoken.kernels import NEVER, Choice
from multitoken.kv_cache import causal_mask
from multitoken.model import Linear, MultiTokenModel
from tests.conftest import make_model
from tests.tolerance import assert_within, dot_bound, twin_atol


def plain_lm_logits(model: MultiTokenModel, tokens: torch.Tensor) -> torch.Tensor:
    """A plain causal LM written out directly: embed, every block, norm, unembed."""
    ctx = model.attention_context(tokens.shape[1])
    x = model.tok_embeddings(tokens)
    for block in [*model.trunk, *model.heads]:
        x = block(x, ctx)
    return model.output(model.norm(x))


def test_n1_is_plain_causal_lm():
    model = make_model(n_future=1, n_layers=4)
    tokens = torch.randint(0, 61, (3, 20))
    logits = model(tokens)
    assert logits.shape == (3, 20, 1, 61)
    torch.testing.assert_close(logits[:, :, 0], plain_lm_logits(model, tokens), rtol=0, atol=0)
    # And the loss is the ordinary next-token cross-entropy.
    from multitoken.loss import shift_targets, summed_loss

    inputs, targets = shift_targets(tokens, 1, context=19)
    total, _ = summed_loss(model, inputs, targets)
    expected = F.cross_entropy(plain_lm_logits(model, tokens[:, :19]).flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(total, expected)


def test_layer_split_matches_official_release():
    cfg = preset("7b-n4")
    assert (cfg.n_trunk_layers, cfg.n_future) == (28, 4)
    lin = ModelConfig(n_layers=4, n_future=4, head_type="linear")
    assert lin.n_trunk_layers == 4  # linear heads take no block


def test_param_count_matches_module():
    for name in PRESETS:
        if name == "7b-n4":
            continue
        cfg = preset(name)
        assert param_count(cfg) == MultiTokenModel(cfg).num_parameters()
    assert 6.5e9 < param_count(preset("7b-n4")) < 7.0e9
    for name, budget in [
        ("induction-1m", 1e6),
        ("induction-3m", 3e6),
        ("induction-10m", 10e6),
        ("induction-30m", 30e6),
    ]:
        assert 0.8 * budget < param_count(preset(name), embeddings=False) < 1.25 * budget


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_future=0), "n_future must be >= 1"),
        (dict(n_future=4, n_layers=4), "needs n_layers > n_future"),
        (dict(dim=30, n_heads=4), "not divisible by n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
        (dict(head_type="sideways"), "unknown head type"),
    ],
)
def test_invalid_config(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**{"dim": 32, "n_layers": 4, "n_heads": 4, "n_future": 2, **fields})


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset"):
        preset("huge")


def test_tied_embeddings_share_storage():
    model = make_model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_head_dependencies(head_type):
    """Causal head i changes when head i-1 changes; anticausal when head i+1 does; parallel never."""
    model = make_model(head_type=head_type)
    tokens = torch.randint(0, 61, (1, 12))
    before = model(tokens)
    with torch.no_grad():
        for p in model.heads[1].parameters():
            p.add_(0.5)
    after = model(tokens)
    changed = [not torch.equal(before[:, :, i], after[:, :, i]) for i in range(3)]
    expected = {
        "parallel": [False, True, False],
        "linear": [False, True, False],
        "causal": [False, True, True],
        "anticausal": [True, True, False],
        "mtp": [False, True, True],  # module 2 reads module 1's output
    }[head_type]
    assert changed == expected


def test_forward_subset_of_heads_matches_all():
    model = make_model(head_type="causal")
    tokens = torch.randint(0, 61, (2, 10))
    full = model(tokens)
    torch.testing.assert_close(model(tokens, heads=[2, 0]), full[:, :, [2, 0]], rtol=0, atol=0)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cached_decoding_equals_full_forward(head_type):
    """Feeding a sequence in pieces of varying size through the cache reproduces the full forward.

    Heads that read a token ahead have no input at a piece's end; the decoder fills their caches itself
    (tests/generate/test_conditioned.py), so here only the heads that read hidden states alone are compared."""
    model = make_model(head_type=head_type)
    kind = model.cfg.head_kind
    heads = [i for i in range(model.cfg.n_future) if kind.token_lead(i) is None]
    torch.manual_seed(1)
    tokens = torch.randint(0, 61, (2, 30))
    full = model(tokens, heads=heads)
    atol = twin_atol(lambda m: m(tokens, heads=heads), model)
    cache = model.make_cache(2, 40)
    pieces, start = [1, 5, 2, 7, 1, 4, 10], 0
    for n in pieces:
        pos = torch.arange(start, start + n).expand(2, n)
        out = model(tokens[:, start : start + n], heads=heads, positions=pos, cache=cache)
        torch.testing.assert_close(out, full[:, start : start + n], rtol=0, atol=atol)
        start += n
    assert start == 30


def test_cache_rows_at_different_positions():
    """Each row of a batch may stand at its own position; stale slots beyond it are ignored."""
    model = make_model()
    a, b = torch.randint(0, 61, (1, 9)), torch.randint(0, 61, (1, 14))
    cache = model.make_cache(2, 20)
    # Prefill both, right-padded with junk, then one step each at its own position.
    ids = torch.zeros(2, 13, dtype=torch.long)
    ids[0, :8], ids[1, :13] = a[0, :8], b[0, :13]
    ids[0, 8:] = 7  # junk
    model(ids, positions=torch.arange(13).expand(2, 13), cache=cache)
    step = model(torch.stack([a[:, 8], b[:, 13]]), positions=torch.tensor([[8], [13]]), cache=cache)
    for row, (seq, pos) in enumerate([(a, 8), (b, 13)]):
        full = model(seq)[0, pos]
        atol = twin_atol(lambda m, seq=seq, pos=pos: m(seq)[0, pos], model)
        torch.testing.assert_close(step[row, 0], full, rtol=0, atol=atol)


def test_causal_mask_by_position():
    mask = causal_mask(torch.tensor([[2, 3]]), 5)
    assert mask.shape == (1, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, True, True, False, False], [True, True, True, True, False]]


def test_sequence_longer_than_context_is_refused():
    model = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


ROW_COUNTS = [(1, 1), (1, 2), (2, 3), (1, 8), (1, 9), (4, 16), (3, 50), (5, 13)]  # 65 rows: past every bound


@pytest.mark.parametrize("shape", ROW_COUNTS)
@pytest.mark.parametrize("choice", [NEVER, Choice(bound=64, one_row=True)], ids=["F.linear", "weight-stationary"])
@pytest.mark.parametrize("d_in, d_out", [(24, 40), (64, 2**16)])
def test_linear_equals_f_linear_for_every_row_count(shape, choice, d_in, d_out, monkeypatch):
    # Each path (F.linear; few rows weight-stationary; one row as two columns) must be x @ W.T, with the same
    # gradients, whichever the machine's measurement chose (kernels.py).
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "_chosen", {})
    kernels.use({(torch.float32, d_out, d_in): choice})
    layer = Linear(d_in, d_out)
    x = torch.randn(*shape, d_in, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape, d_out)
    w, rows = layer.weight, x.detach().reshape(-1, d_in)
    assert_within(y, F.linear(x, w), dot_bound(F.linear(x.abs(), w.abs()), d_in), "y")
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(F.linear(x, w), (x, w), g)
    # dx sums over the d_out outputs (65,536 of them for the large weight), dw over the rows.
    assert_within(dx, rx, dot_bound(g.abs() @ w.detach().abs(), d_out), "dx")
    g_rows = g.reshape(-1, d_out)
    assert_within(dw, rw, dot_bound(g_rows.abs().T @ rows.abs(), len(rows)), "dw")
