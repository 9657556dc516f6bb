"""PNG figures of the benchmark documents (matplotlib, Agg backend: no display needed).

`plot_memory_document` draws the memory sweep (peak memory against n, one line per method, one panel per
vocabulary size) and its step-time ratios beside the FLOP ratio; `plot_train_document` draws `bench
train`'s step-time ratio against n beside the FLOP ratio, and its throughput. `python -m
multitoken.bench.plots DOC.json --out DIR` redraws them from saved JSON documents (e.g. a GPU run's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

METHOD_STYLE = {
    "summed": ("summed loss, one backward", "tab:red", "o"),
    "sequential": ("sequential heads", "tab:blue", "s"),
    "chunked": ("sequential + chunked CE", "tab:green", "^"),
}


def _setting_line(doc: dict[str, Any], layers_key: str) -> str:
    s, m = doc["settings"], doc["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} cores)"
    return (
        f"d={s['dim']}, {s[layers_key]} blocks, batch {s['batch']}x{s['context']}, {s['dtype']}, "
        f"{where}, torch {m['torch']}"
    )


def _n_axis(ax: Any, ns: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("n (heads; total depth fixed)")
    ax.grid(True, alpha=0.3)


def _series(rows: list[dict[str, Any]], method: str, key: str) -> tuple[list[int], list[float]]:
    """(n, value) of one method's line; n=1 (the plain LM, measured once) starts every line."""
    ok = [r for r in rows if (r["spec"]["method"] == method or r["spec"]["n_future"] == 1) and key in r]
    ok.sort(key=lambda r: r["spec"]["n_future"])
    return [r["spec"]["n_future"] for r in ok], [r[key] for r in ok]


def _save(fig: Any, title: str, path: Path) -> Path:
    """Title, lay out, write the PNG and free the figure."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_memory_document(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The sweep's two figures (memory, time ratio); nothing if the document has no sweep."""
    if not doc.get("sweep"):
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = doc["sweep"]
    ns = sorted({r["spec"]["n_future"] for p in panels for r in p["rows"]})
    cuda = doc["machine"]["device"].startswith("cuda")
    ylabel = "peak allocated (MiB, cuda max_memory_allocated)" if cuda else "peak RSS of the process (MiB)"
    setting = _setting_line(doc, "sweep_layers")

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for method, (label, color, marker) in METHOD_STYLE.items():
            xs, ys = _series(panel["rows"], method, "peak_mib")
            ax.plot(xs, ys, marker=marker, color=color, label=label)
        baselines = [r["baseline_mib"] for r in panel["rows"] if "baseline_mib" in r]
        if baselines:
            ax.axhline(min(baselines), color="gray", ls=":", label="after model + optimizer creation")
        ax.set_title(f"V = {panel['vocab_size']:,}")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        _n_axis(ax, ns)
    axes[0][0].legend(fontsize=8, loc="upper left")
    memory_png = _save(fig, f"Peak training-step memory against n\n{setting}", out / "bench_memory_vs_n.png")

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        xs, ys = _series(panel["rows"], "summed", "flop_ratio")
        ax.plot(xs, ys, color="black", ls="--", label="FLOP ratio (analytic)")
        for method, (label, color, marker) in METHOD_STYLE.items():
            xs, ys = _series(panel["rows"], method, "time_ratio")
            ax.plot(xs, ys, marker=marker, color=color, label=label)
        ax.set_title(f"V = {panel['vocab_size']:,}")
        ax.set_ylabel("step time / step time of n=1 (x)")
        _n_axis(ax, ns)
    axes[0][0].legend(fontsize=8, loc="upper left")
    title = f"Step-time ratio against n, beside the FLOP ratio\n{setting}"
    return [memory_png, _save(fig, title, out / "bench_memory_time_ratio.png")]


def plot_train_document(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """`bench train`: step-time ratio vs n beside the FLOP ratio (left) and tokens/s with MFU (right)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted((r for r in doc["rows"] if "time_ratio" in r), key=lambda r: r["spec"]["n_future"])
    ns = [r["spec"]["n_future"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot(ns, [r["flop_ratio"] for r in rows], color="black", ls="--", label="FLOP ratio (analytic)")
    ratios = [r["time_ratio"] for r in rows]
    spread = [[t - r["time_ratio_range"][0] for t, r in zip(ratios, rows, strict=True)],
              [r["time_ratio_range"][1] - t for t, r in zip(ratios, rows, strict=True)]]  # fmt: skip
    left.errorbar(ns, ratios, yerr=spread, marker="o", color="tab:blue", capsize=3,
                  label="measured step-time ratio (bars: fastest-slowest step)")  # fmt: skip
    left.set_ylabel("x of n=1")
    left.set_title("Training step time vs n=1")
    left.legend(fontsize=8, loc="upper left")
    _n_axis(left, ns)
    right.bar([str(n) for n in ns], [r["tokens_per_s"] for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        right.annotate(f"MFU {r['mfu']:.0%}", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    right.set_xlabel("n (heads; total depth fixed)")
    right.set_ylabel("training throughput (tokens/s)")
    right.set_title(f"Throughput (MFU vs {doc['peak_tflops']:.3g} TFLOP/s peak)")
    s = doc["settings"]
    title = (
        f"bench train: {rows[0]['params'] / 1e6:.1f}M params, V={s['vocab']:,}, method {s['method']}\n"
        + _setting_line(doc, "layers")
    )
    return _save(fig, title, out / "bench_train_time_ratio.png")


def main(argv: list[str] | None = None) -> None:
    """Redraw the figures of saved benchmark documents."""
    parser = argparse.ArgumentParser(description="Redraw benchmark PNGs from saved JSON documents.")
    parser.add_argument("documents", nargs="+", help="JSON documents printed by bench memory / bench train")
    parser.add_argument("--out", default=".", help="folder for the PNGs")
    args = parser.parse_args(argv)
    for name in args.documents:
        doc = json.loads(Path(name).read_text())
        paths = plot_memory_document(doc, args.out) if doc["benchmark"] == "memory" else [
            plot_train_document(doc, args.out)
        ]  # fmt: skip
        print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
