"""The lm-eval model against slow, obvious twins, through `lm_eval.simple_evaluate` on local tasks.

Three tasks over local jsonl files, read offline: multiple choice (log-likelihoods), perplexity of held-out text
(rolling log-likelihoods) and generation with stop strings. Every score equals its twin computed here with one
forward of head 1 per request (per window of long text); generated text equals plain greedy decoding through
`multitoken.load(...)`, and the reported tokens per forward equal the tree's own counts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import multitoken  # noqa: E402
from multitoken.api import MultiTokenLM  # noqa: E402
from multitoken.cli import main  # noqa: E402
from multitoken.data.tokenizers import ByteTokenizer  # noqa: E402
from multitoken.errors import UserError  # noqa: E402
from multitoken.eval.lm_eval import MultiTokenEvalLM, generation_settings, keep_last_tokens  # noqa: E402
from multitoken.generate.tree import Tree  # noqa: E402
from tests.conftest import make_model  # noqa: E402
from tests.generate.test_speculative import train_briefly  # noqa: E402
from tests.tolerance import twin_atol  # noqa: E402

CONTEXT = 64  # the model's context: some requests below are longer, so truncation and rolling windows run
MAX_GEN = 12  # generated tokens per request: prompts over CONTEXT - MAX_GEN lose text on their left
EOS_TEXT = "<|endoftext|>"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def counting(start: int, n: int) -> str:
    return "".join(f" {i}," for i in range(start, start + n))


@pytest.fixture(scope="module")
def single_thread():
    """conftest's one thread, for the module's fixtures too (training under two contended threads took 5x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, single_thread) -> Path:
    """A byte-level n=3 model trained a few seconds on counting text (so its heads' drafts are often accepted),
    with a draft tree, saved as a run directory."""
    stream = torch.tensor(list(counting(0, 2000).encode()))
    model = train_briefly(make_model(seed=1, vocab_size=ByteTokenizer.vocab_size, max_seq_len=CONTEXT), stream, 40)
    lm = MultiTokenLM(model, ByteTokenizer(), tree=Tree(((0,), (1,), (0, 0))))
    return lm.save(tmp_path_factory.mktemp("lm_eval") / "run")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


QUESTIONS = ["Is 4, 5, 6 counting?\nA:", "Is 7, 9 counting?\nA:", "Which comes next:" + counting(100, 12) + "\nA:"]
CHOICES = ["yes", "no"]  # lm-eval puts its target delimiter, a space, before each
PROMPTS = ["Count:" + counting(31, 2), "Count:" + counting(7, 1), "Count:" + counting(1200, 9), "x"]


