"""Experiments: the ground truths they score against, and each one end to end at its `test` setting."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from multitoken.errors import UserError
from multitoken.experiments import polynomials as poly
from multitoken.experiments.common import git_commit, machine_info, markdown_table
from multitoken.experiments.induction import (
    COPY_LENGTH,
    FIRST_PARTS,
    SECOND_PARTS,
    WordTokenizer,
    copy_accuracy,
    copy_sequences,
    generate_stories,
)

# --------------------------------------------------------------------------------------------------
# polynomial arithmetic in F7[X]/(X^5)


def test_ring_operations_by_hand() -> None:
    one_plus_x = (1, 1, 0, 0, 0)
    assert poly.poly_add((6, 1, 2, 3, 4), (1, 6, 5, 4, 3)) == (0, 0, 0, 0, 0)
    assert poly.poly_neg((0, 1, 2, 3, 6)) == (0, 6, 5, 4, 1)
    assert poly.poly_mul(one_plus_x, one_plus_x) == (1, 2, 1, 0, 0)
    assert poly.poly_mul((0, 0, 0, 1, 0), (0, 0, 0, 1, 0)) == (0, 0, 0, 0, 0)  # X^3 X^3 = X^6 = 0
    assert poly.poly_mul((0, 0, 1, 0, 0), (3, 0, 0, 5, 2)) == (0, 0, 3, 0, 0)  # X^2 (3 + 5X^3 + 2X^4) = 3X^2
    # (1 + X)^4 = 1 + 4X + 6X^2 + 4X^3 + X^4
    assert poly.poly_mul(poly.poly_mul(one_plus_x, one_plus_x), poly.poly_mul(one_plus_x, one_plus_x)) == (
        1, 4, 6, 4, 1,
    )  # fmt: skip


def test_composition_by_hand() -> None:
    assert poly.poly_comp((0, 0, 1, 0, 0), (1, 1, 0, 0, 0)) == (1, 2, 1, 0, 0)  # X^2 ∘ (1 + X)
    assert poly.poly_comp((0, 0, 0, 0, 1), (1, 1, 0, 0, 0)) == (1, 4, 6, 4, 1)  # X^4 ∘ (1 + X)
    assert poly.poly_comp((3, 1, 0, 0, 0), (0, 2, 0, 0, 0)) == (3, 2, 0, 0, 0)  # (3 + X) ∘ 2X
    assert poly.poly_comp((0, 0, 1, 0, 0), (0, 0, 0, 1, 0)) == (0, 0, 0, 0, 0)  # X^2 ∘ X^3 = X^6 = 0
    # (X + X^4) ∘ (X - 1) = (X-1)^4 + (X-1) = X^4 - 4X^3 + 6X^2 - 3X = (0, 4, 6, 3, 1) mod 7
    assert poly.poly_comp((0, 1, 0, 0, 1), (6, 1, 0, 0, 0)) == (0, 4, 6, 3, 1)
    # a constant polynomial composed with anything stays itself; anything composed with X is itself
    assert poly.poly_comp((5, 0, 0, 0, 0), (2, 3, 4, 5, 6)) == (5, 0, 0, 0, 0)
    assert poly.poly_comp((2, 3, 4, 5, 6), (0, 1, 0, 0, 0)) == (2, 3, 4, 5, 6)
    # p ∘ c for a constant c is the constant p(c): 1 + 2*3 + 3*9 + 4*27 + 5*81 = 547 = 1 mod 7
    assert poly.poly_comp((1, 2, 3, 4, 5), (3, 0, 0, 0, 0)) == (547 % 7, 0, 0, 0, 0)


def _z_mul(a: list[int], b: list[int]) -> list[int]:
    """Untruncated product in Z[X]: an independent oracle with no modular reduction inside."""
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _z_eval(expr: poly.Expr) -> list[int]:
    """An expression in Z[X], reducing only where the definition forces it: p's representative in p ∘ q."""
    op = expr[0]
    if op == "lit":
        return list(expr[1])
    if op == "neg":
        return [-c for c in _z_eval(expr[1])]
    a, b = _z_eval(expr[1]), _z_eval(expr[2])
    if op == "add":
        n = max(len(a), len(b))
        return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
    if op == "mul":
        return _z_mul(a, b)
    rep = [c % 7 for c in a[:5]]  # p's canonical representative (degree < 5) in F7[X]/(X^5)
    total, power = [0], [1]
    for c in rep:
        total = [(total[i] if i < len(total) else 0) + c * (power[i] if i < len(power) else 0)
                 for i in range(max(len(total), len(power)))]  # fmt: skip
        power = _z_mul(power, b)
    return total


