"""Does fine-tuning simulate the two people better than prompting or retrieval? A contest on held-out sessions.

    python eval.py                                        # out/adapter -> out/adapter/eval.json
    python eval.py --speaker RIYA --long-context 2048     # simulate Riya; a smaller in-context window
    python eval.py --big-model Qwen2.5-72B --big-base-url http://localhost:8000/v1   # a big model in context
    OPENAI_API_KEY=... python eval.py --judge-model gpt-4o-mini   # also an AI judge (sends chats to the API)
    python eval.py --loops 4                              # also 4 simulated 50-message conversations

On the latest sessions, the ones sft.py validates on (the adapter's training.json says which), every
message of --speaker (on a CPU, by default, only the latest 200 of them: --max-messages 0 for all) is
scored by the negative log-likelihood of what they really wrote (its text and the newline that ends the
turn: exactly the tokens sft.py trains on) under

    (a) the base model, short context: the up to --context-messages earlier messages of its session
    (b) the base model, long context: as much of the two people's earlier history as fits in
        --long-context tokens (the model's whole window by default): the purely in-context baseline
    (c) the fine-tuned model (base + adapter), short context, as it was trained
    (d) the fine-tuned model, long context
    (e) the base model, short context plus retrieval: the earlier sessions' messages most relevant to
        the short context (BM25), as many as fit in --retrieval-tokens, as earlier chat lines
    (f) the fine-tuned model, short context plus the same retrieval
    (g) with --big-model, any model behind an OpenAI-compatible server, given the history as text,
        scored from the server's prompt log-probs (bits per character: another tokenizer)
    (h) the fine-tuned model, short context plus memory.py's memory of the training sessions (what
        each person said about themselves), recalled for the context, --memory-tokens of it; also on
        the messages that reuse a rare word the same person wrote before (with the share of their NLL
        those words carry, and what an oracle's lines save there: the training messages holding the
        word, chosen by reading the message; the room a memory has), and a consistency test: remembered facts
        asked for in fresh seeded sessions, with and without the memory
    (i) (h) read by context-aware decoding (--memory-contrast, sample.py's): the logits with the
        memory pushed away from those with its lines' form (tag and date) only; what that costs the
        person's real messages, and whether it makes the consistency test's answers restate the memory

in nats per token and bits per character, with paired bootstrap 95% intervals for each contrast.
Then: who said this (is a message likelier after its real author's tag?), who talks next, statistics
of sampled replies, and a judge-free Turing test: a classifier trained on the training sessions to
tell the person's real messages from a model's replies to the same prompts must pick the real reply
among 5 on held-out prompts (chance 20%; lower = better simulation), and its AUC. With --judge-model,
an AI judge takes the same 5-way test. Prints markdown tables; writes --out (JSON) and a length
histogram.
"""
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import cli
import lora
import memory as mem
import sample
import sft
from cli import FRACTION, POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import capture, pad, scored_logprobs
from prep import BM25, Message, encode_example, load_pair, one_line, split_sessions, tag, words


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
    max_len: Annotated[int | None, "tokens per short-context example (default: as the adapter was trained)",
                       Range(2)] = None
    long_context: Annotated[int, "long context: tokens of history per forward; 0 = the model's window", Range(0)] = 0
    retrieval_tokens: Annotated[int, "(e), (f): tokens of retrieved earlier messages before the short context",
                                Range(0)] = 512
    memory_tokens: Annotated[int, "(h): tokens of memory.py's memory, built from the training sessions, before "
                                  "the short context; 0 = no (h) and no consistency test", Range(0)] = 256
    consistency_seeds: Annotated[int, "(h): simulated sessions per remembered fact in the consistency test",
                                 Range(1)] = 10
    memory_contrast: Annotated[float, "(i): (h) read by context-aware decoding, (1 + a) x the logits with the memory "
                                      "- a x those with its lines' form only (sample.py --memory-contrast), scored "
                                      "and in the consistency test; 0 = off", Range(0)] = 1.0
    max_messages: Annotated[int, "score the speaker's latest N held-out messages (and the messages between "
                                 "them); 0 = all", Range(0)] = 200
    who_said: Annotated[int, "who said this: each person's latest N held-out messages; 0 = off", Range(0)] = 80
    batch_size: Annotated[int, "sequences per forward (short context) and per sampling batch", Range(1)] = 16
    samples: Annotated[int, "held-out prompts, spread over the scored messages, that each model replies to",
                       Range(0)] = 64
    turing_samples: Annotated[int, "sampled replies per held-out prompt, beside the real one, in the "
                                   "pick-the-real test", Range(1)] = 4
    turing_train: Annotated[int, "training-session prompts whose real and sampled replies train the "
                                 "Turing-test classifier; 0 = no Turing test", Range(0)] = 200
    loops: Annotated[int, "simulated conversations of --loop-length messages from held-out session openers",
                     Range(0)] = 0
    loop_length: Annotated[int, "messages per simulated conversation", Range(1)] = 50
    bootstrap: Annotated[int, "bootstrap resamples for each interval", Range(100)] = 2000
    seed: Annotated[int, "seed for sampling, the bootstrap and the judge's orders"] = 0
    out: Annotated[str, "JSON results; the length histogram goes next to it (default: eval.json in the "
                        "adapter's folder)"] = ""
    big_model: Annotated[str, "(g): a model behind an OpenAI-compatible server (vLLM, llama.cpp, Ollama); "
                              "empty = none"] = ""
    big_base_url: Annotated[str, "(g): the server"] = "http://localhost:8000/v1"
    big_key_env: Annotated[str, "(g): environment variable that holds the server's key"] = "OPENAI_API_KEY"
    big_context: Annotated[int, "(g): characters of earlier history in its prompt", Range(1)] = 16000
    judge_model: Annotated[str, "an AI judge through an OpenAI-compatible API (default: no judge)"] = ""
    judge_base_url: Annotated[str, "the judge's API"] = "https://api.openai.com/v1"
    judge_key_env: Annotated[str, "environment variable that holds the judge's API key"] = "OPENAI_API_KEY"
    api_cache: Annotated[str, "every answer of the judge and the big model, one JSON line each: a rerun pays "
                              "for none twice (default: api_cache.jsonl in the adapter's folder)"] = ""


# Scoring all 1,687 held-out FRIEND messages of the shipped data takes about 50 minutes on 2 CPU cores
# (each is scored after 8 messages of context, as trained: ~480k tokens per model for (a) and (c) alone),
# so a CPU scores the latest 200; a GPU scores them all.
GPU_DEFAULTS = dict(max_messages=0)


@dataclass
class Scores:
    """What one pass over the held-out sessions measured. Keys (s, i): message i of held-out session s."""
    nll: dict = field(default_factory=dict)  # (s, i) -> (summed NLL in nats, tokens), the speaker's messages
    chars: dict = field(default_factory=dict)  # (s, i) -> characters those tokens spell (bits per character)
    next_tag: dict = field(default_factory=dict)  # (s, i) -> the tag predicted to write message i, i >= 1
    window: dict = field(default_factory=dict)  # long context: (s, i) -> its forward's (first, chunk, end) lines


def first_scored(held_out, tags, speaker_tag, max_messages) -> tuple:
    """The key (s, i) from which on held-out messages are scored: the speaker's latest max_messages
    messages (0 = all) are the speaker's messages from there on. A contiguous stretch, not a spread,
    because the long context scores a stretch of consecutive messages per forward."""
    targets = [(s, i) for s, session in enumerate(held_out) for i, m in enumerate(session)
               if tags[m.speaker] == speaker_tag]
    return targets[-max_messages] if 0 < max_messages < len(targets) else (0, 0)


def scored_chars(m) -> int:
    """The characters of the tokens a message is scored on: " text" and the newline ending its turn.
    Dividing bits by them makes models with different tokenizers comparable."""
    return len(" " + one_line(m.text) + "\n")


def nats_per_token(scores: Scores) -> float:
    return sum(n for n, _ in scores.nll.values()) / sum(t for _, t in scores.nll.values())


def bits_per_char(scores: Scores) -> float:
    return sum(n for n, _ in scores.nll.values()) / math.log(2) / sum(scores.chars[k] for k in scores.nll)


