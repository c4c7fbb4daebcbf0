"""eval.py: every score against a direct computation, the judge against a local fake API, and the CLI."""
import json
import math
import random
import re
import socket
from datetime import datetime

import numpy as np
import pytest
import torch

import eval as ev
import lora
import sample
from model import BadInput, load_checkpoint, load_tokenizer, token_logprobs
from prep import Message, encode_example, load_pair, one_line, split_sessions, tag, words, write_jsonl
from conftest import FakeServer, script

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
                               turing_samples=1, turing_train=0, context_messages=2, out=str(tmp_path / "e.json")))
    assert r["samples"]["fine-tuned"]["training_copies"] == r["samples"]["base"]["training_copies"] == 0.5
    assert r["samples"]["fine-tuned"]["n"] == 4
    assert (tmp_path / "e_lengths.png").stat().st_size > 1000


def test_reply_statistics_by_hand():
    stats = ev.reply_stats(["a b a", "b a", "c", ""], training_texts={"c"})
    assert stats["words_mean"] == 1.5 and stats["words_median"] == 1.5 and stats["training_copies"] == 0.25
    assert stats["distinct_1"] == 3 / 6 and stats["distinct_2"] == 2 / 3  # (a b), (b a) twice


# ---------------------------------------------------------------------------------------------------
# The judge, against a tiny OpenAI-compatible server on 127.0.0.1.

class FakeAPI(FakeServer):
    """Every chat completion answers "Answer: {answer}" (or, with malformed=True, a 200 whose body is no
    chat completion); with fail_after, a quota error after that many requests."""

    def __init__(self, answer="A", fail_after=None, malformed=False):
        self.answer, self.fail_after, self.malformed = answer, fail_after, malformed
        super().__init__()

    def respond(self, path, body):
        if self.fail_after is not None and len(self.requests) >= self.fail_after:  # a 400 is not retried
            return 400, {"error": {"message": "quota exceeded", "type": "invalid_request_error"}}
        self.requests.append((path, body))
        if self.malformed:
            return 200, {"id": "c1", "choices": "no choices here"}
        return 200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"Answer: {self.answer}"}}]}


ITEMS = [([f"[RIYA] question {j}"], f"real reply {j}", [f"simulated reply {j}.{n}" for n in range(4)])
         for j in range(12)]


def expected_pick_rate(requests, answer="A"):
    """From the prompts the server saw: a judge that always answers `answer` picked the real reply
    where the real reply stood at that letter."""
    where = [re.search(r"Reply ([A-E]): real reply", body["messages"][0]["content"]).group(1) for _, body in requests]
    return sum(w == answer for w in where) / len(where), where


