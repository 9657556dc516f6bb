"""Hugging Face import/export against transformers' own LlamaForCausalLM (random weights, no downloads)."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

import multitoken  # noqa: E402
from multitoken.checkpoint import latest_checkpoint, load_run, save_checkpoint, write_run_config  # noqa: E402
from multitoken.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer  # noqa: E402
from multitoken.errors import CheckpointError, DataError, UserError  # noqa: E402
from multitoken.interop.hf import (  # noqa: E402
    byte_tokenizer_as_hf,
    config_from_hf,
    export_hf,
    export_run,
    import_hf,
    import_to_run,
    read_safetensors,
)
from tests.conftest import make_model  # noqa: E402
from tests.tolerance import twin_atol  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "Hello, world! Multi-token prediction.", "naïve café ∑ 😀"] * 20


def random_llama(
    tmp_path: Path,
    tie: bool = False,
    n_kv_heads: int = 2,
    model_type: str = "llama",
    tokenizer: bool = True,
    **save_kwargs,
) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised small transformers model saved with save_pretrained (+ a BPE tokenizer)."""
    common = dict(
        vocab_size=301,
        hidden_size=64,
        intermediate_size=136,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    if model_type == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, head_dim=16, **common))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Norm weights start at 1: perturb them (and give the weights some size) so that a swapped or
            # dropped tensor changes the logits.
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    out = tmp_path / "hf"
    hf.save_pretrained(out, **save_kwargs)
    if tokenizer:
        BPETokenizer.train(TEXTS, 301).save(out)  # tokenizer.json (+ our config, ignored by the importer)
    return out, hf.eval()


def hf_logits(hf: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, model: torch.nn.Module, x: torch.Tensor) -> None:
    """Two fp32 implementations of one forward agree up to rounding: a few times our forward's own fp32
    error against float64, measured here (tests/tolerance.py)."""
    atol = twin_atol(lambda m: m(x, heads=[0])[:, :, 0], model)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


def tokens(vocab: int, T: int = 24, B: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("tie", "n_kv_heads"), [(False, 2), (True, 2), (False, 4), (True, 1)])
def test_import_matches_transformers(tmp_path, tie, n_kv_heads):
    src, hf = random_llama(tmp_path, tie=tie, n_kv_heads=n_kv_heads)
    model, tok = import_hf(src)
    cfg = model.cfg
    assert (cfg.n_future, cfg.n_trunk_layers, cfg.n_layers) == (1, 2, 3)
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.max_seq_len) == (n_kv_heads, tie, 5000.0, 64)
    assert isinstance(tok, BPETokenizer)
    x = tokens(301)
    with torch.no_grad():
        ours = model(x)[:, :, 0]
    assert_same_logits(ours, hf_logits(hf, x), model, x)


def test_import_model_object_and_mistral_without_window(tmp_path):
    src, hf = random_llama(tmp_path, model_type="mistral", tokenizer=False)
    x = tokens(301)
    for source in (src, hf):
        model, _ = import_hf(source)
        with torch.no_grad():
            assert_same_logits(model(x)[:, :, 0], hf_logits(hf, x), model, x)


def test_import_sharded(tmp_path):
    src, hf = random_llama(tmp_path, max_shard_size="50KB")
    assert (src / "model.safetensors.index.json").is_file()
    model, _ = import_hf(src)
    x = tokens(301)
    with torch.no_grad():
        assert_same_logits(model(x)[:, :, 0], hf_logits(hf, x), model, x)


def test_import_extra_heads_start_as_copies(tmp_path):
    src, hf = random_llama(tmp_path)
    model, _ = import_hf(src, n_future=3, max_seq_len=32)
    assert (model.cfg.n_layers, model.cfg.n_trunk_layers, model.cfg.max_seq_len) == (5, 2, 32)
    x = tokens(301)
    with torch.no_grad():
        logits = model(x)
    assert_same_logits(logits[:, :, 0], hf_logits(hf, x), model, x)
    assert torch.equal(logits[:, :, 1], logits[:, :, 0]) and torch.equal(logits[:, :, 2], logits[:, :, 0])
    assert model.heads[1].attention.wq.weight.data_ptr() != model.heads[0].attention.wq.weight.data_ptr()


