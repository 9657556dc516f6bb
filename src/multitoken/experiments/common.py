"""What every experiment shares: settings, a small in-memory training loop, machine facts, plots, reports.

An experiment writes `report.md` (tables, plots, seeds, the exact command, git commit, machine, torch
version) and `results.json` (the same numbers, machine-readable) into its output folder. Nothing in a
report is typed in by hand: every number comes from the run that wrote it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.config import ModelConfig, TrainConfig
from multitoken.data.dataset import WindowSampler
from multitoken.data.tokenizers import Tokenizer
from multitoken.errors import UserError
from multitoken.kernels import cpu_model
from multitoken.loop import training_loop
from multitoken.loss import IGNORE_INDEX, LossReport, sequential_backward, shift_targets
from multitoken.model import MultiTokenModel
from multitoken.pretrain import apply_update, build_optimizer, train_step

SETTINGS = ("test", "cpu", "full")
# `quick` is the name the command line passes when --full is not given: it runs the CPU setting.
SETTING_ALIASES = {"quick": "cpu"}


def canonical_setting(setting: str) -> str:
    """The setting's own name (an alias such as `quick` resolved); an unknown name is a UserError."""
    setting = SETTING_ALIASES.get(setting, setting)
    check_setting(setting)
    return setting


def check_setting(setting: str) -> None:
    """`test` (seconds, for the test suite), `cpu` (the decisive setting: about 20 minutes on 2 CPU cores)
    or `full` (a GPU or a long run)."""
    if setting not in SETTINGS:
        names = ", ".join([*SETTINGS, *SETTING_ALIASES])
        raise UserError(f"unknown setting {setting!r}; choose one of {names}")


# --------------------------------------------------------------------------------------------------
# training on a token stream held in memory (synthetic tasks)


@dataclass
class TrainedModel:
    """A model trained by `train_on_tokens`, its per-step losses and the periodic evaluations."""

    model: MultiTokenModel
    losses: list[float]
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_seen: int = 0


BatchStep = Callable[[MultiTokenModel, torch.optim.Optimizer, int, float], tuple[LossReport, float, int]]


