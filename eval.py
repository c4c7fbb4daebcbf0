"""Does fine-tuning simulate the two people better than prompting alone? Measured on the held-out sessions.

    python eval.py                                        # out/adapter on data/convos.jsonl -> out/eval.json
    python eval.py --speaker RIYA --long-context 2048     # simulate Riya; a smaller in-context window
    OPENAI_API_KEY=... python eval.py --judge-model gpt-4o-mini   # also an AI judge (sends chats to the API)

On the latest sessions, the ones sft.py validates on, every message of --speaker (on a CPU, by default,
only the latest 200 of them: --max-messages 0 for all) is scored four ways:
the negative log-likelihood per token of what they really wrote (its text and the newline that ends
the turn: exactly the tokens sft.py trains on) under

    (a) the base model, short context: the up to --context-messages earlier messages of its session
    (b) the base model, long context: as much of the two people's earlier history as fits in
        --long-context tokens (the model's whole window by default): the purely in-context baseline
    (c) the fine-tuned model (base + adapter), short context, as it was trained
    (d) the fine-tuned model, long context.

Plus: who talks next (base and fine-tuned, against always guessing "the same person again" or "the
other person"), statistics of sampled replies (length, distinct-n, verbatim copies of training
messages), and, with --judge-model, how often an AI judge mistakes a simulated reply for the real one.
Prints a markdown table, writes --out (JSON: every number and the settings) and a length histogram.
"""
import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

import cli
import lora
import sample
import sft
from cli import FRACTION, POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import capture, pad, scored_logprobs
from prep import encode_example, load_pair, one_line, split_sessions, tag


@dataclass
class Options:
    adapter: Annotated[str, "adapter directory from sft.py"] = sft.ADAPTER
    data: Annotated[str, "chat history (default: the data the adapter was trained on)"] = ""
    speaker: Annotated[str, "whose messages are simulated and scored: a tag from the data, e.g. FRIEND"] = "FRIEND"
    model: Annotated[str, "base model (default: the one the adapter was trained on)"] = ""
    allow_other_base: Annotated[bool, "load the adapter even onto a base model other than the one it was "
                                      "trained on"] = False
    # The split, the short context and the example length are the adapter's (its training.json), so the
    # held-out sessions are the ones it never saw and its examples are built as in training.
    context_messages: Annotated[int | None, "short context: at most this many earlier messages of the "
                                            "session (default: as the adapter was trained)", Range(0)] = None
    session_gap_hours: Annotated[float | None, "a silence this long starts a new session (default: as the "
                                               "adapter was trained)", POSITIVE] = None
    val_frac: Annotated[float | None, "fraction of sessions (the latest) held out (default: as the adapter "
                                      "was trained)", FRACTION] = None
    max_len: Annotated[int | None, "tokens per short-context example (default: as the adapter was trained)", Range(2)] = None
    long_context: Annotated[int, "long context: tokens of history per forward; 0 = the model's window", Range(0)] = 0
    max_messages: Annotated[int, "score the speaker's latest N held-out messages (and the messages between "
                                 "them); 0 = all", Range(0)] = 200
    batch_size: Annotated[int, "sequences per forward (short context) and per sampling batch", Range(1)] = 16
    samples: Annotated[int, "replies sampled from each model, prompts spread over the held-out messages", Range(0)] = 64
    seed: Annotated[int, "seed for sampling and the judge's reply order"] = 0
    out: Annotated[str, "JSON results (the length histogram goes next to it)"] = "out/eval.json"
    judge_model: Annotated[str, "an AI judge through an OpenAI-compatible API (default: no judge)"] = ""
    judge_base_url: Annotated[str, "the judge's API"] = "https://api.openai.com/v1"
    judge_key_env: Annotated[str, "environment variable that holds the judge's API key"] = "OPENAI_API_KEY"
    judge_cache: Annotated[str, "the judge's answers, one JSON line each: a rerun pays for none twice"] = \
        "out/judge_cache.jsonl"


# Scoring all 1,687 held-out FRIEND messages of the shipped data takes about 50 minutes on 2 CPU cores
# (each is scored after 8 messages of context, as trained: ~480k tokens per model for (a) and (c) alone),
# so a CPU scores the latest 200 (~10 minutes); a GPU scores them all.
GPU_DEFAULTS = dict(max_messages=0)


