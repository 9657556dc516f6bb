"""`multitoken serve PATH`: an OpenAI-compatible HTTP server over `MultiTokenLM.generate`.

Endpoints: POST /v1/completions and /v1/chat/completions (server-sent events with "stream": true), GET /v1/models
and /health. One worker thread owns the model: handlers queue jobs and await them, so the event loop never waits
on a forward. Requests that arrive within the batch window with the same options are decoded as one batch
(`Job.batchable` says which may). Every response carries the decoding statistics under "multitoken".

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="demo", prompt="def fib(n):", max_tokens=64, temperature=0)
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multitoken.api import Generation, MultiTokenLM, load
from multitoken.errors import UserError

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as exc:  # the `serve` extra is optional
    raise UserError(
        f"serving needs fastapi and uvicorn ({exc.name} is missing): pip install 'multitoken[serve]'"
    ) from None

logger = logging.getLogger(__name__)

# The API's stop reasons as OpenAI's finish reasons: the context's end is a length limit too.
FINISH_REASONS = {"length": "length", "context": "length", "eos": "stop", "stop": "stop"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat goes on to the context's end


# --------------------------------------------------------------------------------------------------
# requests


def _as_list(value: Any) -> Any:
    """A string as a list of one; a list as it is, its items checked by the field's type."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")
    return value


