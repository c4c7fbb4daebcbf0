"""sample.py: the sampling distribution against transformers' processors, batching, stopping, and every mode."""
from dataclasses import replace

import pytest
import torch

import sample
from model import greedy, load_checkpoint
from sample import Options, banned_ngrams, generate, penalize, sampling_logprobs
from conftest import script



@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
                                dict(temperature=1.3, top_k=20, top_p=0.9), dict(top_p=0.9, min_p=0.2)])
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
    torch.testing.assert_close(penalize(logits, ids, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])  # near-uniform (a nucleus of most of V) to peaked
def test_the_nucleus_found_among_the_top_tokens_is_the_one_a_full_sort_finds(scale):
    probs = (torch.randn(4, 5000, generator=torch.Generator().manual_seed(2)) * scale).softmax(-1)
    for top_p in (0.5, 0.9, 0.999):
        ranked, order = probs.sort(-1, descending=True)
        outside = ranked.cumsum(-1) - ranked >= top_p
        expected = ~outside.scatter(-1, order, outside)
        assert torch.equal(sample.nucleus(probs, top_p), expected)


def test_draw_samples_the_distribution_and_never_a_token_of_probability_zero():
    logp = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]]).log().repeat(20000, 1)
    counts = torch.bincount(sample.draw(logp, torch.Generator().manual_seed(0)), minlength=5).float()
    assert counts[1] == counts[4] == 0
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0]), atol=0.015, rtol=0)


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



def test_cli_prints_one_reply_or_n_replies(tiny_adapter):
    one = script("sample.py", "--adapter", str(tiny_adapter), "--speaker", "FRIEND", "--prompt", "[RIYA] you coming?",
              "--max-new-tokens", "5")
    assert one.returncode == 0, one.stderr
    assert len(one.stdout.splitlines()) == 1 and one.stdout.startswith("[FRIEND] ")
    five = script("sample.py", "--adapter", str(tiny_adapter), "--speaker", "FRIEND", "--prompt", "[RIYA] hi", "--n", "5",
               "--max-new-tokens", "5")
    assert [l[:9] for l in five.stdout.splitlines()] == ["[FRIEND] "] * 5


def test_cli_marks_a_reply_cut_before_its_turn_ended(tiny_adapter):
    out = script("sample.py", "--adapter", str(tiny_adapter), "--prompt", "[RIYA] hi", "--n", "4", "--max-new-tokens", "1")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 4, out.stderr
    # one token is either the newline that ends the turn (an empty reply) or a cut reply
    assert all(line == "[FRIEND] " or line.endswith(sample.CUT) for line in lines) and any(sample.CUT in l for l in lines)


def test_cli_compare_prints_base_and_fine_tuned_side_by_side(tiny_adapter):
    out = script("sample.py", "--adapter", str(tiny_adapter), "--prompt", "[RIYA] hi", "--compare", "--n", "2",
              "--max-new-tokens", "5", "--temperature", "0").stdout.splitlines()
    assert out[0].split() == ["base", "|", "fine-tuned"] and len(out) == 3
    assert all(base.strip() != tuned.strip() for base, tuned in (l.split(" | ") for l in out[1:]))


def test_cli_chat_answers_each_line_typed_on_stdin(tiny_adapter):
    out = script("sample.py", "--adapter", str(tiny_adapter), "--chat", "--me", "RIYA", "--speaker", "FRIEND",
              "--max-new-tokens", "4", stdin="hey\nwanna go hiking?\n")
    assert out.returncode == 0, out.stderr
    assert [l[:9] for l in out.stdout.splitlines()] == ["[FRIEND] ", "[FRIEND] "]


def test_cli_loop_plays_both_people_and_reports_repetition(tiny_adapter):
    out = script("sample.py", "--adapter", str(tiny_adapter), "--loop", "4", "--prompt", "[RIYA] hey", "--max-new-tokens", "4")
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == "[RIYA] hey" and all(l.startswith(("[RIYA] ", "[FRIEND] ")) for l in lines[1:5])
    assert lines[-1].startswith("repetition: messages 4, resampled repeats ")


@pytest.mark.parametrize("args, says", [
    (["--adapter", "no/such/adapter"], "error: --adapter no/such/adapter: no adapter there"),
    (["--base", "--prompt", "hello there"], "error: --prompt line 'hello there' does not start with a speaker tag"),
    (["--base", "--memory-contrast", "1"], "error: --memory-contrast reads the memory: add --memory"),
    (["--base", "--memory", "--memory-contrast", "-1"], "error: --memory-contrast -1.0: must be >= 0"),
])
def test_cli_bad_input_is_one_line_and_exit_status_2(args, says):
    out = script("sample.py", *args)
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