@pytest.fixture(scope="module")
def until(run_dir) -> list[str]:
    """The generation task's stop strings: a newline, and two characters the model greedily writes after the
    first prompt, so that a stop string surely cuts some text."""
    text = multitoken.load(run_dir).generate(PROMPTS[0], max_new_tokens=MAX_GEN, decoding="plain").text
    assert len(text) >= 6, text
    return ["\n", text[4:6]]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, until) -> Path:
    """Three lm-eval task files over local jsonl files. Contexts end without whitespace, so lm-eval hands the
    continuations over as written (it moves a context's trailing spaces into its continuation)."""
    root = tmp_path_factory.mktemp("tasks")
    write_jsonl(root / "choice.jsonl", [{"q": q, "choices": CHOICES, "gold": 0} for q in QUESTIONS])
    texts = [counting(10, 5), counting(300, 30) + "\n", counting(7, 2)]
    write_jsonl(root / "text.jsonl", [{"text": t} for t in texts])
    write_jsonl(root / "gen.jsonl", [{"prompt": p, "answer": " 1"} for p in PROMPTS])

    def task(name: str, data: str, body: str) -> None:
        dataset = (
            f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / data}\n"
            f"  cache_dir: {root / 'datasets-cache'}\ntest_split: test\n"
        )
        (root / f"{name}.yaml").write_text(f"task: {name}\n{dataset}{body}")

    task(
        "mt_choice", "choice.jsonl",
        'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n",
    )  # fmt: skip
    task(
        "mt_text", "text.jsonl",
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    )  # fmt: skip
    task(
        "mt_gen", "gen.jsonl",
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def offline():
    """lm-eval's data sets read with the Hub switched off: the tasks must need nothing but their files."""
    import datasets.config

    with pytest.MonkeyPatch.context() as mp:
        for name, value in OFFLINE.items():
            mp.setenv(name, value)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def results(run_dir, task_dir, offline, single_thread) -> dict:
    """Every task evaluated once, its samples (requests and responses) kept; batches of 2 mix lengths."""
    return lm_eval.simple_evaluate(
        model="multitoken",
        model_args=f"pretrained={run_dir},decoding=tree,device=cpu,dtype=fp32",
        batch_size=2,
        tasks=["mt_choice", "mt_text", "mt_gen"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )


def requests_of(results: dict, task: str) -> list[tuple[tuple, object]]:
    """(arguments, response) of every request lm-eval made for `task`."""
    return [
        (args, resp[0]) for s in results["samples"][task] for args, resp in zip(s["arguments"], s["resps"], strict=True)
    ]


@torch.no_grad()
def slow_loglikelihood(model: torch.nn.Module, context: list[int], continuation: list[int]) -> tuple:
    """log P(continuation | context) from head 1 in one forward of this request alone, the window cut on the left
    to the context plus one token; whether head 1's top choice is the continuation at every token; and the
    smallest gap between its top two logits there (below the tolerance, rounding may flip that choice)."""
    window = (context + continuation)[-(CONTEXT + 1) :]
    n = len(continuation)
    logits = model(torch.tensor([window[:-1]]), heads=[0])[0, -n:, 0]  # (n, V): the continuation's predictions
    target = torch.tensor(continuation)
    picked = logits.log_softmax(dim=-1).gather(-1, target[:, None]).sum()
    top2 = logits.topk(2, dim=-1).values
    return picked, bool((logits.argmax(dim=-1) == target).all()), float((top2[:, 0] - top2[:, 1]).min())


@torch.no_grad()
def slow_rolling(model: torch.nn.Module, text: str) -> torch.Tensor:
    """log P(text): each token after the end-of-text token and the at most CONTEXT tokens before it, predicted
    in blocks of CONTEXT tokens, one forward per block; one forward for text that fits."""
    tokens = list(text.encode())
    seq = [ByteTokenizer.eos_id, *tokens]  # token j of the text is seq[j + 1], predicted from seq[: j + 1]
    total = torch.zeros((), dtype=next(model.parameters()).dtype)
    for start in range(0, len(tokens), CONTEXT):
        end = min(start + CONTEXT, len(tokens))
        first = max(0, end - CONTEXT)
        logp = model(torch.tensor([seq[first:end]]), heads=[0])[0, :, 0].log_softmax(dim=-1)
        for j in range(start, end):
            total = total + logp[j - first, seq[j + 1]]
    return total


def test_loglikelihoods_equal_head_1_computed_one_request_at_a_time(results, run_dir):
    model = multitoken.load(run_dir).model
    reqs = requests_of(results, "mt_choice")
    assert any(len((c + x).encode()) > CONTEXT + 1 for (c, x), _ in reqs)  # the left cut ran
    assert all(c == c.rstrip() for (c, _), _ in reqs)  # else lm-eval would move the space into the continuation

    def slow(m):
        return torch.stack([slow_loglikelihood(m, list(c.encode()), list(x.encode()))[0] for (c, x), _ in reqs])

    expected, atol = slow(model), twin_atol(slow, model)
    for ((context, continuation), (logprob, greedy)), want in zip(reqs, expected, strict=True):
        assert logprob == pytest.approx(float(want), abs=atol)
        _, slow_greedy, gap = slow_loglikelihood(model, list(context.encode()), list(continuation.encode()))
        assert greedy == slow_greedy or gap <= atol
    # Accuracy: the choice of highest log-likelihood is the gold one (2 choices per question, in order).
    best = expected.view(-1, 2).argmax(dim=-1).tolist()
    golds = [s["target"] for s in results["samples"]["mt_choice"]]
    right = sum(b == g for b, g in zip(best, golds, strict=True))
    assert results["results"]["mt_choice"]["acc,none"] == pytest.approx(right / len(golds))


def test_rolling_loglikelihood_is_the_full_sum_or_the_windowed_sum(results, run_dir):
    model = multitoken.load(run_dir).model
    reqs = requests_of(results, "mt_text")
    lengths = [len(text.encode()) for (text,), _ in reqs]
    assert min(lengths) <= CONTEXT and max(lengths) > 2 * CONTEXT  # one forward, and three windows

    def slow(m):
        return torch.stack([slow_rolling(m, text) for (text,), _ in reqs])

    expected, atol = slow(model), twin_atol(slow, model)
    for (_, got), want in zip(reqs, expected, strict=True):
        assert got == pytest.approx(float(want), abs=atol)
    bits = -sum(float(w) for w in expected) / sum(lengths) / torch.log(torch.tensor(2.0)).item()
    assert results["results"]["mt_text"]["bits_per_byte,none"] == pytest.approx(bits, abs=atol)


def test_generated_text_is_plain_greedy_decoding_and_tokens_per_forward_are_reported(results, run_dir, until):
    lm = multitoken.load(run_dir)
    reqs = requests_of(results, "mt_gen")
    room = CONTEXT - MAX_GEN
    assert any(len(c) > room for (c, _), _ in reqs)  # a prompt cut on its left
    outs = []
    for (context, kwargs), text in reqs:
        assert kwargs["until"] == until and kwargs["max_gen_toks"] == MAX_GEN
        out = lm.generate(context[-room:], max_new_tokens=MAX_GEN, decoding="plain", stop=[*until, EOS_TEXT])
        assert text == out.text
        outs.append(out)
    assert any(o.stop_reason == "stop" for o in outs)  # a stop string cut some text
    # The tree's own counts, one prompt at a time: a sequence's acceptances do not depend on its batch.
    stop = [*until, EOS_TEXT]
    trees = [lm.generate(c[-room:], max_new_tokens=MAX_GEN, decoding="tree", stop=stop) for (c, _), _ in reqs]
    report = results["config"]["multitoken"]
    assert report["decoding"] == "tree" and report["generate_requests"] == len(reqs)
    assert report["generated_tokens"] == sum(len(t.token_ids) for t in trees)
    assert report["forwards"] == sum(t.stats["forwards"] for t in trees)
    assert report["tokens_per_forward"] == report["generated_tokens"] / report["forwards"] > 1.0, report


def test_direct_requests_empty_and_overlong_contexts(run_dir):
    lm = MultiTokenEvalLM(pretrained=str(run_dir), batch_size="3", device="cpu")
    model = lm.lm.model
    pairs = [("", "Count: 1, 2"), ("Count:" + counting(40, 20), counting(60, 2)), ("A", "B"), ("Q", "x" * CONTEXT)]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    contexts = [[ByteTokenizer.eos_id], *[list(c.encode()) for c, _ in pairs[1:]]]  # empty: after end-of-text

    def slow(m):
        return torch.stack(
            [slow_loglikelihood(m, c, list(x.encode()))[0] for c, (_, x) in zip(contexts, pairs, strict=True)]
        )

    atol = twin_atol(slow, model)
    for (logprob, _), want in zip(got, slow(model), strict=True):
        assert logprob == pytest.approx(float(want), abs=atol)
    with pytest.raises(UserError, match="exceeds the model's context"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("Q", "x" * (CONTEXT + 1)), 0)])
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in ("", "ab")])
    atol = twin_atol(lambda m: slow_rolling(m, "ab"), model)
    assert rolling[0] == 0.0 and rolling[1] == pytest.approx(float(slow_rolling(model, "ab")), abs=atol)


