"""The official release layout: names, params.json, Meta's RoPE permutation, round trips, bad files."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from multitoken.checkpoint import load_run, save_checkpoint, write_run_config
from multitoken.config import ModelConfig, preset
from multitoken.data.tokenizers import ByteTokenizer, load_tokenizer
from multitoken.errors import CheckpointError, UserError
from multitoken.interop.hf import export_run, import_to_run
from multitoken.interop.meta import config_from_params, export_meta, import_meta, meta_ffn_dim, meta_ffn_params
from multitoken.model import apply_rope, rope_tables
from tests.conftest import make_model
from tests.tolerance import network_atol


def varied_model(**overrides):
    """make_model (2 trunk blocks + 3 heads, GQA) with non-trivial norm weights."""
    model = make_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def all_logits(model, T=20):
    x = torch.randint(0, model.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x)  # (B, T, n_future, V)


def test_layout_names_and_params(tmp_path):
    model = varied_model(ffn_dim=100)
    out = export_meta(model, tmp_path / "meta")
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.pth", "params.json"]
    params = json.loads((out / "params.json").read_text())
    assert set(params) == {
        "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
        "norm_eps", "rope_theta", "n_future_tokens",
    }  # fmt: skip
    assert (params["n_layers"], params["n_future_tokens"], params["n_kv_heads"]) == (5, 3, 2)
    assert meta_ffn_dim(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == 100
    weights = torch.load(out / "consolidated.pth", weights_only=True)
    layers = {int(k.split(".")[1]) for k in weights if k.startswith("layers.")}
    extra = {int(k.split(".")[1]) for k in weights if k.startswith("extra_heads.")}
    assert layers == set(range(5 - 3 + 1)) and extra == {0, 1}  # trunk (2) + head 1, then heads 2..3
    block = sorted(k.split(".", 2)[2] for k in weights if k.startswith("layers.0."))
    assert block == sorted(
        f"{w}.weight"
        for w in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                  "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm")
    )  # fmt: skip
    assert sorted(k for k in weights if "layers" not in k and "heads" not in k) == [
        "norm.weight", "output.weight", "tok_embeddings.weight",
    ]  # fmt: skip
    assert len(weights) == 3 + 9 * (3 + 2)
    # Head 2 is extra_heads.0; head 1 is the last of layers; values other than wq/wk are untouched.
    assert torch.equal(weights["extra_heads.0.attention.wv.weight"], model.heads[1].attention.wv.weight)
    assert torch.equal(weights["layers.2.feed_forward.w2.weight"], model.heads[0].feed_forward.w2.weight)
    assert torch.equal(weights["layers.1.ffn_norm.weight"], model.trunk[1].ffn_norm.weight)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"n_future": 1}, {"n_kv_heads": 4}])
def test_round_trip_all_heads(tmp_path, overrides):
    model = varied_model(**overrides)
    out = export_meta(model, tmp_path / "meta")
    again, tokenizer = import_meta(out, max_seq_len=model.cfg.max_seq_len)
    assert tokenizer is None and again.cfg.n_future == model.cfg.n_future
    assert torch.equal(all_logits(again), all_logits(model))


def meta_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's reference rotary embedding on x (T, H, hd): complex rotation of interleaved pairs."""
    T, _, hd = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(T, -1, hd // 2, 2))
    return torch.view_as_real(xc * freqs_cis[:, None]).flatten(2)


def test_permutation_matches_meta_rope(tmp_path):
    """Attention scores from exported wq/wk under Meta's RoPE equal ours under rotate-half RoPE."""
    model = varied_model(rope_theta=500.0)
    cfg, attn = model.cfg, model.trunk[0].attention
    weights = torch.load(export_meta(model, tmp_path / "meta") / "consolidated.pth", weights_only=True)
    T, hd, group = 12, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    x = torch.randn(T, cfg.dim)
    with torch.no_grad():
        q = meta_rope((x @ weights["layers.0.attention.wq.weight"].T).view(T, cfg.n_heads, hd), cfg.rope_theta)
        k = meta_rope((x @ weights["layers.0.attention.wk.weight"].T).view(T, cfg.n_kv_heads, hd), cfg.rope_theta)
        theirs = torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, dim=1))
        cos, sin = rope_tables(hd, T, cfg.rope_theta)
        q = apply_rope(attn.wq(x).view(T, cfg.n_heads, hd).transpose(0, 1)[None], cos, sin)[0]  # (H, T, hd)
        k = apply_rope(attn.wk(x).view(T, cfg.n_kv_heads, hd).transpose(0, 1)[None], cos, sin)[0]
        ours = q @ k.repeat_interleave(group, dim=0).transpose(1, 2)
    # Two products (projection over dim, score over hd) and the rotation: three rounded stages.
    torch.testing.assert_close(theirs, ours, rtol=0, atol=network_atol(theirs, cfg.dim, depth=3))