@dataclass
class Scores:
    """What one pass over the held-out sessions measured. Keys (s, i): message i of held-out session s."""
    nll: dict = field(default_factory=dict)  # (s, i) -> (summed NLL in nats, tokens), the speaker's messages
    next_tag: dict = field(default_factory=dict)  # (s, i) -> the tag predicted to write message i, i >= 1
    window: dict = field(default_factory=dict)  # long context: (s, i) -> its forward's (first, chunk, end) lines


def first_scored(held_out, tags, speaker_tag, max_messages) -> tuple:
    """The key (s, i) from which on held-out messages are scored: the speaker's latest max_messages
    messages (0 = all) are the speaker's messages from there on. A contiguous stretch, not a spread,
    because the long context scores a stretch of consecutive messages per forward."""
    targets = [(s, i) for s, session in enumerate(held_out) for i, m in enumerate(session)
               if tags[m.speaker] == speaker_tag]
    return targets[-max_messages] if 0 < max_messages < len(targets) else (0, 0)


def nats_per_token(scores: Scores) -> float:
    return sum(n for n, _ in scores.nll.values()) / sum(t for _, t in scores.nll.values())


# ---------------------------------------------------------------------------------------------------
# Short context: one sequence per held-out message, exactly as sft.py builds a training example.
#
# Who talks next, read from the same forwards. A tag is several tokens ("[", "F", "RI", "END", "]" and
# "[", "RI", "Y", "A", "]" for SmolLM2) that begin alike; the model chooses between the two people at
# the first token where their tags differ ("F" or "RI" after "["), and the rest of a name is all but
# certain once begun. So the prediction is whichever of those two tokens has the larger logit at that
# position, which every sequence below already contains: no extra forward. Summing each whole tag's
# log-probs (sample.next_speaker) would need two more forwards per position and model; on 60 held-out
# positions of the shipped data with SmolLM2 the two rules agreed 59 times (base) and 58 (fine-tuned).

def branch(tag_ids: dict) -> int:
    """The first token index at which the two tags' tokens differ."""
    a, b = tag_ids.values()
    return next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)


@torch.inference_mode()
def short_context(model, tok, held_out, tags, speaker_tag, context_messages, max_len, batch_size, start=(0, 0),
                  desc="short context"):
    """Score every held-out message of speaker_tag from key start on, after the up to context_messages
    messages before it in its session (as prep.encode_example tokenises a training example, cut to
    max_len), and predict at every position i >= 1 from start on which of the two people writes
    message i."""
    tag_ids = {t: tok.encode(t, start=False) for t in tags.values()}
    b = branch(tag_ids)
    rows = []  # (key, tokens, loss mask, the position whose logits choose the next tag, or None)
    for s, session in enumerate(held_out):
        for i, m in enumerate(session):
            target = tags[m.speaker] == speaker_tag
            if (s, i) < start or (not target and i == 0):
                continue  # not scored, or nothing to score and nobody to predict before a session's first message
            k = min(context_messages, i)
            tokens, mask, _, _ = encode_example(tok, session[i - k : i], m, tags, max_len)
            n = mask.index(True) if True in mask else len(tokens)  # where the text after the tag begins
            choose = None  # the position whose logits predict the branch token
            if i >= 1:  # the tag follows a newline, so it is tokenised as tag_ids holds it
                tag_start = n - len(tag_ids[tags[m.speaker]])
                if tokens[tag_start:n] != tag_ids[tags[m.speaker]]:
                    raise ValueError(f"the tokenizer splits {tags[m.speaker]!r} differently after a newline")
                choose = tag_start + b - 1
            if not target:  # only the next-speaker prediction is needed: stop after the tag
                tokens, mask = tokens[:n], [False] * n
            rows.append(((s, i), tokens, mask, choose))

    candidates = torch.tensor([ids[b] for ids in tag_ids.values()])  # the two branch tokens
    names = list(tag_ids)
    device = model.embed_tokens.weight.device
    final = f"resid.{model.cfg.n_layers}"  # the stream before the final norm: norm + unembed = the logits
    scores = Scores()
    rows.sort(key=lambda r: len(r[1]))  # similar lengths share a batch: little padding
    for first in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = rows[first : first + batch_size]
        tokens, _ = pad([ids for _, ids, _, _ in batch], device=device)
        scored = pad([mask for _, _, mask, _ in batch], device=device)[0].bool()  # (B, T): the target's tokens
        acts = {}
        nll_tok = -scored_logprobs(model, tokens, scored, hooks=capture(acts, final))  # (N,)
        row = scored[:, 1:].nonzero()[:, 0]  # (N,): the sequence each scored token belongs to
        nll = torch.zeros(len(batch), device=device).index_add_(0, row, nll_tok)  # (B,)
        for j, (key, _, mask, choose) in enumerate(batch):
            if any(mask):
                scores.nll[key] = (nll[j].item(), sum(mask))
            if choose is not None:
                logits = model.unembed(model.norm(acts[final][j, choose]))
                scores.next_tag[key] = names[int(logits[candidates.to(device)].argmax())]
    return scores


