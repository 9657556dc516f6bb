"""The front door: `multitoken.load(path)` gives a model with its tokenizer, tree and draft vocabulary, whose
`generate(text)` decodes plainly or self-speculatively and returns text with its statistics.

    import multitoken
    lm = multitoken.load("runs/demo")
    out = lm.generate("def fib(n):", max_new_tokens=64)
    print(out.text, out.tokens_per_forward)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multitoken.checkpoint import cast_model, load_run, resolve_dtype, save_checkpoint, write_run_config
from multitoken.config import DEFAULT_PRESET, HeadsConfig, ModelConfig, TrainConfig, preset
from multitoken.data.tokenizers import Tokenizer, load_tokenizer
from multitoken.errors import UserError
from multitoken.generate.autoregressive import NextToken
from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE, DraftVocab
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.session import Drafter, decode
from multitoken.generate.speculative import HeadDrafter
from multitoken.generate.tree import TREE_FILE, Tree, load_tree, save_tree
from multitoken.model import MultiTokenModel

DECODINGS = ("plain", "chain", "tree")


@dataclass
class Generation:
    """One prompt's continuation and how it was decoded.

    `stop_reason` is "length" (max_new_tokens reached), "eos", "stop" (a stop string; the text ends before
    it) or "context" (the model's context limit). `tokens_per_forward` is this sequence's tokens over the
    forwards it took part in; `stats` holds the batch's (accept histogram, tokens/s, ...).
    """

    prompt: str
    text: str
    token_ids: list[int]
    stop_reason: str
    tokens_per_forward: float
    stats: dict[str, Any] = field(default_factory=dict)


class MultiTokenLM:
    """A multi-token model ready to decode: the model, its tokenizer, and the draft tree and draft vocabulary
    calibrated for it (either may be None)."""

    def __init__(
        self,
        model: MultiTokenModel,
        tokenizer: Tokenizer,
        tree: Tree | None = None,
        draft_vocab: DraftVocab | None = None,
    ) -> None:
        self.model, self.tokenizer, self.tree, self.draft_vocab = model.eval(), tokenizer, tree, draft_vocab

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def default_decoding(self) -> str:
        """What `generate` decodes with unless told: the tree if there is one, else the heads' chain, else plain."""
        return "tree" if self.tree is not None else "chain" if self.model.cfg.n_future > 1 else "plain"

    def generate(
        self,
        prompt: str | Sequence[str] | list[dict[str, str]],
        *,
        max_new_tokens: int = 128,
        decoding: str | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: str | Sequence[str] = (),
        stop_at_eos: bool = True,
        draft_vocab: bool = False,
        heads_used: int | None = None,
        compile_step: bool = False,
        cuda_graphs: bool = False,
        stream: Callable[[str], None] | None = None,
        keep_prompt_end: bool = False,
    ) -> Generation | list[Generation]:
        """Continue `prompt`: one string, a batch of them (then a list comes back, one per prompt), or chat
        messages [{"role": "user", "content": ...}], rendered under the tokenizer's chat template.

        decoding: "plain", "chain" (heads 2..k draft, head 1 verifies; `heads_used` = k) or "tree" (the
        calibrated tree); the default is the tree if there is one, else the chain if the model has extra
        heads, else plain. Greedy (temperature 0) output is the same whichever decoding; sampling
        (temperature, top_k, top_p, drawn from `seed`) keeps the model's distribution exactly. `stop`: end
        decoding once one of these strings appears, the text cut before the first. `draft_vocab`: draft among
        the draft vocabulary's tokens only. `stream(text)`: called with each new piece of text as it is
        accepted (one prompt only; it sees the text up to where decoding stopped, past any stop string).
        `keep_prompt_end`: a prompt too long for the context keeps its last tokens (code goes on where its
        prompt ends) instead of raising a UserError.
        """
        chat = _is_chat(prompt)
        if chat:  # one conversation: rendered under the chat template, its special tokens recognised
            prompt = self.tokenizer.apply_chat_template(prompt)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if decoding is None:
            decoding = self.default_decoding
        if decoding not in DECODINGS:
            raise UserError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        if decoding == "tree" and self.tree is None:
            raise UserError("no draft tree: calibrate one first (`multitoken calibrate RUN`) or decode with a chain")
        if draft_vocab and self.draft_vocab is None:
            raise UserError("no draft vocabulary: make one with `multitoken calibrate RUN --draft-vocab K`")
        if stream is not None and len(prompts) != 1:
            raise UserError("streaming prints one continuation as it is decoded; give one prompt")
        stops = [stop] if isinstance(stop, str) else list(stop)
        sampling = SamplingConfig(temperature, top_k, top_p)
        ids = [self.tokenizer.encode(p, special_tokens=chat) for p in prompts]
        if keep_prompt_end:
            ids = [p[-(self.model.cfg.max_seq_len - 1) :] for p in ids]
        generator = torch.Generator(self.device).manual_seed(seed)
        eos = self.tokenizer.eos_id if stop_at_eos else None
        on_tokens = TextStream(self.tokenizer, stream) if stream is not None else None
        if decoding == "plain":
            drafter: Drafter = NextToken()
        else:
            tree = self.tree if decoding == "tree" else None
            drafter = HeadDrafter(heads_used, tree, self.draft_vocab if draft_vocab else None)
        result = decode(
            self.model, ids, max_new_tokens, drafter, sampling=sampling, generator=generator, eos_id=eos,
            on_tokens=on_tokens, stop_when=self._stop_rule(stops), compile_step=compile_step,
            cuda_graphs=cuda_graphs,
        )  # fmt: skip
        if on_tokens is not None:
            on_tokens.finish()
        stats = dict(result.stats)
        row_forwards = stats.pop("row_forwards")  # both decoders count each sequence's forwards
        out = []
        for b, (text_prompt, new) in enumerate(zip(prompts, result.tokens, strict=True)):
            text, reason = self.tokenizer.decode(new), result.stop_reasons[b]
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            out.append(Generation(text_prompt, text, list(new), reason, len(new) / max(row_forwards[b], 1), stats))
        return out[0] if isinstance(prompt, str) else out

    def _stop_rule(self, stops: list[str]) -> Callable[[int, list[int]], bool] | None:
        """Whether a sequence's text now holds a stop string: the tail of its tokens decoded, long enough to
        hold the longest stop string (a token is at least one byte, a character at most four) and the tokens of
        one step (at most the model's heads)."""
        if not stops:
            return None
        tail = 4 * max(len(s) for s in stops) + self.model.cfg.n_future + 1

        def stop(row: int, tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens[-tail:])
            return any(s in text for s in stops)

        return stop

    def save(self, directory: str | Path, format: str = "run") -> Path:
        """Write the model, tokenizer, tree and draft vocabulary to `directory`, which `load` reads back.

        format: "run" (a run directory) or "hf" (a folder transformers' `AutoModelForCausalLM` loads as the
        next-token model, every head, the tree and the draft vocabulary beside it). The directory appears
        complete or not at all.
        """
        from multitoken.interop.meta import staged_dir

        if format == "hf":
            return self._save_hf(Path(directory))
        if format != "run":
            raise UserError(f"format must be 'run' or 'hf', got {format!r}")
        with staged_dir(Path(directory)) as tmp:
            write_run_config(tmp, self.model.cfg)
            self.tokenizer.save(tmp)
            save_checkpoint(tmp, 0, self.model)
            if self.tree is not None:
                save_tree(self.tree, tmp / TREE_FILE)
            if self.draft_vocab is not None:
                self.draft_vocab.save(tmp / DRAFT_VOCAB_FILE)
        return Path(directory)

    def _save_hf(self, directory: Path) -> Path:
        import tempfile

        from multitoken.interop.hf import export_hf

        with tempfile.TemporaryDirectory() as side:  # the tree and draft vocabulary, copied in by export_hf
            extra = []
            if self.tree is not None:
                save_tree(self.tree, Path(side) / TREE_FILE)
                extra.append(Path(side) / TREE_FILE)
            if self.draft_vocab is not None:
                self.draft_vocab.save(Path(side) / DRAFT_VOCAB_FILE)
                extra.append(Path(side) / DRAFT_VOCAB_FILE)
            return export_hf(self.model, directory, self.tokenizer, extra_files=extra)

    def calibrate(
        self,
        text: str | Sequence[str],
        *,
        budget: int | str = "auto",
        on: str = "generated",
        windows: int = 16,
        max_rank: int = 4,
        prompt_tokens: int = 32,
        length: int = 256,
        draft_vocab: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Fit the draft tree (and with `draft_vocab=K` a draft vocabulary of K tokens) to `text`, held-out text
        like what will be decoded; `generate` and `save` use them from now on. Returns the calibration's report
        (tree size, expected tokens per forward of the tree and of the chain, per-head acceptance).

        budget: tree nodes, or "auto" (decoding steps timed on this machine). on: "generated" (the model's own
        continuations of prompts from the text, what greedy decoding will meet) or "data" (the text itself).
        Sampling settings calibrate a tree for sampled decoding with them.
        """
        import numpy as np

        from multitoken.generate.autotune import fit_tree

        texts = [text] if isinstance(text, str) else list(text)
        tokens = np.asarray([t for piece in texts for t in self.tokenizer.encode(piece)], dtype=np.int64)
        fitted = fit_tree(
            self.model, tokens, length=min(length, self.model.cfg.max_seq_len), on=on, windows=windows,
            max_rank=max_rank, prompt_tokens=prompt_tokens, budget=budget, draft_vocab=draft_vocab,
            sampling=SamplingConfig(temperature, top_k, top_p), seed=seed,
        )  # fmt: skip
        self.tree = fitted.tree
        if fitted.draft_vocab is not None:
            self.draft_vocab = fitted.draft_vocab
        return fitted.report()


class TextStream:
    """Calls `emit(piece)` with each new piece of one sequence's text as its tokens arrive (an `on_tokens`
    callback of the decoders). The tokens so far are decoded again each time; a final U+FFFD, which may be half
    of a character whose other bytes are still to come, is held back until `finish`."""

    def __init__(self, tokenizer: Tokenizer, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit, self.ids, self.shown = tokenizer, emit, [], ""

    def __call__(self, row: int, tokens: list[int]) -> None:
        self.ids += tokens
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if text.startswith(self.shown) and len(text) > len(self.shown):  # else wait for `finish`
            self.emit(text[len(self.shown) :])
            self.shown = text

    def finish(self) -> None:
        """Emit whatever was held back."""
        text = self.tokenizer.decode(self.ids)
        rest = text[len(self.shown) :] if text.startswith(self.shown) else "\n" + text
        if rest:
            self.emit(rest)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> MultiTokenLM:
    """A model to decode with, from a run directory (`multitoken train`, `import`, `heads`, `MultiTokenLM.save`),
    a Hugging Face Llama folder or a GGUF file (both need the `hf` extra), or the official multi-token release's
    layout (params.json + consolidated.pth, read with `torch.load(weights_only=True)`). `dtype`: "fp32" or "bf16" (or a
    torch dtype); None gives float32."""
    path = Path(path)
    dtype = resolve_dtype(dtype)
    hf_folder = (path / "config.json").is_file() and not (path / "checkpoints").exists()
    if (path / "params.json").is_file() and not (path / "checkpoints").exists():  # the official release's layout
        from multitoken.interop.meta import import_meta

        model, tokenizer = import_meta(path)
        if tokenizer is None:
            raise UserError(f"{path} has no tokenizer of ours; import it with `multitoken import --layout meta`")
        model = cast_model(model.to(device), dtype or torch.float32)
    elif path.suffix == ".gguf" or hf_folder:
        from multitoken.interop.hf import import_hf

        model, tokenizer = import_hf(path, dtype=dtype or torch.float32)  # every head, if multitoken exported it
        if tokenizer is None:
            raise UserError(f"{path} has no tokenizer (tokenizer.json); import it with `multitoken import`")
        model = cast_model(model.to(device), dtype or torch.float32)
    else:
        run = load_run(path, device, dtype)  # a run directory, or load_run's one-line error saying what is wrong
        model, tokenizer = run.model, load_tokenizer(path)
    folder = path if path.is_dir() else path.parent
    tree = load_tree(folder / TREE_FILE) if (folder / TREE_FILE).is_file() else None
    vocab = DraftVocab.load(folder / DRAFT_VOCAB_FILE) if (folder / DRAFT_VOCAB_FILE).is_file() else None
    return MultiTokenLM(model, tokenizer, tree, vocab)


def train(
    config: TrainConfig | None = None,
    *,
    data: str | Path | Sequence[str | Path] = (),
    model: ModelConfig | str = DEFAULT_PRESET,
    out: str | Path = "runs/model",
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MultiTokenLM:
    """Train a multi-token model into the run directory `out` and return it ready to decode.

    config: the optimisation (default `TrainConfig()`, the main job's). data: a file, folder or glob, or a list
    of them (text files, or .jsonl with a "text" field); empty: the running Python's standard library.
    model: a `ModelConfig` or a preset name (`multitoken.config.PRESETS`); its vocabulary follows the
    tokenizer ("bpe" of `vocab_size` tokens trained on the data, or "bytes"). resume: continue `out`.
    """
    from multitoken.pretrain import train as train_run

    model_cfg = preset(model) if isinstance(model, str) else model
    train_run(
        Path(out), None if resume else model_cfg, None if resume else config or TrainConfig(), sources=_sources(data),
        tokenizer=tokenizer, bpe_vocab_size=vocab_size, resume=resume,
        device=torch.device(device) if device is not None else None, progress=progress,
    )  # fmt: skip
    return load(out, device or "cpu")


def add_heads(
    source: str | Path,
    out: str | Path,
    heads: HeadsConfig | None = None,
    config: TrainConfig | None = None,
    *,
    data: str | Path | Sequence[str | Path] = (),
    progress: bool = True,
) -> MultiTokenLM:
    """Give the model of `source` (a run directory, e.g. from `multitoken import`) more heads and train them
    (`HeadsConfig`: how many, frozen or joint, which targets), into the run directory `out`; return it.

    config: optimisation and budget (default `multitoken.config.default_heads_train_config()`: ten minutes);
    data as for `train`.
    """
    from multitoken.heads import train_heads

    train_heads(Path(source), Path(out), heads, config, _sources(data), progress=progress)
    return load(out)


def _sources(data: str | Path | Sequence[str | Path]) -> list[str]:
    """Training sources as a list of strings: one path or glob is a list of one, not of its characters."""
    return [str(data)] if isinstance(data, str | Path) else [str(d) for d in data]


def _is_chat(prompt: Any) -> bool:
    """Whether `prompt` is chat messages: a list of {"role": ..., "content": ...} dicts."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)