def _reduce(z: list[int]) -> tuple[int, ...]:
    return tuple((z[i] if i < len(z) else 0) % 7 for i in range(5))


def test_evaluator_matches_untruncated_integer_arithmetic() -> None:
    rng = random.Random(0)
    for _ in range(300):
        expr = poly.random_expr(rng, rng.randint(1, 7))
        assert poly.evaluate(expr) == _reduce(_z_eval(expr)), poly.infix(expr)


def _parse(tokens: list[int]) -> tuple[poly.Expr, list[int]]:
    word = poly.VOCAB[tokens[0]]
    if word == "neg":
        child, rest = _parse(tokens[1:])
        return ("neg", child), rest
    if word in poly.BINARY:
        left, rest = _parse(tokens[1:])
        right, rest = _parse(rest)
        return (word, left, right), rest
    return ("lit", tuple(int(poly.VOCAB[t]) for t in tokens[:5])), tokens[5:]


def test_expressions_have_m_operations_and_parse_back() -> None:
    rng = random.Random(1)
    for m in range(0, 11):
        for _ in range(20):
            expr = poly.random_expr(rng, m)
            assert poly.count_ops(expr) == m
            parsed, rest = _parse(poly.to_tokens(expr))
            assert parsed == expr and rest == []
    prompt, answer = poly.example_tokens(("add", ("lit", (1, 2, 3, 4, 5)), ("lit", (6, 6, 6, 6, 6))))
    assert prompt[0] == poly.EOS and prompt[-1] == poly.EQ
    assert [poly.VOCAB[t] for t in answer] == ["0", "1", "2", "3", "4"]


def test_training_stream_is_seeded() -> None:
    a, b = poly.training_stream(3, 50, (1, 5)), poly.training_stream(3, 50, (1, 5))
    assert (a == b).all() and (a[:1000] != poly.training_stream(4, 50, (1, 5))[:1000]).any()


# --------------------------------------------------------------------------------------------------
# induction stories


def test_names_are_two_tokens_and_later_mentions_are_marked() -> None:
    tok = WordTokenizer()
    stories = generate_stories(5, 50, tok)
    assert [s.ids for s in stories] == [s.ids for s in generate_stories(5, 50, tok)]  # seeded
    first_ids = {tok.stoi[w] for w in FIRST_PARTS}
    second_ids = {tok.stoi[w] for w in SECOND_PARTS}
    for s in stories:
        names: dict[int, int] = {}
        for j, t in enumerate(s.ids):
            if t in first_ids:
                assert s.ids[j + 1] in second_ids  # every name is exactly first part + second part
                assert names.setdefault(t, s.ids[j + 1]) == s.ids[j + 1]  # a first part names one character
                assert (j in s.later_mentions) != (j in s.first_mentions)
            else:
                assert j not in s.later_mentions and j not in s.first_mentions
        for j in s.later_mentions:
            assert s.ids[j] in s.ids[:j]  # the name was seen before
        assert len(s.first_mentions) == len(names)


class NextTokenStub(torch.nn.Module):
    """A 'model' whose head 1 says token x[t + shift] at position t (shift 1: always right)."""

    def __init__(self, vocab_size: int, shift: int) -> None:
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(vocab_size, 1)
        self.vocab_size, self.shift = vocab_size, shift

    def forward(self, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.roll(x, -self.shift, 1), self.vocab_size).float()[:, :, None]


def test_copy_control_sequences_and_metric() -> None:
    tok = WordTokenizer()
    seqs = copy_sequences(0, 50, tok.vocab_size, tok.eos_id)
    assert seqs.shape == (50, 2 * COPY_LENGTH + 1) and (seqs == copy_sequences(0, 50, tok.vocab_size, tok.eos_id)).all()
    assert (seqs[:, 0] == tok.eos_id).all() and (seqs[:, 1:] != tok.eos_id).all()
    assert (seqs[:, 1 : COPY_LENGTH + 1] == seqs[:, COPY_LENGTH + 1 :]).all()
    assert len(np.unique(seqs[:, 1:])) > tok.vocab_size // 2  # drawn over the vocabulary
    assert copy_accuracy(NextTokenStub(tok.vocab_size, 1), seqs)["copy_accuracy"] == 1.0
    assert copy_accuracy(NextTokenStub(tok.vocab_size, 0), seqs)["copy_accuracy"] < 0.05  # repeats its input