# ---------------------------------------------------------------------------------------------------
# Long context: the purely in-context baseline. Each forward holds a run of held-out messages (the
# "chunk") after as many whole earlier messages (earlier sessions too, training ones included, in
# time order) as fit in the budget; one forward scores every message of its chunk, each with
# everything before it as context. A chunk takes at most half the budget, so every message sees at
# least half the budget of history, and a message late in its chunk sees less old history than an
# early one (its own chunk's messages take that room): within the same token budget. A session that
# fits in half the budget is one chunk: one forward per session. (Held-out sessions can be long: the
# shipped data has one of ~34k tokens, four times SmolLM2's window.)

def line_tokens(tok, m, tags, start=False):
    """A message's chat line "[TAG] text\\n" as (its tag's tokens, its text's and end-of-turn newline's
    tokens), cut where prep.encode_example cuts: the second part is what sft.py puts loss on.
    start=False: the line continues a document (tok.encode's contract: continuations concatenate)."""
    head = tags[m.speaker]
    ids, head_ids = tok.encode(f"{head} {one_line(m.text)}\n", start), tok.encode(head, start)
    n = 0
    while n < min(len(ids), len(head_ids)) and ids[n] == head_ids[n]:
        n += 1
    return ids[:n], ids[n:]


@torch.inference_mode()
def long_context(model, tok, all_sessions, n_held_out, tags, speaker_tag, budget, start=(0, 0),
                 desc="long context"):
    """Score every message of speaker_tag in the last n_held_out sessions, from key start on, with up
    to budget tokens of the history before it. Scores.window records which lines each forward held."""
    stream = [m for session in all_sessions for m in session]  # the whole history, in time order
    lines = [line_tokens(tok, m, tags) for m in tqdm(stream, desc="tokenizing", unit="message", leave=False)]
    size = [len(h) + len(t) for h, t in lines]
    first_held_out = len(stream) - sum(len(s) for s in all_sessions[-n_held_out:])

    forwards = []  # (first, chunk start, end): lines first..end-1 in one forward, chunk start.. scored
    begin = first_held_out
    for s, session in enumerate(all_sessions[-n_held_out:]):
        end_of_session = begin + len(session)
        c = end_of_session if s < start[0] else begin + start[1] if s == start[0] else begin
        while c < end_of_session:
            e, used = c + 1, size[c]
            while e < end_of_session and used + size[e] <= budget // 2:
                used, e = used + size[e], e + 1
            first = c
            while first > 0 and used + size[first - 1] <= budget:
                first, used = first - 1, used + size[first - 1]
            forwards.append((first, c, e))
            c = e
        begin = end_of_session

    device = model.embed_tokens.weight.device
    # stream[first_held_out:] are the held-out sessions' messages: their keys (s, i), in order
    held = dict(enumerate([(s, i) for s, session in enumerate(all_sessions[-n_held_out:])
                           for i in range(len(session))], start=first_held_out))
    scores = Scores()
    for first, c, e in tqdm(forwards, desc=desc, unit="forward"):
        while True:
            # The window's first line begins the document (with BOS where the model wants one), so the
            # tokens equal tok.encode of the window's text; that can add a token or two: drop a line.
            head, text = line_tokens(tok, stream[first], tags, start=True)
            tokens, spans = head + text, {first: (len(head), len(head) + len(text))}
            for g in range(first + 1, e):
                h, t = lines[g]
                spans[g] = (len(tokens) + len(h), len(tokens) + len(h) + len(t))
                tokens += h + t
            if len(tokens) <= budget or first == c:
                break
            first += 1
        tokens = tokens[:budget]  # only a single message longer than the whole budget is cut
        lo = max(1, spans[c][0])  # score from the chunk on: only the chunk's predictions are needed
        scored = torch.arange(len(tokens), device=device)[None] >= lo  # (1, T)
        nll = -scored_logprobs(model, torch.tensor([tokens], device=device), scored)  # (T - lo,)
        for g in range(c, e):
            a, z = spans[g][0], min(spans[g][1], len(tokens))
            if tags[stream[g].speaker] == speaker_tag and z > a:
                scores.nll[held[g]] = (nll[a - lo : z - lo].sum().item(), z - a)
            scores.window[held[g]] = (first, c, e)
    return scores


