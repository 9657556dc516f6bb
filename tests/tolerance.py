"""Tolerances derived from the computation: reduction length, the dtype's unit roundoff, the values' size.

Two evaluations of the same sum that add in different orders (another kernel, another blocking, another
thread count, another CPU) differ by rounding alone. For a dot product of k terms, Higham and Mary's
probabilistic bound (SIAM J. Sci. Comput. 2019) gives

    |fl(x . y) - x . y| <= LAMBDA * sqrt(k) * u * sum_i |x_i y_i|

with probability at least 1 - k * 2 exp(-LAMBDA^2 (1 - u)^2 / 2) for each result, u being the unit roundoff
(eps / 2). Two evaluations differ by at most twice that. LAMBDA = 8 puts a false failure below 1e-11 per
element for k up to 10^3, whatever the machine; the worst-case bound (k instead of sqrt(k)) would be so loose
for long reductions that a wrong product could pass. `dot_bound` applies it to one product.

A whole network chains many reductions, normalisations and softmaxes, whose errors no closed form bounds
tightly. There the reference is the network's own rounding, measured on the running machine: `twin_atol`
evaluates the slow path in float32 and in float64 and allows a small multiple of the float32 error. A fast
path that rounds the same computation differently stays within it on any CPU; one that changes the
computation (a wrong cache slot, a value stored in half precision) does not.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

LAMBDA = 8.0


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps / 2


def dot_bound(abs_terms: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-element bound on the difference of two evaluations of sums of k terms.

    `abs_terms` is sum_i |x_i y_i| for each result: for a product A @ B it is |A| @ |B|.
    """
    return 2 * LAMBDA * math.sqrt(k) * unit_roundoff(dtype) * abs_terms


def network_atol(
    reference: torch.Tensor, k: int, depth: int, dtype: torch.dtype = torch.float32, floor: float = 1.0
) -> float:
    """Absolute tolerance for two evaluations of a `depth`-deep stack of reductions of length at most k.

    The magnitude is the reference's largest value, at least `floor`: 1 for forward values (hidden states
    are normalised to unit RMS before every product, so no intermediate value is much smaller than that),
    0 for gradients, whose own size is their scale.
    """
    scale = max(float(reference.detach().abs().max()), floor)
    return 2 * LAMBDA * math.sqrt(k) * unit_roundoff(dtype) * depth * scale


def sum_rtol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative tolerance for two evaluations of a sum of n terms of one sign (a loss over n tokens)."""
    return 2 * LAMBDA * math.sqrt(n) * unit_roundoff(dtype)


def model_atol(
    reference: torch.Tensor, cfg, extra_depth: int = 1, dtype: torch.dtype = torch.float32, floor: float = 1.0
) -> float:
    """`network_atol` for a forward (or backward) of a model of this config: every block, the unembedding
    (`extra_depth`), reductions over the model's widths and its context. A scale estimate, not a bound (see the
    module docstring): used for gradients and losses, where no float64 twin is at hand."""
    k = max(cfg.dim, cfg.ffn_dim, cfg.max_seq_len)
    return network_atol(reference, k, cfg.n_layers + extra_depth, dtype, floor)


def loss_tolerance(logits: torch.Tensor, cfg, n_tokens: int) -> dict[str, float]:
    """pytest.approx arguments for two evaluations of a mean cross-entropy over n_tokens.

    A change of at most a in every logit moves each token's -log p by at most 2a; the mean adds the
    rounding of an n-term sum of positive terms.
    """
    return {"rel": sum_rtol(n_tokens), "abs": 2 * model_atol(logits, cfg)}


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, msg: str = "") -> None:
    """Assert |actual - expected| <= bound elementwise, reporting the worst element."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    excess = diff - bound
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{msg} differs by {diff.flatten()[worst]:.3g} where the bound is "
        f"{bound.expand_as(diff).flatten()[worst]:.3g} (element {worst})"
    )


TWIN_FACTOR = 16.0  # two fp32 roundings of one computation differ by a few times either's error against fp64


def twin_atol(slow: Callable[[torch.nn.Module], torch.Tensor], model: torch.nn.Module) -> float:
    """Absolute tolerance for comparing a fast fp32 path with `slow(model)`: TWIN_FACTOR times the largest
    difference between `slow` in float32 and in float64 (a float64 copy of the model), with a floor of a few
    ulps of the largest value so that an exactly representable result still leaves room for one rounding."""
    with torch.no_grad():
        ref32 = slow(model).double()
        ref64 = slow(copy.deepcopy(model).double())
    error = float((ref32 - ref64).abs().max())
    ulp = torch.finfo(torch.float32).eps * float(ref64.abs().max())
    return TWIN_FACTOR * max(error, ulp)
