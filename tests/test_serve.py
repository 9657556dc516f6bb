"""The HTTP server: its texts are the Python API's, streamed or not, batched or not, and through OpenAI's client."""

import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

import multitoken
from multitoken.api import MultiTokenLM
from multitoken.cli import main
from multitoken.data.tokenizers import EOS_TOKEN, BPETokenizer, ByteTokenizer
from multitoken.generate.tree import Tree
from multitoken.serve import StopFilter, bind, create_app
from tests.conftest import make_model
from tests.generate.test_speculative import held_out_prompts, trained_model

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONTEXT = 96  # make_model's max_seq_len
# Text in the trained model's language: its token ids as bytes (ASCII below 61), on which its heads often agree.
PROMPTS = ["".join(map(chr, p)) for p in held_out_prompts(4)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained model with three heads and a tree, its token ids as bytes, saved as a run directory."""
    lm = MultiTokenLM(trained_model(), ByteTokenizer(), tree=Tree(((0,), (1,), (0, 0))))
    return lm.save(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A random model over all 257 byte tokens (any prompt is in its vocabulary), for the command line."""
    lm = MultiTokenLM(make_model(vocab_size=257), ByteTokenizer(), tree=Tree(((0,), (1,), (0, 0))))
    return lm.save(tmp_path_factory.mktemp("serve") / "random")


@pytest.fixture(scope="module")
def lm(run):
    return multitoken.load(run)


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, name="run")) as c:
        yield c


def shown(out) -> str:
    """The API's text as the server shows it: the end-of-text token ends the text without appearing in it."""
    return out.text.removesuffix(EOS_TOKEN) if out.stop_reason == "eos" else out.text


def finish(out) -> str:
    return "stop" if out.stop_reason in ("eos", "stop") else "length"


def events(response) -> list[dict]:
    """The JSON objects of a server-sent event stream, which must end with [DONE]."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"
    return [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]


def test_greedy_completions_are_the_api_text(client, lm):
    for prompt in (PROMPTS[0], PROMPTS[1:3]):
        r = client.post("/v1/completions", json={"model": "run", "prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        prompts = [prompt] if isinstance(prompt, str) else prompt
        alone = [lm.generate(p, max_new_tokens=24) for p in prompts]  # the oracle: one prompt at a time
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "run"
        assert [c["text"] for c in body["choices"]] == [shown(o) for o in alone]
        assert [c["finish_reason"] for c in body["choices"]] == [finish(o) for o in alone]
        assert [c["index"] for c in body["choices"]] == list(range(len(prompts)))
        n_prompt, n_new = sum(len(p.encode()) for p in prompts), sum(len(o.token_ids) for o in alone)
        assert body["usage"] == {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_new,
            "total_tokens": n_prompt + n_new,
        }
        stats = body["multitoken"]
        assert stats["decoding"] == lm.default_decoding == "tree" and stats["batch_size"] == len(prompts)
        assert stats["tokens_per_forward"] == sum(o.tokens_per_forward for o in alone) / len(alone)
        if len(prompts) == 1:  # a batch's histogram counts every sequence in it
            assert stats["accept_histogram"] == alone[0].stats["accept_histogram"]


def test_sampling_with_a_seed_is_the_api_draw(client, lm):
    request = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 7}
    texts = [client.post("/v1/completions", json=request).json()["choices"][0]["text"] for _ in range(2)]
    out = lm.generate(PROMPTS[0], max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    assert texts == [shown(out)] * 2


def test_streams_concatenate_to_the_text(client, lm):
    sampled = {"temperature": 1.0, "seed": 3}  # seeded: the stream and the whole answer are the same draw
    full = lm.generate(PROMPTS[2], max_new_tokens=40, **sampled)
    # A stop string first met well inside the text: the stream must hold back what may be its start, then cut.
    stop = next(full.text[i : i + 3] for i in range(8, 30) if full.text.find(full.text[i : i + 3]) == i)
    for extra in ({"temperature": 0}, sampled, {**sampled, "stop": stop}, {**sampled, "stop": ["\x00\x01no", stop]}):
        request = {"prompt": PROMPTS[2], "max_tokens": 40, **extra}
        whole = client.post("/v1/completions", json=request).json()
        chunks = events(client.post("/v1/completions", json={**request, "stream": True}))
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and len(chunks) > 2
        assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["multitoken"] == whole["multitoken"]
        if "stop" in extra:
            assert whole["choices"][0]["text"] == full.text[: full.text.find(stop)]
            assert whole["choices"][0]["finish_reason"] == "stop"


def test_the_stop_filter_shows_what_the_cut_text_starts_with():
    def cut(text: str, stops: list[str]) -> str:  # the slow twin: the whole text cut at its first stop string
        return text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]

    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choices("ab<", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("ab<>", k=rng.randint(0, 30)))
        bounds = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[i:j] for i, j in zip([0, *bounds], [*bounds, len(text)], strict=True)]
        shown_text = StopFilter(tuple(stops))
        for piece in pieces:
            shown_text.feed(piece)
            assert cut(text, stops).startswith(shown_text.sent)  # never shows what the rest may cut
        shown_text.feed("#")  # in no stop string: everything not cut is safe to show now
        assert shown_text.sent == cut(text + "#", stops)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A random model whose BPE tokenizer has ChatML's special tokens and template; two heads, no tree."""
    texts = ["def add(a, b):\n    return a + b\n", "Hello, world! Be brief.", "user assistant system"] * 20
    tok = BPETokenizer.train(texts, 300)
    tok._hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = BPETokenizer(tok._hf, EOS_TOKEN, CHATML)
    lm = MultiTokenLM(make_model(vocab_size=tok.vocab_size, n_future=2), tok)
    return lm.save(tmp_path_factory.mktemp("serve") / "chat")