class _Body(BaseModel):
    """What both endpoints read. Strict: a string is not a number. Fields we do not use (logprobs, user, ...) are
    ignored; null means the default, as OpenAI's clients send it."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: list[str] | None = None  # one string, or several
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = None
    n: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported; send the request n times")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        if stop is None:
            return None
        if "" in (stops := _as_list(stop)):  # it would cut every text before its first character
            raise ValueError("a stop string must not be empty")
        return stops


class CompletionBody(_Body):
    """POST /v1/completions."""

    prompt: list[str] = Field(min_length=1)  # one string, or several
    max_tokens: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_list(cls, prompt: Any) -> Any:
        return _as_list(prompt)


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str


class ChatBody(_Body):
    """POST /v1/chat/completions; `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
    """An HTTP error, answered in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    @property
    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """`raw` as `model`, whatever its content type; a mistake becomes a 400 naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors(include_input=False, include_url=False)[0]
        if error["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {error['ctx']['error']}") from None
        loc = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix to a validator's own message
        raise ApiError(400, f"{loc or 'request body'}: {message}", str(error["loc"][0]) if loc else None) from None


# --------------------------------------------------------------------------------------------------
# the worker


@dataclass(frozen=True)
class Options:
    """How a request decodes; requests with equal options can share a batch."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None  # None: drawn afresh for each batch
    stop: tuple[str, ...]


def request_options(body: _Body, max_tokens: int, context: int) -> Options:
    """The decoding options of a request. Greedy decoding ignores the sampling fields, so they are dropped and
    never keep greedy requests out of each other's batches."""
    if max_tokens > context:
        raise ApiError(400, f"max_tokens is {max_tokens}; the model's context is {context} tokens", "max_tokens")
    stop = tuple(body.stop or ())
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    if temperature == 0:
        return Options(max_tokens, 0.0, None, None, None, stop)
    return Options(max_tokens, temperature, body.top_k, body.top_p, body.seed, stop)


@dataclass
class Job:
    """One request for the worker: prompts, or one conversation (chat messages).

    emit(piece): streams the text (one prompt only); it runs on the worker thread.
    """

    prompt: list[str] | list[dict[str, str]]
    chat: bool
    options: Options
    emit: Callable[[str], None] | None = None
    future: Future[Outcome] = field(default_factory=Future)

    @property
    def size(self) -> int:
        """Sequences the job adds to a batch."""
        return 1 if self.chat else len(self.prompt)

    @property
    def batchable(self) -> bool:
        """Whether the job may share a batch. `generate` streams one prompt and renders one conversation per call;
        and a batch draws from one generator, so a seeded sample decoded with others would depend on them."""
        return self.emit is None and not self.chat and (self.options.temperature == 0 or self.options.seed is None)


@dataclass
class Outcome:
    """A job's generations (one per prompt), their prompts' token counts and the sequences decoded with them."""

    generations: list[Generation]
    prompt_tokens: list[int]
    batch_size: int


class Batcher:
    """The worker thread that owns the model. It takes the oldest job, gathers for `window` seconds the queued jobs
    that may join it (equal options, at most `max_batch` sequences in all) and decodes them with one `generate`
    call. Jobs that may not join wait, in order, for the next batch. `counts` says what it has done."""

    def __init__(self, lm: MultiTokenLM, decoding: str, window: float, max_batch: int) -> None:
        self.lm, self.decoding, self.window, self.max_batch = lm, decoding, window, max_batch
        self.counts = {"batches": 0, "largest_batch": 0}  # generate calls, and the most sequences in one
        eos = lm.tokenizer.decode([lm.tokenizer.eos_id])
        self.stop_tokens = (eos,) if eos else ()  # the end-of-text token ends a text without showing in it
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: deque[Job | None] = deque()
        self._thread = threading.Thread(target=self._work, name="multitoken-serve", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Future[Outcome]:
        """Queue `job`; its future gets the `Outcome`, or the exception that decoding raised."""
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Decode what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # a gone client's job drops
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        first = self._waiting.popleft() if self._waiting else self._queue.get()
        if first is None:
            return None
        batch, size = [first], first.size
        if not first.batchable:
            return batch
        for job in list(self._waiting):
            if self._joins(first, job, size):
                self._waiting.remove(job)
                batch.append(job)
                size += job.size
        deadline = time.monotonic() + self.window
        while size < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if self._joins(first, job, size):
                batch.append(job)
                size += job.size
            else:
                self._waiting.append(job)
        return batch

    def _joins(self, first: Job, job: Job | None, size: int) -> bool:
        return job is not None and job.batchable and job.options == first.options and size + job.size <= self.max_batch

    def _run(self, batch: list[Job]) -> None:
        try:
            outcomes = self._decode(batch)
        except UserError as exc:
            if len(batch) > 1:  # one request's mistake (a prompt too long) must not fail the others: each alone
                for job in batch:
                    self._run([job])
            else:
                batch[0].future.set_exception(exc)
            return
        except Exception as exc:  # each handler reports it (a 500, logged) and the worker goes on
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, outcome in zip(batch, outcomes, strict=True):
            job.future.set_result(outcome)

    def _decode(self, batch: list[Job]) -> list[Outcome]:
        first, o = batch[0], batch[0].options
        prompt = first.prompt if first.chat else [p for job in batch for p in job.prompt]
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], sum(job.size for job in batch))
        out = self.lm.generate(
            prompt, max_new_tokens=o.max_new_tokens, decoding=self.decoding, temperature=o.temperature,
            top_k=o.top_k, top_p=o.top_p, seed=secrets.randbits(63) if o.seed is None else o.seed,
            stop=o.stop + self.stop_tokens, stream=first.emit,
        )  # fmt: skip
        generations = [out] if isinstance(out, Generation) else out
        # Counted here, on the thread that owns the tokenizer: its special-token switch is not thread-safe.
        prompt_tokens = [len(self.lm.tokenizer.encode(g.prompt, special_tokens=first.chat)) for g in generations]
        outcomes, start = [], 0
        for job in batch:
            end = start + job.size
            outcomes.append(Outcome(generations[start:end], prompt_tokens[start:end], len(generations)))
            start = end
        return outcomes


class StopFilter:
    """What of a streamed text may be shown: the text before the first stop string, less a tail that may be the
    start of one (the next piece decides). What it shows is always a start of the final, cut text."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.text, self.sent = stops, "", ""

    def feed(self, piece: str) -> str:
        """Add `piece`; return the text that may be shown now and was not shown before."""
        self.text += piece
        end = min((i for s in self.stops if (i := self.text.find(s)) >= 0), default=len(self.text))
        for s in self.stops:
            held = next((k for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), 0)
            end = min(end, len(self.text) - held)
        new = self.text[len(self.sent) : end]
        self.sent += new
        return new


class _Disconnected(Exception):
    """Raised in the decode of a stream whose client has gone, so that it stops."""


# --------------------------------------------------------------------------------------------------
# the app


def create_app(
    lm: MultiTokenLM, *, name: str, decoding: str | None = None, batch_window_ms: float = 10.0, max_batch: int = 8
) -> FastAPI:
    """The server's app for `lm`, served as model `name`. decoding: "plain", "chain" or "tree" (default: the
    model's own, `lm.default_decoding`); greedy at temperature 0, sampled otherwise. The worker starts and stops
    with the app's lifespan."""
    batcher = Batcher(lm, decoding or lm.default_decoding, batch_window_ms / 1000, max_batch)
    context, created = lm.model.cfg.max_seq_len, int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)

    app = FastAPI(title="multitoken", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # logged by the server, not sent
        return JSONResponse(ApiError(500, "internal server error", kind="server_error").body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "decoding": batcher.decoding, **batcher.counts}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "multitoken"}],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> dict[str, Any] | StreamingResponse:
        body = parse_body(CompletionBody, await request.body())
        if len(body.prompt) > max_batch:
            raise ApiError(400, f"at most {max_batch} prompts per request (the server's --max-batch)", "prompt")
        if body.stream and len(body.prompt) != 1:
            raise ApiError(400, "a stream carries one prompt's text; give one prompt", "prompt")
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        job = Job(body.prompt, False, request_options(body, max_tokens, context))
        return await (stream(job) if body.stream else answer(job))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
        body = parse_body(ChatBody, await request.body())
        if lm.tokenizer.chat_template is None:
            raise ApiError(400, f"model {name} has no chat template; use /v1/completions with a prompt", "messages")
        max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None), context)
        job = Job([m.model_dump() for m in body.messages], True, request_options(body, max_tokens, context))
        return await (stream(job) if body.stream else answer(job))

    def head(job: Job, chunk: bool) -> dict[str, Any]:
        if job.chat:
            kind, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl"
        else:
            kind, prefix = "text_completion", "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": name}

    def statistics(outcome: Outcome) -> dict[str, Any]:
        gens = outcome.generations
        prompt, completion = sum(outcome.prompt_tokens), sum(len(g.token_ids) for g in gens)
        stats = gens[0].stats  # the batch's: every generation of a batch carries the same
        return {
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "multitoken": {
                "decoding": batcher.decoding,
                "tokens_per_forward": sum(g.tokens_per_forward for g in gens) / len(gens),
                "batch_size": outcome.batch_size,
                **{k: stats[k] for k in ("accept_histogram", "head_acceptance") if k in stats},
            },
        }

    async def answer(job: Job) -> dict[str, Any]:
        try:
            outcome = await asyncio.wrap_future(batcher.submit(job))
        except Exception as exc:
            raise _api_error(exc) from None
        choices = []
        for i, g in enumerate(outcome.generations):
            text = (
                {"message": {"role": "assistant", "content": g.text}}
                if job.chat
                else {"text": g.text, "logprobs": None}
            )
            choices.append({"index": i, **text, "finish_reason": FINISH_REASONS[g.stop_reason]})
        return {**head(job, chunk=False), "choices": choices, **statistics(outcome)}

    async def stream(job: Job) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: the decode has ended
        gone = threading.Event()

        def emit(piece: str) -> None:  # on the worker thread
            if gone.is_set():
                raise _Disconnected
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        job.emit = emit
        future = batcher.submit(job)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        try:  # a mistake found before the first piece is still an HTTP error, not an event
            first = await pieces.get()
        except asyncio.CancelledError:
            gone.set()
            raise
        if first is None and future.exception() is not None:
            raise _api_error(future.exception())
        top = head(job, chunk=True)

        def event(text: str | None, finish: str | None = None, **extra: Any) -> str:
            if job.chat:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**top, 'choices': [choice], **extra})}\n\n"

        async def events() -> AsyncIterator[str]:
            shown = StopFilter(job.options.stop + batcher.stop_tokens)
            try:
                if job.chat:
                    yield event(None)  # the assistant's role comes first, as OpenAI sends it
                piece = first
                while piece is not None:
                    if text := shown.feed(piece):
                        yield event(text)
                    piece = await pieces.get()
                if (exc := future.exception()) is not None:
                    yield f"data: {json.dumps(_api_error(exc).body)}\n\n"
                else:
                    outcome = future.result()
                    gen = outcome.generations[0]
                    if rest := gen.text[len(shown.sent) :]:  # held back to the end, e.g. half a stop string
                        yield event(rest)
                    yield event("", FINISH_REASONS[gen.stop_reason], **statistics(outcome))
                yield "data: [DONE]\n\n"
            finally:
                gone.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _api_error(exc: BaseException) -> ApiError:
    """A failed decode as an HTTP error: the API's UserError (a prompt too long, ...) is the client's mistake, a
    400; anything else is logged here and answered as a 500, without its traceback."""
    if isinstance(exc, UserError):
        return ApiError(400, str(exc))
    logger.error("decoding failed", exc_info=exc)
    return ApiError(500, "the server failed to decode this request; see its log", kind="server_error")


# --------------------------------------------------------------------------------------------------
# running


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line UserError."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, OverflowError) as exc:  # in use, no such address, a port past 65535
        raise UserError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    decoding: str | None = None,
    batch_window_ms: float = 10.0,
    max_batch: int = 8,
) -> None:
    """Serve the model at `path` (anything `multitoken.load` reads) on host:port until interrupted."""
    sock = bind(host, port)  # before the model loads: a port in use fails at once
    try:
        lm = load(path, device, dtype)
        lm.generate("Hello", max_new_tokens=1, decoding=decoding)  # checks --decoding against the model; warms up
        name = Path(path).resolve().name
        app = create_app(lm, name=name, decoding=decoding, batch_window_ms=batch_window_ms, max_batch=max_batch)
        decoder = decoding or lm.default_decoding
        print(f"serving {name} ({decoder} decoding) at http://{host}:{sock.getsockname()[1]}/v1", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