def _train_fresh(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    batch_step: BatchStep,
    tokens_per_step: int,
    evaluate: Callable[[MultiTokenModel], dict[str, Any]] | None,
    eval_every: int,
    device: torch.device | None,
) -> TrainedModel:
    """A fresh model seeded by `cfg.seed`, AdamW and the training loop: what `train_on_tokens` and
    `train_on_examples` share. batch_step(model, optimizer, step, lr) -> (report, grad norm, tokens in the batch).
    `evaluate(model)` runs every `eval_every` steps (0: only at the end); the model is left in eval mode."""
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = MultiTokenModel(model_cfg)
    model.reset_parameters(seed=cfg.seed)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    result = TrainedModel(model, [])
    start = time.perf_counter()

    def run_eval(step: int) -> None:
        model.eval()
        record = evaluate(model)
        model.train()
        result.evals.append({"step": step, "tokens": result.tokens_seen, **record})

    def step_fn(step: int, lr: float) -> tuple[LossReport, float]:
        report, grad_norm, tokens = batch_step(model, optimizer, step, lr)
        result.tokens_seen += tokens
        return report, grad_norm

    def after_step(step: int, report: LossReport) -> None:
        if evaluate is not None and eval_every and step % eval_every == 0 and step < cfg.max_steps:
            run_eval(step)

    result.losses = training_loop(step_fn, cfg, tokens_per_step=tokens_per_step, after_step=after_step).losses
    if evaluate is not None:
        run_eval(len(result.losses))
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def train_on_tokens(
    model_cfg: ModelConfig,
    tokens: np.ndarray,
    cfg: TrainConfig,
    evaluate: Callable[[MultiTokenModel], dict[str, Any]] | None = None,
    eval_every: int = 0,
    device: torch.device | None = None,
) -> TrainedModel:
    """Train a fresh model on random windows of an in-memory token stream, with the project's own step.

    The same pieces as `multitoken.pretrain.train` (AdamW, warmup + cosine, the sequential multi-token step)
    without its run folder, checkpoints and tokenizer: synthetic tasks generate their tokens directly.
    `evaluate(model)` runs every `eval_every` steps (0: only at the end); the model is left in eval mode.
    Batches depend only on `cfg.seed` and the step; weights only on `cfg.seed`.
    """
    sampler = WindowSampler(tokens, cfg.batch_size, cfg.context + model_cfg.n_future, cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.context * cfg.grad_accum
    run_on = device or torch.device("cpu")

    def batch_step(model: MultiTokenModel, optimizer: torch.optim.Optimizer, step: int, lr: float):
        return (*train_step(model, optimizer, sampler, step, cfg, lr, run_on), tokens_per_step)

    return _train_fresh(model_cfg, cfg, batch_step, tokens_per_step, evaluate, eval_every, device)


# --------------------------------------------------------------------------------------------------
# training on examples with a loss mask (the loss only where the task has something to predict)


@dataclass
class ExamplePool:
    """Examples packed into one padded array: tokens (N, L), which tokens are targets (N, L), lengths (N,).

    `target[i, j]` says token j of example i is one the loss scores (an answer token, a token to be copied);
    every other position is context only. Rows are right-padded with `pad` (never a target).
    """

    tokens: np.ndarray
    target: np.ndarray
    lengths: np.ndarray

    @classmethod
    def pack(cls, examples: Sequence[tuple[Sequence[int], Sequence[bool]]], pad: int) -> ExamplePool:
        """From (token ids, target flags) pairs of any lengths."""
        width = max(len(t) for t, _ in examples)
        tokens = np.full((len(examples), width), pad, dtype=np.int64)
        target = np.zeros((len(examples), width), dtype=bool)
        for i, (ids, flags) in enumerate(examples):
            assert len(ids) == len(flags), "one target flag per token"
            tokens[i, : len(ids)] = ids
            target[i, : len(ids)] = flags
        return cls(tokens, target, np.array([len(t) for t, _ in examples]))

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step` (rows drawn from a generator seeded by (seed, step)), cut to its longest row:
        tokens (B, L) int64 and target flags (B, L) bool."""
        rng = np.random.default_rng((seed, step))
        rows = rng.integers(0, len(self.tokens), size=batch_size)
        width = int(self.lengths[rows].max())
        return torch.from_numpy(self.tokens[rows, :width]), torch.from_numpy(self.target[rows, :width])


def masked_targets(tokens: torch.Tensor, target: torch.Tensor, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, L-1) and per-head targets (B, n, L-1) that score only flagged tokens.

    Head i at position t predicts token t+i+1; it has a target there only if that token is flagged (so
    every head is scored on the same answer tokens, each from its own distance), else IGNORE_INDEX.
    """
    inputs, targets = shift_targets(tokens, n_future, context=tokens.shape[1] - 1)
    _, flags = shift_targets(target.long(), n_future, context=tokens.shape[1] - 1)  # IGNORE past the end
    return inputs, targets.masked_fill(flags != 1, IGNORE_INDEX)


def masked_step(
    model: MultiTokenModel,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    target: torch.Tensor,
    cfg: TrainConfig,
    lr: float,
    step: int = 0,
) -> tuple[LossReport, float]:
    """One optimizer step of the sequential multi-token loss on flagged tokens only; (report, grad norm).

    Each head's loss is its mean cross-entropy over its scored targets, summed over heads (the paper's L_n
    restricted to the answer)."""
    inputs, targets = masked_targets(tokens, target, model.cfg.n_future)
    report = sequential_backward(model, inputs, targets, cfg.head_weights, cfg.loss_chunk)
    return report, apply_update(model, optimizer, report.total, step, lr, cfg)


def train_on_examples(
    model_cfg: ModelConfig,
    pool: ExamplePool,
    cfg: TrainConfig,
    evaluate: Callable[[MultiTokenModel], dict[str, Any]] | None = None,
    eval_every: int = 0,
    device: torch.device | None = None,
) -> TrainedModel:
    """Train a fresh model on batches of whole examples from `pool`, the loss on flagged tokens only.

    AdamW, warmup + cosine and the sequential step as `train_on_tokens`; batches depend only on
    `cfg.seed` and the step, weights only on `cfg.seed`, so two arms with the same seed see the same data.
    `evaluate(model)` runs every `eval_every` steps (0: only at the end); the model is left in eval mode.
    """
    run_on = device or torch.device("cpu")

    def batch_step(model: MultiTokenModel, optimizer: torch.optim.Optimizer, step: int, lr: float):
        tokens, target = pool.batch(cfg.seed, step, cfg.batch_size)
        report, grad_norm = masked_step(model, optimizer, tokens.to(run_on), target.to(run_on), cfg, lr, step)
        return report, grad_norm, tokens.numel()

    return _train_fresh(model_cfg, cfg, batch_step, cfg.batch_size, evaluate, eval_every, device)


@dataclass
class CorpusRun:
    """A model trained on a text corpus by `train_corpus_model`, its tokenizer and the held-out tokens."""

    model: MultiTokenModel
    tokenizer: Tokenizer
    final_eval: dict[str, Any]
    seconds: float
    tokens_seen: int
    val_tokens: np.ndarray


def train_corpus_model(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    work_dir: Path,
    sources: Sequence[str | Path] = (),
    device: torch.device | None = None,
    tokenizer: str = "bytes",
    bpe_vocab_size: int = 8192,
) -> CorpusRun:
    """Train a model with the project's `train` (default corpus: the Python standard library; bytes, or a
    BPE of `bpe_vocab_size` tokens trained on the corpus's training split with `tokenizer="bpe"`).

    The run folder (checkpoints) goes under `work_dir`, which the caller owns (a temporary directory: the
    reports keep the numbers, not the weights). The token store is cached in `work_dir/../cache` if the
    caller shares one. Returns the trained model in eval mode, its tokenizer and the validation split's tokens.
    """
    from multitoken.checkpoint import load_run
    from multitoken.data.corpus import default_corpus_paths
    from multitoken.data.tokenizers import load_tokenizer
    from multitoken.pretrain import prepare_data, train

    sources = list(sources) or [str(p) for p in default_corpus_paths()]
    cache_dir = Path(work_dir).parent / "cache"
    run_dir = Path(work_dir) / "run"
    result = train(
        run_dir, model_cfg, cfg, sources, tokenizer, bpe_vocab_size, cache_dir=cache_dir, device=device,
        progress=False,
    )  # fmt: skip
    loaded = load_run(run_dir, device or "cpu")
    tok = load_tokenizer(run_dir)
    val = prepare_data(sources, tok, cache_dir, cfg.val_fraction).store.val
    return CorpusRun(loaded.model, tok, result.final_eval or {}, result.seconds, result.tokens_seen, np.asarray(val))


# --------------------------------------------------------------------------------------------------
# provenance


def git_commit(repo: Path | None = None) -> str | None:
    """`git rev-parse HEAD` of the source tree (with `+dirty` if it has uncommitted changes), or None."""
    repo = repo or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Where the numbers were measured: CPU, usable cores, GPU (if used), torch and Python versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores_usable": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_setting(settings: dict[str, Any], setting: str, overrides: dict[str, Any] | None) -> Any:
    """The named setting (a dataclass) with some fields replaced; an unknown field or a value of the wrong
    type is a UserError."""
    base = settings[canonical_setting(setting)]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise UserError(f"unknown setting field(s): {', '.join(unknown)}; the fields are {', '.join(sorted(fields))}")
    for key, value in (overrides or {}).items():
        old = getattr(base, key)
        allowed = (int, float) if isinstance(old, float) else type(old)
        if old is not None and value is not None and (not isinstance(value, allowed) or isinstance(value, bool)):
            raise UserError(f"setting field {key} must be like {old!r} ({type(old).__name__}), got {value!r}")
    return dataclasses.replace(base, **(overrides or {}))


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """["steps=2000", "seeds=[0,1]", "lr=1e-3"] -> {"steps": 2000, "seeds": [0, 1], "lr": 0.001}.

    Values are Python literals (numbers, lists, None); anything else is kept as a string.
    """
    overrides: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key.strip()] = text
    return overrides


def start_run(
    name: str, settings: dict[str, Any], setting: str, out_dir: Path | None, overrides: dict[str, Any] | None
) -> tuple[Any, Path, torch.device, float, str | None]:
    """What every experiment starts with: the resolved setting, the report folder (default
    docs/results/NAME), the device (CUDA for the full setting when there is one), the start time, the commit."""
    s = resolve_setting(settings, canonical_setting(setting), overrides)
    device = torch.device("cuda" if setting == "full" and torch.cuda.is_available() else "cpu")
    return s, Path(out_dir or f"docs/results/{name}"), device, time.perf_counter(), git_commit()


def default_command(name: str, setting: str, out_dir: Path, overrides: dict[str, Any] | None = None) -> str:
    """The command line that reruns an experiment (fields overridden with --set), or the Python call for the
    test setting, which the CLI does not offer."""
    if setting == "test":
        return (
            'python -c "from multitoken.experiments import run_experiment; '
            f'run_experiment({name!r}, {setting!r}, {str(out_dir)!r}, overrides={overrides!r})"'
        )
    flag = " --full" if setting == "full" else ""
    sets = "".join(f" --set {shlex.quote(f'{k}={_literal(v)}')}" for k, v in (overrides or {}).items())
    return f"multitoken experiment {name}{flag} --out {out_dir}{sets}"


def _literal(value: Any) -> str:
    """A --set value as `parse_overrides` reads it back: lists without spaces."""
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)


# --------------------------------------------------------------------------------------------------
# tables, plots, the report


def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` decimals, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(width: float = 6.4, height: float = 4.0):  # -> (Figure, Axes); matplotlib types stay local
    """A figure on the non-interactive Agg backend (no display on the machines this runs on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def save_figure(fig, path: Path) -> Path:
    """Write a PNG and close the figure (figures are not garbage-collected while pyplot holds them)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def grouped_bars(
    path: Path,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    title: str,
    errors: dict[str, Sequence[float]] | None = None,
    xlabel: str = "",
) -> Path:
    """A bar chart: one group of bars per entry of `groups`, one bar per series (optional error bars)."""
    fig, ax = new_figure()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for j, (label, values) in enumerate(series.items()):
        err = errors.get(label) if errors else None
        ax.bar(x + (j - (len(series) - 1) / 2) * width, values, width, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, groups)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def line_plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    markers: bool = True,
    xticks: Sequence[float] | None = None,
) -> Path:
    """Lines `label -> (x, y)` on one axes; `xticks` fixes the x ticks (e.g. integers only)."""
    fig, ax = new_figure()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if markers else None, markersize=3, label=label)
    if logx:
        ax.set_xscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(
    out_dir: Path,
    *,
    title: str,
    name: str,
    setting: str,
    command: str,
    seeds: Sequence[int],
    sections: Sequence[str],
    results: dict[str, Any],
    seconds: float,
    commit: str | None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Write `report.md` and `results.json` into `out_dir`; return the results document.

    `commit` is `git_commit()` taken when the run started: the code that ran, even if HEAD moved since.
    `sections` are markdown blocks (tables, `![](plot.png)` links, discussion) in order; the header with
    the command, commit, machine, seeds and wall time is added here so no report can leave it out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    doc = {
        "experiment": name,
        "setting": setting,
        "command": command,
        "git_commit": commit,
        "machine": machine,
        "seeds": list(seeds),
        "wall_time_s": round(seconds, 1),
        **results,
    }
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_cores_usable']} usable cores)"
    header = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- setting: `{setting}`; seeds: {', '.join(map(str, seeds))}",
        f"- git commit: `{doc['git_commit']}`",
        f"- machine: {where}; torch {machine['torch']}, Python {machine['python']}",
        f"- wall time: {seconds / 60:.1f} min",
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(header) + "\n" + "\n\n".join(sections).rstrip() + "\n")
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; 0 spread for a single value."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std()) if len(arr) > 1 else 0.0
