"""Polynomial arithmetic in F7[X]/(X^5) (paper §4.2): does multi-token prediction help algorithmic reasoning?

Expressions combine polynomials with unary negation, addition, multiplication and composition; an
expression with m operations is trained for m in 1..5 and tested in domain (m <= 5) and out of domain
(m = 6..10). The model reads the expression, a separator, and must produce the result's 5 coefficients;
the metric is exact match of greedy decoding by m. The paper finds multi-token prediction (n=2, 4) ahead
of n=1 in and out of domain, by more than tripling the model size gives.

Polynomials are coefficient tuples (c0, ..., c4) in 0..6. Composition p∘q is taken on p's canonical
representative (degree < 5): sum_i p_i q^i mod (7, X^5). (Composition is not compatible with the ideal
(X^5) when q(0) != 0, so the representative has to be fixed; degree < 5 is the only natural choice.)

Tokens: digits 0..6, the four operators, `=` and `<eos>`. Expressions are written in prefix (Polish)
notation with every literal exactly 5 digit tokens, so they parse without brackets.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.config import TrainConfig, param_count, preset
from multitoken.experiments.common import (
    default_command,
    line_plot,
    markdown_table,
    start_run,
    train_on_tokens,
    write_report,
)
from multitoken.generate.autoregressive import generate
from multitoken.model import MultiTokenModel

NAME = "polynomials"
P = 7  # the field F7
D = 5  # the quotient by X^5: 5 coefficients
OPS = ("neg", "add", "mul", "comp")
VOCAB = [str(d) for d in range(P)] + list(OPS) + ["=", "<eos>"]
TOKEN = {w: i for i, w in enumerate(VOCAB)}
EQ, EOS = TOKEN["="], TOKEN["<eos>"]

Poly = tuple[int, ...]
# An expression is ("lit", poly), ("neg", e) or (op, e1, e2) for the binary operators.
Expr = tuple[Any, ...]


# --------------------------------------------------------------------------------------------------
# the ring F7[X]/(X^5)


def poly_neg(p: Poly) -> Poly:
    return tuple((-c) % P for c in p)


def poly_add(p: Poly, q: Poly) -> Poly:
    return tuple((a + b) % P for a, b in zip(p, q, strict=True))


def poly_mul(p: Poly, q: Poly) -> Poly:
    """Product truncated at X^5: terms X^i X^j with i + j >= 5 vanish in the quotient."""
    out = [0] * D
    for i, a in enumerate(p):
        for j, b in enumerate(q[: D - i]):
            out[i + j] += a * b
    return tuple(c % P for c in out)


def poly_comp(p: Poly, q: Poly) -> Poly:
    """p(q(X)) = sum_i p_i q^i mod (7, X^5), by Horner's rule: (((p4 q + p3) q + p2) q + p1) q + p0."""
    out: Poly = (p[D - 1],) + (0,) * (D - 1)
    for c in reversed(p[: D - 1]):
        out = poly_add(poly_mul(out, q), (c,) + (0,) * (D - 1))
    return out


BINARY = {"add": poly_add, "mul": poly_mul, "comp": poly_comp}


def evaluate(expr: Expr) -> Poly:
    """The value of an expression in F7[X]/(X^5)."""
    op = expr[0]
    if op == "lit":
        return expr[1]
    if op == "neg":
        return poly_neg(evaluate(expr[1]))
    return BINARY[op](evaluate(expr[1]), evaluate(expr[2]))


def count_ops(expr: Expr) -> int:
    return 0 if expr[0] == "lit" else 1 + sum(count_ops(e) for e in expr[1:])


def random_expr(rng: random.Random, m: int) -> Expr:
    """An expression with exactly m operations (uniform operator, uniform split of the rest, uniform leaves)."""
    if m == 0:
        return ("lit", tuple(rng.randrange(P) for _ in range(D)))
    op = rng.choice(OPS)
    if op == "neg":
        return ("neg", random_expr(rng, m - 1))
    left = rng.randint(0, m - 1)
    return (op, random_expr(rng, left), random_expr(rng, m - 1 - left))


def to_tokens(expr: Expr) -> list[int]:
    """Prefix notation; a literal is its 5 coefficients c0..c4."""
    if expr[0] == "lit":
        return [TOKEN[str(c)] for c in expr[1]]
    return [TOKEN[expr[0]]] + [t for e in expr[1:] for t in to_tokens(e)]


