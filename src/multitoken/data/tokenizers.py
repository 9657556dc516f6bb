"""Tokenizers: raw bytes, or byte-level BPE through Hugging Face `tokenizers`.

Both kinds share one small interface (`Tokenizer`) and save themselves into a run directory as a
`tokenizer_config.json` (plus `tokenizer.json` for BPE), so a checkpoint always carries the exact
tokenizer it was trained with. `<|endoftext|>` separates documents in the token stream.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from multitoken.checkpoint import read_json
from multitoken.errors import DataError

EOS_TOKEN = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
# End-of-document tokens of common pretrained tokenizers, in order of preference.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>")


class Tokenizer(ABC):
    """Text <-> token ids, with one end-of-document id (`eos_id`)."""

    kind: str
    vocab_size: int
    eos_id: int

    chat_template: str | None = None  # a Jinja template (transformers' format) that renders chat messages

    @abstractmethod
    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; no end-of-document id is added. With `special_tokens`, a special token's text
        (`<|im_start|>`, `<|endoftext|>`) becomes its id, as transformers does; otherwise it is plain text."""

    def __call__(self, text: str, special_tokens: bool = False) -> list[int]:
        return self.encode(text, special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text of `messages` ([{"role": ..., "content": ...}]) under the tokenizer's chat template, rendered
        in a sandboxed Jinja environment (a template from a file can read only what it is given); encode it with
        `special_tokens=True`."""
        if self.chat_template is None:
            raise DataError("this tokenizer has no chat template; give a plain text prompt")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:  # transformers' templates call it to reject bad input
            raise DataError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                eos_token=getattr(self, "eos_token", EOS_TOKEN), bos_token="",
            )  # fmt: skip
        except TemplateError as exc:
            raise DataError(f"cannot render the chat template: {exc}") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (subclasses override with a faster path)."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD instead of raising."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the files that `load_tokenizer(directory)` reads back."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Identity of this tokenizer (kind, vocabulary and merges); a cache key for token stores."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is `<|endoftext|>`."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of `text`; with `special_tokens`, each `<|endoftext|>` is the end-of-text id."""
        if not special_tokens:
            return list(text.encode("utf-8"))
        pieces = [list(piece.encode("utf-8")) for piece in text.split(EOS_TOKEN)]
        return [t for i, piece in enumerate(pieces) for t in ([self.eos_id] if i else []) + piece]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; each `eos_id` is rendered as `<|endoftext|>`."""
        pieces: list[str] = []
        start = 0
        ids = list(ids)
        for i, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} out of range for the byte tokenizer (0..256)")
            if token == self.eos_id:
                # Decode each run between separators on its own, so a separator never glues two
                # partial UTF-8 sequences into one character.
                pieces.append(bytes(ids[start:i]).decode("utf-8", errors="replace"))
                pieces.append(EOS_TOKEN)
                start = i + 1
        pieces.append(bytes(ids[start:]).decode("utf-8", errors="replace"))
        return "".join(pieces)

    def save(self, directory: Path) -> None:
        """Write `tokenizer_config.json` ({"kind": "bytes"})."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"kind": self.kind}) + "\n")

    @property
    def fingerprint(self) -> str:
        """Always `bytes-257`: there is only one byte tokenizer."""
        return f"{self.kind}-{self.vocab_size}"


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE when trained here)."""

    kind = "bpe"

    def __init__(
        self, hf_tokenizer: HFTokenizer, eos_token: str | None = None, chat_template: str | None = None
    ) -> None:
        """Wrap `hf_tokenizer`; `eos_token` defaults to the first of `EOS_CANDIDATES` it knows."""
        self._hf = hf_tokenizer
        self.chat_template = chat_template
        # A literal "<|endoftext|>" inside a source file is text, not a document boundary: only the
        # token store inserts separators, exactly as the byte tokenizer does.
        self._hf.encode_special_tokens = True
        candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        for token in candidates:
            token_id = hf_tokenizer.token_to_id(token)
            if token_id is not None:
                self.eos_token = token
                self.eos_id = token_id
                break
        else:
            raise DataError(f"tokenizer has no end-of-text token (looked for {', '.join(candidates)})")
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._fingerprint = (
            f"{self.kind}-{self.vocab_size}-"
            + hashlib.blake2b(hf_tokenizer.to_str().encode("utf-8"), digest_size=8).hexdigest()
        )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE of `vocab_size` tokens (including `<|endoftext|>`) on `texts`.

        All 256 bytes are in the initial alphabet, so any text round-trips even if unseen in training.
        """
        if vocab_size < 257:
            raise DataError(f"BPE vocab_size must be at least 257 (256 bytes + eos), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf, EOS_TOKEN)

    @classmethod
    def from_file(cls, path: Path, eos_token: str | None = None, chat_template: str | None = None) -> BPETokenizer:
        """Load a `tokenizer.json` (trained here or from a pretrained model)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"no tokenizer file {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on any parse error
            raise DataError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(hf, eos_token, chat_template)

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, without a pretrained tokenizer's BOS/EOS decorations; with `special_tokens`,
        special tokens written in the text are recognised (a chat prompt), as transformers does."""
        if not special_tokens:
            return self._hf.encode(text, add_special_tokens=False).ids
        self._hf.encode_special_tokens = False
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        finally:
            self._hf.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust library."""
        return [enc.ids for enc in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included; invalid UTF-8 becomes U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` ({"kind": "bpe", "eos_token": ...})."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(directory / TOKENIZER_FILE))
        config = {"kind": self.kind, "eos_token": self.eos_token}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config) + "\n")

    @property
    def fingerprint(self) -> str:
        """`bpe-<vocab_size>-<hash of tokenizer.json>`."""
        return self._fingerprint


def load_tokenizer(path: Path) -> Tokenizer:
    """Load the tokenizer saved in a run directory, or a `tokenizer.json` file."""
    path = Path(path)
    if path.is_file():
        return BPETokenizer.from_file(path)
    config_path = path / CONFIG_FILE
    if config_path.is_file():
        config = read_json(config_path, DataError)
        kind = config.get("kind") if isinstance(config, dict) else None
        if not isinstance(kind, str):
            raise DataError(f"corrupt tokenizer config {config_path}: it names no tokenizer kind")
        if kind == ByteTokenizer.kind:
            return ByteTokenizer()
        if kind == BPETokenizer.kind:
            template = config.get("chat_template")
            template = template if isinstance(template, str) else None
            eos = config.get("eos_token")
            return BPETokenizer.from_file(path / TOKENIZER_FILE, eos if isinstance(eos, str) else None, template)
        raise DataError(f"unknown tokenizer kind {kind!r} in {config_path}")
    if (path / TOKENIZER_FILE).is_file():
        return BPETokenizer.from_file(path / TOKENIZER_FILE)
    raise DataError(f"no tokenizer in {path}")


def build_tokenizer(kind: str, texts: Iterable[str] | None, vocab_size: int) -> Tokenizer:
    """Make the tokenizer a run asks for.

    `kind` is "bytes" (`vocab_size` is ignored: always 257), "bpe" (trained on `texts` to
    `vocab_size` tokens), or a path to a `tokenizer.json` / run directory to load.
    """
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == BPETokenizer.kind:
        if texts is None:
            raise DataError("training a BPE tokenizer needs texts")
        return BPETokenizer.train(texts, vocab_size)
    if Path(kind).exists():
        return load_tokenizer(Path(kind))
    raise DataError(f"unknown tokenizer {kind!r}: expected 'bytes', 'bpe' or a path to a tokenizer.json")
