"""TensorBoard view of a run: the metrics records of `train` and `heads` as scalars.

metrics.jsonl stays the record; this writes the same numbers where `tensorboard --logdir DIR` shows them:
the loss per head, learning rate, gradient norm, tokens/s and, when the FLOPs per token and a peak are
known, model FLOPs utilisation; each evaluation's per-head loss, accuracy, agreement with head 1 (the
acceptance forecast of self-speculative decoding) and bits per byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitoken.errors import UserError


class TensorBoardLog:
    """A metrics sink (`log(record)`) writing TensorBoard event files under `log_dir`.

    flops_per_token and peak_flops (FLOP/s of the hardware): both given, train records also log `mfu`.
    """

    def __init__(self, log_dir: str | Path, flops_per_token: float | None = None, peak_flops: float | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "TensorBoard logging needs the tensorboard package: pip install 'multitoken[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops

    def __call__(self, record: dict[str, Any]) -> None:
        step, kind = int(record["step"]), record.get("kind", "train")
        scalars = self.scalars(record)
        for name, value in scalars.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)
        if kind == "eval":
            self.writer.flush()  # evaluations are rare: show them at once

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        """The record's numbers by TensorBoard tag (without the train/ or eval/ prefix)."""
        out: dict[str, float] = {}
        for name, value in record.items():
            if name in ("step", "kind"):
                continue
            if isinstance(value, list):  # one value per head: head 1 is the next-token head
                prefix = "loss" if name == "per_head" else name
                out.update({f"{prefix}/head{i + 1}": float(v) for i, v in enumerate(value) if v == v})
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out[name] = float(value)
        if "tokens_per_s" in record and self.flops_per_token and self.peak_flops:
            out["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops
        return out

    def close(self) -> None:
        self.writer.close()