# ---------------------------------------------------------------------------------------------------
# Who talks next.

def next_speaker_accuracy(scores: Scores, held_out, tags) -> dict:
    """Accuracy of the predicted next tag at every position i >= 1, and the two rules that ignore the
    text: the person who wrote message i-1 writes again, or the other one does."""
    keys = sorted(scores.next_tag)
    real = [tags[held_out[s][i].speaker] for s, i in keys]
    again = [tags[held_out[s][i - 1].speaker] == r for (s, i), r in zip(keys, real)]
    return {"positions": len(keys),
            "accuracy": sum(scores.next_tag[k] == r for k, r in zip(keys, real)) / len(keys),
            "same_person_again": sum(again) / len(keys),
            "other_person": 1 - sum(again) / len(keys)}


# ---------------------------------------------------------------------------------------------------
# Sampled replies.

def sample_prompts(tok, held_out, tags, speaker_tag, context_messages, max_len, n, start=(0, 0)):
    """n prompts (short context, as in training) evenly spread over the held-out messages of
    speaker_tag from key start on: [(context lines, prompt text ending in the tag, the real reply)]."""
    targets = [(s, i) for s, session in enumerate(held_out) for i, m in enumerate(session)
               if tags[m.speaker] == speaker_tag and (s, i) >= start]
    out = []
    for j in range(min(n, len(targets))):
        s, i = targets[j * len(targets) // min(n, len(targets))]
        k = min(context_messages, i)
        _, _, text, cut = encode_example(tok, held_out[s][i - k : i], held_out[s][i], tags, max_len)
        out.append((text[:cut].splitlines()[:-1], text[:cut], one_line(held_out[s][i].text)))
    return out


def simulate(model, tok, prompts: list[str], seed: int, batch_size: int, desc="sampling") -> list[str]:
    """One reply per prompt with sample.py's default sampling, in seeded batches."""
    replies = []
    for j in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        replies += sample.generate(model, tok, prompts[j : j + batch_size], sample.Options(seed=seed + j))
    return replies


def distinct(texts, n) -> float:
    """Distinct-n (https://arxiv.org/abs/1510.03055): unique n-grams / all n-grams, within each reply."""
    grams = [tuple(w[k : k + n]) for w in (t.split() for t in texts) for k in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def reply_stats(replies: list[str], training_texts: set) -> dict:
    """Lengths in words, distinct-1/2, and the share of replies equal to a training message (compared
    as one_line(text).lower(), the form training_texts holds)."""
    words = [len(r.split()) for r in replies]
    return {"n": len(replies), "words_mean": float(np.mean(words)), "words_median": float(np.median(words)),
            "words_p90": float(np.percentile(words, 90)), "distinct_1": distinct(replies, 1),
            "distinct_2": distinct(replies, 2),
            "training_copies": sum(one_line(r).lower() in training_texts for r in replies) / len(replies)}


def plot_lengths(replies: dict, path: Path):
    plt = cli.pyplot()
    lengths = {name: [len(r.split()) for r in texts] for name, texts in replies.items()}
    top = max(max(v, default=0) for v in lengths.values())
    bins = np.arange(0, top + 2) - 0.5  # one bin per word count
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in lengths.items():
        ax.hist(values, bins=bins, histtype="step", lw=1.5, label=f"{name} (mean {np.mean(values):.1f})")
    ax.set(xlabel="reply length (words)", ylabel="replies", title="Held-out replies: real and sampled")
    ax.legend()
    cli.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# The AI judge: real or simulated? An error rate of 50% means it cannot tell them apart.

# Any OpenAI-compatible API (the judge; later, a bigger model in context), with every answer cached.

def read_answers(cache_path) -> dict:
    """The cache: one JSON line {"key", "answer"} per paid answer. A line cut short (a run killed while
    writing it) or otherwise unreadable is skipped, and its question is asked again."""
    cached = {}
    path = Path(cache_path)
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                cached[row["key"]] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return cached


def ask_api(prompts: dict, request, model_name, base_url, key_env, cache_path, what="conversations") -> dict:
    """{key: prompt} -> {key: answer}: each prompt not yet in cache_path goes to the API through
    request(client, prompt) -> a JSON-able answer, and each answer is appended to the cache as it comes,
    so an interrupted run pays for no answer twice and a rerun sends nothing. Chat logs are personal
    data: it says where it sends how many before sending anything, and the key is never printed."""
    from openai import OpenAI, OpenAIError

    cached = read_answers(cache_path)
    to_send = {k: p for k, p in prompts.items() if k not in cached}
    print(f"sending {len(to_send)} {what} ({len(prompts) - len(to_send)} answers cached) to {base_url} "
          f"({model_name})", file=sys.stderr)
    if not to_send:
        return {k: cached[k] for k in prompts}
    api_key = os.environ.get(key_env)
    if not api_key:
        raise BadInput(f"--judge-key-env {key_env}: that environment variable is not set")
    client = OpenAI(base_url=base_url, api_key=api_key, timeout=60, max_retries=2)
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_path, "a", encoding="utf-8") as f:
        for key, prompt in tqdm(to_send.items(), desc=f"asking {model_name}", unit="request"):
            try:
                answer = request(client, prompt)
            except (OpenAIError, AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
                # A refusal, or a 200 whose body is not what the API promises. One line, and never the
                # key: servers may echo what they were sent.
                message = " ".join(str(e).split()).replace(api_key, "[key]")[:300]
                raise BadInput(f"{base_url} ({model_name}) failed ({type(e).__name__}: {message}); "
                               f"{len(prompts) - len(to_send)} earlier answers are kept in {cache_path}") from None
            cached[key] = answer
            f.write(json.dumps({"key": key, "answer": answer}) + "\n")
            f.flush()  # every paid answer is on disk before the next request
    return {k: cached[k] for k in prompts}


def chat_answer(model_name):
    """request() for ask_api: the text of one chat completion. Only the model and the message are
    sent: reasoning models refuse temperature=0 and max_tokens."""
    def request(client, prompt):
        reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": prompt}])
        text = reply.choices[0].message.content
        if not isinstance(text, str):
            raise ValueError("the reply holds no text")
        return text

    return request


# The AI judge: real or simulated? An error rate of 50% means it cannot tell them apart.

JUDGE_PROMPT = """Below are the latest messages of a text chat between two people, then two candidates for \
the next message, written by {speaker}. One is what {speaker} really wrote; the other was written by a language model \
imitating them. Which one is real? Think if you like, then end with a line of its own that is exactly \
"Answer: A" or "Answer: B".

Chat:
{context}

Reply A: {a}
Reply B: {b}"""

ANSWER_LINE = re.compile(r"answer:\s*\(?([AB])\)?\.?", re.IGNORECASE)


def picked(answer: str) -> str | None:
    """The letter the judge's answer ends on ("Answer: A" as its last line), or None when it doesn't
    end that way. Read strictly: "Reply A reads like a model; the real one is B" is unclear, not A."""
    lines = [line.strip().strip("*").strip() for line in answer.strip().splitlines() if line.strip()]
    match = ANSWER_LINE.fullmatch(lines[-1]) if lines else None
    return match.group(1).upper() if match else None


def judge(items, speaker_tag, model_name, base_url, key_env, cache_path, seed) -> dict:
    """items: [(context lines, real reply, simulated reply)], replies of speaker_tag. Shows each to the
    judge with the two replies in a seeded random order; answers are cached (ask_api)."""
    rng = random.Random(seed)
    prompts, real = {}, {}  # cache key -> prompt, and the letter of the real reply
    for context, real_reply, simulated in items:
        real_first = rng.random() < 0.5
        a, b = (real_reply, simulated) if real_first else (simulated, real_reply)
        prompt = JUDGE_PROMPT.format(speaker=speaker_tag, context="\n".join(context) or "(the chat begins here)",
                                     a=a, b=b)
        key = hashlib.sha256(json.dumps([model_name, base_url, prompt]).encode()).hexdigest()
        prompts[key], real[key] = prompt, "A" if real_first else "B"
    answers = ask_api(prompts, chat_answer(model_name), model_name, base_url, key_env, cache_path)
    picks = {key: picked(answer) if isinstance(answer, str) else None for key, answer in answers.items()}
    judged = [(pick, real[key]) for key, pick in picks.items() if pick]
    wrong = sum(pick != r for pick, r in judged)
    return {"model": model_name, "base_url": base_url, "judgements": len(judged),
            "unclear": len(prompts) - len(judged), "error_rate": wrong / len(judged) if judged else None}


# ---------------------------------------------------------------------------------------------------
# The whole evaluation.

def evaluate(opts: Options) -> dict:
    t0 = time.time()
    tuned = sft.load_tuned(opts.adapter, opts.model, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    data = sft.data_settings(tuned.training, opts)
    messages, _ = load_pair(data.data)
    tags = {s: tag(s) for s in dict.fromkeys(m.speaker for m in messages)}
    speaker_tag = tag(opts.speaker)
    if speaker_tag not in tags.values():
        raise BadInput(f"--speaker {opts.speaker}: no {speaker_tag} in {data.data}; its tags are "
                       f"{', '.join(tags.values())}")
    train_sessions, held_out = split_sessions(messages, data.session_gap_hours, data.val_frac)
    n_targets = sum(tags[m.speaker] == speaker_tag for s in held_out for m in s)
    if not n_targets:
        raise BadInput(f"the held-out sessions (the latest {len(held_out)}) of {data.data} have no "
                       f"{speaker_tag} message to score; try a larger --val-frac")
    start = first_scored(held_out, tags, speaker_tag, opts.max_messages)
    budget = opts.long_context or model.cfg.max_seq_len
    seconds = {}

    def timed(name, fn):
        t = time.time()
        result = fn()
        seconds[name] = round(time.time() - t, 1)
        return result

    # Samples and the judge first: a judge failure (exit 2) then costs no scoring time.
    result = {"samples": None, "judge": None}
    if opts.samples:
        items = sample_prompts(tok, held_out, tags, speaker_tag, data.context_messages, data.max_len, opts.samples,
                               start)
        prompts = [p for _, p, _ in items]
        with lora.disabled(model):
            base_replies = timed("sample base", lambda: simulate(model, tok, prompts, opts.seed, opts.batch_size,
                                                                 "sampling (base)"))
        tuned_replies = timed("sample fine-tuned", lambda: simulate(model, tok, prompts, opts.seed, opts.batch_size,
                                                                    "sampling (fine-tuned)"))
        replies = {"real": [r for _, _, r in items], "base": base_replies, "fine-tuned": tuned_replies}
        training_texts = {one_line(m.text).lower() for s in train_sessions for m in s}
        result["samples"] = {name: reply_stats(r, training_texts) for name, r in replies.items()}
        plot_lengths(replies, Path(opts.out).with_name(Path(opts.out).stem + "_lengths.png"))
        if opts.judge_model:
            judged = [(context, real, sim) for (context, _, real), sim in zip(items, tuned_replies)]
            result["judge"] = timed("judge", lambda: judge(judged, speaker_tag, opts.judge_model, opts.judge_base_url,
                                                           opts.judge_key_env, opts.judge_cache, opts.seed))
    elif opts.judge_model:
        raise BadInput("--judge-model needs sampled replies: --samples must be above 0")

    short = lambda desc: short_context(model, tok, held_out, tags, speaker_tag, data.context_messages,
                                       data.max_len, opts.batch_size, start, desc)
    long = lambda desc: long_context(model, tok, train_sessions + held_out, len(held_out), tags, speaker_tag,
                                     budget, start, desc)
    with lora.disabled(model):  # the base model: the same weights with the adapter switched off
        a = timed("(a)", lambda: short("(a) base, short context"))
        b = timed("(b)", lambda: long("(b) base, long context"))
    c = timed("(c)", lambda: short("(c) fine-tuned, short context"))
    d = timed("(d)", lambda: long("(d) fine-tuned, long context"))

    nll = {}
    for key, model_name, context, scores in [("a", "base", "short", a), ("b", "base", "long", b),
                                             ("c", "fine-tuned", "short", c), ("d", "fine-tuned", "long", d)]:
        x = nats_per_token(scores)
        nll[key] = {"model": model_name, "context": context, "messages": len(scores.nll),
                    "tokens": sum(t for _, t in scores.nll.values()), "nll": x, "perplexity": float(np.exp(x))}
    result = {
        "settings": {**asdict(opts), **asdict(data), "model": tuned.base_model, "adapter": tuned.adapter,
                     "speaker": speaker_tag, "long_context": budget, "held_out_sessions": len(held_out),
                     "held_out_messages": n_targets, "messages": len(a.nll), "first_scored": list(start),
                     "sampling": sample.sampling_settings(sample.Options())},
        "nll": nll,
        "next_speaker": {"base": next_speaker_accuracy(a, held_out, tags),
                         "fine-tuned": next_speaker_accuracy(c, held_out, tags)},
        **result,
        "seconds": {**seconds, "total": round(time.time() - t0, 1)},
    }
    return result


def markdown(r: dict) -> str:
    s = r["settings"]
    which = ("all" if s["messages"] == s["held_out_messages"]
             else f"the latest {s['messages']} of the {s['held_out_messages']}")
    out = [f"Held out: the latest {s['held_out_sessions']} sessions of {s['data']}; scoring {which} "
           f"{s['speaker']} messages in them. Model {s['model']}, adapter {s['adapter']}.", "",
           "| model | context | messages | tokens | NLL (nats/token) | perplexity |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
    for key, row in r["nll"].items():
        context = (f"{s['context_messages']} messages of its session" if row["context"] == "short"
                   else f"{s['long_context']} tokens of history")
        out.append(f"| ({key}) {row['model']} | {context} | {row['messages']} | {row['tokens']} | "
                   f"{row['nll']:.4f} | {row['perplexity']:.2f} |")
    ns = r["next_speaker"]
    out += ["", f"| who talks next ({ns['base']['positions']} positions, short context) | accuracy |",
            "| --- | ---: |",
            f"| base | {ns['base']['accuracy']:.3f} |", f"| fine-tuned | {ns['fine-tuned']['accuracy']:.3f} |",
            f"| always the same person again | {ns['base']['same_person_again']:.3f} |",
            f"| always the other person | {ns['base']['other_person']:.3f} |"]
    if r["samples"]:
        out += ["", f"| replies ({r['samples']['real']['n']} prompts) | words: mean | median | 90th pct | "
                    "distinct-1 | distinct-2 | copies of a training message |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, x in r["samples"].items():
            out.append(f"| {name} | {x['words_mean']:.1f} | {x['words_median']:.0f} | {x['words_p90']:.0f} | "
                       f"{x['distinct_1']:.3f} | {x['distinct_2']:.3f} | {x['training_copies']:.1%} |")
    if r["judge"]:
        j = r["judge"]
        rate = "n/a" if j["error_rate"] is None else f"{j['error_rate']:.1%}"
        out += ["", "| AI judge: real or fine-tuned? | judgements | unclear answers | error rate (50% = can't tell) |",
                "| --- | ---: | ---: | ---: |", f"| {j['model']} | {j['judgements']} | {j['unclear']} | {rate} |"]
    return "\n".join(out)


def main():
    opts = parse_options(Options, GPU_DEFAULTS)
    result = evaluate(opts)
    out = Path(opts.out)
    cli.write_atomically(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    print(markdown(result))
    print(f"\nwrote {out}; wall time {result['seconds']['total'] / 60:.1f} min")


if __name__ == "__main__":
    exit_on_bad_input(main)
