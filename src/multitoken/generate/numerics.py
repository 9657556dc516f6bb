"""Where self-speculative greedy decoding departs from plain greedy decoding, and why (bf16 near-ties).

In float32 on the CPU the two decoders agree token for token. In bf16 (typically on a GPU) they need not:
a verify forward over a block of k tokens and a one-token forward run different kernels, which round
differently, so where head 1's two best logits are nearly tied the argmax can flip. This module shows
that each divergence is such a near-tie rather than a bug: for every prompt whose outputs differ it finds
the first differing position and measures, with a full forward of the plain sequence up to that point,
head 1's logits there, in the model's dtype and in float32 (the same weights upcast).

A divergence counts as a near-tie when the float32 gap between the two tokens the decoders chose is at
most `rtol * max(1, |top-1 logit|)`, where rtol defaults to twice the model dtype's machine epsilon
(bf16: 2 * 2^-7 = 0.0156, i.e. within about one rounding of each logit). As a second, data-driven
criterion the record also says whether the gap is within the dtype's own error at that position
(|logit in the model's dtype - logit in float32|, the larger over the two tokens, doubled).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from multitoken.generate.autoregressive import generate
from multitoken.generate.speculative import speculative_generate
from multitoken.generate.tree import Tree
from multitoken.model import MultiTokenModel, rope_tables


def model_dtype(model: MultiTokenModel) -> torch.dtype:
    return model.tok_embeddings.weight.dtype


def default_rtol(dtype: torch.dtype) -> float:
    """Twice the dtype's machine epsilon: bf16 0.0156, fp16 0.00195, fp32 2.4e-7."""
    return 2.0 * torch.finfo(dtype).eps


def near_tie_threshold(top1: float, dtype: torch.dtype, rtol: float | None = None) -> float:
    """The largest logit gap still called a near-tie for a top-1 logit of `top1` in `dtype`."""
    return (default_rtol(dtype) if rtol is None else rtol) * max(1.0, abs(top1))