# --------------------------------------------------------------------------------------------------
# shared helpers and every experiment end to end (test settings: seconds each)


def test_markdown_table_and_provenance() -> None:
    assert markdown_table(["a", "b"], [[1, 0.5]]).splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 0.500 |"]
    info = machine_info()
    assert info["torch"] and info["cpu"]
    assert git_commit() is None or len(git_commit().split("+")[0]) == 40


def test_overrides_round_trip_through_the_recorded_command() -> None:
    import shlex

    from multitoken.experiments.common import default_command, parse_overrides, resolve_setting
    from multitoken.experiments.selfspec import SETTINGS

    overrides = {"steps": 2000, "seeds": [0, 1], "lr": 0.001, "n_source_files": None}
    command = default_command("selfspec", "cpu", Path("docs/results/x"), overrides)
    assert command.startswith("multitoken experiment selfspec --out docs/results/x --set steps=2000")
    argv = shlex.split(command)
    assert parse_overrides([argv[i + 1] for i, a in enumerate(argv) if a == "--set"]) == overrides
    s = resolve_setting(SETTINGS, "quick", {"lr": 1})  # an int where a float goes is fine; quick is cpu
    assert s.lr == 1 and s.steps == SETTINGS["cpu"].steps
    with pytest.raises(UserError, match="seeds must be like"):
        resolve_setting(SETTINGS, "cpu", {"seeds": 3})
    with pytest.raises(UserError, match="unknown setting"):
        resolve_setting(SETTINGS, "fast", None)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine a descheduled thread stalls
    every parallel op: one thread keeps these tests within seconds of CPU time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["induction", "polynomials", "selfspec", "heads_used", "head_variants"])
def test_experiment_writes_report(name: str, tmp_path, one_thread) -> None:
    from multitoken.experiments import run_experiment

    doc = run_experiment(name, "test", tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == name == doc["experiment"]
    for needed in ("command:", "git commit:", "machine:", "torch", "seeds:", "| --- |"):
        assert needed in report
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(f"]({p.name})" in report for p in pngs)
    if name == "heads_used":  # rows k = 1..4 for both kinds of prompt, at batch B and 1, every output exact
        rows = doc["decoding"]["seed=0"]
        assert set(rows) == {"code", "text", "code (batch 1)", "text (batch 1)"}
        assert all(list(r) == ["1", "2", "3", "4"] for r in rows.values())
        assert all(x["exact"] == 1.0 for r in rows.values() for x in r.values())
    # two seeds in the test setting: every comparison gets a verdict by the rule
    assert doc["comparisons"] and "## Verdict" in report
    assert all(c["verdict"] in ("reproduced", "refuted", "undecided") for c in doc["comparisons"])
    if name == "selfspec":  # batch 1 timed as its own rows beside the batch
        rows = doc["decoding"]["n=8 seed=0"]
        assert "plain (batch 1)" in rows and "chain k=8 (batch 1)" in rows and "chain k=8" in rows
    if name == "induction":  # its test setting runs the copy control too
        assert "## Control: repeated random strings" in report and (tmp_path / "copy_control.png").exists()


def test_head_variants_split_by_kind_merge_into_one_report(tmp_path, one_thread) -> None:
    from multitoken.experiments import head_variants, run_experiment

    run_experiment("head_variants", "test", tmp_path / "a", overrides={"head_types": ["parallel", "causal"]})
    run_experiment("head_variants", "test", tmp_path / "b", overrides={"head_types": ["linear"]})
    doc = head_variants.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m", "multitoken experiment head_variants")
    assert [c["comparison"] for c in doc["comparisons"]] == ["parallel vs causal", "parallel vs linear"]
    part = json.loads((tmp_path / "a" / "results.json").read_text())
    assert doc["runs"][: len(part["runs"])] == part["runs"]
    assert "## Verdict" in (tmp_path / "m" / "report.md").read_text()
    run_experiment("head_variants", "test", tmp_path / "c", overrides={"head_types": ["linear"], "steps": 2})
    with pytest.raises(UserError, match="different settings"):
        head_variants.merge([tmp_path / "a", tmp_path / "c"], tmp_path / "m2", "x")
