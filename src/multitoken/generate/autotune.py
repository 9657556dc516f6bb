"""Fitting decoding to a model and a text: the draft tree (and draft vocabulary) behind `multitoken calibrate`
and `MultiTokenLM.calibrate`.

The tree comes from a calibration (calibration.py) on the text decoding will read (`on="generated"`: the
model's own continuations of prompts from the text; `on="data"`: the text itself), with either a fixed node
budget or `budget="auto"`: each candidate tree's decoding step timed on this machine, the fastest expected
one kept (`choose_tree_by_speed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from multitoken.errors import UserError
from multitoken.eval.heldout import windows_tensor
from multitoken.generate.bench import choose_tree_by_speed
from multitoken.generate.calibration import build_tree, calibrate, calibrate_decoding
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.tree import Calibration, Tree
from multitoken.model import MultiTokenModel

AUTO_BUDGETS = (2, 3, 4, 6, 8, 12, 16, 24, 32)  # the tree sizes `budget="auto"` times ...
AUTO_TOKENS = 48  # ... decoding this many tokens (less 16: the difference of two runs leaves out the prefill)
CALIBRATION_ON = ("generated", "data")


@dataclass
class Fitted:
    """A calibrated tree, the calibration it came from, the draft vocabulary (or None) and, for an automatic
    budget, one row per budget tried (`choose_tree`'s) with the plain step's seconds."""

    tree: Tree
    calibration: Calibration
    draft_vocab: DraftVocab | None = None
    budget_choice: list[dict[str, Any]] = field(default_factory=list)
    plain_step_s: float | None = None

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary: sizes, expected tokens per forward of the tree and of the chain, acceptance."""
        acceptance = self.calibration.acceptance
        return {
            "size": self.tree.size,
            "expected_tokens_per_forward": self.tree.expected_length(self.calibration),
            "chain_expected_tokens_per_forward": Tree.chain(acceptance.shape[0] + 1).expected_length(self.calibration),
            "acceptance": acceptance.tolist(),
            **({"budget_choice": self.budget_choice} if self.budget_choice else {}),
        }


def fit_tree(
    model: MultiTokenModel,
    tokens: np.ndarray,
    *,
    length: int,
    on: str = "generated",
    windows: int = 16,
    max_rank: int = 4,
    prompt_tokens: int = 32,
    budget: int | str = "auto",
    draft_vocab: int | None = None,
    vocab_tokens: np.ndarray | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
) -> Fitted:
    """Calibrate a draft tree for `model` on `tokens` (1-D ids), windows of `length` tokens.

    draft_vocab: also make a draft vocabulary of that many tokens, the most frequent of `vocab_tokens`
    (default: `tokens`), and calibrate through it. budget: a node count, or "auto" (timed here).
    """
    if on not in CALIBRATION_ON:
        raise UserError(f"calibration runs on one of {', '.join(CALIBRATION_ON)}, got {on!r}")
    if model.cfg.n_future < 2:
        raise UserError("the model has one head: nothing drafts, so there is no tree to calibrate")
    device = model.tok_embeddings.weight.device
    vocab = None
    if draft_vocab is not None:
        source = tokens if vocab_tokens is None else vocab_tokens
        vocab = DraftVocab.most_frequent(source, model.cfg.vocab_size, draft_vocab)
    generator = torch.Generator(device).manual_seed(seed)
    if on == "data":
        windowed = windows_tensor(tokens, windows, length)
        calibration = calibrate(model, windowed, max_rank, vocab=vocab, sampling=sampling)
    else:
        if not 1 <= prompt_tokens < length - model.cfg.n_future:
            raise UserError(f"prompt_tokens (--prompt-tokens) must be between 1 and {length - model.cfg.n_future - 1}")
        prompts = windows_tensor(tokens, windows, prompt_tokens)
        calibration = calibrate_decoding(model, prompts, length, max_rank, vocab, sampling, generator)
    if budget == "auto":
        prompt = tokens[:prompt_tokens].tolist()
        budgets = [b for b in AUTO_BUDGETS if len(prompt) + AUTO_TOKENS + b < model.cfg.max_seq_len]
        tree, choices, plain = choose_tree_by_speed(
            model, calibration, prompt, budgets, vocab, AUTO_TOKENS, sampling, generator
        )
        return Fitted(tree, calibration, vocab, choices, plain)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise UserError(f"budget must be a node count >= 1 or 'auto', got {budget!r}")
    return Fitted(build_tree(calibration, budget), calibration, vocab)