def top2_gap(logits: torch.Tensor) -> tuple[float, float, int, int]:
    """(gap, top-1 value, top-1 id, top-2 id) of a 1-D logit vector, computed in float32."""
    values, ids = logits.float().topk(2)
    return float(values[0] - values[1]), float(values[0]), int(ids[0]), int(ids[1])


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (a length mismatch counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def float32_copy(model: MultiTokenModel) -> MultiTokenModel:
    """The same weights in float32, with the rotary tables recomputed in float32 (a bf16 `.to` rounds them)."""
    ref = copy.deepcopy(model).float()
    cos, sin = rope_tables(ref.cfg.head_dim, ref.cfg.max_seq_len, ref.cfg.rope_theta)
    ref.rope_cos, ref.rope_sin = cos.to(ref.rope_cos.device), sin.to(ref.rope_sin.device)
    return ref


@torch.no_grad()
def head1_logits(model: MultiTokenModel, tokens: Sequence[int]) -> torch.Tensor:
    """Head 1's logits (V,) after `tokens`, by a full forward (no cache) in the model's own dtype."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=model.tok_embeddings.weight.device)
    return model(ids, heads=[0])[0, -1, 0]


def divergence_record(
    model: MultiTokenModel,
    ref: MultiTokenModel,
    context: Sequence[int],
    plain_token: int | None,
    spec_token: int | None,
    rtol: float | None = None,
) -> dict[str, Any]:
    """Measure head 1 after `context`, where plain decoding chose `plain_token` and speculative `spec_token`.

    `ref` is the float32 copy. The pair gap |l(plain) - l(spec)| is the one that matters; when the two
    tokens are head 1's top two it equals the top-2 gap.
    """
    dtype = model_dtype(model)
    logits = head1_logits(model, context).float()
    logits32 = head1_logits(ref, context).float()
    gap, top1, first, second = top2_gap(logits)
    gap32, top1_32, first32, second32 = top2_gap(logits32)
    record: dict[str, Any] = {
        "plain_token": plain_token,
        "spec_token": spec_token,
        "dtype": str(dtype).removeprefix("torch."),
        "eps": torch.finfo(dtype).eps,
        "top2_gap": gap,
        "top2_gap_fp32": gap32,
        "top1_logit_fp32": top1_32,
        "top2_ids": [first, second],
        "top2_ids_fp32": [first32, second32],
        "threshold": near_tie_threshold(top1_32, dtype, rtol),
    }
    if plain_token is None or spec_token is None:  # one output is a prefix of the other: no pair to compare
        record.update(pair_gap_fp32=None, dtype_error=None, spec_rank_fp32=None, near_tie=False)
        record["within_dtype_error"] = False
        return record
    pair = torch.tensor([plain_token, spec_token], device=logits.device)
    pair_gap32 = float((logits32[pair[0]] - logits32[pair[1]]).abs())
    dtype_error = float((logits[pair] - logits32[pair]).abs().max())
    record.update(
        pair_gap=float((logits[pair[0]] - logits[pair[1]]).abs()),
        pair_gap_fp32=pair_gap32,
        dtype_error=dtype_error,
        spec_rank_fp32=int((logits32 > logits32[spec_token]).sum()),  # 0: top-1, 1: runner-up
        near_tie=pair_gap32 <= record["threshold"],
        within_dtype_error=pair_gap32 <= 2.0 * dtype_error,
    )
    return record


@torch.no_grad()
def divergence_report(
    model: MultiTokenModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    heads_used: int | None = None,
    tree: Tree | None = None,
    rtol: float | None = None,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Greedy plain vs greedy self-speculative decoding on `prompts`, in whatever dtype the model is in
    (`cuda_graphs`: the speculative step replayed from CUDA graphs).

    Returns {prompts, exact, diverged, diverged_at_near_tie, diverged_within_dtype_error, dtype, eps,
    rtol, records}: one record per diverging prompt (its index, the first differing position and what
    `divergence_record` measured there). The claim to check: diverged_at_near_tie == diverged.
    """
    dtype = model_dtype(model)
    plain = generate(model, prompts, max_new_tokens)
    spec = speculative_generate(
        model, prompts, max_new_tokens, heads_used=heads_used, tree=tree, cuda_graphs=cuda_graphs
    )
    ref: MultiTokenModel | None = None
    records = []
    for b, (prompt, a, s) in enumerate(zip(prompts, plain.tokens, spec.tokens, strict=True)):
        i = first_divergence(a, s)
        if i is None:
            continue
        if ref is None:
            ref = float32_copy(model)
        plain_token, spec_token = (a[i] if i < len(a) else None), (s[i] if i < len(s) else None)
        record = divergence_record(model, ref, [*prompt, *a[:i]], plain_token, spec_token, rtol)
        records.append({"prompt": b, "position": i, **record})
    return {
        "prompts": len(prompts),
        "exact": sum(a == s for a, s in zip(plain.tokens, spec.tokens, strict=True)),
        "diverged": sum(a != s for a, s in zip(plain.tokens, spec.tokens, strict=True)),
        "diverged_at_near_tie": sum(r["near_tie"] for r in records),
        "diverged_within_dtype_error": sum(r["within_dtype_error"] for r in records),
        "dtype": str(dtype).removeprefix("torch."),
        "eps": torch.finfo(dtype).eps,
        "rtol": default_rtol(dtype) if rtol is None else rtol,
        "max_new_tokens": max_new_tokens,
        "heads_used": spec.stats.get("heads_used"),
        "tree_size": spec.stats.get("tree_size"),
        "records": records,
    }


def format_report(report: dict[str, Any]) -> str:
    """A short readable summary of `divergence_report`."""
    lines = [
        f"{report['dtype']}: {report['prompts']} prompts, {report['exact']} exact, {report['diverged']} diverged, "
        f"{report['diverged_at_near_tie']} at a near-tie (gap <= {report['rtol']:.3g} * max(1, |top1|)), "
        f"{report['diverged_within_dtype_error']} within 2x the dtype's own logit error"
    ]
    for r in report["records"]:
        if r["pair_gap_fp32"] is None:
            lines.append(f"  prompt {r['prompt']} pos {r['position']}: outputs differ in length only")
            continue
        lines.append(
            f"  prompt {r['prompt']} pos {r['position']}: plain {r['plain_token']} vs spec {r['spec_token']} "
            f"(rank {r['spec_rank_fp32']}), fp32 gap {r['pair_gap_fp32']:.4g} vs threshold {r['threshold']:.3g}, "
            f"{r['dtype']} error {r['dtype_error']:.3g}: {'near-tie' if r['near_tie'] else 'NOT a near-tie'}"
        )
    return "\n".join(lines)
