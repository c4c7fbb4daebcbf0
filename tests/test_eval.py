"""eval.py: every score against a direct computation, the judge against a local fake API, and the CLI."""
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import eval as ev
import lora
import sample
from model import BadInput, load_checkpoint, load_tokenizer, token_logprobs
from prep import encode_example, load_pair, one_line, split_sessions, tag, write_jsonl
from conftest import script

FRIEND = "[FRIEND]"
KEY = "sk-test-0123456789-never-print-me"


@pytest.fixture(scope="module")
def zero_adapter(tiny_chat_dir, tmp_path_factory):
    """A freshly initialised adapter: B = 0, so it adds exactly nothing."""
    model = load_checkpoint(tiny_chat_dir)
    lora.add_lora(model, r=4, alpha=8)
    path = tmp_path_factory.mktemp("zero_adapter")
    lora.save_adapter(model, path, base_model=str(tiny_chat_dir))
    return path


@pytest.fixture(scope="module")
def chat(small_chat, tiny_chat_dir, tiny_adapter):
    """The tiny model with its adapter, its tokenizer, and small_chat split as eval.py splits it."""
    model = load_checkpoint(tiny_chat_dir)
    lora.load_adapter(model, tiny_adapter)
    messages, _ = load_pair(small_chat)
    tags = {s: tag(s) for s in dict.fromkeys(m.speaker for m in messages)}
    train, held_out = split_sessions(messages, 3.0, 0.1)
    return model.eval(), load_tokenizer(tiny_chat_dir), tags, train, held_out


def direct_nll(model, tokens, mask):
    """Summed NLL of the masked tokens of one sequence, run alone."""
    t = torch.tensor([tokens])
    with torch.no_grad():
        lp = token_logprobs(model(t)[:, :-1], t[:, 1:])[0]
    return -(lp * torch.tensor(mask[1:], dtype=torch.float)).sum().item(), sum(mask)


def test_the_held_out_sessions_are_the_latest_like_sft(chat, small_chat, tiny_chat_dir):
    from prep import build_examples

    model, tok, tags, train, held_out = chat
    messages, _ = load_pair(small_chat)
    _, val = build_examples(messages, tok, max_len=512)
    assert len(val) == sum(map(len, held_out)) and train[-1][-1].time <= held_out[0][0].time


@pytest.mark.parametrize("latest", [0, 7])  # all the speaker's held-out messages; only the latest 7
def test_short_context_nll_equals_the_training_example_scored_alone(chat, latest):
    model, tok, tags, _, held_out = chat
    start = ev.first_scored(held_out, tags, FRIEND, latest)
    scores = ev.short_context(model, tok, held_out, tags, FRIEND, 8, 512, batch_size=5, start=start)
    expected_keys = {(s, i) for s, session in enumerate(held_out) for i, m in enumerate(session)
                     if tags[m.speaker] == FRIEND}
    if latest:
        expected_keys = set(sorted(expected_keys)[-latest:])
    assert set(scores.nll) == expected_keys and len(expected_keys) == (latest or len(expected_keys)) > 5
    positions = {(s, i) for s, session in enumerate(held_out) for i in range(1, len(session)) if (s, i) >= start}
    assert set(scores.next_tag) == positions
    for s, i in sorted(expected_keys):
        k = min(8, i)
        tokens, mask, _, _ = encode_example(tok, held_out[s][i - k : i], held_out[s][i], tags, 512)
        nll, n = direct_nll(model, tokens, mask)
        assert scores.nll[(s, i)][1] == n
        assert scores.nll[(s, i)][0] == pytest.approx(nll, rel=1e-5), (s, i)


def line(m, tags):
    return f"{tags[m.speaker]} {one_line(m.text)}\n"