def poly_str(p: Poly) -> str:
    """Human form, e.g. 3 + 2X + X^4 (0 for the zero polynomial)."""
    terms = [
        (str(c) if i == 0 or c != 1 else "") + ("" if i == 0 else "X" if i == 1 else f"X^{i}")
        for i, c in enumerate(p)
        if c
    ]
    return " + ".join(terms) or "0"


def infix(expr: Expr) -> str:
    """Human form of an expression (∘ is composition)."""
    op = expr[0]
    if op == "lit":
        return f"({poly_str(expr[1])})"
    if op == "neg":
        return f"-{infix(expr[1])}"
    sym = {"add": "+", "mul": "*", "comp": "∘"}[op]
    return f"[{infix(expr[1])} {sym} {infix(expr[2])}]"


def example_tokens(expr: Expr) -> tuple[list[int], list[int]]:
    """(prompt, answer): `<eos> expression =` and the result's 5 coefficient tokens."""
    return [EOS, *to_tokens(expr), EQ], [TOKEN[str(c)] for c in evaluate(expr)]


def training_stream(seed: int, count: int, m_range: tuple[int, int]) -> np.ndarray:
    """`count` examples, m uniform in `m_range`, joined into one stream (each starts with `<eos>`)."""
    rng = random.Random(seed)
    out: list[int] = []
    for _ in range(count):
        prompt, answer = example_tokens(random_expr(rng, rng.randint(*m_range)))
        out += prompt + answer
    return np.asarray(out, dtype=np.int64)


@torch.no_grad()
def exact_match(model: MultiTokenModel, exprs: list[Expr], batch_size: int = 64) -> dict[str, float]:
    """Greedy decoding of the 5 answer tokens: exact-match rate and per-coefficient accuracy."""
    exact, coeff = 0, np.zeros(D)
    for start in range(0, len(exprs), batch_size):
        batch = [example_tokens(e) for e in exprs[start : start + batch_size]]
        out = generate(model, [p for p, _ in batch], D).tokens
        for (_, answer), got in zip(batch, out, strict=True):
            hits = np.array([a == g for a, g in zip(answer, got, strict=True)])
            exact += int(hits.all())
            coeff += hits
    return {"exact_match": exact / len(exprs), "coefficient_accuracy": (coeff / len(exprs)).tolist()}


# --------------------------------------------------------------------------------------------------
# the experiment


@dataclass
class Setting:
    sizes: dict[str, dict[str, Any]]  # label -> preset name and overrides
    n_values: list[int]
    seeds: list[int]
    train_examples: int
    test_per_m: int
    steps: int
    batch_size: int
    context: int
    lr: float


_SMALL = {"preset": "induction-1m", "n_layers": 6}
_LARGE = {"preset": "induction-3m", "n_layers": 7}
SETTINGS = {
    "test": Setting({"S": {"preset": "tiny", "n_layers": 5}}, [1, 2], [0], 2000, 4, 4, 4, 64, 3e-3),
    "quick": Setting({"S": _SMALL, "M": _LARGE}, [1, 2, 4], [0], 50_000, 60, 150, 8, 96, 3e-3),
    "full": Setting(
        {"S": _SMALL, "M": _LARGE, "L": {"preset": "induction-10m"}}, [1, 2, 4], [0, 1], 2_000_000, 500, 20_000,
        64, 128, 1e-3,
    ),  # fmt: skip
}
TEST_M = list(range(1, 11))
TRAIN_M = (1, 5)