def test_official_7b_params():
    """The 7B n=4 shape is written the way Llama writes it, and a Llama-style params.json reads back."""
    cfg = preset("7b-n4")
    assert meta_ffn_params(cfg) == {"multiple_of": 256, "ffn_dim_multiplier": None}
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5,
              "vocab_size": -1, "n_future_tokens": 4}  # fmt: skip
    read = config_from_params(params, vocab_size=32000, max_seq_len=4096)
    assert (read.ffn_dim, read.n_trunk_layers, read.n_future, read.n_kv_heads) == (11008, 28, 4, 32)


def test_other_head_types_refused(tmp_path):
    for head_type in ("causal", "anticausal", "linear", "mtp"):
        with pytest.raises(UserError, match="only parallel heads"):
            export_meta(make_model(head_type=head_type), tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


def corrupt(tmp_path: Path, change) -> Path:
    out = export_meta(varied_model(), tmp_path / "meta")
    weights = torch.load(out / "consolidated.pth", weights_only=True)
    change(weights)
    torch.save(weights, out / "consolidated.pth")
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("extra_heads.1.ffn_norm.weight"), "1 missing"),
        (lambda w: w.update({"extra_heads.2.ffn_norm.weight": torch.ones(32)}), "1 unexpected"),
        (lambda w: w.update({"layers.0.attention.wk.weight": torch.ones(32, 32)}), "shape"),
        (lambda w: w.update({"note": "a string"}), "plain dict of tensors"),
    ],
)
def test_bad_weights_raise(tmp_path, change, message):
    out = corrupt(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        import_meta(out)


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_truncated_foreign_and_pickled_files(tmp_path, capsys):
    out = export_meta(varied_model(), tmp_path / "meta")
    path = out / "consolidated.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        import_meta(out)
    path.write_bytes(pickle.dumps({"tok_embeddings.weight": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot read"):
        import_meta(out)
    assert "unpickled!" not in capsys.readouterr().out
    path.write_bytes(data)
    (out / "params.json").write_text(json.dumps({"dim": 32}))
    with pytest.raises(CheckpointError, match="not a valid Llama config"):
        import_meta(out)
    (out / "params.json").unlink()
    with pytest.raises(CheckpointError, match="no params.json"):
        import_meta(out)


def test_run_round_trip_with_tokenizer(tmp_path):
    model = varied_model(vocab_size=257)
    run = tmp_path / "run"
    write_run_config(run, model.cfg)
    ByteTokenizer().save(run)
    save_checkpoint(run, 7, model)
    out = export_run(run, tmp_path / "meta", "meta")
    assert isinstance(load_tokenizer(out), ByteTokenizer)
    run2 = import_to_run(out, tmp_path / "run2", layout="meta", max_seq_len=model.cfg.max_seq_len)
    loaded = load_run(run2)
    assert loaded.config["source"]["format"] == "meta" and isinstance(load_tokenizer(run2), ByteTokenizer)
    assert ModelConfig.from_dict(loaded.config["model"]).n_future == 3
    assert torch.equal(all_logits(loaded.model), all_logits(model))
    with pytest.raises(UserError, match="unknown export format"):
        export_run(run, tmp_path / "x", "onnx")


def test_the_api_loads_the_official_layout_with_every_head(tmp_path):
    import multitoken

    model = make_model(vocab_size=257, n_future=3, max_seq_len=256)
    out = export_meta(model, tmp_path / "meta", ByteTokenizer())
    lm = multitoken.load(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, lm.model.state_dict()[name]), name
    assert lm.model.cfg.n_future == 3 and lm.generate("ab", max_new_tokens=4, stop_at_eos=False).token_ids