def test_the_judge_caches_its_answers_and_never_shows_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    api, cache = FakeAPI("A"), tmp_path / "judge.jsonl"
    try:
        first = ev.judge(ITEMS, FRIEND, "judge-1", api.url, "JUDGE_KEY", cache, seed=0)
        assert len(api.requests) == len(ITEMS) and api.requests[0][0] == "/v1/chat/completions"
        rate, where = expected_pick_rate(api.requests)
        assert len(set(where)) >= 3  # the seeded order really moves the real reply around
        assert first["pick_real"] == pytest.approx(rate) and first["judgements"] == len(ITEMS)
        assert first["candidates"] == 5
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
        assert result["pick_real"] == pytest.approx(expected_pick_rate(api.requests, "B")[0])
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
    out = script("eval.py", "--adapter", str(tiny_adapter), "--data", str(small_chat), "--samples", "2", "--turing-train", "0",
              "--out", str(tmp_path / "e.json"), "--judge-model", "m", "--judge-base-url", url,
              "--api-cache", str(tmp_path / "cache.jsonl"), env={"OPENAI_API_KEY": KEY})
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {url} (m) failed (APIConnectionError")
    assert "Traceback" not in out.stderr and KEY not in out.stderr + out.stdout
    assert f"sending 2 conversations (0 answers cached) to {url}" in out.stderr


def test_cli_prints_the_table_and_writes_the_json(small_chat, tiny_chat_dir, tiny_adapter, tmp_path):
    out = script("eval.py", "--adapter", str(tiny_adapter), "--data", str(small_chat), "--model", str(tiny_chat_dir),
              "--samples", "4", "--turing-train", "8", "--turing-samples", "2", "--who-said", "6",
              "--out", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("| (a) base |", "| (b) base |", "| (c) fine-tuned |", "| (d) fine-tuned |",
                "| always the same person again |", "| fine-tuned |"):
        assert row in out.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["nll"]) == set("abcdefhi") and result["settings"]["long_context"] == 64
    assert result["settings"]["speaker"] == FRIEND and result["samples"]["real"]["n"] == 4
    assert result["nll"]["a"]["messages"] == result["nll"]["b"]["messages"] == result["settings"]["messages"]
    assert result["settings"]["messages"] == result["settings"]["held_out_messages"]  # fewer than 200: all
    assert "scoring all [FRIEND] messages" in out.stdout
    assert "wall time" in out.stdout.splitlines()[-1]
    # stderr is a pipe here: plain lines (the plan, each part's time), no progress bars' carriage returns
    assert "\r" not in out.stderr and "\n(c): " in out.stderr


def test_results_go_next_to_the_adapter_evaluated_and_name_what_was_run(small_chat, tiny_adapter, tmp_path):
    import shutil

    mine = tmp_path / "second_adapter"
    shutil.copytree(tiny_adapter, mine)
    out = script("eval.py", "--adapter", str(mine), "--data", str(small_chat), "--samples", "2", "--turing-train", "0",
                 "--who-said", "0", "--retrieval-tokens", "0", "--max-messages", "3", "--long-context", "64")
    assert out.returncode == 0, out.stderr[-2000:]
    assert {"eval.json", "eval_lengths.png"} <= {f.name for f in mine.iterdir()}
    assert not (tiny_adapter / "eval.json").exists()  # the first adapter's results are not touched
    settings = json.loads((mine / "eval.json").read_text())["settings"]
    assert settings["adapter"] == str(mine) and settings["data"] == str(small_chat)
    assert settings["out"] == str(mine / "eval.json") and settings["api_cache"] == str(mine / "api_cache.jsonl")
    assert settings["sampling"] == sample.sampling_settings(sample.Options())  # what simulate() samples with


def test_max_messages_scores_the_latest_ones_in_every_measure(small_chat, tiny_adapter, tmp_path):
    r = ev.evaluate(ev.Options(data=str(small_chat), adapter=str(tiny_adapter), samples=3, max_messages=5,
                               turing_train=6, turing_samples=2, who_said=4,
                               long_context=128, context_messages=2, out=str(tmp_path / "e.json")))
    assert [r["nll"][k]["messages"] for k in "abcd"] == [5] * 4 and r["settings"]["messages"] == 5
    assert r["settings"]["held_out_messages"] > 5 and r["samples"]["real"]["n"] == 3
    assert "scoring the latest 5 of the " in ev.markdown(r)


def test_no_retrieval_or_memory_tokens_means_no_such_rows_or_contrasts(small_chat, tiny_adapter, tmp_path):
    r = ev.evaluate(ev.Options(data=str(small_chat), adapter=str(tiny_adapter), samples=0, turing_train=0, who_said=0,
                               max_messages=5, retrieval_tokens=0, memory_tokens=0, long_context=128, context_messages=2,
                               out=str(tmp_path / "e.json")))
    assert sorted(r["nll"]) == list("abcd") and sorted(r["contrasts"]) == ["c vs b", "d vs b"]
    assert "retrieved" not in ev.markdown(r) and "memory" not in ev.markdown(r) and r["memory"] is None


def test_memory_row_h_scores_the_same_messages_and_splits_out_the_rare_word_ones(small_chat, tiny_adapter, tmp_path):
    r = ev.evaluate(ev.Options(data=str(small_chat), adapter=str(tiny_adapter), samples=0, turing_train=0, who_said=0,
                               max_messages=8, retrieval_tokens=0, memory_tokens=64, long_context=128,
                               context_messages=2, consistency_seeds=2, out=str(tmp_path / "e.json")))
    assert r["nll"]["h"]["messages"] == r["nll"]["c"]["messages"] == 8
    assert r["nll"]["h"]["tokens"] == r["nll"]["c"]["tokens"] == r["nll"]["i"]["tokens"]  # the same targets
    assert {"i vs c", "i vs h", "i_rest vs c_rest"} <= set(r["contrasts"]) and "read by contrast 1" in ev.markdown(r)
    k = r["memory"]["consistency"]
    assert k["facts"] == 0 or len(k["with memory, contrast 1"]["per_fact"]) == k["facts"]
    assert {"h vs c", "h_rest vs c_rest"} <= set(r["contrasts"]) and r["memory"]["entries"] > 0
    n_rare = r["memory"]["rare_word_messages"]
    assert ("h_rare vs c_rare" in r["contrasts"]) == (n_rare > 0)
    assert r["contrasts"]["h_rest vs c_rest"]["nats_per_token"]["messages"] == 8 - n_rare
    assert "memory tokens" in ev.markdown(r) and "on the other messages" in ev.markdown(r)
    assert 0 <= r["memory"]["rare_word_nll_share"] <= 1 and 0 <= r["memory"]["rare_word_in_recalled_memory"] <= n_rare
    assert ("Room on the" in ev.markdown(r)) == (n_rare > 0) == ("A reference that reads" in ev.markdown(r))
    assert n_rare == 0 or r["memory"]["oracle_rare"]["messages"] == n_rare


def test_no_rare_word_message_means_no_rare_word_rows_and_no_oracle(small_chat, tiny_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "rare_reuse", lambda *a, **k: set())
    r = ev.evaluate(ev.Options(data=str(small_chat), adapter=str(tiny_adapter), samples=0, turing_train=0, who_said=0,
                               max_messages=8, retrieval_tokens=0, memory_tokens=64, long_context=128,
                               context_messages=2, consistency_seeds=2, out=str(tmp_path / "e.json")))
    k = r["memory"]
    assert k["rare_word_messages"] == 0 and k["oracle_rare"] is None and k["c_rare_nll"] is None
    assert "h_rare vs c_rare" not in r["contrasts"] and "Room on the" not in ev.markdown(r)


def test_the_share_of_nll_on_chosen_words_by_hand(chat):
    """word_share: none chosen is 0; every word of the messages chosen is the share on the tokens that,
    decoded alone, spell a letter or digit (not a space, punctuation or the turn's newline)."""
    model, tok, tags, _, held = chat
    keys = [(s, i) for s, session in enumerate(held) for i, m in enumerate(session) if tags[m.speaker] == FRIEND][:6]
    share = lambda chosen: ev.word_share(model, tok, held, tags, keys, chosen, 8, 512)
    per_token = []  # (nll, decoded text, key) of each target token, each message run alone
    for s, i in keys:
        tokens, mask, _, _ = encode_example(tok, held[s][i - min(8, i) : i], held[s][i], tags, 512)
        t = torch.tensor([tokens])
        with torch.no_grad():
            lp = token_logprobs(model(t)[:, :-1], t[:, 1:])[0]
        per_token += [(-lp[j - 1].item(), tok.decode([tokens[j]]), (s, i)) for j in range(len(tokens)) if mask[j]]
    total = sum(x for x, _, _ in per_token)
    assert share(set()) == 0
    everything = {w for s, i in keys for w in words(held[s][i].text)}
    expected = sum(x for x, piece, _ in per_token if re.search(r"\w", piece)) / total
    assert share(everything) == pytest.approx(expected, rel=1e-4)
    # One word: its tokens found by laying the tokens' pieces end to end, each decoded alone.
    word = max(everything, key=len)
    on_word = 0.0
    for key in keys:
        pieces = [(x, piece) for x, piece, k in per_token if k == key]
        ends = np.cumsum([len(piece) for _, piece in pieces])
        spans = [m.span() for m in re.finditer(rf"\b{word}\b", "".join(p for _, p in pieces).lower())]
        on_word += sum(x for (x, _), end, length in zip(pieces, ends, (len(p) for _, p in pieces))
                       if any(a < end and end - length < b for a, b in spans))
    assert on_word > 0 and share({word}) == pytest.approx(on_word / total, rel=1e-4)


def busan_sessions():
    """(train, held, tags): two training sessions and a held-out one, by hand, for the rare-word tests."""
    t = lambda day: datetime(2020, 1, day)
    train = [[Message(t(1), "Riya", "we went to Busan last summer"), Message(t(2), "Friend", "busan is great")],
             [Message(t(3), "Friend", "my cousin Tomasz is visiting"), Message(t(4), "Riya", "nice, summer plans")]]
    held = [[Message(t(9), "Friend", "tomasz says hi"), Message(t(9), "Friend", "summer is coming"),
             Message(t(9), "Riya", "going back to busan"), Message(t(9), "Friend", "I love busan")]]
    return train, held, {"Riya": "[RIYA]", "Friend": "[FRIEND]"}


def test_rare_word_reuse_by_hand():
    train, held, tags = busan_sessions()
    # FRIEND wrote busan and tomasz before (each in at most 2 training messages); "summer" is in 2 as well,
    # but FRIEND never wrote it.
    assert ev.rare_reuse(train, held, tags, "[FRIEND]", max_messages=2) == {(0, 0), (0, 3)}
    assert ev.rare_reuse(train, held, tags, "[RIYA]", max_messages=2) == {(0, 2)}
    assert ev.rare_reuse(train, held, tags, "[FRIEND]", max_messages=1) == {(0, 0)}  # busan is in 2 messages


def test_the_oracle_lines_are_the_training_messages_holding_the_next_messages_rare_word(chat):
    """oracle_retriever reads the message after the context: the training messages (either person's) with
    a rare word it reuses, the newest within the budget, in time order; never a held-out message."""
    tok = chat[1]
    train, held, tags = busan_sessions()
    rare = ev.rare_words(train, tags, "[FRIEND]", max_messages=2)
    assert rare == {"busan", "tomasz", "cousin", "great", "visiting"}
    retrieve = ev.oracle_retriever(tok, train, held, tags, rare, 10_000)
    assert retrieve(0, held[0][:3]) == [train[0][0], train[0][1]]  # "I love busan": both busan lines
    assert retrieve(0, held[0][:1]) == []  # "summer is coming": no rare word (FRIEND never wrote summer)
    assert retrieve(0, []) == []  # a session's first message: nothing before it, as for the memory
    newest = train[0][1]  # "busan is great": only the newest fits in its own cost
    budget = len(tok.encode(f"{tags[newest.speaker]} {newest.text}\n", start=False))
    assert ev.oracle_retriever(tok, train, held, tags, rare, budget)(0, held[0][:3]) == [newest]


def test_the_memory_retriever_gives_dated_lines_from_before_the_context_only(chat):
    import memory

    _, tok, _, train, held = chat
    entries = memory.supersede([e for s, session in enumerate(train) for e in memory.entries_of(session, s)])
    assert entries
    retrieve = ev.memory_retriever(entries, tok, 10_000)
    context = held[0][:2]
    got = retrieve(0, context) + retrieve(0, [Message(context[-1].time, "Riya", entries[0].text[:40])])
    train_times = {m.time for s in train for m in s}
    assert got and all(m.time in train_times and m.time < context[-1].time for m in got)
    assert all(m.text.endswith(f" ({m.time.isoformat()[:10]})") for m in got)
    assert retrieve(0, []) == []
    forms = ev.memory_retriever(entries, tok, 10_000, form=True)(0, context)
    assert [(m.time, m.speaker, m.text) for m in forms] == [(m.time, m.speaker, f"({m.time.isoformat()[:10]})")
                                                            for m in retrieve(0, context)]


def test_the_consistency_test_reads_agreement_by_content_words(tiny_chat_dir, monkeypatch):
    import memory
    from model import load_checkpoint, load_tokenizer

    entries = [memory.Entry("Friend", "i'm originally from korea", datetime(2020, 1, 1).isoformat(), 0, "origin", "origin")]
    answers = iter([["korea for sure", "from korea", "utah"], ["seoul, korea", "korea", "korea lol"],
                    ["utah", "", "b"]])
    asked = []
    monkeypatch.setattr(ev.sample, "generate", lambda model, tok, prompts, opts, hooks=None, contexts=None, **k:
                        asked.append((prompts, contexts, opts.memory_contrast)) or next(answers))  # reply_to's
    model, tok = load_checkpoint(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    r = ev.consistency(model, tok, entries, {"Riya": "[RIYA]", "Friend": "[FRIEND]"}, n_seeds=3, seed=0, contrast=1.5)
    assert r["facts"] == 1
    assert r["without memory"] == {"agrees_with_memory": pytest.approx(2 / 3), "agree_with_each_other": pytest.approx(1 / 3),
                                   "per_fact": [pytest.approx(2 / 3)], "interval": [pytest.approx(2 / 3)] * 2,
                                   "empty": 0.0}
    assert r["with memory"] == {"agrees_with_memory": 1.0, "agree_with_each_other": 1.0, "per_fact": [1.0],
                                "interval": [1.0, 1.0], "empty": 0.0}
    assert r["with memory, contrast 1.5"]["agrees_with_memory"] == 0.0
    assert r["with memory, contrast 1.5"]["empty"] == pytest.approx(1 / 3)
    assert r["examples"][0]["question"] == "[RIYA] where are you from again?"
    question = "[RIYA] where are you from again?\n[FRIEND]"
    (plain, none, a0), (remembered, context, a1), (_, context2, a2) = asked
    assert plain == [question] * 3 and none is None and a0 == a1 == 0 and a2 == 1.5
    assert remembered[0].startswith("[FRIEND] i'm originally from korea (2020-01-01)\n") and remembered[0].endswith(question)
    assert context == context2 == [question] * 3  # the memory's lines are told apart from the conversation


def test_the_interval_over_facts_by_hand():
    assert ev.facts_interval([0.5, 0.5, 0.5], seed=0) == [0.5, 0.5]  # no spread, no width
    low, high = ev.facts_interval([0.0, 1.0], seed=0, n_boot=4000)  # means of 2 draws: 0, 0.5 or 1
    assert (low, high) == (0.0, 1.0)
    low, high = ev.facts_interval([0.0, 0.1, 0.2, 0.9, 1.0], seed=0)
    assert 0 <= low < 0.44 < high <= 1


def test_memory_read_by_contrast_is_scored_as_by_hand(smol):
    """contrasted: its plain scores are (h) as short_context scores it, at any weight, and so is its
    contrast at weight 0; with no memory both are (c) at any weight; at weight 1, by hand,
    log-softmax(2 x the logits with the memory - the logits with its form) at each of a message's tokens."""
    model, tok = smol
    t = datetime(2020, 5, 1)
    held = [[Message(t, "Riya", "hey stranger"), Message(t, "Riya", "where are you from again?"),
             Message(t, "Friend", "i grew up in daegu, near the mountains"), Message(t, "Riya", "and your sister?"),
             Message(t, "Friend", "she is a nurse in daegu")]]
    tags = {"Riya": "[RIYA]", "Friend": "[FRIEND]"}
    remembered = [Message(datetime(2019, 1, 1), "Friend", "i grew up in daegu (2019-01-01)"),
                  Message(datetime(2019, 1, 2), "Friend", "my sister is a nurse (2019-01-02)")]
    forms = [Message(m.time, m.speaker, m.text[m.text.index("(") :]) for m in remembered]  # the dates alone
    retrieve, baseline = (lambda s, context: remembered), (lambda s, context: forms)
    h = ev.short_context(model, tok, held, tags, "[FRIEND]", 8, 512, batch_size=8, retrieve=retrieve)
    c = ev.short_context(model, tok, held, tags, "[FRIEND]", 8, 512, batch_size=8)
    keys = sorted(h.nll)
    assert keys == [(0, 2), (0, 4)]
    _, zero = ev.contrasted(model, tok, held, tags, keys, retrieve, baseline, 8, 512, 0.0)
    nothing = ev.contrasted(model, tok, held, tags, keys, *[lambda s, context: []] * 2, 8, 512, 2.0)
    plain, one = ev.contrasted(model, tok, held, tags, keys, retrieve, baseline, 8, 512, 1.0)
    for k in keys:
        for scores in (zero, plain):
            assert scores.nll[k] == (pytest.approx(h.nll[k][0], rel=1e-4), h.nll[k][1])
            assert scores.chars[k] == h.chars[k]
        for scores in nothing:
            assert scores.nll[k] == (pytest.approx(c.nll[k][0], rel=1e-4), c.nll[k][1])
        s, i = k
        context = ev.before(held[s], i, 8)
        rows = [encode_example(tok, extra + context, held[s][i], tags, 512)[:2] for extra in (remembered, forms)]
        with torch.no_grad():
            logits = [model(torch.tensor([t]))[0, :-1][torch.tensor(m[1:])] for t, m in rows]
        target = torch.tensor(rows[1][0][1:])[torch.tensor(rows[1][1][1:])]
        by_hand = -(2 * logits[0] - logits[1]).log_softmax(-1).gather(1, target[:, None]).sum().item()
        assert one.nll[k][0] == pytest.approx(by_hand, rel=1e-4) and abs(one.nll[k][0] - h.nll[k][0]) > 0.1


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
                      turing_train=4, turing_samples=1, who_said=3,
                      out=str(tmp_path / "e.json"))
    r = ev.evaluate(opts)  # no --data, no --max-len: both from the adapter's training.json
    # short-context examples at 1024, (e), (f) with room for the retrieved messages on top, (h) for the memory's
    assert set(seen) == {1024, 1024 + 512, 1024 + 256} and r["settings"]["max_len"] == 1024
    assert r["settings"]["context_messages"] == 3
    assert r["settings"]["data"] == str(small_chat) and r["settings"]["adapter"] == str(tmp_path / "run" / "adapter")
    seen.clear()
    assert ev.evaluate(ev.Options(**{**vars(opts), "max_len": 256}))["settings"]["max_len"] == 256
    assert set(seen) == {256, 256 + 512, 256 + 256}


# ---------------------------------------------------------------------------------------------------
# Issue 13's numbers, each against a direct computation on a tiny case.

def scores_of(rows):
    """{key: (nats, tokens, chars)} -> Scores."""
    s = ev.Scores()
    for key, (nats, tokens, chars) in rows.items():
        s.nll[key], s.chars[key] = (nats, tokens), chars
    return s


def test_the_paired_bootstrap_equals_a_for_loop_over_the_same_draws_and_collapses_on_a_constant():
    rng = np.random.default_rng(1)
    rows_x = {(0, i): (float(rng.uniform(5, 30)), int(rng.integers(3, 12)), int(rng.integers(10, 40))) for i in range(40)}
    rows_y = {k: (n + float(rng.normal(1.0, 2.0)), t, c) for k, (n, t, c) in rows_x.items()}
    x, y = scores_of(rows_x), scores_of(rows_y)
    got = ev.contrast(x, y, "token", n_boot=500, seed=7)
    keys = sorted(rows_x)
    draws = np.random.default_rng(7).integers(0, len(keys), (500, len(keys)))
    diffs = []
    for draw in draws:  # the definition, one resample at a time
        picked = [keys[j] for j in draw]
        diffs.append((sum(rows_x[k][0] for k in picked) - sum(rows_y[k][0] for k in picked))
                     / sum(rows_x[k][1] for k in picked))
    assert got["low"] == pytest.approx(np.percentile(diffs, 2.5)) and got["high"] == pytest.approx(np.percentile(diffs, 97.5))
    total = sum(v[0] for v in rows_x.values()) - sum(v[0] for v in rows_y.values())
    assert got["difference"] == pytest.approx(total / sum(v[1] for v in rows_x.values()))
    assert got["low"] < got["difference"] < got["high"] < 0  # y is worse by ~1 nat a message: x is better
    # A difference of exactly 0.5 bits per character on every message: the interval is that point.
    same = scores_of({k: (n, t, c) for k, (n, t, c) in rows_x.items()})
    shifted = scores_of({k: (n + 0.5 * c * math.log(2), t, c) for k, (n, t, c) in rows_x.items()})
    flat = ev.contrast(shifted, same, "char", n_boot=200)
    assert flat["difference"] == pytest.approx(0.5) and flat["low"] == pytest.approx(0.5) == pytest.approx(flat["high"])


def test_bits_per_character_divide_the_nats_by_ln_2_and_the_characters_of_the_scored_tokens(chat):
    model, tok, tags, _, held_out = chat
    scores = ev.short_context(model, tok, held_out, tags, FRIEND, 8, 512, batch_size=8)
    nats = sum(n for n, _ in scores.nll.values())
    assert ev.bits_per_char(scores) == pytest.approx(nats / math.log(2) / sum(scores.chars.values()))
    for s, i in list(scores.nll)[:10]:  # the scored tokens spell exactly the characters counted
        k = min(8, i)
        tokens, mask, _, _ = encode_example(tok, held_out[s][i - k : i], held_out[s][i], tags, 512)
        text = tok.decode([t for t, m in zip(tokens, mask) if m])
        assert len(text) == scores.chars[(s, i)] == len(" " + one_line(held_out[s][i].text) + "\n")


def test_retrieval_takes_the_top_bm25_messages_of_earlier_sessions_that_fit_in_time_order(chat):
    from prep import BM25, words

    _, tok, tags, train, held_out = chat
    budget = 60
    retrieve = ev.retriever(tok, train, held_out, tags, budget)
    s, i = 0, 5
    context = held_out[s][i - 3 : i]
    got = retrieve(s, context)
    earlier = [m for session in train for m in session]  # held-out session 0: only training sessions before it
    scores = BM25([words(one_line(m.text)) for m in earlier]).scores(words(" ".join(one_line(m.text) for m in context)))
    cost = lambda m: len(tok.encode(f"{tags[m.speaker]} {one_line(m.text)}\n", start=False))
    expected, used = [], 0  # by hand: most relevant first, whole messages, skipping one that won't fit
    for j in sorted(range(len(earlier)), key=lambda j: -scores[j]):
        if scores[j] > 0 and used + cost(earlier[j]) <= budget:
            expected.append(j)
            used += cost(earlier[j])
    assert got == [earlier[j] for j in sorted(expected)] and got  # in time order
    assert all(m.time <= held_out[0][0].time for m in got)
    assert retrieve(s, []) == [] and ev.retriever(tok, train, held_out, tags, 0)(s, context) == []
    later = retrieve(1, held_out[1][:3]) if len(held_out) > 1 else []
    assert all(m not in held_out[1] for m in later)  # never the target's own session


class Rigged(torch.nn.Module):
    """A model that, wherever the latest tag it has seen is [FRIEND], puts all its mass on the very next
    token of the sequence (it peeks at the whole row: a rig, not a language model), and is uniform
    elsewhere. So any text is likelier after [FRIEND] than after [RIYA], whoever wrote it."""

    def __init__(self, tok, tags):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(1, 1)
        self.cfg = type("Config", (), {"n_layers": 0})
        self.norm = torch.nn.Identity()
        self.tag_ids = {t: tok.encode(t, start=False) for t in tags.values()}
        self.full = None  # the whole rows: scored_logprobs passes tokens[:, :-1], the rig wants the next one

    def forward(self, tokens, mask=None, hooks=None, checkpoint=False, unembed=True):
        B, T = tokens.shape
        logits = torch.zeros(B, T, 49152)
        for b in range(B):
            row, last = self.full[b].tolist(), None
            for p in range(T):
                for t, ids in self.tag_ids.items():
                    if row[max(0, p - len(ids) + 1) : p + 1] == ids:
                        last = t
                if last == FRIEND:
                    logits[b, p, row[p + 1]] = 50.0
        return logits

    def unembed(self, x):
        return x


def test_who_said_this_on_a_rigged_model_equals_that_persons_share(chat, monkeypatch):
    _, tok, tags, _, held_out = chat
    rig = Rigged(tok, tags)
    real = ev.scored_logprobs

    def peeking(model, tokens, scored, **kw):
        model.full = tokens
        return real(model, tokens, scored, **kw)

    monkeypatch.setattr(ev, "scored_logprobs", peeking)
    result = ev.who_said(rig, tok, held_out, tags, 2, 512, 8, per_person=10)
    # FRIEND's texts are likelier after their real tag, RIYA's after the swapped one: right = FRIEND's share.
    assert result["[FRIEND]"]["accuracy"] == 1.0 and result["[RIYA]"]["accuracy"] == 0.0
    assert result["accuracy"] == pytest.approx(0.5) and result["messages"] == 20


def test_the_detector_finds_a_planted_signal_and_is_at_chance_without_one():
    rng = random.Random(0)
    vocab = "we should go get food later maybe tonight sure ok yes no idk lol".split()
    text = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 9)))
    real_train = [text() + " 🙂" for _ in range(80)]  # the person always ends with an emoji
    fake_train = [text() for _ in range(80)]
    detector = ev.train_detector(real_train, fake_train)
    real = ev.detector_scores(detector, [text() + " 🙂" for _ in range(30)])
    fake = np.array([ev.detector_scores(detector, [text() for _ in range(4)]) for _ in range(30)])
    planted = ev.pick_the_real(real, fake, n_boot=200)
    assert planted["pick_real"] > 0.9 and planted["auc"] > 0.95 and planted["candidates"] == 5
    blind = ev.train_detector([text() for _ in range(80)], [text() for _ in range(80)])
    real = ev.detector_scores(blind, [text() for _ in range(200)])
    fake = np.array([ev.detector_scores(blind, [text() for _ in range(4)]) for _ in range(200)])
    none = ev.pick_the_real(real, fake, n_boot=200)
    assert 0.1 < none["pick_real"] < 0.32 and 0.4 < none["auc"] < 0.6
    assert none["pick_real_interval"][0] < 0.2 < none["pick_real_interval"][1]


