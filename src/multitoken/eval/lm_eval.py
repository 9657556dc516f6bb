"""The lm-evaluation-harness model "multitoken": any model `multitoken.load` reads, scored by head 1 and generating
by self-speculative decoding.

lm-eval's command line finds only the models its own package registers, so this module runs that command line
with "multitoken" registered (`multitoken lm-eval ...`, or `python -m multitoken.eval.lm_eval ...`); every
argument is lm-eval's:

    multitoken lm-eval --model multitoken --model_args pretrained=runs/demo,decoding=tree,dtype=fp32 \\
        --tasks my_task --include_path my_tasks/

From Python, `lm_eval.simple_evaluate(model=MultiTokenEvalLM(pretrained=...), ...)` or `model="multitoken"` once
this module is imported.

Log-likelihoods come from head 1, the next-token head, in batches; a context that does not fit loses tokens on
its left, as lm-eval's Hugging Face model does. Generation decodes with the heads' drafts (the tree, the chain or
plainly), so greedy text is plain greedy text; the tokens per forward over every generate request are logged and
reported in the results' config (`results["config"]["multitoken"]`).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from multitoken.api import DECODINGS, load
from multitoken.argtypes import COUNT, NATURAL, NONNEGATIVE, PROBABILITY
from multitoken.errors import UserError

if __name__ == "__main__":
    # `python -m multitoken.eval.lm_eval ...` is `multitoken lm-eval ...`, run before this copy of the module
    # registers its model: the command line imports the module under its own name, which registers it once.
    from multitoken.cli import main as cli_main

    sys.exit(cli_main(["lm-eval", *sys.argv[1:]]))

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ModuleNotFoundError as exc:  # the `lm-eval` extra is optional
    raise UserError(
        f"evaluating with lm-eval needs its package ({exc.name} is missing): pip install 'multitoken[lm-eval]'"
    ) from None

# Under lm-eval's logger, whose handler its command line sets up, so the line shows beside its own.
logger = logging.getLogger("lm_eval.models.multitoken")

# The generation options of lm-eval's requests this model follows; any other is refused, not ignored.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")

# lm-eval's caches of responses (--use_cache: a SQLite file of pickles) and of requests (--cache_requests: dill
# files) run code from the file when read.
PICKLED_CACHES = ("--use_cache", "--cache_requests")


@register_model("multitoken")
class MultiTokenEvalLM(TemplateLM):
    """A multitoken model as an lm-eval `LM`.

    pretrained: a run directory, Hugging Face folder or .gguf file (`multitoken.load`). decoding: "plain", "chain"
    or "tree" for generate requests (default: the model's, `MultiTokenLM.default_decoding`). device: default CUDA
    when there is one; CUDA where there is none means the CPU, as for lm-eval's own models, since lm-eval's command
    line asks for cuda:0 unless told. dtype: "fp32" or "bf16" (default fp32). batch_size: requests per forward or
    per decode. max_gen_toks: tokens generated when a request does not say. seed: of sampled generations (batch k
    draws from seed + k). max_batch_size is accepted and unused: lm-eval passes it for batch_size "auto", which
    this model does not take.
    """

    def __init__(
        self,
        pretrained: str,
        decoding: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_gen_toks: int | str = 256,
        seed: int | str = 0,
    ) -> None:
        super().__init__()
        if decoding is not None and decoding not in DECODINGS:  # checked before hours of scoring, not after
            raise UserError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        self.lm = load(str(pretrained), _device(device), dtype)
        if decoding == "tree" and self.lm.tree is None:
            raise UserError(f"{pretrained} has no draft tree: calibrate one (`multitoken calibrate`) or use a chain")
        self.decoding = decoding or self.lm.default_decoding
        self._device = self.lm.device
        self._batch_size = _option("batch_size", 1 if batch_size is None else batch_size, COUNT)
        self.max_gen_toks = _option("max_gen_toks", max_gen_toks, NATURAL)
        self.seed = _option("seed", seed, NATURAL)
        self.generate_requests = self.generated_tokens = self.forwards = 0

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> MultiTokenEvalLM:
        """The model of `model_args` (`arg_dict`) and lm-eval's own settings (`additional_config`: device,
        batch_size, max_batch_size). lm-eval's command line always sends its settings, so a key also in model_args
        takes the model_args value instead of being passed twice."""
        settings = {k: v for k, v in (additional_config or {}).items() if v is not None}
        known = inspect.signature(cls).parameters
        unknown = sorted(set(arg_dict) - set(known))
        if unknown:
            raise UserError(f"model_args: {', '.join(unknown)} is not an option of multitoken ({', '.join(known)})")
        if "pretrained" not in arg_dict:
            raise UserError("model_args needs pretrained=PATH (a run directory, Hugging Face folder or .gguf file)")
        return cls(**{**settings, **arg_dict})

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> MultiTokenEvalLM:
        """`create_from_arg_obj` of lm-eval's "key=value,key=value" model_args."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ----------------------------------------------------------------------------------------------
    # what lm-eval's TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token: a document's first token is scored after it (lm-eval's prefix token)."""
        return self.lm.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        """The model's context in tokens."""
        return self.lm.model.cfg.max_seq_len

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of `string`, as `generate` encodes a prompt (special tokens as plain text)."""
        return self.lm.tokenizer.encode(string)

    def set_cache_hook(self, cache_hook: Any) -> None:
        """Refuse lm-eval's response cache (`use_cache`): it reads pickles, which run code, from its file."""
        if getattr(cache_hook, "dbdict", None) is not None:
            raise UserError("use_cache keeps responses as pickles, which run code when read: evaluate without it")
        super().set_cache_hook(cache_hook)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Not supported: the rendered template would reach the tokenizer as plain text."""
        raise UserError("the multitoken lm-eval model takes no chat template: run without --apply_chat_template")

    # ----------------------------------------------------------------------------------------------
    # log-likelihoods from head 1

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether it is head 1's greedy choice at every token) for each
        (key, context ids, continuation ids), in batches of similar lengths.

        Context and continuation together are cut on the left to the context plus one token (the last token is
        predicted, never read), as lm-eval's Hugging Face model does; a continuation longer than the context
        cannot be scored at all.
        """
        limit = self.max_length
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="multitoken loglikelihood") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                inputs, targets = [], []
                for _, context, continuation in chunk:
                    if len(continuation) > limit:
                        raise UserError(
                            f"a continuation of {len(continuation)} tokens exceeds the model's context of {limit}"
                        )
                    inputs.append((context + continuation)[-(limit + 1) :][:-1])
                    targets.append(continuation)
                results += self._score(inputs, targets)
                bar.update(len(chunk))
        return order.get_original(results)

    @torch.no_grad()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """Score each `targets[b]` as the tokens after the last len(targets[b]) positions of `inputs[b]`, in one
        forward of head 1. Right padding is never read: attention is causal."""
        width = max(len(x) for x in inputs)
        batch = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)  # (B, T)
        for b, ids in enumerate(inputs):
            batch[b, : len(ids)] = torch.tensor(ids)
        logits = self.lm.model(batch.to(self.device), heads=[0])[:, :, 0]  # (B, T, V)
        out = []
        for b, (ids, target) in enumerate(zip(inputs, targets, strict=True)):
            rows = logits[b, len(ids) - len(target) : len(ids)].float().log_softmax(dim=-1)  # (n, V)
            expected = torch.tensor(target, device=rows.device)
            picked = rows.gather(-1, expected[:, None]).sum()
            out.append((float(picked), bool((rows.argmax(dim=-1) == expected).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log P(text) of each request's text, first token after the end-of-text token. Text longer than the
        context is scored in lm-eval's disjoint rolling windows, each token once with as much context as fits."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for pair in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                context, continuation = make_disjoint_window(pair)
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += logprob
        return totals

    # ----------------------------------------------------------------------------------------------
    # generation by self-speculative decoding

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each request's context under its generation options (`GEN_KWARGS`) with `MultiTokenLM.generate`,
        in batches of requests with the same options; the text ends before the first `until` string or the
        end-of-text token. A context longer than the context less max_gen_toks loses text on its left."""
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        texts = []
        eos_text = self.lm.tokenizer.decode([self.eot_token_id])
        with tqdm(total=len(requests), disable=disable_tqdm, desc="multitoken generate_until") as bar:
            for k, chunk in enumerate(order.get_batched(n=self.batch_size)):
                contexts, options = zip(*chunk, strict=True)
                settings = generation_settings(options[0], self.max_gen_toks)
                room = self.max_length - settings["max_new_tokens"]
                if room < 1:
                    raise UserError(
                        f"max_gen_toks {settings['max_new_tokens']} leaves no room for a prompt in the model's "
                        f"context of {self.max_length} tokens"
                    )
                prompts = [keep_last_tokens(c, room, self.tok_encode) for c in contexts]
                settings["stop"] = [*settings["stop"], eos_text]  # the text ends before end-of-text, as in lm-eval
                outs = self.lm.generate(prompts, decoding=self.decoding, seed=self.seed + k, **settings)
                for g in outs:
                    # The API gives each sequence's tokens per forward; its forward count is tokens over that ratio
                    # (an integer the float division returns within rounding). max_gen_toks 0 yields no token.
                    n = len(g.token_ids)
                    self.generated_tokens += n
                    self.forwards += round(n / g.tokens_per_forward) if n else 0
                texts += [g.text for g in outs]
                bar.update(len(chunk))
        self.generate_requests += len(requests)
        if requests:
            logger.info(
                "multitoken: %d generate requests, %d tokens in %d forwards: %.3f tokens per forward (%s decoding)",
                self.generate_requests, self.generated_tokens, self.forwards, self.tokens_per_forward, self.decoding,
            )  # fmt: skip
        return order.get_original(texts)

    @property
    def tokens_per_forward(self) -> float:
        """Tokens generated per forward over every generate request so far (1.0 for plain decoding)."""
        return self.generated_tokens / max(self.forwards, 1)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval adds to its results' config: the decoding and its tokens per forward."""
        return {
            "multitoken": {
                "decoding": self.decoding,
                "n_future": self.lm.model.cfg.n_future,
                "generate_requests": self.generate_requests,
                "generated_tokens": self.generated_tokens,
                "forwards": self.forwards,
                "tokens_per_forward": self.tokens_per_forward,
            }
        }


def generation_settings(gen_kwargs: dict[str, Any], max_gen_toks: int) -> dict[str, Any]:
    """`MultiTokenLM.generate` keywords from an lm-eval request's generation options, read as lm-eval's own models
    read them: do_sample False means greedy whatever the temperature; do_sample True without a temperature
    samples at 1; without do_sample a positive temperature samples."""
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise UserError(
            f"generation option {', '.join(unknown)} is not supported by the multitoken model "
            f"(it follows {', '.join(GEN_KWARGS)})"
        )
    until = gen_kwargs.get("until") or []
    do_sample = gen_kwargs.get("do_sample")
    temperature = _option("temperature", gen_kwargs.get("temperature", 1.0 if do_sample else 0.0), NONNEGATIVE)
    top_k, top_p = gen_kwargs.get("top_k"), gen_kwargs.get("top_p")
    return {
        "stop": [until] if isinstance(until, str) else list(until),
        "max_new_tokens": _option("max_gen_toks", gen_kwargs.get("max_gen_toks", max_gen_toks), NATURAL),
        "temperature": 0.0 if do_sample is False else temperature,
        "top_k": None if top_k is None else _option("top_k", top_k, COUNT),
        "top_p": None if top_p is None else _option("top_p", top_p, PROBABILITY),
    }


def keep_last_tokens(text: str, limit: int, encode: Callable[[str], list[int]]) -> str:
    """The longest end of `text` (cut at a character) that encodes to at most `limit` tokens.

    Cutting text rather than token ids keeps the prompt a string that `generate` encodes itself, and never
    splits a character. The cut is found by bisection: a later cut leaves fewer tokens (BPE merges across the
    cut can bend this by a token, and the end returned still fits).
    """
    if len(encode(text)) <= limit:
        return text
    fits, over = len(text), 0  # text[fits:] fits, text[over:] does not
    while fits - over > 1:
        mid = (fits + over) // 2
        if len(encode(text[mid:])) <= limit:
            fits = mid
        else:
            over = mid
    return text[fits:]


def _device(device: str | None) -> torch.device:
    """The device to load the model on (see `MultiTokenEvalLM`), or a one-line UserError for a name torch does not
    know."""
    from multitoken.pretrain import default_device

    if device is None:
        return default_device()
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UserError(f"device must be a torch device (cpu, cuda, cuda:1, ...), got {device!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        logger.warning("multitoken: %s asked for, but CUDA is not available: evaluating on the CPU", device)
        return torch.device("cpu")
    return chosen


def _option(name: str, value: Any, parse: Callable[[str], Any]) -> Any:
    """A numeric option of the model or of a request (lm-eval passes command-line text or numbers) read by one of
    the command line's argument types, or a one-line UserError saying what it must be."""
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"{name} {exc}") from None


def main(argv: Sequence[str]) -> None:
    """lm-eval's command line on `argv` (`run`, `ls`, `validate`; `run` when no command is named) with the
    "multitoken" model registered. Its pickled caches are refused before anything runs."""
    probe = argparse.ArgumentParser(add_help=False)  # matches the flags' abbreviations as lm-eval's parser does
    for flag in PICKLED_CACHES:
        probe.add_argument(flag, nargs="?", const=True)
    found, _ = probe.parse_known_args(argv)
    for flag in PICKLED_CACHES:
        if getattr(found, flag.lstrip("-")) is not None:
            raise UserError(f"{flag}: lm-eval's cache keeps pickles, which run code when read; run without it")
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's command line reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