def test_the_samplers_logprobs_are_what_a_scoring_forward_gives_at_the_same_temperature(tiny_chat_dir):
    from model import load_tokenizer, pad, scored_logprobs

    model, tok = load_checkpoint(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    prompts = [tok.encode(p) for p in ["[RIYA] hi\n[FRIEND]", "[FRIEND] a much longer opening line here\n[RIYA]"]]
    opts = Options(max_new_tokens=7, temperature=0.7, top_p=1.0, repetition_penalty=1.0)  # plain temperature
    replies = sample.generate_ids(model, prompts, opts)
    assert [len(r.ids) for r in replies] == [7, 7] and not any(r.ended for r in replies)  # ends=None: no stop
    tokens, mask = pad([p + r.ids for p, r in zip(prompts, replies)], left=True)  # left-padded, as sampled
    scored = torch.zeros_like(mask)
    scored[:, -7:] = True
    with torch.no_grad():
        rescored = scored_logprobs(model, tokens, scored, mask=mask, temperature=0.7)
    torch.testing.assert_close(rescored, torch.tensor([lp for r in replies for lp in r.logprobs]), atol=1e-5, rtol=0)
    with torch.no_grad():  # at another temperature they differ: the check can fail
        assert not torch.allclose(scored_logprobs(model, tokens, scored, mask=mask), rescored, atol=1e-3)


def test_a_reply_that_ends_its_turn_is_marked_ended_and_a_cut_one_is_not(smol):
    model, tok = smol
    prompt = [tok.encode("[RIYA] did you finish the homework?\n[FRIEND]")]
    greedy_opts = Options(temperature=0, repetition_penalty=1.0, max_new_tokens=60)
    [whole] = sample.generate_ids(model, prompt, greedy_opts, sample.turn_ends(tok))
    assert whole.ended and "\n" in tok.decode(whole.ids[-1:]) and len(whole.logprobs) == len(whole.ids)
    [cut] = sample.generate_ids(model, prompt, replace(greedy_opts, max_new_tokens=len(whole.ids) - 1),
                                sample.turn_ends(tok))
    assert not cut.ended and cut.ids == whole.ids[:-1]


def test_repeated_prompts_share_one_prefill_and_still_sample_exactly_what_is_scored(tiny_chat_dir):
    from model import load_tokenizer, pad, scored_logprobs

    model, tok = load_checkpoint(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    one, two = tok.encode("[RIYA] hi\n[FRIEND]"), tok.encode("[FRIEND] a longer line than the other\n[RIYA]")
    prompts = [one, two, one, one]
    forwards = []
    opts = Options(max_new_tokens=6, temperature=0.9, top_p=1.0, repetition_penalty=1.0)
    replies = sample.generate_ids(model, prompts, opts, hooks={"resid.0": lambda x: forwards.append(x.shape[0])})
    assert forwards[0] == 2  # the prefill ran the 2 distinct prompts, not 4
    assert len({tuple(replies[j].ids) for j in (0, 2, 3)}) > 1  # separate samples, not one copied
    tokens, mask = pad([p + r.ids for p, r in zip(prompts, replies)], left=True)
    scored = torch.zeros_like(mask)
    scored[:, -6:] = True
    with torch.no_grad():
        rescored = scored_logprobs(model, tokens, scored, mask=mask, temperature=0.9)
    torch.testing.assert_close(rescored, torch.tensor([lp for r in replies for lp in r.logprobs]), atol=1e-5, rtol=0)


def test_batches_taken_by_length_give_each_prompt_its_own_reply_in_the_prompts_order(tiny_chat_dir):
    from model import load_tokenizer

    model, tok = load_checkpoint(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    texts = ["[RIYA] a much longer opening line than any other here\n[FRIEND]", "[RIYA]", "[FRIEND] hey\n[RIYA]",
             "[RIYA] one two three\n[FRIEND]", "[FRIEND] ok\n[RIYA] fine\n[FRIEND]"]
    prompts = [tok.encode(t) for t in texts]
    greedy_opts = Options(temperature=0, max_new_tokens=6)
    batched = sample.generate_in_batches(model, prompts, greedy_opts, batch_size=2)
    assert [r.ids for r in batched] == [sample.generate_ids(model, [p], greedy_opts)[0].ids for p in prompts]
    # Sampling: batch j of the length order, seeded seed + j, exactly as generate_ids samples it
    opts = Options(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=6, seed=3)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    sampled = sample.generate_in_batches(model, prompts, opts, batch_size=2)
    for j in range(0, len(order), 2):
        part = order[j : j + 2]
        alone = sample.generate_ids(model, [prompts[i] for i in part], replace(opts, seed=3 + j))
        assert [sampled[i].ids for i in part] == [r.ids for r in alone]


def test_memory_lines_are_not_the_conversation_the_penalty_counts(smol):
    """With context_ids (the prompt without its memory lines), the repetition penalty counts only those:
    each token's log-prob is, by hand, the log-softmax of the logits after the whole prompt, penalised
    for the tokens of the context and the reply so far (and not, as without context_ids, the memory's)."""
    model, tok = smol
    memory, context = "[FRIEND] i grew up in seoul (2018-05-15)\n", "[RIYA] where are you from again?\n[FRIEND]"
    prompt, plain = tok.encode(memory + context), tok.encode(context)
    opts = Options(max_new_tokens=4, temperature=1.0, top_p=1.0, repetition_penalty=1.3)
    [reply] = sample.generate_ids(model, [prompt], opts, context_ids=[plain])
    off = 0.0  # how far the old rule (the memory penalised too) is from what was sampled
    with torch.no_grad():
        for t, token in enumerate(reply.ids):
            logits = model(torch.tensor([prompt + reply.ids[:t]]))[:, -1]
            by_hand = penalize(logits, torch.tensor([plain + reply.ids[:t]]), 1.3).log_softmax(-1)[0, token]
            assert abs(by_hand.item() - reply.logprobs[t]) < 1e-4
            old = penalize(logits, torch.tensor([prompt + reply.ids[:t]]), 1.3).log_softmax(-1)[0, token]
            off = max(off, abs(old.item() - reply.logprobs[t]))
    assert off > 1e-2


def test_memory_contrast_samples_exactly_the_contrasted_distribution(smol):
    """Context-aware decoding through both KV caches: every sampled token's log-prob is, by hand, from
    log-softmax((1 + a) x logits(memory + context + reply so far) - a x logits(baseline + reply so
    far)), for rows of different lengths in one batch; with the baseline equal to the prompt it changes
    nothing."""
    model, tok = smol
    memories = ["[FRIEND] i grew up in seoul (2018-05-15)\n", "[RIYA] my sister is a nurse (2018-06-01)\n[RIYA] hi\n"]
    forms = ["[FRIEND] (2018-05-15)\n", "[RIYA] (2018-06-01)\n[RIYA] hi\n"]
    contexts = ["[RIYA] where are you from again?\n[FRIEND]", "[FRIEND] what does she do\n[RIYA]"]
    prompts = [tok.encode(m + c) for m, c in zip(memories, contexts)]
    plains = [tok.encode(c) for c in contexts]
    baselines = [tok.encode(f + c) for f, c in zip(forms, contexts)]
    a = 1.5
    opts = Options(max_new_tokens=5, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=2)
    replies = sample.generate_ids(model, prompts, opts, context_ids=plains, contrast=a, baseline_ids=baselines)
    with torch.no_grad():
        for p, c, r in zip(prompts, baselines, replies):
            for t, token in enumerate(r.ids):
                with_memory = model(torch.tensor([p + r.ids[:t]]))[0, -1]
                without = model(torch.tensor([c + r.ids[:t]]))[0, -1]
                by_hand = ((1 + a) * with_memory - a * without).log_softmax(-1)[token]
                assert abs(by_hand.item() - r.logprobs[t]) < 1e-4
    same = sample.generate_ids(model, prompts, opts, context_ids=plains, contrast=a, baseline_ids=prompts)
    plain = sample.generate_ids(model, prompts, opts)
    assert [r.ids for r in same] == [r.ids for r in plain]
    torch.testing.assert_close(torch.tensor([r.logprobs for r in same]), torch.tensor([r.logprobs for r in plain]))
    assert not torch.allclose(torch.tensor([r.logprobs for r in replies]), torch.tensor([r.logprobs for r in plain]),
                              atol=1e-3)  # the contrast changes the distribution: the check above can fail


def test_reply_to_tells_generate_which_lines_are_the_memory(monkeypatch):
    seen = {}
    monkeypatch.setattr(sample, "generate", lambda model, tok, prompts, opts, hooks=None, contexts=None,
                        baselines=None, **kw: seen.update(prompts=prompts, contexts=contexts, baselines=baselines)
                        or ["ok"] * len(prompts))
    sample.reply_to(None, None, ["[FRIEND] i live in oslo (2018-01-02)"], ["[RIYA] where?"], "[FRIEND]", Options(), n=2)
    assert seen == {"prompts": ["[FRIEND] i live in oslo (2018-01-02)\n[RIYA] where?\n[FRIEND]"] * 2,
                    "contexts": ["[RIYA] where?\n[FRIEND]"] * 2,
                    "baselines": ["[FRIEND] (2018-01-02)\n[RIYA] where?\n[FRIEND]"] * 2}  # the form, not the words
    sample.reply_to(None, None, [], ["[RIYA] where?"], "[FRIEND]", Options())
    assert seen == {"prompts": ["[RIYA] where?\n[FRIEND]"], "contexts": None, "baselines": None}  # nothing to tell apart


def test_a_reply_read_with_a_memory_ends_where_it_copies_a_memory_date(monkeypatch):
    texts = iter(["i live in oslo (2018-01-02) and more", "(2018-01-0", "we met in 2018 (in may)", "ux design 2018-05 yes",
                  "from 1990-1995"] * 2)
    monkeypatch.setattr(sample, "generate_ids", lambda model, ids, opts, *a: [sample.Reply([1], [0.0], True)] * len(ids))
    monkeypatch.setattr(sample, "reply_text", lambda tok, prompt, reply: next(texts))
    monkeypatch.setattr(sample, "turn_ends", lambda tok: None)
    tok = type("Tok", (), {"encode": lambda self, text: [1]})()
    prompts = ["p"] * 5
    assert sample.generate(None, tok, prompts, Options(), contexts=prompts) == [
        "i live in oslo", "", "we met in 2018 (in may)", "ux design", "from 1990-1995"]
    assert sample.generate(None, tok, prompts, Options())[:2] == ["i live in oslo (2018-01-02) and more", "(2018-01-0"]
