import pytest
import torch

from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.common import prefill
from multitoken.generate.sampling import SamplingConfig, probabilities, sample
from tests.conftest import make_model
from tests.tolerance import twin_atol


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The slow obvious twin: a full forward over the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), heads=[0])
        seq.append(int(logits[0, -1, 0].argmax()))
    return seq[len(prompt) :]


def test_cached_greedy_equals_full_forward_greedy():
    model = make_model()
    prompts = [[1, 2, 3], [5] * 11, [7, 8]]
    result = generate(model, prompts, max_new_tokens=15)
    for p, out in zip(prompts, result.tokens, strict=True):
        assert out == naive_greedy(model, p, 15)
    assert result.stop_reasons == ["length"] * 3
    assert result.n_forwards == 15


@pytest.mark.parametrize("head_type", ["parallel", "causal", "anticausal", "linear"])
def test_prefill_logits_equal_the_full_forward_at_each_last_position(head_type):
    # prefill unembeds only each prompt's last position; the full forward unembeds every one.
    model = make_model(seed=2, head_type=head_type)
    prompts = [[5, 7, 1, 9, 2, 2, 8], [3], [4, 4, 6]]
    cache = model.make_cache(len(prompts))
    logits, lengths = prefill(model, cache, prompts, heads=[0, 1, 2])
    assert lengths.tolist() == [7, 1, 3] and logits.shape == (3, 3, model.cfg.vocab_size)
    for b, p in enumerate(prompts):
        full = model(torch.tensor([p]))[0, -1]  # (k, V), no cache
        atol = twin_atol(lambda m, p=p: m(torch.tensor([p]))[0, -1], model)
        torch.testing.assert_close(logits[b], full, rtol=0, atol=atol)


def test_batch_equals_each_alone():
    model = make_model(head_type="causal")
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    batch = generate(model, prompts, max_new_tokens=10).tokens
    assert batch == [generate(model, [p], max_new_tokens=10).tokens[0] for p in prompts]


def test_stops_cleanly_at_context_limit():
    model = make_model(max_seq_len=20)
    result = generate(model, [[1] * 15, [2] * 3], max_new_tokens=50)
    assert [len(t) for t in result.tokens] == [5, 17]  # a full sequence has exactly 20 tokens
    assert result.stop_reasons == ["context", "context"]
    assert result.tokens[0] == naive_greedy(model, [1] * 15, 5)


def test_stops_at_eos():
    model = make_model()
    first = generate(model, [[1, 2, 3]], max_new_tokens=8).tokens[0]
    eos = first[3]
    result = generate(model, [[1, 2, 3]], max_new_tokens=8, eos_id=eos)
    assert result.tokens[0] == first[: first.index(eos) + 1]
    assert result.stop_reasons == ["eos"]


def test_seeded_sampling_is_reproducible():
    model = make_model()
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
    runs = [
        generate(model, [[1, 2]], 12, sampling=cfg, generator=torch.Generator().manual_seed(3)).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "prompts, message",
    [([[]], "prompt 0 is empty"), ([[1] * 96], "context is 96"), ([], "no prompts")],
)
def test_bad_prompts(prompts, message):
    with pytest.raises(UserError, match=message):
        generate(make_model(), prompts, 4)


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=3))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert probabilities(logits, SamplingConfig()).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert sample(logits, SamplingConfig()).item() == 0


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling(kwargs):
    with pytest.raises(UserError):
        SamplingConfig(**kwargs)