BASE = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=10,
            intermediate_size=100)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
        ({"model_type": "qwen2"}, "model_type 'qwen2'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
        ({"num_hidden_layers": 1}, "fewer than 2 layers"),
        ({"intermediate_size": None}, "no valid 'intermediate_size'"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    assert config_from_hf(BASE).rope_theta == 10000.0
    with pytest.raises(CheckpointError, match=message):
        config_from_hf({**BASE, **change})


def test_rope_theta_spellings():
    assert config_from_hf({**BASE, "rope_theta": 5e5}).rope_theta == 5e5
    assert config_from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 7e4}}).rope_theta == 7e4


def test_bad_sources(tmp_path):
    src, _ = random_llama(tmp_path)
    config = json.loads((src / "config.json").read_text())
    # Refused from config.json alone, before any weight is read.
    (src / "model.safetensors").unlink()
    (src / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(CheckpointError, match="RoPE scaling 'linear'"):
        import_hf(src)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_hf(src)
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickled"):
        import_hf(src)
    with pytest.raises(CheckpointError, match="neither"):
        import_hf(tmp_path / "nowhere")


def test_truncated_or_mismatched_weights(tmp_path):
    src, _ = random_llama(tmp_path)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        import_hf(src)
    weights.write_bytes(data)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="unexpected"):
        import_hf(src)
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="shape"):
        import_hf(src)


def test_import_to_run(tmp_path):
    src, hf = random_llama(tmp_path)
    run = import_to_run(src, tmp_path / "run")
    loaded = load_run(run)
    assert loaded.config["source"]["format"] == "hf"
    x = tokens(301)
    with torch.no_grad():
        assert_same_logits(loaded.model(x)[:, :, 0], hf_logits(hf, x), loaded.model, x)
    tok = load_tokenizer(run)
    assert tok.encode(TEXTS[0]) == BPETokenizer.from_file(src / "tokenizer.json").encode(TEXTS[0])
    with pytest.raises(UserError, match="not an empty directory"):
        import_to_run(src, run)