def test_generation_options_follow_lm_evals_reading():
    greedy = generation_settings({"until": "\n", "do_sample": False, "temperature": 0.7}, 32)
    assert greedy == {"stop": ["\n"], "max_new_tokens": 32, "temperature": 0.0, "top_k": None, "top_p": None}
    assert generation_settings({"do_sample": True}, 8)["temperature"] == 1.0
    assert generation_settings({"temperature": 0.5, "top_p": 0.9, "max_gen_toks": 4}, 8) == {
        "stop": [], "max_new_tokens": 4, "temperature": 0.5, "top_k": None, "top_p": 0.9,
    }  # fmt: skip
    with pytest.raises(UserError, match="num_beams is not supported"):
        generation_settings({"num_beams": 4}, 8)
    with pytest.raises(UserError, match="max_gen_toks must be an integer >= 0"):
        generation_settings({"max_gen_toks": -1}, 8)
    with pytest.raises(UserError, match="top_p must be a finite number > 0 and <= 1"):
        generation_settings({"do_sample": True, "top_p": 1.5}, 8)


@pytest.mark.parametrize("text", ["plain ascii text of some length", "ééé✓ mixed", "✓✓✓", ""])
def test_keep_last_tokens_is_the_longest_end_that_fits(text):
    encode = ByteTokenizer().encode
    for limit in range(1, len(encode(text)) + 2):
        ends = [text[i:] for i in range(len(text) + 1) if len(encode(text[i:])) <= limit]
        assert keep_last_tokens(text, limit, encode) == max(ends, key=len)