def test_chat_completions_render_the_template(chat_run):
    lm = multitoken.load(chat_run)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    out = lm.generate(messages, max_new_tokens=12)
    request = {"model": "chat", "messages": messages, "max_tokens": 12, "temperature": 0}
    with TestClient(create_app(lm, name="chat")) as client:
        body = client.post("/v1/chat/completions", json=request).json()
        chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
        newer = client.post("/v1/chat/completions", json={**request, "max_tokens": None, "max_completion_tokens": 12})
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": shown(out)}, "finish_reason": finish(out)}
    ]
    prompt_tokens = len(lm.tokenizer.encode(out.prompt, special_tokens=True))
    assert out.prompt.endswith("<|im_start|>assistant\n") and body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["multitoken"]["decoding"] == "chain" and body["usage"]["completion_tokens"] == len(out.token_ids)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == shown(out)
    assert chunks[-1]["choices"][0]["finish_reason"] == finish(out) and chunks[-1]["usage"] == body["usage"]
    assert newer.json()["choices"] == body["choices"]


def test_concurrent_requests_share_a_batch_and_get_their_own_text(lm):
    prompts = PROMPTS[:3]
    greedy = [{"prompt": p, "max_tokens": 20, "temperature": 0} for p in prompts]
    sampled = [{"prompt": p, "max_tokens": 20, "temperature": 0.8, "seed": s} for s, p in enumerate(prompts[:2])]
    # A long window that closes early once max_batch sequences are in: the batch does not hang on the clock.
    with TestClient(create_app(lm, name="run", batch_window_ms=5000, max_batch=3)) as client:
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda r: client.post("/v1/completions", json=r).json(), greedy))
        after_greedy = client.get("/health").json()
        with ThreadPoolExecutor(2) as pool:  # seeded samples are decoded alone: their draw is the seed's alone
            drawn = list(pool.map(lambda r: client.post("/v1/completions", json=r).json(), sampled))
        after_sampled = client.get("/health").json()
    alone = [shown(lm.generate(p, max_new_tokens=20)) for p in prompts]
    assert [r["choices"][0]["text"] for r in together] == alone
    assert [r["multitoken"]["batch_size"] for r in together] == [3, 3, 3]
    assert after_greedy == {"status": "ok", "decoding": "tree", "batches": 1, "largest_batch": 3}
    draws = [shown(lm.generate(r["prompt"], max_new_tokens=20, temperature=0.8, seed=r["seed"])) for r in sampled]
    assert [r["choices"][0]["text"] for r in drawn] == draws
    assert after_sampled["batches"] == 3 and after_sampled["largest_batch"] == 3


def test_a_bad_request_in_a_batch_fails_alone(lm):
    good = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    bad = {**good, "prompt": "\x01" * (CONTEXT + 4)}  # longer than the context: the API refuses it
    with TestClient(create_app(lm, name="run", batch_window_ms=5000, max_batch=2)) as client:
        with ThreadPoolExecutor(2) as pool:
            ok, refused = pool.map(lambda r: client.post("/v1/completions", json=r), [good, bad])
        counts = client.get("/health").json()
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == shown(
        lm.generate(PROMPTS[0], max_new_tokens=16)
    )
    assert refused.status_code == 400 and "context" in refused.json()["error"]["message"]
    assert counts["batches"] == 3 and counts["largest_batch"] == 2  # decoded together first, then each alone


