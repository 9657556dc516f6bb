"""Few-row kernel choices (multitoken/kernels.py): the rule over given timings, the measurement's order, the
cache and the environment, and that no choice changes a result beyond rounding."""

import json

import pytest
import torch
import torch.nn.functional as F

from multitoken import kernels
from multitoken.errors import UserError
from multitoken.kernels import NEVER, Choice, choose
from multitoken.model import Linear
from tests.conftest import make_model
from tests.tolerance import twin_atol

STATIONARY = Choice(bound=64, one_row=True)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No choices in use or remembered, the cache in a temporary directory, no override."""
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_known", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(kernels.CACHE_ENV, raising=False)
    monkeypatch.delenv(kernels.FEW_ROWS_ENV, raising=False)
    return tmp_path / "multitoken" / "kernels.json"


@pytest.fixture
def calibrations(monkeypatch):
    """Replace the measurement by a fixed answer (bound 8, one row as two columns) and count the calls."""
    calls = []

    def fake(weight_groups):
        calls.append(sorted(weight_groups, key=str))
        return dict.fromkeys(weight_groups, Choice(bound=8, one_row=True)), True

    monkeypatch.setattr(kernels, "calibrate", fake)
    return calls


def weights(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype) for s in shapes]


# --------------------------------------------------------------------------------------------------
# the rule, over given timings


def times(ratios):
    """Timings with F.linear taking `ratio` times as long as the weight-stationary path."""
    return {rows: (1.0, ratio) for rows, ratio in ratios.items()}


def test_choose_takes_the_prefix_that_wins_by_the_margin():
    assert choose(times({1: 1.2, 2: 2.0, 3: 1.5, 4: 1.2, 8: 1.1, 12: 0.9, 16: 1.5, 32: 2.0})) == Choice(8, True)
    # A win of 2 % is within the 5 % margin: a loss. Past the first loss, nothing counts.
    assert choose(times({1: 1.02, 2: 1.5, 3: 1.02, 4: 2.0})) == Choice(2, False)
    assert choose(times({1: 1.5, 2: 0.5, 3: 3.0})) == Choice(0, True)
    assert choose(times({1: 0.5, 2: 1.5, 64: 1.5})) == Choice(64, False)  # unmeasured counts between wins: won
    assert choose(times({2: 1.5, 4: 1.5})) == Choice(4, False)  # one row unmeasured: not taken
    assert choose({}) == NEVER
    assert choose(times({1: 1.08, 2: 1.08}), margin=0.1) == NEVER
    assert choose(times({1: 1.08, 2: 1.08}), margin=0.0) == Choice(2, True)


def test_choice_takes():
    c = Choice(bound=6, one_row=False)
    assert [c.takes(n) for n in range(8)] == [False, False, True, True, True, True, True, False]
    assert Choice(bound=0, one_row=True).takes(1) and not Choice(bound=0, one_row=True).takes(2)
    assert not any(NEVER.takes(n) for n in range(70))


# --------------------------------------------------------------------------------------------------
# the measurement


def test_measure_alternates_rounds_and_stops_a_shape_at_its_first_loss(monkeypatch):
    # A fake clock: the weight-stationary path costs 1 per pass; F.linear 2 below 8 rows for the narrow shape
    # (which then loses at 8) and always for the wide one. Every row count gets `rounds` passes per path,
    # each path first in half of the rounds.
    log = []

    def fake_seconds(product, x, ws):
        stationary = product is kernels.weight_stationary
        log.append((x.shape[1], x.shape[0], "stationary" if stationary else "F.linear"))
        if stationary:
            return 1.0
        return 2.0 if x.shape[1] == 16 or x.shape[0] < 8 else 1.0

    monkeypatch.setattr(kernels, "_seconds", fake_seconds)
    narrow, wide = (torch.float32, 4, 8), (torch.float32, 4, 16)
    ws = {narrow: weights((4, 8)), wide: weights((4, 16))}
    timings, finished = kernels.measure(ws, rows=(1, 2, 8, 12), rounds=4, budget_s=60)
    assert finished
    assert sorted(timings[narrow]) == [1, 2, 8] and sorted(timings[wide]) == [1, 2, 8, 12]
    assert choose(timings[narrow]) == Choice(2, True) and choose(timings[wide]) == Choice(12, True)
    firsts = [path for (_, rows, path) in log[::4] if rows == 1]  # each round: path A on 2 shapes, then path B
    assert firsts == ["stationary", "F.linear", "stationary", "F.linear"]
    for shape, rows in [(8, 1), (8, 8), (16, 12)]:
        assert sum(1 for e in log if e[:2] == (shape, rows)) == 2 * 4
    assert not any(e[:2] == (8, 12) for e in log)


def test_measure_really_times_both_paths():
    ws = {
        (torch.float32, 24, 8): weights((24, 8), (24, 8)),
        (torch.bfloat16, 5, 8): weights((5, 8), dtype=torch.bfloat16),
    }
    timings, finished = kernels.measure(ws, rows=(1, 2), rounds=2, budget_s=60)
    assert finished and set(timings) == set(ws)
    assert all(1 in t and all(s > 0 for pair in t.values() for s in pair) for t in timings.values())


def test_a_measurement_out_of_time_serves_this_process_only(fresh, monkeypatch):
    ws = {(torch.float32, 4, 8): weights((4, 8))}
    assert kernels.measure(ws, budget_s=-1) == ({(torch.float32, 4, 8): {}}, False)  # nothing measured: no win
    monkeypatch.setattr(kernels, "BUDGET_S", -1.0)  # already past: no row count starts
    assert kernels.prepare(ws[torch.float32, 4, 8]) == {(torch.float32, 4, 8): NEVER}
    assert not fresh.exists()


def test_sample_keeps_the_weight_width_and_bounds_the_bytes():
    big, small = torch.empty(2 * kernels.SAMPLE_BYTES // (4 * 64), 64), torch.empty(3, 64)
    sample = kernels._sample([big, small])
    assert [w.shape[1] for w in sample] == [64]  # the big one fills the budget alone, as its leading rows
    assert sample[0].nbytes <= kernels.SAMPLE_BYTES and sample[0].data_ptr() == big.data_ptr()
    assert [w.shape for w in kernels._sample([small, small])] == [small.shape, small.shape]


def test_groups_by_dtype_and_shape_with_tied_weights_once():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    h = torch.randn(4, 8, dtype=torch.bfloat16)
    got = kernels.groups([a, b, a, h, torch.randn(3)])  # a twice (tied), and a norm's vector
    assert list(got) == [(torch.float32, 4, 8), (torch.bfloat16, 4, 8)]
    assert [[id(w) for w in ws] for ws in got.values()] == [[id(a), id(b)], [id(h)]]


# --------------------------------------------------------------------------------------------------
# the cache and the environment


def test_cache_hit_in_a_new_process(fresh, calibrations):
    ws = weights((4, 8), (8, 4))
    chosen = kernels.prepare(ws)
    assert len(calibrations) == 1 and fresh.exists()
    assert kernels.choice_for((4, 8), torch.float32) == Choice(8, True)
    kernels._known.clear()  # as a new process: only the file remembers
    kernels._chosen.clear()
    assert kernels.prepare(ws) == chosen and len(calibrations) == 1
    assert kernels.choice_for((8, 4), torch.float32) == Choice(8, True)
    assert kernels.prepare(ws) == chosen and len(calibrations) == 1  # and in the same process, from memory


def test_the_key_follows_threads_dtype_shapes_and_cpu(fresh, calibrations, monkeypatch):
    ws = weights((4, 8))
    kernels.prepare(ws)
    torch.set_num_threads(2)  # the conftest fixture restores one thread
    kernels.prepare(ws)
    assert len(calibrations) == 2
    assert len(json.loads(fresh.read_text())["entries"]) == 2
    base = kernels.cache_key(kernels.groups(ws))
    assert base != kernels.cache_key(kernels.groups(weights((4, 8), dtype=torch.bfloat16)))
    assert base != kernels.cache_key(kernels.groups(weights((4, 8), (4, 9))))
    monkeypatch.setattr(kernels, "cpu_model", lambda: "Another CPU")
    assert base != kernels.cache_key(kernels.groups(ws))


def test_choices_are_kept_per_thread_count(fresh):
    kernels.use({(torch.float32, 4, 8): STATIONARY})
    assert kernels.choice_for((4, 8), torch.float32) == STATIONARY
    torch.set_num_threads(2)
    assert kernels.choice_for((4, 8), torch.float32) == NEVER  # not measured at 2 threads: F.linear
    assert kernels.choice_for((4, 8), torch.bfloat16) == NEVER and kernels.choice_for((8, 4), torch.float32) == NEVER


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff not json",
        b'{"format": 1, "entries": ',
        b"[]",
        b'{"format": 99, "entries": {}}',
        b'{"format": 1, "entries": []}',
        "KEY_WITH_A_BAD_ENTRY",
    ],
)
def test_a_corrupt_cache_is_measured_again_and_rewritten(fresh, calibrations, content):
    ws = weights((4, 8))
    if content == "KEY_WITH_A_BAD_ENTRY":  # the right key, a malformed value
        key = kernels.cache_key(kernels.groups(ws))
        content = json.dumps({"format": 1, "entries": {key: {"float32 4x8": {"bound": "8", "one_row": 1}}}}).encode()
    fresh.parent.mkdir(parents=True)
    fresh.write_bytes(content)
    assert kernels.prepare(ws) == {(torch.float32, 4, 8): Choice(8, True)}
    assert len(calibrations) == 1
    data = json.loads(fresh.read_text())
    assert data["format"] == kernels.FORMAT
    assert list(data["entries"].values()) == [{"float32 4x8": {"bound": 8, "one_row": True}}]


def test_an_unwritable_cache_warns_and_decoding_goes_on(fresh, calibrations):
    fresh.parent.parent.mkdir(parents=True, exist_ok=True)
    fresh.parent.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write"):
        kernels.prepare(weights((4, 8)))
    assert kernels.choice_for((4, 8), torch.float32) == Choice(8, True)


def test_cache_off_measures_every_process_and_writes_nothing(fresh, calibrations, monkeypatch):
    monkeypatch.setenv(kernels.CACHE_ENV, "off")
    ws = weights((4, 8))
    kernels.prepare(ws)
    kernels._known.clear()
    kernels.prepare(ws)
    assert len(calibrations) == 2 and not fresh.parent.exists()


def test_xdg_cache_home_and_its_fallback(fresh, monkeypatch):
    assert kernels.cache_path() == fresh
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says to ignore a relative path
    assert kernels.cache_path() == kernels.Path.home() / ".cache" / "multitoken" / "kernels.json"


@pytest.mark.parametrize("value, expected", [("0", NEVER), ("5", Choice(5, True)), ("1", Choice(1, True))])
def test_the_override_decides_alone(fresh, calibrations, monkeypatch, value, expected):
    monkeypatch.setenv(kernels.FEW_ROWS_ENV, value)
    ws = weights((4, 8), (8, 4))
    assert kernels.prepare(ws) == {(torch.float32, 4, 8): expected, (torch.float32, 8, 4): expected}
    assert kernels.choice_for((8, 4), torch.float32) == expected
    assert not calibrations and not fresh.exists()


@pytest.mark.parametrize(("name", "value"), [("FEW_ROWS_ENV", "eight"), ("FEW_ROWS_ENV", "-1"), ("CACHE_ENV", "of")])
def test_bad_environment_values_are_one_line_user_errors(fresh, monkeypatch, name, value):
    monkeypatch.setenv(getattr(kernels, name), value)
    with pytest.raises(UserError, match=getattr(kernels, name)) as info:
        kernels.prepare(weights((4, 8)))
    assert "\n" not in str(info.value)


def test_other_devices_are_never_measured(fresh, calibrations):
    assert kernels.prepare([torch.randn(4, 8, device="meta")]) == {} and not calibrations


def test_a_real_measurement_lands_in_the_cache(fresh, monkeypatch):
    # The whole way, with real timings of a tiny model: whatever they say, the file holds valid choices for
    # every shape of the model's linear layers. (A budget that a busy machine cannot exhaust.)
    monkeypatch.setattr(kernels, "BUDGET_S", 60.0)
    model = make_model()
    chosen = kernels.prepare(m.weight for m in model.modules() if isinstance(m, Linear))
    assert set(chosen) == {(torch.float32, *m.weight.shape) for m in model.modules() if isinstance(m, Linear)}
    assert all(0 <= c.bound <= max(kernels.ROWS) for c in chosen.values())
    assert kernels._parse(json.loads(fresh.read_text())["entries"][kernels.cache_key(chosen)], chosen) == chosen


# --------------------------------------------------------------------------------------------------
# results: the same, whichever path runs


def decode_logits(model, prompt, block, calls):
    """Head logits of one decode forward over `block` (B, T) after `prompt` (B, P), with a fresh cache."""
    cache = model.make_cache(prompt.shape[0])  # where decoding chooses its kernels
    B, P = prompt.shape
    model(prompt, positions=torch.arange(P).expand(B, P), cache=cache)
    before = len(calls)
    out = model(block, positions=P + torch.arange(block.shape[1]).expand(B, -1), cache=cache)
    return out, len(calls) - before


@pytest.mark.parametrize("B, T", [(1, 1), (1, 2), (1, 3), (2, 4), (1, 12), (3, 7), (1, 64)])
def test_decode_forwards_agree_with_and_without_the_weight_stationary_path(fresh, monkeypatch, B, T):
    calls = []
    real = kernels.weight_stationary
    monkeypatch.setattr(kernels, "weight_stationary", lambda x, w: calls.append(1) or real(x, w))
    model = make_model(vocab_size=97, dim=48, n_heads=4, n_kv_heads=2)
    torch.manual_seed(1)
    prompt, block = torch.randint(0, 97, (B, 5)), torch.randint(0, 97, (B, T))
    monkeypatch.setenv(kernels.FEW_ROWS_ENV, "64")
    fast, n_fast = decode_logits(model, prompt, block, calls)
    monkeypatch.setenv(kernels.FEW_ROWS_ENV, "0")
    slow, n_slow = decode_logits(model, prompt, block, calls)
    # Every product of the block took the weight-stationary path in the first run and none in the second.
    n_products = len([m for m in model.modules() if isinstance(m, Linear)]) + 2  # the unembedding serves 3 heads
    assert (n_fast, n_slow) == (n_products, 0)
    atol = twin_atol(lambda m: decode_logits(m, prompt, block, [])[0], model)
    torch.testing.assert_close(fast, slow, rtol=0, atol=atol)


def test_draft_vocabulary_rows_follow_the_unembedding_choice(fresh, monkeypatch):
    model = make_model(vocab_size=97)
    rows = model.output.weight[torch.tensor([3, 5, 8, 13])]  # (4, D): not a shape any layer has
    z = torch.randn(2, 3, model.cfg.dim)
    kernels.use({(torch.float32, 97, model.cfg.dim): STATIONARY})
    calls = []
    real = kernels.weight_stationary
    monkeypatch.setattr(kernels, "weight_stationary", lambda x, w: calls.append(w.shape) or real(x, w))
    with torch.no_grad():
        got = model.unembed(z, rows)
        want = F.linear(model.norm(z), rows)
    assert calls == [rows.shape]
    atol = twin_atol(lambda m: F.linear(m.norm(z.to(m.output.weight.dtype)), m.output.weight[[3, 5, 8, 13]]), model)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