def test_model_args_take_precedence_over_the_harness_settings(run_dir):
    """lm-eval's command line sends --device (cuda:0 unless told) and --batch_size to every model; the same keys
    in model_args win instead of being passed twice."""
    lm = MultiTokenEvalLM.create_from_arg_string(
        f"pretrained={run_dir},device=cpu,batch_size=3", {"batch_size": "1", "device": "cuda:0", "max_batch_size": None}
    )
    assert lm.batch_size == 3 and lm.device == torch.device("cpu")
    lm = MultiTokenEvalLM.create_from_arg_obj({"pretrained": str(run_dir)}, {"batch_size": 2, "device": "cuda:0"})
    assert lm.batch_size == 2 and lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_mistakes_are_one_line_errors(run_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="batch_size must be an integer >= 1"):
        MultiTokenEvalLM(pretrained=str(run_dir), batch_size="auto")
    with pytest.raises(UserError, match="device must be a torch device"):
        MultiTokenEvalLM(pretrained=str(run_dir), device="gpu")
    with pytest.raises(UserError, match="decoding must be one of"):
        MultiTokenEvalLM(pretrained=str(run_dir), decoding="beam")
    no_tree = MultiTokenLM(make_model(vocab_size=ByteTokenizer.vocab_size), ByteTokenizer()).save(tmp_path / "nt")
    with pytest.raises(UserError, match="has no draft tree"):
        MultiTokenEvalLM(pretrained=str(no_tree), decoding="tree")
    lm = MultiTokenEvalLM(pretrained=str(run_dir), max_gen_toks=CONTEXT)
    with pytest.raises(UserError, match="leaves no room for a prompt"):
        lm.generate_until([Instance("generate_until", {}, ("Count:", {"until": ["\n"]}), 0)])
    capsys.readouterr()
    for flag in (["--use_cache", "responses"], ["--use_ca=x"], ["--cache_requests", "true"]):
        assert main(["lm-eval", "--model", "multitoken", *flag, "--tasks", "x"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "keeps pickles, which run code" in err, err


class Payload:
    """Unpickled, it creates the file `path`: what a crafted cache entry could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_response_cache_runs_no_code_from_its_file(run_dir, task_dir, tmp_path, offline):
    """lm-eval's response cache (use_cache) is a SQLite file of pickles: one holding a crafted entry for every
    request of the task is refused before any entry is read."""
    from lm_eval.api.model import hash_args
    from sqlitedict import SqliteDict

    marker = tmp_path / "ran"
    with SqliteDict(str(tmp_path / "responses_rank0.db"), autocommit=True) as db:  # the file lm-eval reads
        for question in QUESTIONS:
            for choice in CHOICES:
                db[hash_args("loglikelihood", (question, " " + choice))] = Payload(marker)
    with pytest.raises(UserError, match="use_cache keeps responses as pickles"):
        lm_eval.simple_evaluate(
            model="multitoken", model_args=f"pretrained={run_dir}", tasks=["mt_choice"],
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            use_cache=str(tmp_path / "responses"),
        )  # fmt: skip
    assert not marker.exists()


@pytest.mark.slow  # lm-eval's command line indexes its thousands of built-in tasks first (about a minute)
def test_command_line_evaluates_and_reports_tokens_per_forward(run_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--model", "multitoken", "--model_args", f"pretrained={run_dir},decoding=chain,device=cpu,batch_size=3",
        "--tasks", "mt_choice,mt_gen",
        "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(out),
    ]  # fmt: skip
    for command in (["-m", "multitoken", "lm-eval"], ["-m", "multitoken.eval.lm_eval"]):
        done = subprocess.run(
            [sys.executable, *command, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, **OFFLINE},
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "tokens per forward (chain decoding)" in done.stderr
        assert "mt_choice" in done.stdout and "mt_gen" in done.stdout  # lm-eval's table of scores
    written = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert written and all(r["config"]["multitoken"]["tokens_per_forward"] >= 1.0 for r in written)