MALFORMED = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", [1, 2], None),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": CONTEXT + 1}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "a", "stop": ["x", ""]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 9}, "prompt"),  # over --max-batch
    ("/v1/completions", {"prompt": "\x01" * (CONTEXT + 4)}, None),  # the API's UserError
    ("/v1/completions", {"prompt": "\x01" * (CONTEXT + 4), "stream": True}, None),  # before any event
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),  # no chat template
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
]


def test_malformed_requests_get_openai_errors_and_the_server_goes_on(client, lm):
    for path, body, param in MALFORMED:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = client.post(path, **kwargs)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param and error["message"] and "Traceback" not in r.text, (body, error)
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        r = client.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    request = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logprobs": None}  # unknown: ignored
    r = client.post("/v1/completions", json=request)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == shown(lm.generate(PROMPTS[0], max_new_tokens=4))
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "run"


def test_a_failing_decode_is_a_500_without_its_traceback(lm, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in decoding")

    request = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(lm, name="run")) as client:
        monkeypatch.setattr(lm, "generate", broken)
        failed = [client.post("/v1/completions", json={**request, "stream": s}) for s in (False, True)]
        monkeypatch.undo()
        after = client.post("/v1/completions", json=request)
    for r in failed:
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "a bug" not in r.text and "Traceback" not in r.text
    assert "a bug in decoding" in caplog.text  # the server's log has it
    monkeypatch.setattr("multitoken.serve.request_options", broken)  # a bug in the server's own code
    with TestClient(create_app(lm, name="run"), raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json=request)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "a bug" not in r.text
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == shown(
        lm.generate(PROMPTS[0], max_new_tokens=4)
    )


@pytest.fixture(scope="module")
def server(lm):
    """The app under uvicorn on a free port, in a thread: the address of its API."""
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(create_app(lm, name="run"), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert srv.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    srv.should_exit = True
    thread.join(timeout=20)
    sock.close()


def test_openai_client_gets_the_api_text(server, lm):
    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0)
    out = lm.generate(PROMPTS[3], max_new_tokens=20)
    done = client.completions.create(model="run", prompt=PROMPTS[3], max_tokens=20, temperature=0)
    assert done.choices[0].text == shown(out) and done.choices[0].finish_reason == finish(out)
    assert done.usage.completion_tokens == len(out.token_ids) and done.model_extra["multitoken"]["decoding"] == "tree"
    chunks = client.completions.create(model="run", prompt=PROMPTS[3], max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == shown(out)
    assert [m.id for m in client.models.list()] == ["run"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="run", prompt="a", max_tokens=CONTEXT + 1)


def test_cli_serves_with_its_flags(random_run, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0 and "(default: 127.0.0.1)" in help_text and "(default: 8000)" in help_text
    assert "(default: 10.0)" in help_text and "(default: 8)" in help_text
    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: apps.append(self.config.app))
    assert main(["serve", str(random_run), "--port", "0", "--decoding", "plain", "--max-batch", "2"]) == 0
    assert "plain decoding" in capsys.readouterr().err
    with TestClient(apps[0]) as client:
        assert client.get("/health").json()["decoding"] == "plain"
        assert client.post("/v1/completions", json={"prompt": ["a", "b", "c"]}).status_code == 400  # --max-batch 2


def test_cli_mistakes_are_one_line(random_run, tmp_path, monkeypatch, capsys):
    no_tree = MultiTokenLM(make_model(vocab_size=257, n_future=2), ByteTokenizer()).save(tmp_path / "no-tree")
    taken = bind("127.0.0.1", 0)
    cases = [
        (["serve", str(no_tree), "--port", "0", "--decoding", "tree"], "no draft tree"),
        (["serve", str(random_run), "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
        (["serve", str(random_run), "--port", "70000"], "cannot listen on 127.0.0.1:70000"),
        (["serve", str(tmp_path / "missing"), "--port", "0"], "missing"),
        (["serve", str(random_run), "--batch-window-ms", "-1"], "--batch-window-ms"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    taken.close()
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    monkeypatch.delitem(sys.modules, "multitoken.serve")
    assert main(["serve", str(random_run)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'multitoken[serve]'" in err and err.count("\n") == 1