# History cut from the left; the whole history fits; only the speaker's latest 9 messages are scored.
@pytest.mark.parametrize("budget, latest", [(200, 0), (10_000, 0), (200, 9)])
def test_long_context_nll_equals_the_window_text_scored_alone(chat, budget, latest):
    model, tok, tags, train, held_out = chat
    all_sessions = train + held_out
    stream = [m for s in all_sessions for m in s]
    first_held = len(stream) - sum(map(len, held_out))
    start = ev.first_scored(held_out, tags, FRIEND, latest)
    scores = ev.long_context(model, tok, all_sessions, len(held_out), tags, FRIEND, budget, start)
    keys = [(s, i) for s, session in enumerate(held_out) for i in range(len(session))]
    assert set(scores.window) == {k for k in keys if k >= start}
    if latest:
        assert len(scores.nll) == latest and start > (0, 0)
    assert set(scores.nll) == {k for k in keys if tags[held_out[k[0]][k[1]].speaker] == FRIEND and k >= start}
    n_tokens = lambda a, z: len(tok.encode("".join(line(m, tags) for m in stream[a:z])))
    for first, chunk, end in set(scores.window.values()):
        # Truncated the stated way: whole messages, as many as fit, and a chunk of at most half the budget.
        assert n_tokens(first, end) <= budget and (first == 0 or n_tokens(first - 1, end) > budget)
        assert first < chunk and (end - chunk == 1 or n_tokens(chunk, end) <= budget // 2)
    if budget == 10_000:
        assert {w[0] for w in scores.window.values()} == {0}  # every message saw the whole history
    checked = sorted(scores.nll) if budget == 200 else sorted(scores.nll)[::15]  # long windows cost more
    for g, key in enumerate(keys, start=first_held):
        if key not in checked:
            continue
        first = scores.window[key][0]
        text = "".join(line(m, tags) for m in stream[first : g + 1])
        prompt = text[: len(text) - len(line(stream[g], tags))] + tags[stream[g].speaker]
        tokens, head = tok.encode(text), tok.encode(prompt)
        n = next(j for j, (x, y) in enumerate(zip(tokens, head + [-1])) if x != y)
        nll, count = direct_nll(model, tokens, [j >= n for j in range(len(tokens))])
        assert scores.nll[key][1] == count
        assert scores.nll[key][0] == pytest.approx(nll, rel=1e-5), key


def test_a_zero_adapter_gives_the_base_scores_exactly_and_a_random_one_differs(small_chat, zero_adapter,
                                                                                tiny_adapter, tmp_path):
    opts = ev.Options(data=str(small_chat), samples=0, out=str(tmp_path / "e.json"), long_context=128,
                      context_messages=2)  # short sequences: a quicker test
    zero = ev.evaluate(ev.Options(**{**vars(opts), "adapter": str(zero_adapter)}))["nll"]
    assert zero["c"]["nll"] == zero["a"]["nll"] and zero["d"]["nll"] == zero["b"]["nll"]
    assert zero["a"]["nll"] != zero["b"]["nll"]
    tuned = ev.evaluate(ev.Options(**{**vars(opts), "adapter": str(tiny_adapter)}))["nll"]
    assert tuned["a"] == zero["a"] and tuned["b"] == zero["b"]  # the base is the base
    assert tuned["c"]["nll"] != tuned["a"]["nll"] and tuned["d"]["nll"] != tuned["b"]["nll"]


class Guesser(torch.nn.Module):
    """A fake model whose logits at every position favour the first differing token of one tag: a fixed
    tag, or (always=None) the tag it has most recently seen begin. Causal, like a real model. Its
    "stream" is already the logits: no layers, and the final norm and unembedding are identities."""

    def __init__(self, tok, tags, always=None):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(1, 1)  # where eval.py looks for the device
        self.cfg = type("Config", (), {"n_layers": 0})
        self.norm = torch.nn.Identity()
        self.tag_ids = {t: tok.encode(t, start=False) for t in tags.values()}
        self.b = ev.branch(self.tag_ids)
        self.always = always

    def forward(self, tokens, mask=None, hooks=None, checkpoint=False, unembed=True):
        logits = self.logits(tokens)
        if hooks and "resid.0" in hooks:  # resid.{n_layers}: the stream before the final norm
            hooks["resid.0"](logits)
        return logits

    def logits(self, tokens):
        B, T = tokens.shape
        logits = torch.zeros(B, T, 49152)
        for row, ids in zip(logits, tokens.tolist()):
            last = self.always
            for p in range(T):
                for t, tag_ids in self.tag_ids.items():
                    if self.always is None and ids[max(0, p - self.b) : p + 1] == tag_ids[: self.b + 1]:
                        last = t
                if last is not None:
                    row[p, self.tag_ids[last][self.b]] = 10.0
        return logits

    def unembed(self, x):  # eval.py unembeds what forward(unembed=False) returns: here already logits
        return x


def test_next_speaker_accuracy_of_a_fixed_guess_equals_that_persons_share(chat):
    _, tok, tags, _, held_out = chat
    scores = ev.short_context(Guesser(tok, tags, always=FRIEND), tok, held_out, tags, FRIEND, 8, 512, 8)
    acc = ev.next_speaker_accuracy(scores, held_out, tags)
    positions = [(s, i) for s, session in enumerate(held_out) for i in range(1, len(session))]
    friend_share = sum(tags[held_out[s][i].speaker] == FRIEND for s, i in positions) / len(positions)
    assert acc["positions"] == len(positions) and acc["accuracy"] == pytest.approx(friend_share)
    assert 0.2 < friend_share < 0.8


def test_next_speaker_accuracy_of_guessing_the_last_speaker_equals_the_same_person_baseline(chat):
    _, tok, tags, _, held_out = chat
    scores = ev.short_context(Guesser(tok, tags), tok, held_out, tags, FRIEND, 8, 512, 8)
    acc = ev.next_speaker_accuracy(scores, held_out, tags)
    positions = [(s, i) for s, session in enumerate(held_out) for i in range(1, len(session))]
    again = sum(held_out[s][i].speaker == held_out[s][i - 1].speaker for s, i in positions) / len(positions)
    assert acc["accuracy"] == pytest.approx(again) == pytest.approx(acc["same_person_again"])
    assert acc["other_person"] == pytest.approx(1 - again) and 0.2 < again < 0.8


def test_the_verbatim_copy_rate_counts_exactly_the_replies_equal_to_training_messages(
        small_chat, tiny_adapter, tmp_path, monkeypatch):
    messages, _ = load_pair(small_chat)
    train, _ = split_sessions(messages, 3.0, 0.1)
    texts = [m.text for s in train for m in s if len(m.text.split()) > 3]
    canned = [texts[0].upper(), "  " + texts[5] + "  ", texts[9] + " and more", "zq xv wk"]  # 2 copies of 4
    monkeypatch.setattr(sample, "generate", lambda model, tok, prompts, opts: canned[: len(prompts)])
    r = ev.evaluate(ev.Options(data=str(small_chat), adapter=str(tiny_adapter), samples=4, batch_size=4,
                               context_messages=2, out=str(tmp_path / "e.json")))
    assert r["samples"]["fine-tuned"]["training_copies"] == r["samples"]["base"]["training_copies"] == 0.5
    assert r["samples"]["fine-tuned"]["n"] == 4
    assert (tmp_path / "e_lengths.png").stat().st_size > 1000


def test_reply_statistics_by_hand():
    stats = ev.reply_stats(["a b a", "b a", "c", ""], training_texts={"c"})
    assert stats["words_mean"] == 1.5 and stats["words_median"] == 1.5 and stats["training_copies"] == 0.25
    assert stats["distinct_1"] == 3 / 6 and stats["distinct_2"] == 2 / 3  # (a b), (b a) twice


# ---------------------------------------------------------------------------------------------------
# The judge, against a tiny OpenAI-compatible server on 127.0.0.1.

class FakeAPI:
    """A local OpenAI-compatible server: every chat completion answers "Answer: {answer}" (or, with
    malformed=True, a 200 whose body is no chat completion); with fail_after, a quota error after that
    many requests."""

    def __init__(self, answer="A", fail_after=None, malformed=False):
        self.requests, self.answer, self.fail_after, self.malformed = [], answer, fail_after, malformed
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if api.fail_after is not None and len(api.requests) >= api.fail_after:
                    self.send_response(400)  # not retried by the client
                    payload = {"error": {"message": "quota exceeded", "type": "invalid_request_error"}}
                else:
                    api.requests.append((self.path, body))
                    self.send_response(200)
                    payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": f"Answer: {api.answer}"}}]}
                    if api.malformed:
                        payload = {"id": "c1", "choices": "no choices here"}
                data = json.dumps(payload).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


ITEMS = [([f"[RIYA] question {j}"], f"real reply {j}", f"simulated reply {j}") for j in range(12)]


def expected_error_rate(requests, answer="A"):
    """From the prompts the server saw: the judge (always `answer`) is wrong where the real reply is not there."""
    where = []
    for _, body in requests:
        prompt = body["messages"][0]["content"]
        where.append("A" if re.search(r"Reply A: real reply", prompt) else "B")
    return sum(w != answer for w in where) / len(where), where


def test_the_judge_caches_its_answers_and_never_shows_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    api, cache = FakeAPI("A"), tmp_path / "judge.jsonl"
    try:
        first = ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", cache, seed=0)
        assert len(api.requests) == len(ITEMS) and api.requests[0][0] == "/v1/chat/completions"
        rate, where = expected_error_rate(api.requests)
        assert {"A", "B"} == set(where)  # the seeded order really puts the real reply in both places
        assert first["error_rate"] == pytest.approx(rate) and first["judgements"] == len(ITEMS)
        again = ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", cache, seed=0)
        assert len(api.requests) == len(ITEMS) and again == first  # all from the cache: nothing sent
        assert len(cache.read_text().splitlines()) == len(ITEMS)
        ev.judge(ITEMS, FRIEND, "judge-2", api.url, "JUDGE_KEY", cache, seed=0)
        assert len(api.requests) == 2 * len(ITEMS)  # another judge model is another judgement
    finally:
        api.close()
    out = capsys.readouterr()
    assert "sending 12 conversations" in out.err and api.url in out.err
    for text in (out.out, out.err, cache.read_text()):
        assert KEY not in text


def test_an_interrupted_judge_keeps_what_it_paid_for_and_exits_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    api, cache = FakeAPI("B", fail_after=5), tmp_path / "judge.jsonl"
    try:
        with pytest.raises(BadInput, match=r"^http://127.0.0.1:\d+/v1 \(judge-1\) failed \(BadRequestError") as e:
            ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", cache, seed=0)
        assert "\n" not in str(e.value) and KEY not in str(e.value)
        assert len(cache.read_text().splitlines()) == 5  # each answer was on disk as it came
        api.fail_after = None  # the quota is back: run again
        result = ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", cache, seed=0)
        assert len(api.requests) == len(ITEMS)  # 5 before the failure + only the 7 missing ones after it
        assert result["error_rate"] == pytest.approx(expected_error_rate(api.requests, "B")[0])
    finally:
        api.close()


@pytest.mark.parametrize("answer, letter", [
    ("Answer: A", "A"), ("I think B is the model.\nAnswer: A", "A"), ("**Answer: (B)**", "B"), ("answer: b.", "B"),
    ("Reply A reads like a model; the real one is B", None), ("A", None), ("Answer: A or B", None), ("", None),
    ("Answer: B\nActually, maybe not.", None)])
def test_the_judges_answer_is_read_from_its_last_line_only(answer, letter):
    assert ev.picked(answer) == letter


def test_a_half_written_cache_line_is_asked_again_and_blocks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    api, cache = FakeAPI("A"), tmp_path / "judge.jsonl"
    try:
        first = ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", cache, seed=0)
        lines = cache.read_text().splitlines()
        cache.write_text("\n".join(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]]))  # killed mid-write
        again = ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", cache, seed=0)
        assert len(api.requests) == len(ITEMS) + 1 and again == first  # only the broken one, once more
    finally:
        api.close()