def run(
    setting: str = "quick",
    out_dir: Path | None = None,
    command: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train every (size, n, seed), score exact match by number of operations, write the report."""
    s, out_dir, device, t0, commit = start_run(NAME, SETTINGS, setting, out_dir, overrides)
    stream = training_stream(1_000, s.train_examples, TRAIN_M)
    test_rng = random.Random(2_000)  # another seed: test expressions are (almost surely) unseen
    tests = {m: [random_expr(test_rng, m) for _ in range(s.test_per_m)] for m in TEST_M}

    runs: list[dict[str, Any]] = []
    for label, size in s.sizes.items():
        for n in s.n_values:
            for seed in s.seeds:
                model_cfg = preset(size["preset"], n_layers=size.get("n_layers"), n_future=n, vocab_size=len(VOCAB))
                cfg = TrainConfig(
                    batch_size=s.batch_size, context=s.context, max_steps=s.steps, lr=s.lr,
                    warmup_steps=max(1, s.steps // 10), seed=seed, loss_chunk=0,
                )  # fmt: skip
                trained = train_on_tokens(model_cfg, stream, cfg, device=device)
                scores = {m: exact_match(trained.model, exprs) for m, exprs in tests.items()}
                runs.append({
                    "size": label, "n": n, "seed": seed,
                    "non_embedding_params": param_count(model_cfg, embeddings=False),
                    "train_seconds": round(trained.seconds, 1), "tokens_seen": trained.tokens_seen,
                    "final_loss": trained.losses[-1],
                    "exact_match": {m: v["exact_match"] for m, v in scores.items()},
                    "coefficient_accuracy": {m: v["coefficient_accuracy"] for m, v in scores.items()},
                })  # fmt: skip
    seconds = time.perf_counter() - t0
    sections = _report_sections(runs, s, out_dir, tests)
    results = {"settings": s.__dict__, "train_m": TRAIN_M, "test_m": TEST_M, "runs": runs}
    return write_report(
        out_dir, title="Polynomial arithmetic in F7[X]/(X^5) (paper §4.2)", name=NAME, setting=setting,
        command=command or default_command(NAME, setting, out_dir, overrides), seeds=s.seeds, sections=sections,
        results=results, seconds=seconds, commit=commit, device=device,
    )  # fmt: skip


def _mean_over_seeds(runs: list[dict[str, Any]], key: str, m: int) -> float:
    return float(np.mean([r[key][m] for r in runs]))


def _report_sections(
    runs: list[dict[str, Any]], s: Setting, out_dir: Path, tests: dict[int, list[Expr]]
) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, curves, coeff_rows = [], {}, []
    for label in s.sizes:
        for n in s.n_values:
            group = [r for r in runs if r["size"] == label and r["n"] == n]
            em = [_mean_over_seeds(group, "exact_match", m) for m in TEST_M]
            in_dom = float(np.mean([e for m, e in zip(TEST_M, em, strict=True) if m <= TRAIN_M[1]]))
            out_dom = float(np.mean([e for m, e in zip(TEST_M, em, strict=True) if m > TRAIN_M[1]]))
            params = f"{group[0]['non_embedding_params'] / 1e6:.2f}M"
            rows.append([label, params, n, in_dom, out_dom, *em])
            curves[f"{label} ({params}) n={n}"] = (TEST_M, em)
            c1 = np.mean([r["coefficient_accuracy"][1] for r in group], axis=0)
            coeff_rows.append([label, n, *c1.tolist()])
    line_plot(
        out_dir / "exact_match_by_m.png", curves, "operations m (trained on 1..5; 6..10 out of domain)",
        "exact match (greedy, 5 coefficients)", "Polynomial arithmetic: exact match by number of operations",
    )  # fmt: skip
    table = markdown_table(
        ["size", "non-emb. params", "n", "in domain (m<=5)", "out of domain (m>5)", *[f"m={m}" for m in TEST_M]],
        rows,
    )
    coeffs = markdown_table(["size", "n", *[f"X^{i}" for i in range(D)]], coeff_rows)
    example = tests[2][0]
    chance = (1 / P) ** D
    return [
        "## Setup\n\n"
        f"Training expressions: m uniform in {TRAIN_M[0]}..{TRAIN_M[1]} operations ({s.train_examples} examples "
        f"in one stream, loss on every token); test: {s.test_per_m} fresh expressions per m = 1..10. Each model "
        f"has the same total blocks for every n. {s.steps} steps of {s.batch_size} windows x {s.context} tokens, "
        f"AdamW lr {s.lr}. Exact match by chance: {chance:.1e}.\n\n"
        f"Example (m=2): `{infix(example)}` = `{poly_str(evaluate(example))}`; as tokens: "
        f"`{' '.join(VOCAB[t] for t in example_tokens(example)[0] + example_tokens(example)[1])}`",
        "## Exact match by number of operations\n\n" + table,
        "![exact match by m](exact_match_by_m.png)",
        "## Per-coefficient accuracy at m=1\n\nThe constant term X^0 depends only on the operands' constant "
        "terms, so it is the easiest coefficient; X^4 needs the most arithmetic.\n\n" + coeffs,
    ]