def test_pick_the_real_and_auc_by_hand():
    real = np.array([5.0, 0.0, 2.0])
    fake = np.array([[1.0, 2.0], [3.0, 4.0], [2.0, 1.0]])  # prompt 2: a tie with the real one
    r = ev.pick_the_real(real, fake, n_boot=100, seed=0)
    # Prompt 0: caught; 1: not; 2: a tie (jitter decides) -> 1 or 2 of 3.
    assert r["pick_real"] in (pytest.approx(1 / 3), pytest.approx(2 / 3))
    # AUC over all 3 x 6 pairs: real 5 beats 6; real 0 beats 0; real 2 beats 3 (1, 1, 1 from other rows... by hand):
    pairs = [(x, y) for x in real for y in fake.flatten()]
    assert r["auc"] == pytest.approx(np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs]))


def test_conversation_statistics_by_hand():
    conversation = ["[A] we should get food", "[A] we should get food", "[B] ok lets go get food now",
                    "[B] yes", "[A] we should get food tonight"]
    s = ev.conversation_stats([conversation], training_texts={"yes"})
    assert s["messages"] == 5 and s["verbatim_repeats"] == 1 / 5  # message 2 repeats message 1
    # 4-grams: m1 "we should get food" (1); m2 the same (1, repeated); m3 3 new; m4 none; m5 2 ("we should
    # get food" repeated, "should get food tonight" new): 7 in all, 2 repeated.
    assert s["repeated_4grams"] == pytest.approx(2 / 7)
    assert s["run_mean"] == pytest.approx((2 + 2 + 1) / 3) and s["training_copies"] == 1 / 5
    last = ev.conversation_stats([conversation], training_texts=set(), last=2)
    assert last["messages"] == 2 and last["repeated_4grams"] == pytest.approx(1 / 2)  # history still counts