def test_a_200_whose_body_is_no_chat_completion_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    api = FakeAPI(malformed=True)
    try:
        with pytest.raises(BadInput, match=r"\(judge-1\) failed .*0 earlier answers are kept") as e:
            ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", tmp_path / "judge.jsonl", seed=0)
        assert "\n" not in str(e.value) and KEY not in str(e.value)
    finally:
        api.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def test_cli_an_unreachable_judge_is_one_line_and_exit_status_2(small_chat, tiny_adapter, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = script("eval.py", "--adapter", str(tiny_adapter), "--data", str(small_chat), "--samples", "2",
              "--out", str(tmp_path / "e.json"), "--judge-model", "m", "--judge-base-url", url,
              "--judge-cache", str(tmp_path / "cache.jsonl"), env={"OPENAI_API_KEY": KEY})
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {url} (m) failed (APIConnectionError")
    assert "Traceback" not in out.stderr and KEY not in out.stderr + out.stdout
    assert f"sending 2 conversations (0 answers cached) to {url}" in out.stderr


def test_cli_prints_the_table_and_writes_the_json(small_chat, tiny_chat_dir, tiny_adapter, tmp_path):
    out = script("eval.py", "--adapter", str(tiny_adapter), "--data", str(small_chat), "--model", str(tiny_chat_dir),
              "--samples", "4", "--out", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("| (a) base |", "| (b) base |", "| (c) fine-tuned |", "| (d) fine-tuned |",
                "| always the same person again |", "| fine-tuned |"):
        assert row in out.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["nll"]) == {"a", "b", "c", "d"} and result["settings"]["long_context"] == 64
    assert result["settings"]["speaker"] == FRIEND and result["samples"]["real"]["n"] == 4
    assert result["nll"]["a"]["messages"] == result["nll"]["b"]["messages"] == result["settings"]["messages"]
    assert result["settings"]["messages"] == result["settings"]["held_out_messages"]  # fewer than 200: all
    assert "scoring all [FRIEND] messages" in out.stdout
    assert "wall time" in out.stdout.splitlines()[-1]


def test_max_messages_scores_the_latest_ones_in_every_measure(small_chat, tiny_adapter, tmp_path):
    r = ev.evaluate(ev.Options(data=str(small_chat), adapter=str(tiny_adapter), samples=3, max_messages=5,
                               long_context=128, context_messages=2, out=str(tmp_path / "e.json")))
    assert [r["nll"][k]["messages"] for k in "abcd"] == [5] * 4 and r["settings"]["messages"] == 5
    assert r["settings"]["held_out_messages"] > 5 and r["samples"]["real"]["n"] == 3
    assert "scoring the latest 5 of the " in ev.markdown(r)


@pytest.mark.parametrize("args, says", [
    (["--adapter", "no/such/adapter"], "error: --adapter no/such/adapter: no adapter there"),
    (["--speaker", "BOB"], "error: --speaker BOB: no [BOB] in "),
])
def test_cli_bad_input_is_one_line_and_exit_status_2(small_chat, tiny_adapter, args, says):
    out = script("eval.py", "--data", str(small_chat), "--adapter", str(tiny_adapter), *args)
    assert out.returncode == 2 and out.stderr.startswith(says) and out.stderr.count("\n") == 1, out.stderr
    if "BOB" in says:
        assert "[RIYA], [FRIEND]" in out.stderr


def test_a_held_out_set_without_the_speaker_is_bad_input(tmp_path, small_chat, tiny_adapter):
    messages, _ = load_pair(small_chat)
    path = tmp_path / "riya_last.jsonl"
    last = messages[-1].time
    write_jsonl([m for m in messages if m.speaker == "Riya" or (last - m.time).days > 1], path)
    with pytest.raises(BadInput, match="have no \\[FRIEND\\] message to score"):
        ev.evaluate(ev.Options(data=str(path), adapter=str(tiny_adapter)))


def test_an_adapter_trained_at_max_len_1024_is_evaluated_at_1024_unless_a_flag_says_otherwise(
        small_chat, tiny_chat_dir, tmp_path, monkeypatch):
    import sft

    sft.train(sft.Options(data=str(small_chat), model=str(tiny_chat_dir), out=str(tmp_path / "run"), max_steps=1,
                          batch_size=2, val_examples=2, samples=0, max_len=1024, context_messages=3))
    seen = []
    real = ev.encode_example
    monkeypatch.setattr(ev, "encode_example", lambda *a: seen.append(a[-1]) or real(*a))
    opts = ev.Options(adapter=str(tmp_path / "run" / "adapter"), samples=2, max_messages=3, long_context=64,
                      out=str(tmp_path / "e.json"))
    r = ev.evaluate(opts)  # no --data, no --max-len: both from the adapter's training.json
    assert set(seen) == {1024} and r["settings"]["max_len"] == 1024 and r["settings"]["context_messages"] == 3
    assert r["settings"]["data"] == str(small_chat) and r["settings"]["adapter"] == str(tmp_path / "run" / "adapter")
    seen.clear()
    assert ev.evaluate(ev.Options(**{**vars(opts), "max_len": 256}))["settings"]["max_len"] == 256
    assert set(seen) == {256}