# ---------------------------------------------------------------------------------------------------
# Intervals: a paired bootstrap over scored messages. Every model scored the same messages, so each
# resample draws messages (with replacement) and recomputes both models' rates on the same draw; the
# interval of the difference then holds out the messages' own spread, which both share.

def contrast(x: Scores, y: Scores, per="token", n_boot=2000, seed=0) -> dict:
    """x's rate minus y's, in nats per token (same tokenizer) or bits per character, over the messages
    both scored, with a 95% percentile interval from n_boot seeded resamples of those messages."""
    keys = sorted(x.nll.keys() & y.nll.keys())
    a = np.array([x.nll[k][0] for k in keys])
    b = np.array([y.nll[k][0] for k in keys])
    if per == "token":
        if any(x.nll[k][1] != y.nll[k][1] for k in keys):
            raise ValueError("per-token contrasts need the same tokens on both sides; use per='char'")
        d = np.array([x.nll[k][1] for k in keys], dtype=float)
    else:
        a, b = a / math.log(2), b / math.log(2)
        d = np.array([x.chars[k] for k in keys], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(keys), (n_boot, len(keys)))  # (n_boot, n)
    diffs = (a[draws].sum(1) - b[draws].sum(1)) / d[draws].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float((a.sum() - b.sum()) / d.sum()), "low": float(low), "high": float(high),
            "messages": len(keys), "per": per}


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
def score_rows(model, rows, batch_size, desc, choose=None):
    """rows: [(tokens, loss mask)] -> [summed NLL of each row's masked tokens], batched by length. With
    choose ([position or None] per row), also the final logits at that position of each row."""
    device = model.embed_tokens.weight.device
    final = f"resid.{model.cfg.n_layers}"  # the stream before the final norm: norm + unembed = the logits
    nll_out, chosen = [0.0] * len(rows), [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda j: len(rows[j][0]))  # similar lengths share a batch
    for first in cli.progress(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = order[first : first + batch_size]
        tokens, _ = pad([rows[j][0] for j in batch], device=device)
        scored = pad([rows[j][1] for j in batch], device=device)[0].bool()  # (B, T): the target's tokens
        acts = {}
        nll_tok = -scored_logprobs(model, tokens, scored, hooks=capture(acts, final) if choose else None)  # (N,)
        row = scored[:, 1:].nonzero()[:, 0]  # (N,): the sequence each scored token belongs to
        nll = torch.zeros(len(batch), device=device).index_add_(0, row, nll_tok)  # (B,)
        for b, j in enumerate(batch):
            nll_out[j] = nll[b].item()
            if choose and choose[j] is not None:
                chosen[j] = model.unembed(model.norm(acts[final][b, choose[j]]))
    return (nll_out, chosen) if choose else nll_out


def before(session, i, context_messages) -> list:
    """The short context of message i: up to context_messages messages of its session before it."""
    return session[i - min(context_messages, i) : i]


def short_context(model, tok, held_out, tags, speaker_tag, context_messages, max_len, batch_size, start=(0, 0),
                  desc="short context", retrieve=None):
    """Score every held-out message of speaker_tag from key start on, after the up to context_messages
    messages before it in its session (as prep.encode_example tokenises a training example, cut to
    max_len), and predict at every position i >= 1 from start on which of the two people writes
    message i. retrieve(s, context) -> earlier messages to place before the context ((e), (f)); the
    next-speaker predictions are then left out."""
    tag_ids = {t: tok.encode(t, start=False) for t in tags.values()}
    b = branch(tag_ids)
    keys, rows, choose = [], [], []  # per row: its key, (tokens, loss mask), the position choosing the tag
    for s, session in enumerate(held_out):
        for i, m in enumerate(session):
            target = tags[m.speaker] == speaker_tag
            if (s, i) < start or (not target and (i == 0 or retrieve)):
                continue  # not scored, or nothing to score and nobody to predict
            context = before(session, i, context_messages)
            extra = retrieve(s, context) if retrieve else []
            tokens, mask, _, _ = encode_example(tok, extra + context, m, tags, max_len)
            n = mask.index(True) if True in mask else len(tokens)  # where the text after the tag begins
            position = None  # the position whose logits predict the branch token
            if i >= 1 and not retrieve:  # the tag follows a newline, so it is tokenised as tag_ids holds it
                tag_start = n - len(tag_ids[tags[m.speaker]])
                if tokens[tag_start:n] != tag_ids[tags[m.speaker]]:
                    raise ValueError(f"the tokenizer splits {tags[m.speaker]!r} differently after a newline")
                position = tag_start + b - 1
            if not target:  # only the next-speaker prediction is needed: stop after the tag
                tokens, mask = tokens[:n], [False] * n
            keys.append((s, i))
            rows.append((tokens, mask))
            choose.append(position)

    predicting = any(p is not None for p in choose)
    nll, logits = score_rows(model, rows, batch_size, desc, choose) if predicting else \
        (score_rows(model, rows, batch_size, desc), [None] * len(rows))
    candidates = [ids[b] for ids in tag_ids.values()]  # the two branch tokens
    names = list(tag_ids)
    scores = Scores()
    for key, (_, mask), value, chosen in zip(keys, rows, nll, logits):
        if any(mask):
            scores.nll[key], scores.chars[key] = (value, sum(mask)), scored_chars(held_out[key[0]][key[1]])
        if chosen is not None:
            scores.next_tag[key] = names[int(chosen[candidates].argmax())]
    return scores


# ---------------------------------------------------------------------------------------------------
# Retrieval: the strongest rival in personalisation benchmarks (LaMP: retrieval +14.9%, fine-tuning
# +1.1%). The query is the short context; the candidates are every message of the sessions before the
# target's (training sessions, and earlier held-out ones); the most relevant whole messages by BM25 go
# before the short context, in time order, as ordinary chat lines.

def retriever(tok, earlier_sessions, held_out, tags, budget: int):
    """retrieve(s, context) -> the messages of sessions before held-out session s most relevant to
    context by BM25, as many whole ones as fit in budget tokens (most relevant first), in time order."""
    stream = [m for session in earlier_sessions + held_out for m in session]
    starts = np.cumsum([0] + [len(x) for x in earlier_sessions + held_out])  # each session's first message
    bm25 = BM25([words(one_line(m.text)) for m in stream])
    cost = {}

    def retrieve(s, context):
        if not context or budget <= 0:
            return []
        limit = starts[len(earlier_sessions) + s]  # the messages before held-out session s
        scores = bm25.scores(words(" ".join(one_line(m.text) for m in context)))[:limit]
        chosen, used = [], 0
        for j in np.argsort(-scores, kind="stable"):
            if scores[j] <= 0 or used >= budget:
                break
            if j not in cost:
                cost[j] = len(tok.encode(f"{tags[stream[j].speaker]} {one_line(stream[j].text)}\n", start=False))
            if used + cost[j] <= budget:
                chosen.append(j)
                used += cost[j]
        return [stream[j] for j in sorted(chosen)]

    return retrieve


# ---------------------------------------------------------------------------------------------------
# Memory, (h): what each person said about themselves in the training sessions (memory.py), recalled
# for the short context by relevance and recency, before it, as dated chat lines of their speaker.

def memory_retriever(entries, tok, budget: int, form=False):
    """retrieve(s, context) -> the memory's entries for context, as messages (memory.render's text; with
    form, memory.form's: the date alone, what context-aware decoding subtracts)."""
    def retrieve(s, context):
        if not context:
            return []
        lines = [f"{tag(m.speaker)} {one_line(m.text)}" for m in context]
        return [Message(datetime.fromisoformat(x.time), x.speaker, (mem.form if form else str)(mem.render(x)).split("] ", 1)[1])
                for x in mem.recall(entries, lines, context[-1].time, tok, budget)]
    return retrieve


@torch.inference_mode()
def contrasted(model, tok, held_out, tags, keys, retrieve, baseline, context_messages, max_len,
               weight: float) -> tuple[Scores, Scores]:
    """(h) and (h) scored under context-aware decoding's distribution (sample.Options.memory_contrast),
    from one forward with the memory and one with its form: each held-out message of keys after its
    short context, each token's log-prob from the log-softmax of the logits with the memory
    (retrieve(s, context)) before the context ((h), as short_context scores it: the same rows), and from
    that of (1 + weight) x those logits - weight x those with baseline(s, context) before it (as
    sample.reply_to: the memory's form, not its words). The second is what the contrast costs the
    person: the messages they really wrote, under the distribution it samples from."""
    device = model.embed_tokens.weight.device
    plain, scores = Scores(), Scores()
    for s, i in cli.progress(sorted(keys), desc="(h), (i) memory, with contrast", unit="message", leave=False):
        m, context = held_out[s][i], before(held_out[s], i, context_messages)
        rows = [encode_example(tok, extra + context, m, tags, max_len)[:2] for extra in (retrieve(s, context),
                                                                                         baseline(s, context))]
        tokens, _ = pad([r[0] for r in rows], device=device)  # (2, T): with the memory, with its form
        scored = pad([r[1] for r in rows], device=device)[0].bool()
        target = tokens[0, 1:][scored[0, 1:]]  # (N,)
        if not len(target) or not torch.equal(target, tokens[1, 1:][scored[1, 1:]]):
            continue  # the message itself cut by max_len differently: nothing comparable to score
        h = model(tokens[:, :-1], unembed=False)  # (2, T-1, D): the stream at t predicts token t + 1
        logits = [model.unembed(h[r][scored[r, 1:]]).float() for r in range(2)]  # 2 x (N, V)
        for out, mixed in ((plain, logits[0]), (scores, (1 + weight) * logits[0] - weight * logits[1])):
            logp = mixed.log_softmax(-1).gather(1, target[:, None])[:, 0]
            out.nll[(s, i)], out.chars[(s, i)] = (-logp.sum().item(), len(target)), scored_chars(m)
    return plain, scores


def rare_words(train_sessions, tags, speaker_tag, max_messages=5) -> set:
    """The words of 4+ letters speaker_tag wrote in a training session that are in at most max_messages
    training messages of either person: a name, a place, a hobby."""
    count = Counter(w for s in train_sessions for m in s for w in set(words(one_line(m.text))))
    theirs = {w for s in train_sessions for m in s if tags[m.speaker] == speaker_tag for w in words(one_line(m.text))}
    return {w for w in theirs if count[w] <= max_messages and len(w) >= 4 and w.isalpha()}


def rare_reuse(train_sessions, held_out, tags, speaker_tag, max_messages=5) -> set:
    """Keys (s, i) of the held-out messages of speaker_tag that reuse one of its rare_words: where a
    memory can help most."""
    rare = rare_words(train_sessions, tags, speaker_tag, max_messages)
    return {(s, i) for s, session in enumerate(held_out) for i, m in enumerate(session)
            if tags[m.speaker] == speaker_tag and rare & set(words(one_line(m.text)))}


def oracle_retriever(tok, train_sessions, held_out, tags, rare: set, budget: int):
    """retrieve(s, context) -> a reference, not a method: it reads the held-out message that follows
    context, and returns the training-session messages (either person's) that hold a rare word this
    message reuses, the newest that fit in budget tokens, in time order. So every rare-word message
    gets the earlier uses of its word, chosen by the answer; recall from the context finds the word for
    few. What these lines save on the rare-word messages is the reference for what the training
    sessions can supply there."""
    theirs = [(m, set(words(one_line(m.text)))) for session in train_sessions for m in session]

    def retrieve(s, context):
        if not context:
            return []  # as memory_retriever: nothing before a session's first message
        after = held_out[s][next(j for j, m in enumerate(held_out[s]) if m is context[-1]) + 1]
        wanted = rare & set(words(one_line(after.text)))
        chosen, used = [], 0
        for m in sorted((m for m, ws in theirs if wanted & ws), key=lambda m: m.time, reverse=True):
            cost = len(tok.encode(f"{tags[m.speaker]} {one_line(m.text)}\n", start=False))
            if used + cost <= budget:
                chosen.append(m)
                used += cost
        return sorted(chosen, key=lambda m: m.time)

    return retrieve


@torch.inference_mode()
def word_share(model, tok, held_out, tags, keys, chosen: set, context_messages, max_len) -> float:
    """The share of the summed NLL of the messages keys (scored as short_context scores them) that falls
    on the tokens of their words in chosen: were those tokens certain, the messages' NLL would fall by
    this share, so it bounds what supplying those words can save (a memory holding the rare word a
    message reuses saves at most this on the rare-word messages, unless it changes the other tokens).
    A token is a word's when the characters it decodes to overlap the word's."""
    total = on_words = 0.0
    for s, i in sorted(keys):
        m = held_out[s][i]
        tokens, mask, _, _ = encode_example(tok, before(held_out[s], i, context_messages), m, tags, max_len)
        if not any(mask):
            continue
        n = mask.index(True)
        nll = (-scored_logprobs(model, torch.tensor([tokens]), torch.tensor([mask]))).tolist()  # one per target token
        ends = [len(tok.decode(tokens[n : j + 1])) for j in range(n, len(tokens))]  # where each token's text ends
        text = tok.decode(tokens[n:]).lower()
        spans = [(x.start(), x.end()) for x in re.finditer(r"\w+", text) if x.group() in chosen]
        for x, start, end in zip(nll, [0] + ends[:-1], ends):
            total += x
            on_words += x * any(a < end and start < b for a, b in spans)
    return on_words / total if total else 0.0


def restricted(scores: Scores, keys) -> Scores:
    """The scores of some messages only."""
    keep = scores.nll.keys() & set(keys)
    return Scores({k: scores.nll[k] for k in keep}, {k: scores.chars[k] for k in keep})


# The consistency test: asked for a remembered fact in fresh sessions, does the simulation give the
# same answer each time, and the one the person gave?
QUESTIONS = {"origin": "where are you from again?", "home": "where do you live now?",
             "work": "where do you work again?", "study": "what are you studying again?", "age": "how old are you again?"}


def facts_interval(per_fact, seed, n_boot=2000) -> list:
    """A 95% percentile interval for the mean agreement, resampling facts (a fact's answers share its
    question and memory, so they are not independent draws): with 5 facts, a rough one."""
    draws = np.random.default_rng(seed).integers(0, len(per_fact), (n_boot, len(per_fact)))
    return [float(x) for x in np.percentile(np.array(per_fact)[draws].mean(1), [2.5, 97.5])]


def consistency(model, tok, entries, tags, n_seeds: int, seed: int, contrast=0.0) -> dict:
    """For each current single-valued fact (memory.py's subjects with a question), the other person asks
    for it in n_seeds fresh sessions (one seeded batch), without the memory, with it before the question,
    and (contrast > 0) with it read by context-aware decoding (sample.Options.memory_contrast). A reply
    agrees with the memory when it shares a content word of the fact the question does not hold; two
    replies agree when they share a content word. Also the share of empty replies (a reply read with
    the memory ends where it copies a memory line's date, so one that began with a date is empty)."""
    facts = [x for x in entries if x.superseded is None and x.subject in QUESTIONS and not x.simulated]
    if not facts:
        return {"facts": 0}
    people = list(tags.values())
    now = max(datetime.fromisoformat(x.time) for x in entries) + timedelta(days=1)
    content = lambda text, but=(): set(mem.content_words(text)) - set(but)
    out = {"facts": len(facts), "seeds": n_seeds, "examples": []}
    conditions = [("without memory", False, 0.0), ("with memory", True, 0.0)]
    if contrast:
        conditions.append((f"with memory, contrast {contrast:g}", True, contrast))
    for label, with_memory, weight in conditions:
        agree_memory, agree_each, per_fact, empty = [], [], [], []
        for j, fact in enumerate(facts):
            asker = next(t for t in people if t != tag(fact.speaker))
            question = f"{asker} {QUESTIONS[fact.subject]}"
            memory = [mem.render(x) for x in mem.recall(entries, [question], now, tok)] if with_memory else []
            replies = sample.reply_to(model, tok, memory, [question], tag(fact.speaker),
                                      sample.Options(seed=seed + j, memory_contrast=weight), n=n_seeds)
            answer = content(fact.text, but=words(question))
            agrees = [bool(content(r) & answer) for r in replies]
            agree_memory += agrees
            empty += [not r.strip() for r in replies]
            per_fact.append(float(np.mean(agrees)))
            pairs = [(a, b) for k, a in enumerate(replies) for b in replies[k + 1 :]]
            agree_each += [bool(content(a) & content(b)) for a, b in pairs]
            if j < 3:
                out["examples"].append({"condition": label, "fact": fact.text, "question": question, "replies": replies[:3]})
        out[label] = {"agrees_with_memory": float(np.mean(agree_memory)), "agree_with_each_other": float(np.mean(agree_each)),
                      "per_fact": per_fact, "interval": facts_interval(per_fact, seed), "empty": float(np.mean(empty))}
    return out


# ---------------------------------------------------------------------------------------------------
# Who said this? Each held-out message is scored after its real author's tag and after the other
# person's, with the same short context: the model "knows who says what" where the real author's
# version is likelier. A base model should sit near 50%; this is what an adapter learned about each
# person, and it needs no sampling.

def who_said(model, tok, held_out, tags, context_messages, max_len, batch_size, per_person, start=(0, 0),
             desc="who said this") -> dict:
    """Accuracy of "the text is likelier after its real author's tag" over each person's latest
    per_person held-out messages from key start on (and per person)."""
    people = list(tags)
    keys = {p: [(s, i) for s, session in enumerate(held_out) for i, m in enumerate(session)
                if m.speaker == p and (s, i) >= start][-per_person:] for p in people}
    rows, owners = [], []
    for p, chosen in keys.items():
        other = next(q for q in people if q != p)
        for s, i in chosen:
            m, context = held_out[s][i], before(held_out[s], i, context_messages)
            for speaker in (p, other):
                tokens, mask, _, _ = encode_example(tok, context, Message(m.time, speaker, m.text), tags, max_len)
                rows.append((tokens, mask))
            owners.append(p)
    nll = score_rows(model, rows, batch_size, desc)
    right = [real < swapped for real, swapped in zip(nll[0::2], nll[1::2])]
    out = {"messages": len(right), "accuracy": float(np.mean(right)) if right else None}
    for p in people:
        mine = [r for r, o in zip(right, owners) if o == p]
        out[tags[p]] = {"messages": len(mine), "accuracy": float(np.mean(mine)) if mine else None}
    return out


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
    lines = [line_tokens(tok, m, tags) for m in cli.progress(stream, desc="tokenizing", unit="message", leave=False)]
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
    for first, c, e in cli.progress(forwards, desc=desc, unit="forward"):
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
                scores.chars[held[g]] = scored_chars(stream[g])
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

def sample_prompts(tok, sessions, tags, speaker_tag, context_messages, max_len, n, start=(0, 0), offset=0):
    """n prompts (short context, as in training) evenly spread over the messages of speaker_tag in
    sessions from key start on: [(key, context lines, prompt text ending in the tag, the real reply)].
    offset shifts every pick by that many messages (another set of prompts, as evenly spread)."""
    targets = [(s, i) for s, session in enumerate(sessions) for i, m in enumerate(session)
               if tags[m.speaker] == speaker_tag and (s, i) >= start]
    out = []
    for j in range(min(n, len(targets))):
        s, i = targets[(j * len(targets) // min(n, len(targets)) + offset) % len(targets)]
        k = min(context_messages, i)
        _, _, text, cut = encode_example(tok, sessions[s][i - k : i], sessions[s][i], tags, max_len)
        out.append(((s, i), text[:cut].splitlines()[:-1], text[:cut], one_line(sessions[s][i].text)))
    return out


def simulate(model, tok, prompts: list[str], seed: int, batch_size: int, per_prompt=1, desc="sampling") -> list:
    """per_prompt replies to each prompt with sample.py's default sampling, in seeded batches:
    [[reply, ...] per prompt]."""
    repeated = [p for p in prompts for _ in range(per_prompt)]
    replies = []
    for j in cli.progress(range(0, len(repeated), batch_size), desc=desc, unit="batch", leave=False):
        replies += sample.generate(model, tok, repeated[j : j + batch_size], sample.Options(seed=seed + j))
    return [replies[k : k + per_prompt] for k in range(0, len(replies), per_prompt)]


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
# A judge-free Turing test. A classifier learns, on the training sessions alone, to tell the person's
# real messages from a model's sampled replies to the same prompts, from the surface of the text:
# hashed character 1-4-grams (spelling, slang, emoji, punctuation habits) plus length, punctuation,
# emoji and letter case. On held-out prompts it must then pick the real reply among 5 (the real one and
# 4 sampled): chance is 20%, and the lower its accuracy the better the model passes for the person.
# A classifier still spots AI replies on social media at 70-80% (Pagan et al. 2025), so this can lose.

BUCKETS = 2**14  # hashed n-gram features


def features(texts: list[str]) -> torch.Tensor:
    """texts -> (N, BUCKETS + 10): log(1 + count) of each hashed character 1-4-gram (crc32, so the same
    in every process), then length in characters and words, punctuation, ! and ?, emoji, the share
    of upper-case letters, all lower case, a capital first letter, and ending in punctuation."""
    X = torch.zeros(len(texts), BUCKETS + 10)
    for r, t in enumerate(texts):
        for n in (1, 2, 3, 4):
            for k in range(len(t) - n + 1):
                X[r, zlib.crc32(t[k : k + n].encode()) % BUCKETS] += 1
        letters = [c for c in t if c.isalpha()]
        upper = sum(c.isupper() for c in letters)
        X[r, BUCKETS:] = torch.tensor([
            len(t), len(t.split()), sum(unicodedata.category(c).startswith("P") for c in t), t.count("!"),
            t.count("?"), sum(unicodedata.category(c) == "So" for c in t), 10 * upper / max(1, len(letters)),
            float(bool(letters) and upper == 0), float(t[:1].isupper()),
            float(bool(t) and unicodedata.category(t[-1]).startswith("P"))])
    return X.log1p()


def train_detector(real: list[str], simulated: list[str], l2=1e-3, steps=300, seed=0):
    """Logistic regression, real = 1: (weights, bias, mean, scale) for detector_scores."""
    X = features(real + simulated)
    y = torch.tensor([1.0] * len(real) + [0.0] * len(simulated))
    mean, scale = X.mean(0), X.std(0) + 1e-3  # standardised: one L2 penalty means the same for every feature
    Z = (X - mean) / scale
    torch.manual_seed(seed)
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            opt.step()
    return w.detach(), b.detach(), mean, scale


def detector_scores(detector, texts) -> np.ndarray:
    w, b, mean, scale = detector
    return (((features(texts) - mean) / scale) @ w + b).numpy()


def pick_the_real(real_scores, simulated_scores, n_boot=2000, seed=0) -> dict:
    """real_scores (P,), simulated_scores (P, k): how often the real reply scores highest of its k + 1
    (ties broken at random), and the AUC of real against simulated, with bootstrap intervals over prompts."""
    rng = np.random.default_rng(seed)
    P, k = simulated_scores.shape
    jitter = rng.random((P, k + 1)) * 1e-9  # breaks exact ties (e.g. identical texts) at random
    table = np.concatenate([real_scores[:, None], simulated_scores], 1) + jitter
    caught = (table.argmax(1) == 0).astype(float)  # (P,)
    above = (real_scores[:, None, None] > simulated_scores[None]) + 0.5 * (real_scores[:, None, None] == simulated_scores[None])
    wins = above.mean(axis=(1, 2))  # (P,): each real reply's share of simulated replies it outscores

    interval = lambda values: mean_interval(values, n_boot, rng)
    return {"prompts": P, "candidates": k + 1, "pick_real": float(caught.mean()), "pick_real_interval": interval(caught),
            "auc": float(wins.mean()), "auc_interval": interval(wins)}


def mean_interval(values, n_boot: int, rng: np.random.Generator) -> list[float]:
    """A 95% percentile bootstrap interval of the mean of values (n,): n_boot resamples of them."""
    values = np.asarray(values, dtype=float)
    draws = rng.integers(0, len(values), (n_boot, len(values)))
    return [float(v) for v in np.percentile(values[draws].mean(1), [2.5, 97.5])]


def mean_with_interval(values, n_boot: int, seed: int) -> dict:
    """{"mean", "interval"} of values (n,): the mean and its seeded 95% bootstrap interval."""
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "interval": mean_interval(values, n_boot, np.random.default_rng(seed))}


# ---------------------------------------------------------------------------------------------------
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
        for key, prompt in cli.progress(to_send.items(), desc=f"asking {model_name}", unit="request"):
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


# ---------------------------------------------------------------------------------------------------
# (g): a big model in context, through any OpenAI-compatible server. Its prompt is the plain chat
# history (as many of the latest lines as fit in --big-context characters) and the message's line; the
# server echoes the prompt's log-probs (vLLM's and OpenAI's completions endpoint with echo and
# logprobs), and the tokens from the space after the tag to the end of the line are the message's. Its
# tokenizer is not ours, so it is compared in bits per character. A server that gives no prompt
# log-probs is said so once, and only its samples are used.

def history(stream, upto: int, tags, budget: int) -> str:
    """The chat lines of stream[:upto], the latest that fit in budget characters, as text."""
    lines, used = [], 0
    for m in reversed(stream[:upto]):
        line = f"{tags[m.speaker]} {one_line(m.text)}\n"
        if used + len(line) > budget:
            break
        lines.append(line)
        used += len(line)
    return "".join(reversed(lines))


def echo_logprobs(model_name):
    """request() for ask_api: the prompt's tokens, their log-probs and character offsets, or None if
    the server gives none."""
    def request(client, prompt):
        reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, temperature=0.0,
                                          echo=True, logprobs=1)
        lp = reply.choices[0].logprobs
        if lp is None or not lp.token_logprobs or not lp.text_offset:
            return None
        return {"logprobs": list(lp.token_logprobs), "offsets": list(lp.text_offset)}

    return request


def sampled_texts(model_name, n: int, opts: sample.Options):
    """request() for ask_api: n replies, each ending where its line ends, with sample.py's settings."""
    def request(client, prompt):
        reply = client.completions.create(model=model_name, prompt=prompt, n=n, max_tokens=opts.max_new_tokens,
                                          temperature=opts.temperature, top_p=opts.top_p, stop=["\n"])
        return [one_line(c.text) for c in sorted(reply.choices, key=lambda c: c.index)]

    return request


def big_model(opts: Options, stream, keys_at: dict, held_out, tags, speaker_tag, prompts, cache) -> tuple:
    """(Scores of the big model on the scored messages, or None without prompt log-probs; its
    per-prompt samples for prompts [(stream index, prompt key)]). keys_at: {key (s, i): stream index}."""
    ask = lambda prompts_by_key, request, what: ask_api(prompts_by_key, request, opts.big_model, opts.big_base_url,
                                                        opts.big_key_env, cache, what)
    texts, cuts = {}, {}
    for key, g in keys_at.items():
        before = history(stream, g, tags, opts.big_context)
        m = stream[g]
        texts[key] = before + f"{tags[m.speaker]} {one_line(m.text)}\n"
        cuts[key] = len(before) + len(tags[m.speaker])  # the message's characters start here: " text\n"
    hashed = lambda text: hashlib.sha256(json.dumps([opts.big_model, opts.big_base_url, "echo", text]).encode()).hexdigest()
    answers = ask({hashed(t): t for t in texts.values()}, echo_logprobs(opts.big_model), "scored messages")
    scores = Scores()
    for key, text in texts.items():
        answer = answers[hashed(text)]
        if answer is None:
            print(f"note: {opts.big_base_url} ({opts.big_model}) gives no prompt log-probs; (g) is left out and "
                  "only its samples are used", file=sys.stderr)
            scores = None
            break
        picked = [(lp, o) for lp, o in zip(answer["logprobs"], answer["offsets"]) if o >= cuts[key] and lp is not None]
        if picked:
            scores.nll[key] = (-sum(lp for lp, _ in picked), len(picked))
            scores.chars[key] = len(text) - picked[0][1]  # the characters its tokens spell
    n = opts.turing_samples
    request = sampled_texts(opts.big_model, n, sample.Options())
    by_prompt = {}
    for g, key in prompts:
        m = stream[g]
        by_prompt[key] = history(stream, g, tags, opts.big_context) + tags[m.speaker]
    hashed_s = lambda text: hashlib.sha256(json.dumps([opts.big_model, opts.big_base_url, "sample", n, text]).encode()).hexdigest()
    samples = ask({hashed_s(t): t for t in by_prompt.values()}, request, "prompts to reply to")
    return scores, [samples[hashed_s(by_prompt[key])] for _, key in prompts]


# ---------------------------------------------------------------------------------------------------
# The AI judge, on the same 5-way test: which of these replies did the person really write?

JUDGE_PROMPT = """Below are the latest messages of a text chat between two people, then {n} candidates for the next \\
message, written by {speaker}. Exactly one is what {speaker} really wrote; the others were written by a \\
language model imitating them. Which one is real? Think if you like, then end with a line of its own that is \\
exactly "Answer: X", X the candidate's letter.

Chat:
{context}

{candidates}"""


ANSWER_LINE = re.compile(r"answer:\s*\(?([A-Z])\)?\.?", re.IGNORECASE)


def picked(answer: str, letters="AB") -> str | None:
    """The letter the judge's answer ends on ("Answer: A" as its last line), or None when it doesn't
    end that way or names no candidate. Read strictly: "Reply A reads like a model; the real one is
    B" is unclear, not A."""
    lines = [line.strip().strip("*").strip() for line in answer.strip().splitlines() if line.strip()]
    match = ANSWER_LINE.fullmatch(lines[-1]) if lines else None
    letter = match.group(1).upper() if match else None
    return letter if letter and letter in letters else None


def judge(items, speaker_tag, model_name, base_url, key_env, cache_path, seed) -> dict:
    """items: [(context lines, real reply, [simulated replies])], replies of speaker_tag. Each goes to
    the judge with the candidates in a seeded random order; answers are cached (ask_api). Returns how
    often it picked the real one (chance: 1 / candidates)."""
    rng = random.Random(seed)
    prompts, real = {}, {}  # cache key -> prompt, and the letter of the real reply
    for context, real_reply, simulated in items:
        candidates = [real_reply] + list(simulated)
        order = list(range(len(candidates)))
        rng.shuffle(order)
        letters = "ABCDEFGHIJ"[: len(candidates)]
        listing = "\n".join(f"Reply {letters[j]}: {candidates[c]}" for j, c in enumerate(order))
        prompt = JUDGE_PROMPT.format(n=len(candidates), speaker=speaker_tag, candidates=listing,
                                     context="\n".join(context) or "(the chat begins here)")
        key = hashlib.sha256(json.dumps([model_name, base_url, prompt]).encode()).hexdigest()
        prompts[key], real[key] = prompt, (letters[order.index(0)], letters)
    answers = ask_api(prompts, chat_answer(model_name), model_name, base_url, key_env, cache_path)
    picks = {key: picked(answer, real[key][1]) if isinstance(answer, str) else None for key, answer in answers.items()}
    judged = [pick == real[key][0] for key, pick in picks.items() if pick]
    return {"model": model_name, "base_url": base_url, "judgements": len(judged), "unclear": len(prompts) - len(judged),
            "candidates": len(items[0][2]) + 1 if items else 0,
            "pick_real": float(np.mean(judged)) if judged else None}


# ---------------------------------------------------------------------------------------------------
# Self-play: the fine-tuned model plays both people from a held-out session's opening message, and
# its conversations are measured beside the real held-out sessions: do they stay inside the human
# envelope, or drift into repetition as they go on (the last 10 messages against the whole)?

def conversation_stats(lines: list[list[str]], training_texts: set, last=None) -> dict:
    """Conversations (each a list of lines "[TAG] text") -> the statistics of their messages (with last,
    of each one's last `last` messages, the earlier ones counting as history): distinct-1/2, the share of a
    message's 4-grams already said earlier in its conversation, verbatim repeats of an earlier
    message, mean words, mean run (messages in a row by one person), and training copies."""
    out = {"messages": 0, "grams": 0, "repeated_grams": 0, "verbatim": 0, "copies": 0, "words": [], "runs": []}
    texts_all = []
    for conversation in lines:
        speakers = [line.split("] ", 1)[0] + "]" for line in conversation]
        texts = [line.split("] ", 1)[-1] if "] " in line else "" for line in conversation]
        seen_grams, seen_texts = set(), set()
        run, first = 0, 0 if last is None else max(0, len(conversation) - last)
        for j, (who, text) in enumerate(zip(speakers, texts)):
            w = text.lower().split()
            grams = {tuple(w[k : k + 4]) for k in range(len(w) - 3)}
            if j >= first:
                out["messages"] += 1
                out["grams"] += len(grams)
                out["repeated_grams"] += len(grams & seen_grams)
                out["verbatim"] += text.lower() in seen_texts
                out["copies"] += one_line(text).lower() in training_texts
                out["words"].append(len(w))
                texts_all.append(text)
            seen_grams |= grams
            seen_texts.add(text.lower())
            run = run + 1 if j and who == speakers[j - 1] else 1
            if j >= first and (j + 1 == len(speakers) or speakers[j + 1] != who):
                out["runs"].append(run)
    n = max(1, out["messages"])
    return {"messages": out["messages"], "distinct_1": distinct(texts_all, 1), "distinct_2": distinct(texts_all, 2),
            "repeated_4grams": out["repeated_grams"] / max(1, out["grams"]), "verbatim_repeats": out["verbatim"] / n,
            "words_mean": float(np.mean(out["words"])) if out["words"] else 0.0,
            "run_mean": float(np.mean(out["runs"])) if out["runs"] else 0.0, "training_copies": out["copies"] / n}


def self_play(model, tok, held_out, tags, fit, n: int, length: int, seed: int) -> list[list[str]]:
    """n simulated conversations of `length` messages, each from the opening line of a held-out
    session (in turn), with sample.py's --loop."""
    openers = [session[0] for session in held_out]
    people = sorted(set(tags.values()))
    conversations = []
    for j in cli.progress(range(n), desc="self-play", unit="conversation", leave=False):
        m = openers[j % len(openers)]
        lines = [f"{tags[m.speaker]} {one_line(m.text)}"]
        sample.loop(model, tok, lines, sample.Options(loop=length - 1, seed=seed + 1000 * j), people, fit=fit,
                    say=lambda line: None)
        conversations.append(lines)
    return conversations


# ---------------------------------------------------------------------------------------------------
# The whole evaluation.

def evaluate(opts: Options) -> dict:
    t0 = time.time()
    tuned = sft.load_tuned(opts.adapter, opts.model, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    data = sft.data_settings(tuned.training, opts)
    cache = Path(opts.api_cache or Path(tuned.adapter) / "api_cache.jsonl")
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
    n_scored = sum(tags[m.speaker] == speaker_tag for s, session in enumerate(held_out)
                   for i, m in enumerate(session) if (s, i) >= start)
    budget = opts.long_context or model.cfg.max_seq_len
    ways = f"{4 + 2 * bool(opts.retrieval_tokens) + bool(opts.memory_tokens)} ways (short and long context" + \
        (", retrieval" if opts.retrieval_tokens else "") + (", memory" if opts.memory_tokens else "") + ";"
    print(f"eval: {len(held_out)} held-out sessions of {data.data}; scoring {n_scored} of their {n_targets} "
          f"{speaker_tag} messages, each {ways} base and fine-tuned)"
          f"{', and (g) ' + opts.big_model if opts.big_model else ''}; sampling {opts.samples} x "
          f"{opts.turing_samples} held-out and {opts.turing_train} training replies per model", file=sys.stderr)
    if n_scored < 100:
        print(f"warning: only {n_scored} held-out {speaker_tag} messages: the intervals will be wide; a larger "
              "--val-frac (at training time) holds out more", file=sys.stderr)
    seconds = {}

    def timed(name, fn):
        t = time.time()
        result = fn()
        seconds[name] = round(time.time() - t, 1)
        print(f"{name}: {seconds[name]:.0f} s", file=sys.stderr)
        return result

    stream = [m for session in train_sessions + held_out for m in session]
    first_held = len(stream) - sum(map(len, held_out))
    at = {}  # held-out key -> index in stream
    for s, session in enumerate(held_out):
        for i in range(len(session)):
            at[(s, i)] = len(at) + first_held
    training_texts = {one_line(m.text).lower() for s in train_sessions for m in s}
    result = {"samples": None, "turing": None, "judge": None, "big_model": None}

    # Samples, the big model and the judge first: a server's failure (exit 2) then costs no scoring time.
    replies, detector_train = {}, {}
    if opts.samples:
        items = sample_prompts(tok, held_out, tags, speaker_tag, data.context_messages, data.max_len, opts.samples, start)
        k = opts.turing_samples
        replies["real"] = [[real] for *_, real in items]
        with lora.disabled(model):
            replies["base"] = timed("sample base", lambda: simulate(model, tok, [p for _, _, p, _ in items], opts.seed,
                                                                    opts.batch_size, k, "sampling (base)"))
        replies["fine-tuned"] = timed("sample fine-tuned", lambda: simulate(
            model, tok, [p for _, _, p, _ in items], opts.seed, opts.batch_size, k, "sampling (fine-tuned)"))
        train_items = sample_prompts(tok, train_sessions, tags, speaker_tag, data.context_messages, data.max_len,
                                     opts.turing_train)
        if opts.turing_train:
            detector_train["real"] = [real for *_, real in train_items]
            with lora.disabled(model):
                detector_train["base"] = timed("sample base (training prompts)", lambda: [r[0] for r in simulate(
                    model, tok, [p for _, _, p, _ in train_items], opts.seed + 1, opts.batch_size, 1, "sampling (base, train)")])
            detector_train["fine-tuned"] = timed("sample fine-tuned (training prompts)", lambda: [r[0] for r in simulate(
                model, tok, [p for _, _, p, _ in train_items], opts.seed + 1, opts.batch_size, 1, "sampling (fine-tuned, train)")])
    elif opts.judge_model or opts.turing_train:
        print("note: --samples 0: no sampled replies, so no Turing test and no judge", file=sys.stderr)

    big = None
    if opts.big_model:
        train_at = {}  # training-prompt key -> stream index (the training sessions come first in stream)
        offset = np.cumsum([0] + [len(x) for x in train_sessions])
        keys_at = {key: at[key] for key in sorted(at) if key >= start
                   and tags[held_out[key[0]][key[1]].speaker] == speaker_tag}
        prompts = [(at[key], key) for key, *_ in items] if opts.samples else []
        if opts.samples and opts.turing_train:
            train_at = {("train",) + key: int(offset[key[0]]) + key[1] for key, *_ in train_items}
            prompts += [(g, key) for key, g in train_at.items()]
        big, big_samples = timed("(g) big model", lambda: big_model(opts, stream, keys_at, held_out, tags, speaker_tag,
                                                                    prompts, cache))
        if opts.samples:
            replies["big model"] = big_samples[: len(items)]
            if opts.turing_train:
                detector_train["big model"] = [r[0] if r else "" for r in big_samples[len(items) :]]

    if replies:
        result["samples"] = {name: reply_stats([r for rs in texts for r in rs], training_texts)
                             for name, texts in replies.items()}
        out_json = Path(opts.out or Path(tuned.adapter) / "eval.json")
        plot_lengths({name: [r for rs in texts for r in rs] for name, texts in replies.items()},
                     out_json.with_name(out_json.stem + "_lengths.png"))
    if replies and opts.turing_train:
        result["turing"] = {}
        for name in [n for n in replies if n != "real"]:
            detector = train_detector(detector_train["real"], detector_train[name], seed=opts.seed)
            real_scores = detector_scores(detector, [r[0] for r in replies["real"]])
            simulated = np.array([detector_scores(detector, rs) for rs in replies[name]])  # (P, k)
            result["turing"][name] = pick_the_real(real_scores, simulated, opts.bootstrap, opts.seed)
    if opts.judge_model and replies:
        judged = [(context, real, replies["fine-tuned"][j]) for j, (_, context, _, real) in enumerate(items)]
        result["judge"] = timed("judge", lambda: judge(judged, speaker_tag, opts.judge_model, opts.judge_base_url,
                                                       opts.judge_key_env, cache, opts.seed))

    # Likelihood of what was really written, seven ways.
    retrieve = retriever(tok, train_sessions, held_out, tags, opts.retrieval_tokens)
    short = lambda desc, extra=0, **kw: short_context(model, tok, held_out, tags, speaker_tag, data.context_messages,
                                                      data.max_len + extra, opts.batch_size, start, desc, **kw)
    long = lambda desc: long_context(model, tok, train_sessions + held_out, len(held_out), tags, speaker_tag,
                                     budget, start, desc)
    said = lambda desc: who_said(model, tok, held_out, tags, data.context_messages, data.max_len, opts.batch_size,
                                 opts.who_said, start, desc)
    with lora.disabled(model):  # the base model: the same weights with the adapter switched off
        a = timed("(a)", lambda: short("(a) base, short context"))
        b = timed("(b)", lambda: long("(b) base, long context"))
        e = timed("(e)", lambda: short("(e) base, retrieval", opts.retrieval_tokens, retrieve=retrieve)) \
            if opts.retrieval_tokens else None
        said_base = timed("who said (base)", lambda: said("who said this (base)")) if opts.who_said else None
    c = timed("(c)", lambda: short("(c) fine-tuned, short context"))
    d = timed("(d)", lambda: long("(d) fine-tuned, long context"))
    f = timed("(f)", lambda: short("(f) fine-tuned, retrieval", opts.retrieval_tokens, retrieve=retrieve)) \
        if opts.retrieval_tokens else None
    # (h): memory.py's memory of the training sessions only (never a held-out message), recalled per context.
    entries = mem.build(messages, data.session_gap_hours, data.val_frac) if opts.memory_tokens else []
    recall_for = memory_retriever(entries, tok, opts.memory_tokens)
    h = i = None
    if entries and opts.memory_contrast:  # (h) from (i)'s forwards with the memory: the same rows, scored once
        forms = memory_retriever(entries, tok, opts.memory_tokens, form=True)
        keys = [(s, j) for s, session in enumerate(held_out) for j, m in enumerate(session)
                if (s, j) >= start and tags[m.speaker] == speaker_tag]
        h, i = timed("(h), (i)", lambda: contrasted(model, tok, held_out, tags, keys, recall_for, forms,
                                                    data.context_messages, data.max_len + opts.memory_tokens,
                                                    opts.memory_contrast))
    elif entries:
        h = timed("(h)", lambda: short("(h) fine-tuned, memory", opts.memory_tokens, retrieve=recall_for))
    said_tuned = timed("who said (fine-tuned)", lambda: said("who said this (fine-tuned)")) if opts.who_said else None

    runs = [("a", "base", "short", a), ("b", "base", "long", b), ("c", "fine-tuned", "short", c),
            ("d", "fine-tuned", "long", d), ("e", "base", "retrieval", e), ("f", "fine-tuned", "retrieval", f),
            ("h", "fine-tuned", "memory", h), ("i", "fine-tuned", "contrast", i)]
    runs = [run for run in runs if run[3] is not None]  # --retrieval-tokens 0: no (e), (f); --memory-tokens 0: no (h), (i)
    if big is not None:
        runs.append(("g", opts.big_model, "big", big))
    nll = {}
    for key, model_name, context, scores in runs:
        x = nats_per_token(scores)
        nll[key] = {"model": model_name, "context": context, "messages": len(scores.nll),
                    "tokens": sum(t for _, t in scores.nll.values()), "nll": x, "perplexity": float(np.exp(x)),
                    "bits_per_char": bits_per_char(scores)}
    named = dict((key, scores) for key, _, _, scores in runs)
    contrasts = {}
    memory = None
    if h is not None:
        # Where a memory should matter: messages reusing a rare word the same person used before.
        rare = rare_reuse(train_sessions, held_out, tags, speaker_tag)
        named |= {"h_rare": restricted(h, rare), "c_rare": restricted(c, rare),
                  "h_rest": restricted(h, h.nll.keys() - rare), "c_rest": restricted(c, c.nll.keys() - rare)}
        if i is not None:
            named |= {"i_rare": restricted(i, rare), "i_rest": restricted(i, i.nll.keys() - rare)}
        # How much room there is: the share of (c)'s NLL on those messages that their rare words carry, and
        # how many of them find their rare word in the memory recalled for their context at all.
        rare_set, rare_keys = rare_words(train_sessions, tags, speaker_tag), sorted(named["c_rare"].nll)
        holds = sum(bool(rare_set & set(words(one_line(held_out[s][i].text))) & {
            w for x in recall_for(s, before(held_out[s], i, data.context_messages)) for w in words(x.text)})
            for s, i in rare_keys)
        share = timed("rare-word share", lambda: word_share(model, tok, held_out, tags, rare_keys, rare_set,
                                                            data.context_messages, data.max_len))
        oracle = timed("oracle", lambda: short("oracle lines", opts.memory_tokens, retrieve=oracle_retriever(
            tok, train_sessions, held_out, tags, rare_set, opts.memory_tokens))) if rare_keys else None
        memory = {"entries": len(entries), "rare_word_messages": len(named["h_rare"].nll),
                  "rare_word_nll_share": share, "rare_word_in_recalled_memory": holds,
                  "c_rare_nll": nats_per_token(named["c_rare"]) if rare_keys else None,
                  "oracle_rare": None if oracle is None else contrast(restricted(oracle, rare_keys), named["c_rare"],
                                                                      "token", opts.bootstrap, opts.seed),
                  "consistency": timed("consistency", lambda: consistency(model, tok, entries, tags,
                                                                          opts.consistency_seeds, opts.seed,
                                                                          opts.memory_contrast))}
    for x, y in [("c", "b"), ("c", "e"), ("f", "c"), ("d", "b"), ("e", "a"), ("c", "g"), ("h", "c"), ("h", "f"),
                 ("h_rare", "c_rare"), ("h_rest", "c_rest"), ("i", "c"), ("i", "h"), ("i_rare", "c_rare"),
                 ("i_rest", "c_rest")]:
        if x not in named or y not in named or not named[x].nll:
            continue
        contrasts[f"{x} vs {y}"] = {
            "nats_per_token": None if "g" in (x, y) else contrast(named[x], named[y], "token", opts.bootstrap, opts.seed),
            "bits_per_char": contrast(named[x], named[y], "char", opts.bootstrap, opts.seed)}

    loops = None
    if opts.loops:
        window = min(data.max_len, model.cfg.max_seq_len) - sample.Options().max_new_tokens
        fit = lambda lines: ([], sample.trim(lines, tok, window, data.context_messages))  # no memory lines
        simulated = timed("self-play", lambda: self_play(model, tok, held_out, tags, fit, opts.loops, opts.loop_length,
                                                         opts.seed))
        real = [[f"{tags[m.speaker]} {one_line(m.text)}" for m in s[: opts.loop_length]] for s in held_out if len(s) >= 10]
        loops = {name: {"whole": conversation_stats(convs, training_texts),
                        "last 10": conversation_stats(convs, training_texts, last=10)}
                 for name, convs in (("real", real), ("fine-tuned", simulated))}
        loops["conversations"] = {"real": len(real), "fine-tuned": len(simulated), "length": opts.loop_length,
                                  "example": simulated[0][:12]}

    return {
        "settings": {**asdict(opts), **asdict(data), "model": tuned.base_model, "adapter": tuned.adapter,
                     "speaker": speaker_tag, "long_context": budget, "held_out_sessions": len(held_out),
                     "held_out_messages": n_targets, "messages": len(a.nll), "first_scored": list(start),
                     "sampling": sample.sampling_settings(sample.Options()),
                     "out": str(opts.out or Path(tuned.adapter) / "eval.json"), "api_cache": str(cache)},
        "nll": nll,
        "contrasts": contrasts,
        "who_said": {"base": said_base, "fine-tuned": said_tuned} if opts.who_said else None,
        "memory": memory,
        "next_speaker": {"base": next_speaker_accuracy(a, held_out, tags),
                         "fine-tuned": next_speaker_accuracy(c, held_out, tags)},
        **result,
        "loops": loops,
        "seconds": {**seconds, "total": round(time.time() - t0, 1)},
    }


CONTEXTS = {"short": "{n} messages of its session", "long": "{budget} tokens of history",
            "retrieval": "{n} messages + {r} retrieved tokens", "big": "{chars} characters of history",
            "memory": "{n} messages + {m} memory tokens",
            "contrast": "{n} messages + {m} memory tokens, read by contrast {a:g}"}


def markdown(r: dict) -> str:
    s = r["settings"]
    which = ("all" if s["messages"] == s["held_out_messages"]
             else f"the latest {s['messages']} of the {s['held_out_messages']}")
    out = [f"Held out: the latest {s['held_out_sessions']} sessions of {s['data']}; scoring {which} "
           f"{s['speaker']} messages in them. Model {s['model']}, adapter {s['adapter']}.", "",
           "| model | context | messages | tokens | NLL (nats/token) | bits/char | perplexity |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, row in r["nll"].items():
        context = CONTEXTS[row["context"]].format(n=s["context_messages"], budget=s["long_context"],
                                                  r=s["retrieval_tokens"], chars=s["big_context"], m=s["memory_tokens"],
                                                  a=s.get("memory_contrast", 0))
        tokens = "-" if key == "g" else row["tokens"]
        nats = "-" if key == "g" else f"{row['nll']:.4f}"
        ppl = "-" if key == "g" else f"{row['perplexity']:.2f}"
        out.append(f"| ({key}) {row['model']} | {context} | {row['messages']} | {tokens} | {nats} | "
                   f"{row['bits_per_char']:.4f} | {ppl} |")
    out += ["", "| contrast (negative: the first is better) | nats/token [95% interval] | bits/char [95% interval] |",
            "| --- | ---: | ---: |"]
    cell = lambda c: "-" if c is None else f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
    subsets = {"_rare": f" on the {r['memory']['rare_word_messages'] if r.get('memory') else 0} messages reusing a rare word",
               "_rest": " on the other messages"}
    for name, c in r["contrasts"].items():
        x, y = name.split(" vs ")
        where = next((label for suffix, label in subsets.items() if x.endswith(suffix)), "")
        x, y = x.split("_")[0], y.split("_")[0]
        out.append(f"| ({x}) vs ({y}){where} | {cell(c['nats_per_token'])} | {cell(c['bits_per_char'])} |")
    if r.get("memory") and r["memory"]["rare_word_messages"]:
        k = r["memory"]
        out += ["", f"Room on the {k['rare_word_messages']} rare-word messages: their rare words' tokens carry "
                    f"{k['rare_word_nll_share']:.1%} of (c)'s NLL on them (what making those tokens certain would save), "
                    f"and the memory recalled for their context holds the rare word for {k['rare_word_in_recalled_memory']} "
                    "of them. A reference that reads each message and puts the training messages holding its rare word "
                    f"({s['memory_tokens']} tokens) before its context changes (c)'s NLL there by {cell(k['oracle_rare'])} "
                    f"nats/token ({k['oracle_rare']['difference'] / k['c_rare_nll']:+.1%} of (c)'s {k['c_rare_nll']:.4f} there): "
                    "the reference for what the training sessions can supply."]
    if r.get("memory") and r["memory"]["consistency"].get("facts"):
        k = r["memory"]["consistency"]
        out += ["", f"| consistency: {k['facts']} remembered facts asked in {k['seeds']} fresh sessions each | agrees "
                    "with the memory [95%, over facts] | answers agree with each other | empty replies |", "| --- | ---: | ---: | ---: |"]
        for label in [x for x in k if x.startswith("with")]:
            low, high = k[label]["interval"]
            out.append(f"| {label} | {k[label]['agrees_with_memory']:.3f} [{low:.2f}, {high:.2f}] | {k[label]['agree_with_each_other']:.3f} | "
                       f"{k[label]['empty']:.3f} |")
    if r["who_said"]:
        w = r["who_said"]
        people = [k for k in w["base"] if k.startswith("[")]
        out += ["", f"| who said this ({w['base']['messages']} messages) | accuracy | " +
                " | ".join(f"{p} ({w['base'][p]['messages']})" for p in people) + " |",
                "| --- | ---: | " + " | ".join("---:" for _ in people) + " |"]
        for name in ("base", "fine-tuned"):
            out.append(f"| {name} | {w[name]['accuracy']:.3f} | " +
                       " | ".join(f"{w[name][p]['accuracy']:.3f}" for p in people) + " |")
    ns = r["next_speaker"]
    out += ["", f"| who talks next ({ns['base']['positions']} positions, short context) | accuracy |",
            "| --- | ---: |",
            f"| base | {ns['base']['accuracy']:.3f} |", f"| fine-tuned | {ns['fine-tuned']['accuracy']:.3f} |",
            f"| always the same person again | {ns['base']['same_person_again']:.3f} |",
            f"| always the other person | {ns['base']['other_person']:.3f} |"]
    if r["samples"]:
        out += ["", f"| replies ({s['samples']} prompts) | n | words: mean | median | 90th pct | distinct-1 | "
                    "distinct-2 | copies of a training message |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, x in r["samples"].items():
            out.append(f"| {name} | {x['n']} | {x['words_mean']:.1f} | {x['words_median']:.0f} | {x['words_p90']:.0f} | "
                       f"{x['distinct_1']:.3f} | {x['distinct_2']:.3f} | {x['training_copies']:.1%} |")
    if r["turing"]:
        first = next(iter(r["turing"].values()))
        out += ["", f"| Turing test: a classifier trained on {s['turing_train']} training prompts picks the real reply "
                    f"among {first['candidates']} on {first['prompts']} held-out prompts | pick the real (chance "
                    f"{1 / first['candidates']:.0%}; lower = passes better) [95%] | AUC real vs simulated [95%] |",
                "| --- | ---: | ---: |"]
        for name, t in r["turing"].items():
            lo, hi = t["pick_real_interval"]
            alo, ahi = t["auc_interval"]
            out.append(f"| {name} | {t['pick_real']:.3f} [{lo:.3f}, {hi:.3f}] | {t['auc']:.3f} [{alo:.3f}, {ahi:.3f}] |")
    if r["judge"]:
        j = r["judge"]
        rate = "n/a" if j["pick_real"] is None else f"{j['pick_real']:.1%}"
        out += ["", f"| AI judge: which of {j['candidates']} is real? (fine-tuned's replies) | judgements | unclear | "
                    f"picked the real one (chance {1 / j['candidates']:.0%}) |",
                "| --- | ---: | ---: | ---: |", f"| {j['model']} | {j['judgements']} | {j['unclear']} | {rate} |"]
    if r["loops"]:
        L = r["loops"]
        out += ["", f"| self-play ({L['conversations']['fine-tuned']} simulated conversations of {L['conversations']['length']} "
                    f"messages; real: {L['conversations']['real']} held-out sessions) | messages | distinct-1 | distinct-2 | "
                    "repeated 4-grams | verbatim repeats | words | run | training copies |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in ("real", "fine-tuned"):
            for part in ("whole", "last 10"):
                x = L[name][part]
                out.append(f"| {name}, {part} | {x['messages']} | {x['distinct_1']:.3f} | {x['distinct_2']:.3f} | "
                           f"{x['repeated_4grams']:.3f} | {x['verbatim_repeats']:.3f} | {x['words_mean']:.1f} | "
                           f"{x['run_mean']:.2f} | {x['training_copies']:.1%} |")
    out += ["", "Time per part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items())]
    return "\n".join(out)


def main():
    opts = parse_options(Options, GPU_DEFAULTS)
    result = evaluate(opts)
    out = Path(result["settings"]["out"])
    cli.write_atomically(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    print(markdown(result))
    print(f"\nwrote {out}; wall time {result['seconds']['total'] / 60:.1f} min")


if __name__ == "__main__":
    exit_on_bad_input(main)