class FakeCompletions(FakeServer):
    """A completions server: echo with logprobs gives one token per character with log-prob -ln 2 (one
    bit each); a sampling request returns n fixed replies. no_logprobs=True: a server that returns no
    prompt log-probs."""

    def __init__(self, no_logprobs=False):
        self.no_logprobs = no_logprobs
        super().__init__()

    def respond(self, path, body):
        self.requests.append(body)
        prompt = body["prompt"]
        if body.get("echo"):
            logprobs = None if self.no_logprobs else {
                "tokens": list(prompt), "token_logprobs": [None] + [-math.log(2)] * (len(prompt) - 1),
                "text_offset": list(range(len(prompt))), "top_logprobs": None}
            choices = [{"index": 0, "text": prompt + "x", "finish_reason": "length", "logprobs": logprobs}]
        else:
            choices = [{"index": j, "text": f" big reply {j}", "finish_reason": "stop", "logprobs": None}
                       for j in range(body.get("n", 1))]
        return 200, {"id": "x", "object": "text_completion", "created": 0, "model": body["model"], "choices": choices}


@pytest.mark.parametrize("no_logprobs", [False, True])
def test_a_big_model_behind_a_server_is_scored_from_its_prompt_logprobs(small_chat, tiny_adapter, tmp_path,
                                                                        monkeypatch, capsys, no_logprobs):
    monkeypatch.setenv("BIG_KEY", KEY)
    api = FakeCompletions(no_logprobs)
    try:
        opts = ev.Options(data=str(small_chat), adapter=str(tiny_adapter), samples=3, max_messages=4, long_context=64,
                          turing_train=5, turing_samples=2, who_said=0, context_messages=2, big_model="big-1",
                          big_base_url=api.url, big_key_env="BIG_KEY", big_context=300, api_cache=str(tmp_path / "c.jsonl"),
                          out=str(tmp_path / "e.json"))
        r = ev.evaluate(opts)
        sent = len(api.requests)
        assert sent == 4 + 3 + 5  # 4 scored messages, 3 held-out and 5 training prompts to reply to
        if no_logprobs:
            assert "g" not in r["nll"] and "gives no prompt log-probs" in capsys.readouterr().err
        else:
            # One bit per character of each message's " text" and newline, exactly: 1.0 bits per character.
            assert r["nll"]["g"]["bits_per_char"] == pytest.approx(1.0) and r["nll"]["g"]["messages"] == 4
            assert "c vs g" in r["contrasts"]
            prompt = next(b["prompt"] for b in api.requests if b.get("echo"))
            assert len(prompt) <= 300 + 200 and prompt.endswith("\n") and prompt.split("\n")[-2].startswith(FRIEND)
        assert r["samples"]["big model"]["n"] == 3 * 2 and "big model" in r["turing"]
        ev.evaluate(opts)
        assert len(api.requests) == sent  # a rerun sends nothing: every answer is cached
        err = capsys.readouterr().err
        assert f"to {api.url} (big-1)" in err and KEY not in err
    finally:
        api.close()
