"""Few-row products on the CPU: the weight-stationary kernel, and which products take it on this machine.

Decoding multiplies 1-64 rows by every weight, and a decode step streams the whole model, so no weight is in
the cache when its turn comes. MKL can multiply a few rows by such a weight slowly. Computing (W @ x.T).T
instead streams W once (`weight_stationary`); one row goes as a two-column product, which avoids MKL's
matrix-vector kernel. Whether either pays depends on the CPU, its thread count, the dtype and the weight's
shape: it paid on an AMD EPYC and lost on an Intel Xeon with AVX-512 and AMX. So nothing is assumed here.

`prepare` (called when a model makes a decoding cache) times both paths on the model's own weights, for every
shape its linear layers have, at the current thread count (`measure`), and `choose` keeps, per shape, the
row counts where the weight-stationary path is faster by `MARGIN`. `linear` (model.py) then follows
`choice_for`. The choices are cached in a JSON file keyed by CPU, torch version, dtype, shapes and threads,
so a machine measures once. Environment:

    MULTITOKEN_FEW_ROWS=N        up to N rows weight-stationary everywhere, nothing measured (0: never)
    MULTITOKEN_KERNEL_CACHE=off  measure in every process; write no cache file
    XDG_CACHE_HOME               the cache lives in $XDG_CACHE_HOME/multitoken/kernels.json
                                 (default ~/.cache/multitoken/kernels.json)

Both paths compute x @ W.T; they differ only in rounding, so no choice changes a result beyond that.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from multitoken.errors import UserError

ROWS = (1, 2, 3, 4, 8, 12, 16, 32, 64)  # the row counts measured; a measured bound never passes the last
MARGIN = 0.05  # the weight-stationary path must be this much faster: a tie is noise, and F.linear the default
ROUNDS = 4  # alternating rounds per row count, each path first in half of them; the median of each is kept
# Weights timed per shape. A decode step streams every weight once, so each should be cold when timed: the
# shapes are timed one after another, and together their samples outgrow a typical last-level cache. A weight
# larger than this is timed on its leading rows, a weight of the same width: timing a 100 MiB unembedding in
# full, at every row count, would cost more than the rest of the measurement together.
SAMPLE_BYTES = 6 * 2**20
# Seconds after which no further row count is started. On an idle machine a model takes a fraction of this;
# a busy one (other processes on the cores) can take many times longer. The counts not reached count as
# losses, and such a truncated measurement serves this process only: it is not cached.
BUDGET_S = 1.0
FORMAT = 1  # of the cache file
FEW_ROWS_ENV, CACHE_ENV = "MULTITOKEN_FEW_ROWS", "MULTITOKEN_KERNEL_CACHE"

Group = tuple[torch.dtype, int, int]  # dtype, out_features, in_features: the weights one choice covers
Timings = dict[int, tuple[float, float]]  # rows -> (weight-stationary seconds, F.linear seconds)


@dataclass(frozen=True)
class Choice:
    """Which products of a weight shape go weight-stationary: 2..`bound` rows, and one row if `one_row`.

    One row is decided apart from the rest: its kernel (a two-column product against MKL's matrix-vector
    product) differs from the one that serves 2 rows and more.
    """

    bound: int = 0
    one_row: bool = False

    def takes(self, rows: int) -> bool:
        """Whether a product of `rows` rows takes the weight-stationary path."""
        return self.one_row if rows == 1 else 2 <= rows <= self.bound


NEVER = Choice()

# The choices in use, by (dtype, out_features, in_features, threads). A shape absent here goes to F.linear.
_chosen: dict[tuple[torch.dtype, int, int, int], Choice] = {}
# What this process measured or read, by cache key: `prepare` looks nothing up twice.
_known: dict[str, dict[Group, Choice]] = {}


def weight_stationary(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T computed as (weight @ x.T).T, which streams the weight once."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    # Row-contiguous rows, so that W @ flat.T reads x column-major: MKL is several times slower on the same
    # rows stored as an (in, M) row-major matrix, and this function's own output (a transposed view) would
    # otherwise feed the next product in that layout.
    flat = x.reshape(rows, in_features).contiguous()  # (M, in)
    if rows == 1:
        flat = flat.repeat(2, 1)  # (2, in): a two-column product, not MKL's matrix-vector product
    y = weight @ flat.T  # (out, M) or (out, 2)
    return y[:, :rows].T.reshape(*x.shape[:-1], out_features)  # (..., out)


def choice_for(shape: Sequence[int], dtype: torch.dtype) -> Choice:
    """The choice in use for a weight of `shape` (out, in) and `dtype` at the current thread count."""
    return _chosen.get((dtype, shape[0], shape[1], torch.get_num_threads()), NEVER)


def use(choices: Mapping[Group, Choice]) -> None:
    """Put `choices` in use at the current thread count (the other thread counts keep theirs)."""
    threads = torch.get_num_threads()
    for (dtype, out_features, in_features), choice in choices.items():
        _chosen[dtype, out_features, in_features, threads] = choice


# --------------------------------------------------------------------------------------------------
# the rule and the measurement


def choose(timings: Mapping[int, tuple[float, float]], margin: float = MARGIN) -> Choice:
    """The choice for one shape from its timings, rows -> (weight-stationary s, F.linear s).

    The bound is the largest measured row count up to which the weight-stationary path wins at every
    measured count from 2 on (winning: F.linear takes at least 1 + `margin` times as long); past the
    first loss nothing counts, so a lucky larger count cannot stretch the bound over a loss.
    """

    def wins(rows: int) -> bool:
        stationary, f_linear = timings[rows]
        return f_linear >= (1 + margin) * stationary

    bound = 0
    for rows in sorted(r for r in timings if r >= 2):
        if not wins(rows):
            break
        bound = rows
    return Choice(bound=bound, one_row=1 in timings and wins(1))


def groups(weights: Iterable[torch.Tensor]) -> dict[Group, list[torch.Tensor]]:
    """The CPU weights (out, in) among `weights` by dtype and shape, each tensor once (tied weights are one)."""
    out: dict[Group, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for w in weights:
        if w.is_cpu and w.dim() == 2 and w.data_ptr() not in seen:
            seen.add(w.data_ptr())
            out.setdefault((w.dtype, w.shape[0], w.shape[1]), []).append(w)
    return out


def _sample(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The weights to time for one shape: in order until SAMPLE_BYTES, a larger one as its leading rows."""
    sample: list[torch.Tensor] = []
    total = 0
    for w in weights:
        if total >= SAMPLE_BYTES:
            break
        w = w.detach()[: max(1, SAMPLE_BYTES // (w.shape[1] * w.element_size()))]
        sample.append(w)
        total += w.nbytes
    return sample


def _seconds(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, ws: Sequence[torch.Tensor]
) -> float:
    """Seconds for one pass of `product` over the weights `ws`."""
    start = time.perf_counter()
    for w in ws:
        product(x, w)
    return time.perf_counter() - start


PATHS = (weight_stationary, F.linear)


@torch.no_grad()
def measure(
    weight_groups: Mapping[Group, Sequence[torch.Tensor]],
    rows: Sequence[int] = ROWS,
    rounds: int = ROUNDS,
    margin: float = MARGIN,
    budget_s: float | None = None,
) -> tuple[dict[Group, Timings], bool]:
    """Seconds per pass over each shape's sample, weight-stationary and through F.linear, at each row count,
    and whether the measurement finished within `budget_s` (default BUDGET_S).

    Row counts go up; a shape leaves once it has lost (by `choose`), since larger counts cannot change its
    choice, and the measurement ends when none is left. Within a row count the paths alternate, each first in
    turn, because identical code can move by tens of percent between back-to-back runs.
    """
    deadline = time.perf_counter() + (BUDGET_S if budget_s is None else budget_s)
    samples = {g: _sample(ws) for g, ws in weight_groups.items()}
    timings: dict[Group, Timings] = {g: {} for g in weight_groups}
    gen = torch.Generator().manual_seed(0)
    live = list(weight_groups)
    for n in sorted(rows):
        if time.perf_counter() > deadline:
            return timings, False
        xs = {g: torch.randn(n, g[2], generator=gen).to(g[0]) for g in live}
        seconds: dict[Group, tuple[list[float], list[float]]] = {g: ([], []) for g in live}
        for r in range(rounds):
            for path in (0, 1) if r % 2 == 0 else (1, 0):
                for g in live:
                    seconds[g][path].append(_seconds(PATHS[path], xs[g], samples[g]))
        for g in live:
            timings[g][n] = (statistics.median(seconds[g][0]), statistics.median(seconds[g][1]))
        live = [g for g in live if n == 1 or choose(timings[g], margin).bound == n]
        if not live:
            break
    return timings, True


def calibrate(weight_groups: Mapping[Group, Sequence[torch.Tensor]]) -> tuple[dict[Group, Choice], bool]:
    """Measure each shape on this machine (`measure`) and choose (`choose`); also whether it finished in time."""
    timings, finished = measure(weight_groups)
    return {g: choose(t) for g, t in timings.items()}, finished


# --------------------------------------------------------------------------------------------------
# the environment and the cache


def override() -> Choice | None:
    """The choice MULTITOKEN_FEW_ROWS forces for every shape (N: up to N rows; 0: none), or None if unset."""
    text = os.environ.get(FEW_ROWS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise UserError(
            f"{FEW_ROWS_ENV}={text!r} is not a row count: set it to a whole number >= 0 "
            "(0 keeps every product on F.linear), or unset it to measure on this machine"
        )
    return Choice(bound=int(text), one_row=int(text) >= 1)


def cache_path() -> Path | None:
    """Where measured choices are kept, or None when MULTITOKEN_KERNEL_CACHE=off."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting == "off":
        return None
    if setting:
        raise UserError(
            f"{CACHE_ENV}={setting!r} is not understood: set it to 'off' (measure without a cache) or unset it"
        )
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores a relative path
    return base / "multitoken" / "kernels.json"


@functools.cache  # read once: `prepare` runs at every decoding start
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what `platform` knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _label(g: Group) -> str:
    return f"{str(g[0]).removeprefix('torch.')} {g[1]}x{g[2]}"


def cache_key(weight_groups: Iterable[Group]) -> str:
    """What a measurement depends on: CPU, torch (its kernels), device, threads, and the dtypes and shapes."""
    shapes = ", ".join(sorted(_label(g) for g in weight_groups))
    return f"{cpu_model()} | torch {torch.__version__} | cpu | {torch.get_num_threads()} threads | {shapes}"


def _read_entries(path: Path) -> dict[str, object]:
    """The cache file's entries; an unreadable, corrupt or foreign file reads as empty (it is measured again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _parse(entry: object, wanted: Iterable[Group]) -> dict[Group, Choice] | None:
    """An entry's choices for exactly the `wanted` shapes, or None if it is malformed."""
    if not isinstance(entry, dict):
        return None
    choices = {}
    for g in wanted:
        item = entry.get(_label(g))
        if not isinstance(item, dict):
            return None
        bound, one_row = item.get("bound"), item.get("one_row")
        if type(bound) is not int or not 0 <= bound <= max(ROWS) or type(one_row) is not bool:
            return None
        choices[g] = Choice(bound=bound, one_row=one_row)
    return choices


def _write_entry(path: Path, key: str, choices: Mapping[Group, Choice]) -> None:
    # checkpoint.py imports the model, which imports this module: import its atomic writer when first needed.
    from multitoken.checkpoint import atomic_write_json

    entries = _read_entries(path)
    entries[key] = {_label(g): {"bound": c.bound, "one_row": c.one_row} for g, c in choices.items()}
    try:
        atomic_write_json(path, {"format": FORMAT, "entries": entries})
    except OSError as e:
        # The cache only saves the next process a measurement; decoding goes on without it.
        warnings.warn(f"could not write {path} ({e.strerror}); set {CACHE_ENV}=off to stop trying", stacklevel=3)


def prepare(weights: Iterable[torch.Tensor]) -> dict[Group, Choice]:
    """Choose the path of the few-row products of these weights on this machine and put the choices in use.

    MULTITOKEN_FEW_ROWS decides alone where set. Otherwise the choices come from this process's earlier
    call, else from the cache file, else from a measurement (`calibrate`, then written to the cache if it
    finished within BUDGET_S).
    Only CPU weights are considered; other devices always use F.linear.
    """
    weight_groups = groups(weights)
    if not weight_groups:
        return {}
    forced = override()
    if forced is not None:
        choices = dict.fromkeys(weight_groups, forced)
    else:
        key = cache_key(weight_groups)
        choices = _known.get(key)
        if choices is None:
            path = cache_path()
            choices = _parse(_read_entries(path).get(key), weight_groups) if path is not None else None
            if choices is None:
                choices, finished = calibrate(weight_groups)
                if path is not None and finished:
                    _write_entry(path, key, choices)
            _known[key] = choices
    use(choices)
    return choices