def test_import_to_run_without_tokenizer(tmp_path):
    src, _ = random_llama(tmp_path, tokenizer=False)
    with pytest.raises(DataError, match="no tokenizer"):
        import_to_run(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    run = import_to_run(src, tmp_path / "run", allow_missing_tokenizer=True)
    assert load_run(run).model.cfg.n_layers == 3
    assert not any(p.name.startswith(".run.") for p in tmp_path.iterdir())  # no staging folder left behind


def save_run(run: Path, model: torch.nn.Module, tok) -> Path:
    """A run directory holding `model` (checkpoint step 1) and its tokenizer."""
    write_run_config(run, model.cfg)
    tok.save(run)
    save_checkpoint(run, 1, model)
    return run


def load_exported(out: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()


@pytest.mark.parametrize(
    ("head_type", "tie", "n_hf_layers"),
    [("parallel", False, 3), ("parallel", True, 3), ("causal", False, 3), ("anticausal", False, 5), ("mtp", True, 3)],
)
def test_export_matches_head1(tmp_path, head_type, tie, n_hf_layers):
    model = make_model(head_type=head_type, tie_embeddings=tie)  # 5 blocks: 2 trunk + 3 heads
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and larger weights, as in random_llama
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    out = export_hf(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == n_hf_layers
    hf = load_exported(out)
    assert hf.config.tie_word_embeddings == tie
    x = tokens(61)
    with torch.no_grad():
        assert_same_logits(hf_logits(hf, x), model(x, heads=[0])[:, :, 0], model, x)
    # And back: the exported folder imports to the same next-token model.
    again, _ = import_hf(out)
    with torch.no_grad():
        assert_same_logits(again(x)[:, :, 0], model(x, heads=[0])[:, :, 0], model, x)


def test_export_refuses_linear_heads(tmp_path):
    for n_future in (1, 2):
        with pytest.raises(UserError, match="linear heads have no Llama equivalent"):
            export_hf(make_model(head_type="linear", n_future=n_future), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_export_run_with_tokenizer(tmp_path, kind):
    tok = BPETokenizer.train(TEXTS, 301) if kind == "bpe" else ByteTokenizer()
    model = make_model(vocab_size=tok.vocab_size)
    run = save_run(tmp_path / "run", model, tok)
    out = export_run(run, tmp_path / "out", "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eos_id
    for text in TEXTS[:3]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id
    assert load_tokenizer(out).encode(TEXTS[2]) == tok.encode(TEXTS[2])  # our loader reads it too
    x = tokens(tok.vocab_size)
    with torch.no_grad():
        assert_same_logits(hf_logits(load_exported(out), x), model(x)[:, :, 0], model, x)


def test_byte_tokenizer_as_hf():
    hf = byte_tokenizer_as_hf()
    text = "naïve\x00\n\t 😀<|endoftext|>"
    assert hf.encode(text, add_special_tokens=False).ids[:-1] == list(text.removesuffix("<|endoftext|>").encode())
    assert hf.encode(text).ids[-1] == 256 and hf.get_vocab_size() == 257
    assert hf.decode(list("ab ç".encode())) == "ab ç"


@pytest.mark.parametrize("head_type", ["parallel", "causal", "anticausal", "mtp"])
def test_export_carries_every_head_and_imports_back_bitwise(tmp_path, head_type):
    """transformers loads the folder as the next-token model; our import reads every head back bitwise."""
    tok = ByteTokenizer()
    model = make_model(head_type=head_type, vocab_size=tok.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    run = save_run(tmp_path / "run", model, tok)
    (run / "tree.json").write_text(json.dumps({"paths": [[0], [1], [0, 0]], "size": 4, "depth": 2}))
    out = export_run(run, tmp_path / "out", "hf")
    x = tokens(tok.vocab_size)
    with torch.no_grad():
        assert_same_logits(hf_logits(load_exported(out), x), model(x)[:, :, 0], model, x)
    back, _ = import_hf(out)
    assert back.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    import multitoken

    lm = multitoken.load(out)
    assert lm.tree is not None and lm.tree.size == 4
    prompt = "".join(chr(t) for t in range(40, 50))
    assert (
        lm.generate(prompt, max_new_tokens=8).token_ids
        == lm.generate(prompt, max_new_tokens=8, decoding="plain").token_ids
    )
    with pytest.raises(UserError, match="carries 3 heads"):
        import_hf(out, n_future=2)
    imported = import_to_run(out, tmp_path / "imported")  # `multitoken import` keeps the heads and the tree
    assert load_run(imported).model.cfg == model.cfg and (imported / "tree.json").is_file()


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chat_template_and_special_tokens_travel_and_match_transformers(tmp_path):
    hf = BPETokenizer.train(TEXTS, 301)._hf
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = BPETokenizer(hf, "<|endoftext|>", CHATML)
    model = make_model(vocab_size=tok.vocab_size, n_future=2)
    run = save_run(tmp_path / "run", model, tok)
    out = export_run(run, tmp_path / "out", "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)  # transformers 4 or 5
    for ours in (load_tokenizer(run), load_tokenizer(out), import_hf(out)[1]):
        assert ours.chat_template == CHATML
        assert ours.encode(ours.apply_chat_template(messages), special_tokens=True) == expected
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tok(text, special_tokens=True) == theirs(text, add_special_tokens=False)["input_ids"]
    assert len(tok(text)) > len(tok(text, special_tokens=True))  # as plain text, the markers are several tokens
    import multitoken

    reply = multitoken.load(out).generate(messages, max_new_tokens=4, stop_at_eos=False)
    assert reply.prompt.endswith("<|im_start|>assistant\n") and len(reply.token_ids) == 4


def test_bf16_in_bf16_out_and_dtype_chosen_on_import_and_export(tmp_path):
    src, hf = random_llama(tmp_path / "a")
    hf.to(torch.bfloat16).save_pretrained(src)  # a bf16 checkpoint, as most hub models are
    source = read_safetensors(src)
    run = import_to_run(src, tmp_path / "run")
    stored = load_file(latest_checkpoint(run) / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # not doubled to fp32
    out = export_run(run, tmp_path / "out")
    exported = read_safetensors(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert set(exported) == set(source) and all(torch.equal(exported[k], source[k]) for k in source)  # bitwise
    as_fp32 = export_run(run, tmp_path / "out32", dtype=torch.float32)
    assert {t.dtype for t in read_safetensors(as_fp32).values()} == {torch.float32}
    run32 = import_to_run(src, tmp_path / "run32", dtype=torch.float32)
    assert {t.dtype for t in load_file(latest_checkpoint(run32) / "model.safetensors").values()} == {torch.float32}
    assert multitoken.load(out).model.tok_embeddings.weight.dtype == torch.float32  # decoding default: fp32
    assert multitoken.load(out, dtype="bf16").model.tok_embeddings.weight.dtype == torch.bfloat16
