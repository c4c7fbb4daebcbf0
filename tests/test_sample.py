"""sample.py: the sampling distribution against transformers' processors, batching, stopping, and every mode."""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lora
import sample
from model import greedy, load_checkpoint
from sample import Options, banned_ngrams, generate, penalize, sampling_logprobs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
                                dict(temperature=1.3, top_k=20, top_p=0.9)])
def test_the_sampling_distribution_equals_transformers_warpers(kw):
    from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    # transformers' order in generate(): temperature, top-k, top-p, min-p.
    procs = [TemperatureLogitsWarper(kw.get("temperature", 1.0))]
    procs += [TopKLogitsWarper(kw["top_k"])] if "top_k" in kw else []
    procs += [TopPLogitsWarper(kw["top_p"])] if "top_p" in kw else []
    procs += [MinPLogitsWarper(kw["min_p"])] if "min_p" in kw else []
    theirs = LogitsProcessorList(procs)(None, logits.clone()).log_softmax(-1)
    ours = sampling_logprobs(logits, **kw)
    assert torch.equal(ours.isinf(), theirs.isinf())
    kept = ~ours.isinf()
    torch.testing.assert_close(ours[kept], theirs[kept])
    assert torch.allclose(ours.exp().sum(-1), torch.ones(3))


def test_the_repetition_penalty_equals_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter(1, ids, True)
    torch.testing.assert_close(penalize(logits, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_ngram_blocking_equals_transformers():
    from transformers import NoRepeatNGramLogitsProcessor

    history = [4, 5, 6, 1, 4, 5, 7, 2, 4, 5]
    theirs = NoRepeatNGramLogitsProcessor(3)(torch.tensor([history]), torch.zeros(1, 10))
    assert sorted(banned_ngrams(history, 3)) == sorted(torch.nonzero(theirs[0].isinf()).flatten().tolist()) == [6, 7]


def test_a_left_padded_batch_gives_the_same_greedy_replies_as_one_by_one(tiny_chat_dir):
    model = load_checkpoint(tiny_chat_dir)
    from model import load_tokenizer

    tok = load_tokenizer(tiny_chat_dir)
    prompts = ["[RIYA] hi\n[FRIEND]", "[FRIEND] are you there? it has been a while\n[RIYA] yes\n[FRIEND]", "[RIYA]"]
    opts = Options(temperature=0, max_new_tokens=8, repetition_penalty=1.2)
    batched = generate(model, tok, prompts, opts)
    assert batched == [generate(model, tok, [p], opts)[0] for p in prompts]
    assert len(set(batched)) == 3


def test_a_reply_stops_where_the_speakers_message_ends(smol):
    model, tok = smol
    prompt = "[RIYA] did you finish the homework?\n[FRIEND]"
    forwards = []
    reply = generate(model, tok, [prompt], Options(temperature=0, repetition_penalty=1.0, max_new_tokens=60),
                     hooks={"resid.0": lambda x: forwards.append(1)})[0]
    # Oracle: plain greedy decoding without any stop rule, cut at its first newline.
    ids = tok.encode(prompt)
    free = tok.decode(ids + greedy(model, torch.tensor([ids]), 60)[0].tolist())[len(tok.decode(ids)) :]
    assert "\n" in free, "the oracle needs a continuation that ends a message"
    assert reply == " ".join(free.split("\n")[0].split()) and reply
    # and decoding stopped there: one forward for the prompt, then one per token up to the newline
    assert len(forwards) == len(tok.encode(free.split("\n")[0] + "\n", start=False))


def test_sampling_is_reproducible_with_a_seed_and_varies_without_it(tiny_chat_dir):
    from model import load_tokenizer

    model, tok = load_checkpoint(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    opts = Options(max_new_tokens=6, temperature=1.0, top_p=1.0)
    a = generate(model, tok, ["[RIYA] hi\n[FRIEND]"] * 4, opts)
    assert a == generate(model, tok, ["[RIYA] hi\n[FRIEND]"] * 4, opts)
    assert len(set(a)) > 1  # the rows of one batch are separate samples
    assert a != generate(model, tok, ["[RIYA] hi\n[FRIEND]"] * 4, replace(opts, seed=1))


def test_a_conversation_loop_resamples_verbatim_repeats_and_reports_them(smol, monkeypatch):
    model, tok = smol
    replies = iter(["same old", "same old", "same old", "same old", "something new", "same old", "same old", "same old"])
    monkeypatch.setattr(sample, "generate", lambda *a, **k: [next(replies)])
    lines = ["[RIYA] hey", "[FRIEND] same old"]
    stats = sample.loop(model, tok, lines, Options(loop=2, data="missing.jsonl"), ["[FRIEND]", "[RIYA]"])
    # Message 1: repeat, repeat, repeat -> kept after two resamples. Message 2: repeat, then new.
    assert lines[2].endswith(" same old") and lines[3].endswith(" something new")
    assert stats["resampled repeats"] == 3 and stats["verbatim repeats kept"] == 1 and stats["messages"] == 2


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_cli_prints_one_reply_or_n_replies(tiny_adapter):
    one = run("--adapter", str(tiny_adapter), "--speaker", "FRIEND", "--prompt", "[RIYA] you coming?",
              "--max-new-tokens", "5")
    assert one.returncode == 0, one.stderr
    assert len(one.stdout.splitlines()) == 1 and one.stdout.startswith("[FRIEND] ")
    five = run("--adapter", str(tiny_adapter), "--speaker", "FRIEND", "--prompt", "[RIYA] hi", "--n", "5",
               "--max-new-tokens", "5")
    assert [l[:9] for l in five.stdout.splitlines()] == ["[FRIEND] "] * 5


def test_cli_compare_prints_base_and_fine_tuned_side_by_side(tiny_adapter):
    out = run("--adapter", str(tiny_adapter), "--prompt", "[RIYA] hi", "--compare", "--n", "2",
              "--max-new-tokens", "5", "--temperature", "0").stdout.splitlines()
    assert out[0].split() == ["base", "|", "fine-tuned"] and len(out) == 3
    assert all(base.strip() != tuned.strip() for base, tuned in (l.split(" | ") for l in out[1:]))


def test_cli_chat_answers_each_line_typed_on_stdin(tiny_adapter):
    out = run("--adapter", str(tiny_adapter), "--chat", "--me", "RIYA", "--speaker", "FRIEND",
              "--max-new-tokens", "4", stdin="hey\nwanna go hiking?\n")
    assert out.returncode == 0, out.stderr
    assert [l[:9] for l in out.stdout.splitlines()] == ["[FRIEND] ", "[FRIEND] "]


def test_cli_loop_plays_both_people_and_reports_repetition(tiny_adapter):
    out = run("--adapter", str(tiny_adapter), "--loop", "4", "--prompt", "[RIYA] hey", "--max-new-tokens", "4")
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == "[RIYA] hey" and all(l.startswith(("[RIYA] ", "[FRIEND] ")) for l in lines[1:5])
    assert lines[-1].startswith("repetition: messages 4, resampled repeats ")


@pytest.mark.parametrize("args, says", [
    (["--adapter", "no/such/adapter"], "error: --adapter no/such/adapter: no adapter there"),
    (["--base", "--prompt", "hello there"], "error: --prompt line 'hello there' does not start with a speaker tag"),
])
def test_cli_bad_input_is_one_line_and_exit_status_2(args, says):
    out = run(*args)
    assert out.returncode == 2 and out.stderr.startswith(says) and out.stderr.count("\n") == 1


def test_a_conversation_loop_caps_runs_of_one_speaker(smol, monkeypatch):
    model, tok = smol
    counter = iter(range(100))
    monkeypatch.setattr(sample, "next_speaker", lambda *a, **k: "[RIYA]")  # a model that never yields
    monkeypatch.setattr(sample, "generate", lambda *a, **k: [f"message {next(counter)}"])
    lines = ["[RIYA] hey"]
    stats = sample.loop(model, tok, lines, Options(loop=6, max_run=2, data="missing.jsonl"), ["[FRIEND]", "[RIYA]"])
    assert [l.split()[0] for l in lines] == ["[RIYA]", "[RIYA]", "[FRIEND]", "[RIYA]", "[RIYA]", "[FRIEND]", "[RIYA]"]
    assert stats["forced turn changes"] == 2
