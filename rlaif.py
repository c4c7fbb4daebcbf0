"""RL from AI feedback, stages 1 and 2: a constitution for each person, critique-and-revise, preference
labels from an AI judge or from the chat log itself, and a reward model trained on them.

    python rlaif.py revise --prompts 8          # critique and revise sampled replies -> out/rlaif/revisions.jsonl
    python sft.py --examples out/rlaif/revisions.jsonl --init-adapter out/adapter --out out/sft_revised
    python rlaif.py label                       # preference pairs -> out/rlaif/pairs.jsonl (+ judge report)
    python rlaif.py train-rm                    # reward model -> out/rlaif/rm/ (then eval-rm on held-out pairs)
    python rlaif.py eval-rm                     # accuracy, calibration, length baselines -> out/rlaif/rm_eval.json
    python rlaif.py label --pairs sampled --judge-model gpt-4o-mini   # an API judge (sends chats: says where)

Constitutional AI (Bai et al. 2022, https://arxiv.org/abs/2212.08073), for simulating two people rather
than for harmlessness. The constitution (data/rlaif/constitution.json) gives each speaker tag a persona
and principles, plus shared ones; a principle has a critique request, a revision request and a
comparison question.

revise   samples the fine-tuned model's reply to prompts from the training sessions, then R times asks a
         judge for a critique and a revision under a freshly drawn principle, in the paper's
         CritiqueRequest / Critique / RevisionRequest / Revision form after the file's few-shot examples.
         A revision that is empty, spans lines or carries a speaker tag is rejected and counted.
label    makes preference pairs on training-session prompts, with token ids kept as sampled (never
         re-tokenised), from the sampler PPO uses (plain temperature). --pairs real-vs-sample (the
         default with no judge configured): the person's real message against a sample, label 1: free,
         and correct by construction. --pairs sampled: two samples, labelled by a judge asked the
         multiple-choice question "(A) or (B)?" in both orders (position bias in small judges is
         large); the local judge's soft label is P(A) / (P(A) + P(B)) from its next-token log-probs,
         clamped to [0.4, 0.6] after a chain of thought (--cot), as in the paper. Writes a judge report:
         position bias, order agreement, and the judge's accuracy at picking a real next message over
         one of the same person's from another session (100 held-out pairs, a 95% interval).
train-rm the reward model: the fine-tuned model folded into its weights, a LoRA of its own and a scalar
         head on the final normed stream at each reply's last real token (the newline that ends its
         turn), trained with the Bradley-Terry loss on soft labels, in a plain loop like sft.py's.
         Scores are then normalised so the fine-tuned model's own replies have mean 0 and std 1.
eval-rm  on held-out real-vs-sample pairs: accuracy, log loss and Brier against a constant 0.5, beside
         the "shorter wins" baseline and on length-matched pairs; score-length correlation; a
         calibration plot; and a check that padding changes no score.

On a CPU that does bf16 in hardware (AVX-512 BF16, AMX) the samples' prompts and the reward model's
forwards and backwards multiply in bf16 (model.cpu_bf16; ~1.8x faster there, rounding only; rm.json
records it and ppo.py scores the same way); --fp32 keeps everything in fp32.

Shapes: B batch, T time, D model dim, P pairs.
"""
import contextlib
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import cli
import eval as ev
import lora
import sample
import sft
from cli import FRACTION, POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import cpu_bf16, pad
from prep import TAG_LINE, encode_example, load_pair, one_line, split_sessions, tag

COMMANDS = ("revise", "label", "train-rm", "eval-rm")
PAIRS = ("real-vs-sample", "sampled")


@dataclass
class Options:
    adapter: Annotated[str, "the fine-tuned (stage-1) adapter from sft.py"] = sft.ADAPTER
    model: Annotated[str, "base model (default: the one the adapter was trained on)"] = ""
    allow_other_base: Annotated[bool, "load the adapter even onto a base model other than the one it was "
                                      "trained on"] = False
    constitution: Annotated[str, "personas and principles (JSON)"] = "data/rlaif/constitution.json"
    speakers: Annotated[str, "whose replies: tags separated by commas (default: both people)"] = ""
    out: Annotated[str, "folder for revisions, pairs, the judge report and the reward model"] = "out/rlaif"
    seed: Annotated[int, "seed for samples, principles and the reward model; label: a seed other than 0 also "
                         "shifts the prompts to other messages (a second, independent reward model)"] = 0
    batch_size: Annotated[int, "sequences per forward and per sampling batch", Range(1)] = 16
    fp32: Annotated[bool, "compute in fp32 even on a CPU that does bf16 in hardware, where by default the "
                          "samples' prompts and the reward model's forwards and backwards run in bf16 (~1.8x "
                          "faster; decoding stays fp32; see model.cpu_bf16)"] = False
    # revise
    prompts: Annotated[int | None, "revise, label: training-session prompts, spread over the speakers "
                                   "(default: 8 for revise, 600 for label)", Range(1)] = None
    revisions: Annotated[int, "revise: critique-and-revise rounds per reply", Range(1)] = 2
    judge_path: Annotated[str, "revise, label: a local judge model (HF directory; default: the base model "
                               "itself, the adapter switched off)"] = ""
    # label
    pairs: Annotated[str, "label: real-vs-sample or sampled (default: sampled with a judge configured, "
                          "else real-vs-sample)"] = ""
    cot: Annotated[bool, "label: the local judge thinks step by step first; its probabilities are then "
                         "clamped to [0.4, 0.6]"] = False
    sanity_pairs: Annotated[int, "label: held-out real-vs-other-session pairs the judge is checked on", Range(0)] = 100
    judge_model: Annotated[str, "revise, label: a judge through an OpenAI-compatible API (default: none)"] = ""
    judge_base_url: Annotated[str, "the judge's API"] = "https://api.openai.com/v1"
    judge_key_env: Annotated[str, "environment variable that holds the judge's API key"] = "OPENAI_API_KEY"
    api_cache: Annotated[str, "the judge's answers, one JSON line each (default: api_cache.jsonl in --out)"] = ""
    # train-rm
    max_steps: Annotated[int, "train-rm: optimizer steps", Range(1)] = 100
    rm_batch: Annotated[int, "train-rm: pairs per step", Range(1)] = 8
    split_above: Annotated[int, "train-rm: run a step's pairs a few at a time, each piece at most this many "
                                "tokens (padded), with the same gradient (memory; sft.py's --split-above); "
                                "0 = all at once", Range(0)] = 512
    lr: Annotated[float, "train-rm: peak learning rate", POSITIVE] = 5e-4
    min_lr: Annotated[float, "train-rm: learning rate at the end of the cosine decay", Range(0)] = 5e-5
    warmup_steps: Annotated[int, "train-rm: linear warmup steps", Range(0)] = 10
    weight_decay: Annotated[float, "train-rm: AdamW weight decay", Range(0)] = 0.0
    grad_clip: Annotated[float, "train-rm: clip the gradient norm to this", POSITIVE] = 1.0
    lora_r: Annotated[int, "train-rm: the reward model's LoRA rank", Range(1)] = 16
    lora_alpha: Annotated[int, "train-rm: its LoRA alpha", POSITIVE] = 32
    val_pairs: Annotated[float, "train-rm: share of the pairs (by prompt) held out for its validation loss",
                         FRACTION] = 0.1
    eval_every: Annotated[int, "train-rm: steps between validation losses", Range(1)] = 25
    save_every: Annotated[int, "train-rm: steps between checkpoints", Range(1)] = 25
    resume: Annotated[bool, "train-rm: continue from the checkpoint in --out/rm"] = False
    # eval-rm
    heldout: Annotated[int, "eval-rm: held-out prompts, each a real-vs-sample pair", Range(1)] = 300
    rm: Annotated[str, "eval-rm: the reward model (default: rm in --out)"] = ""


# The sampler of the pairs, and of PPO's rollouts (ppo.py imports it): plain temperature sampling, no
# top-k, top-p, min-p or repetition penalty. Those cut or reshape the distribution, and PPO must score
# each reply under exactly the distribution it was drawn from, or its KL estimate is biased.
SAMPLING = sample.Options(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, max_new_tokens=48)


# ---------------------------------------------------------------------------------------------------
# The constitution.

PRINCIPLE_KEYS = ("name", "critique", "revision", "comparison")


def read_constitution(path) -> dict:
    """The constitution file (data/rlaif/constitution.json shows every part), checked: a missing or
    malformed part is one sentence naming the file and the key."""
    c = cli.read_json(path, "--constitution")
    where = lambda key: f"--constitution {path}: {key}"

    def text(value, key):
        if not isinstance(value, str) or not value.strip():
            raise BadInput(f"{where(key)} must be a non-empty text")
        return value

    def principles(value, key):
        if not isinstance(value, list):
            raise BadInput(f"{where(key)} must be a list of principles")
        for j, p in enumerate(value):
            if not isinstance(p, dict):
                raise BadInput(f"{where(f'{key}[{j}]')} must be an object with {', '.join(PRINCIPLE_KEYS)}")
            for k in PRINCIPLE_KEYS:
                text(p.get(k), f"{key}[{j}].{k}")
        return value

    if not isinstance(c, dict):
        raise BadInput(f"--constitution {path}: expected a JSON object with speakers, shared and few_shot")
    if not isinstance(c.get("speakers"), dict) or not c["speakers"]:
        raise BadInput(f"{where('speakers')} must be an object: speaker tag -> persona and principles")
    for t, person in c["speakers"].items():
        if not TAG_LINE.fullmatch(t):
            raise BadInput(f"{where(f'speakers.{t}')}: a speaker is named by its tag, e.g. [RIYA]")
        if not isinstance(person, dict):
            raise BadInput(f"{where(f'speakers.{t}')} must be an object with persona and principles")
        text(person.get("persona"), f"speakers.{t}.persona")
        principles(person.get("principles", []), f"speakers.{t}.principles")
    principles(c.get("shared", []), "shared")
    if not isinstance(c.get("few_shot", []), list):
        raise BadInput(f"{where('few_shot')} must be a list")
    for j, shot in enumerate(c.get("few_shot", [])):
        if not isinstance(shot, dict) or not isinstance(shot.get("chat"), list) or not shot["chat"] or \
                not all(isinstance(line, str) and TAG_LINE.match(line) for line in shot["chat"]):
            raise BadInput(f"{where(f'few_shot[{j}].chat')} must be a list of chat lines like \"[RIYA] hi\"")
        text(shot.get("critique"), f"few_shot[{j}].critique")
        text(shot.get("revision"), f"few_shot[{j}].revision")
    return c


def principles_for(constitution: dict, speaker_tag: str) -> list[dict]:
    return constitution["speakers"].get(speaker_tag, {}).get("principles", []) + constitution.get("shared", [])


def persona(constitution: dict, speaker_tag: str) -> str:
    return constitution["speakers"].get(speaker_tag, {}).get("persona", "")


# ---------------------------------------------------------------------------------------------------
# Prompts: short contexts from the training sessions (the split sft.py trained on), as training
# examples are built, for each speaker in turn.

def setup(opts: Options):
    """(the stage-1 model, its data settings, messages' tags, training and held-out sessions, speakers)."""
    tuned = sft.load_tuned(opts.adapter, opts.model, allow_other_base=opts.allow_other_base)
    data = sft.data_settings(tuned.training, opts)
    messages, _ = load_pair(data.data)
    tags = {s: tag(s) for s in dict.fromkeys(m.speaker for m in messages)}
    train_sessions, held_out = split_sessions(messages, data.session_gap_hours, data.val_frac)
    speakers = [tag(x) for x in opts.speakers.split(",")] if opts.speakers else sorted(set(tags.values()))
    unknown = [s for s in speakers if s not in tags.values()]
    if unknown:
        raise BadInput(f"--speakers {opts.speakers}: no {', '.join(unknown)} in {data.data}; its tags are "
                       f"{', '.join(tags.values())}")
    return tuned, data, tags, train_sessions, held_out, speakers


def prompts_from(tok, sessions, tags, speakers, data: sft.DataSettings, n: int, offset=0) -> list[dict]:
    """n prompts spread over the sessions' messages, shared among speakers: each {"context": chat lines,
    "speaker": tag, "prompt_ids": the example's tokens up to the reply, "real_ids": the real reply's
    tokens (its text and the newline), "real": its text}, tokenised as prep.encode_example does.
    offset: another, as evenly spread set of prompts (a second reward model's)."""
    out = []
    for j, speaker in enumerate(speakers):
        share = n // len(speakers) + (j < n % len(speakers))
        for (s, i), context, _, real in ev.sample_prompts(tok, sessions, tags, speaker, data.context_messages,
                                                          data.max_len, share, offset=offset):
            k = min(data.context_messages, i)
            tokens, mask, _, _ = encode_example(tok, sessions[s][i - k : i], sessions[s][i], tags, data.max_len)
            cut = mask.index(True) if True in mask else len(tokens)
            out.append({"context": context, "speaker": speaker, "prompt_ids": tokens[:cut],
                        "real_ids": tokens[cut:], "real": real, "session": s, "index": i})
    return out


def chat_text(context: list[str], speaker: str, reply: str | None = None) -> str:
    return "".join(line + "\n" for line in context) + speaker + ("" if reply is None else f" {reply}")


# ---------------------------------------------------------------------------------------------------
# Judges. A local judge is a model of ours (the base model, the adapter switched off, or --judge-path);
# an API judge is any OpenAI-compatible server, its answers cached and sent only after saying where.

@dataclass
class Judge:
    model: object = None  # local: (model, tokenizer), and a context manager that puts it in judging state
    use: object = None
    api: dict | None = None  # {"model", "base_url", "key_env", "cache"}


def make_judge(opts: Options, tuned: sft.Tuned) -> Judge:
    if opts.judge_model:
        return Judge(api={"model": opts.judge_model, "base_url": opts.judge_base_url, "key_env": opts.judge_key_env,
                          "cache": opts.api_cache or str(Path(opts.out) / "api_cache.jsonl")})
    if opts.judge_path:
        from model import load_model

        return Judge(model=load_model(opts.judge_path), use=contextlib.nullcontext)
    return Judge(model=(tuned.model, tuned.tok), use=lambda: lora.disabled(tuned.model))


def local_lines(judge: Judge, texts: list[str], seed: int) -> list[str]:
    """The local judge's next line after each text (greedy: a judge's words should not be a dice roll)."""
    model, tok = judge.model
    with judge.use():
        return sample.generate(model, tok, texts, sample.Options(temperature=0, max_new_tokens=60, seed=seed))


def api_lines(judge: Judge, texts: list[str], what: str) -> list[str]:
    """The API judge's answers, cut to their first line."""
    keys = {ev_key(judge, "line", t): t for t in texts}
    answers = ev.ask_api(keys, ev.chat_answer(judge.api["model"]), judge.api["model"], judge.api["base_url"],
                         judge.api["key_env"], judge.api["cache"], what)
    return [answers[ev_key(judge, "line", t)].strip().split("\n")[0].strip() for t in texts]


def ev_key(judge: Judge, kind: str, text: str) -> str:
    return hashlib.sha256(json.dumps([judge.api["model"], judge.api["base_url"], kind, text]).encode()).hexdigest()



# ---------------------------------------------------------------------------------------------------
# revise: critique and revision, the paper's supervised stage.

def few_shot(constitution: dict) -> str:
    """The file's examples, in the form every request below takes."""
    blocks = []
    for shot in constitution.get("few_shot", []):
        blocks.append("\n".join(shot["chat"]) + "\n\nCritiqueRequest: Identify ways in which the last reply does "
                      "not sound like the person who wrote it.\nCritique: " + shot["critique"] +
                      "\n\nRevisionRequest: Please rewrite the last reply so that it sounds like them.\nRevision: " +
                      shot["revision"])
    return "".join(b + "\n\n-----\n\n" for b in blocks)


def rejected(revision: str) -> str | None:
    """Why a revision can't be a chat message (None: it can): empty, several lines, or a speaker tag
    inside (the judge wrote a conversation, not a reply)."""
    if not revision.strip():
        return "empty"
    if "\n" in revision.strip():
        return "spans lines"
    if TAG_LINE.search(revision.strip()) or re.search(r"\[[\w-]+\]", revision):
        return "speaker tag"
    return None


def revise(opts: Options) -> dict:
    constitution = read_constitution(opts.constitution)
    tuned, data, tags, train_sessions, _, speakers = setup(opts)
    judge = make_judge(opts, tuned)
    rng = random.Random(opts.seed)
    items = prompts_from(tuned.tok, train_sessions, tags, speakers, data, opts.prompts or 8)
    first = sample.generate_ids(tuned.model, [x["prompt_ids"] for x in items], replace(SAMPLING, seed=opts.seed),
                                sample.turn_ends(tuned.tok))
    replies = [sample.reply_text(tuned.tok, x["prompt_ids"], r.ids) for x, r in zip(items, first)]
    shots, rounds = few_shot(constitution), [[] for _ in items]
    for r in range(opts.revisions):
        drawn = [rng.choice(principles_for(constitution, x["speaker"])) for x in items]
        base = [shots + chat_text(x["context"], x["speaker"], reply) for x, reply in zip(items, replies)]
        asks = [b + f"\n\nCritiqueRequest: {p['critique']}\nCritique:" for b, p in zip(base, drawn)]
        critiques = api_lines(judge, asks, "critiques") if judge.api else local_lines(judge, asks, opts.seed + r)
        asks = [a + f" {c}\n\nRevisionRequest: {p['revision']}\nRevision:" for a, c, p in zip(asks, critiques, drawn)]
        revised = api_lines(judge, asks, "revisions") if judge.api else local_lines(judge, asks, opts.seed + r)
        for j, (p, c, text) in enumerate(zip(drawn, critiques, revised)):
            why = rejected(text)
            rounds[j].append({"principle": p["name"], "critique": c, "revision": text, "rejected": why})
            if why is None:
                replies[j] = one_line(text)
    rows = [{"context": x["context"], "speaker": x["speaker"], "original": sample.reply_text(tuned.tok, x["prompt_ids"], f.ids),
             "reply": reply, "revised": any(rd["rejected"] is None for rd in rs), "rounds": rs}
            for x, f, reply, rs in zip(items, first, replies, rounds)]
    path = Path(opts.out) / "revisions.jsonl"
    cli.write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)))
    reasons = {}
    for rs in rounds:
        for rd in rs:
            reasons[rd["rejected"] or "accepted"] = reasons.get(rd["rejected"] or "accepted", 0) + 1
    return {"rows": len(rows), "revised": sum(r["revised"] for r in rows), "rounds": reasons, "path": str(path),
            "examples": rows[:3]}


# ---------------------------------------------------------------------------------------------------
# label: preference pairs.

def sample_batches(model, tok, prompt_ids: list[list[int]], seed: int, batch_size: int, desc: str, bf16=False) -> list:
    """One SAMPLING reply (sample.Reply: ids kept as sampled) per prompt, in seeded batches; bf16: the
    prompts' prefill in bf16 where the CPU does it in hardware (model.cpu_bf16), as ppo.py's rollouts."""
    with cpu_bf16(model.embed_tokens.weight.device, bf16):
        return sample.generate_in_batches(model, prompt_ids, replace(SAMPLING, seed=seed), sample.turn_ends(tok),
                                          batch_size, desc)


def pair_row(x: dict, a_ids, b_ids, label, kind, tok) -> dict:
    text = lambda ids: sample.reply_text(tok, x["prompt_ids"], ids)
    return {"kind": kind, "speaker": x["speaker"], "context": x["context"], "prompt_ids": x["prompt_ids"],
            "a_ids": a_ids, "b_ids": b_ids, "a": text(a_ids), "b": text(b_ids), "label": label,
            "session": x["session"], "index": x["index"]}


def real_vs_sample(tuned: sft.Tuned, items, seed, batch_size, desc="sampling", bf16=False) -> tuple[list[dict], int]:
    """(pairs of the real reply and a sample, on a random side each, label = P(a is better) = 1 where
    a is the real one; how many samples equalled the real reply and were skipped)."""
    rng = random.Random(seed)
    samples = sample_batches(tuned.model, tuned.tok, [x["prompt_ids"] for x in items], seed, batch_size, desc, bf16)
    rows, same = [], 0
    for x, r in zip(items, samples):
        if r.ids == x["real_ids"]:
            same += 1
            continue
        real_first = rng.random() < 0.5
        a, b = (x["real_ids"], r.ids) if real_first else (r.ids, x["real_ids"])
        rows.append(pair_row(x, a, b, 1.0 if real_first else 0.0, "real-vs-sample", tuned.tok))
    return rows, same


MC_PROMPT = """Consider the following conversation between two people texting:

{chat}

{persona}
{question}
Options:
(A) {speaker} {a}
(B) {speaker} {b}
"""


def mc_prompt(constitution, row, principle, swap=False) -> str:
    a, b = (row["b"], row["a"]) if swap else (row["a"], row["b"])
    return MC_PROMPT.format(chat="\n".join(row["context"]) or "(the chat begins here)",
                            persona=persona(constitution, row["speaker"]), question=principle["comparison"],
                            speaker=row["speaker"], a=a, b=b)


@torch.inference_mode()
def local_preferences(judge: Judge, texts: list[str], cot: bool, batch_size: int) -> list[float]:
    """P(A) / (P(A) + P(B)) of the local judge's next token after each multiple-choice text and "The
    answer is: (". With cot, it first writes a line of reasoning, and the result is clamped to
    [0.4, 0.6]: reasoning drives the probabilities to 0 or 1, which says more than the judge knows."""
    model, tok = judge.model
    letters = [tok.encode("A", start=False)[0], tok.encode("B", start=False)[0]]
    with judge.use():
        if cot:
            thoughts = sample.generate(model, tok, [t + "Let's think step by step:" for t in texts],
                                       sample.Options(temperature=0, max_new_tokens=60))
            texts = [t + f"Let's think step by step: {th}\nSo the answer is: (" for t, th in zip(texts, thoughts)]
        else:
            texts = [t + "The answer is: (" for t in texts]
        out = []
        device = model.embed_tokens.weight.device
        for j in range(0, len(texts), batch_size):
            tokens, mask = pad([tok.encode(t) for t in texts[j : j + batch_size]], left=True, device=device)
            last = model(tokens, mask=mask, unembed=False)[:, -1]  # (B, D)
            two = model.unembed(last).float()[:, letters].softmax(-1)  # (B, 2): renormalised over A and B
            out += two[:, 0].tolist()
    return [min(0.6, max(0.4, p)) for p in out] if cot else out


def api_preferences(judge: Judge, texts: list[str]) -> list[float | None]:
    """P(A) from an API judge: from the log-probs of its answer's letter where the server gives them,
    else 1 or 0 from its strictly read final line ("Answer: A"), else None (unclear)."""
    name = judge.api["model"]

    def request(client, prompt):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               logprobs=True, top_logprobs=5)
        choice = reply.choices[0]
        text = choice.message.content
        if not isinstance(text, str):
            raise ValueError("the reply holds no text")
        p_a = None
        content = getattr(choice.logprobs, "content", None) or []
        for item in reversed(content):  # the letter of the final "Answer: X"
            if item.token.strip() in ("A", "B"):
                probs = {t.token.strip(): math.exp(t.logprob) for t in item.top_logprobs or []}
                if probs.get("A", 0) + probs.get("B", 0) > 0:
                    p_a = probs.get("A", 0) / (probs.get("A", 0) + probs.get("B", 0))
                break
        return {"text": text, "p_a": p_a}

    asks = {ev_key(judge, "prefer", t): t + 'Think if you like, then end with a line of its own that is exactly '
            '"Answer: A" or "Answer: B".' for t in texts}
    answers = ev.ask_api(asks, request, name, judge.api["base_url"], judge.api["key_env"], judge.api["cache"],
                         "comparisons")
    out = []
    for t in texts:
        answer = answers[ev_key(judge, "prefer", t)]
        if answer.get("p_a") is not None:
            out.append(float(answer["p_a"]))
        else:
            letter = ev.picked(answer.get("text", ""))
            out.append(None if letter is None else float(letter == "A"))
    return out


def preferences(judge, constitution, rows, rng, cot, batch_size) -> tuple[list, list, list]:
    """Each row judged in both orders under a principle drawn for it: (label = P(a better), averaged
    over the orders; P(A) with a first; P(A) with b first). None where the judge was unclear."""
    principles = [rng.choice(principles_for(constitution, row["speaker"])) for row in rows]
    texts = [mc_prompt(constitution, row, p, swap) for swap in (False, True) for row, p in zip(rows, principles)]
    p = api_preferences(judge, texts) if judge.api else local_preferences(judge, texts, cot, batch_size)
    first, second = p[: len(rows)], p[len(rows) :]
    labels = [None if a is None or b is None else (a + (1 - b)) / 2 for a, b in zip(first, second)]
    return labels, first, second


def wilson(k: float, n: int, z=1.96) -> list[float]:
    """The Wilson score 95% interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def judge_report(first, second, sanity_labels) -> dict:
    """Position bias (mean P(A): 0.5 is none), order agreement (both orders prefer the same reply), and
    the sanity accuracy (real next message over one from another session) with its interval."""
    both = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    asked = [x for pair in both for x in pair]
    clear = [x for x in sanity_labels if x is not None]
    right = sum(x > 0.5 for x in clear) + 0.5 * sum(x == 0.5 for x in clear)
    interval = wilson(right, len(clear))
    return {"position_bias": float(np.mean(asked)) if asked else None,
            "order_agreement": float(np.mean([(a > 0.5) == (b < 0.5) for a, b in both])) if both else None,
            "unclear": len(first) - len(both),
            "sanity": {"pairs": len(clear), "accuracy": right / len(clear) if clear else None, "interval": interval,
                       "unclear": len(sanity_labels) - len(clear)},
            "warning": None if interval[0] > 0.5 else
            "the judge's sanity interval includes 0.5: it is no better than chance at this, so its labels say little"}


def sanity_pairs(tuned, tags, train_sessions, held_out, speakers, data, n, seed) -> list[dict]:
    """Held-out prompts whose real next message is paired with a message the same person wrote in
    another session (a training one): a judge that reads the conversation should prefer the real one."""
    rng = random.Random(seed)
    items = prompts_from(tuned.tok, held_out, tags, speakers, data, n)
    rows = []
    for x in items:
        mine = [m for s in train_sessions for m in s if tags[m.speaker] == x["speaker"]]
        other = rng.choice(mine)
        other_ids = tuned.tok.encode(f" {one_line(other.text)}\n", start=False)
        real_first = rng.random() < 0.5
        a, b = (x["real_ids"], other_ids) if real_first else (other_ids, x["real_ids"])
        rows.append(pair_row(x, a, b, 1.0 if real_first else 0.0, "sanity", tuned.tok))
    return rows


def label(opts: Options) -> dict:
    constitution = read_constitution(opts.constitution)
    tuned, data, tags, train_sessions, held_out, speakers = setup(opts)
    kind = opts.pairs or ("sampled" if opts.judge_model or opts.judge_path else "real-vs-sample")
    if kind not in PAIRS:
        raise BadInput(f"--pairs {opts.pairs}: one of {', '.join(PAIRS)}")
    items = prompts_from(tuned.tok, train_sessions, tags, speakers, data, opts.prompts or 600, offset=opts.seed * 5)
    report = None
    if kind == "real-vs-sample":
        rows, same = real_vs_sample(tuned, items, opts.seed, opts.batch_size, bf16=not opts.fp32)
    else:
        judge = make_judge(opts, tuned)
        rng = random.Random(opts.seed)
        prompt_ids = [x["prompt_ids"] for x in items]
        a = sample_batches(tuned.model, tuned.tok, prompt_ids, opts.seed, opts.batch_size, "sampling (a)", not opts.fp32)
        b = sample_batches(tuned.model, tuned.tok, prompt_ids, opts.seed + 10**6, opts.batch_size, "sampling (b)", not opts.fp32)
        rows = [pair_row(x, ra.ids, rb.ids, None, "sampled", tuned.tok) for x, ra, rb in zip(items, a, b) if ra.ids != rb.ids]
        same = len(items) - len(rows)
        labels, first, second = preferences(judge, constitution, rows, rng, opts.cot, opts.batch_size)
        for row, value in zip(rows, labels):
            row["label"] = value
        unclear = sum(value is None for value in labels)
        rows = [row for row in rows if row["label"] is not None]
        sanity = sanity_pairs(tuned, tags, train_sessions, held_out, speakers, data, opts.sanity_pairs, opts.seed)
        sanity_labels, _, _ = preferences(judge, constitution, sanity, rng, opts.cot, opts.batch_size)
        real_is_a = [row["label"] for row in sanity]  # 1 where the real reply is a
        report = judge_report(first, second, [None if p is None else (p if r == 1.0 else 1 - p)
                                              for p, r in zip(sanity_labels, real_is_a)])
        report.update({"judge": opts.judge_model or opts.judge_path or "the base model (adapter off)",
                       "cot": opts.cot, "unclear_pairs_dropped": unclear})
        cli.write_atomically(Path(opts.out) / "judge_report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    path = Path(opts.out) / "pairs.jsonl"
    cli.write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)))
    return {"kind": kind, "pairs": len(rows), "identical_skipped": same, "path": str(path), "judge_report": report,
            "adapter": tuned.adapter, "example": {k: rows[0][k] for k in ("speaker", "a", "b", "label")} if rows else None}


# ---------------------------------------------------------------------------------------------------
# The reward model: the stage-1 model folded into its weights, a LoRA of its own, and a scalar head
# on the final normed stream at a reply's last real token. ppo.py loads it (load_rm) and starts its
# critic from it.

# The reward model reads at most this many of a sequence's last tokens: the reply (at most 48 tokens) and
# the latest two or three messages before it. Training pairs and PPO's replies are read the same way;
# reading the whole 8-message context (up to ~500 tokens) made a step about 4x slower on a CPU.
READS = 128


class RewardModel(torch.nn.Module):
    def __init__(self, model, mean=0.0, std=1.0, bf16=False):
        super().__init__()
        self.model = model
        self.bf16 = bf16  # the model's products in bf16 where the CPU does bf16 in hardware (model.cpu_bf16)
        self.head = torch.nn.Linear(model.cfg.dim, 1, device=model.embed_tokens.weight.device, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)  # a new reward model scores every reply 0
        torch.nn.init.zeros_(self.head.bias)
        self.mean, self.std = mean, std  # raw scores -> normalised: (raw - mean) / std

    def raw(self, tokens, mask, left=False):
        """tokens, mask (B, T) -> (B,) raw scores, read at each row's last real token: the end-of-turn
        newline of a finished reply. Right padding (left=False) or left padding, with the mask."""
        with cpu_bf16(tokens.device, self.bf16):
            h = self.model(tokens, mask=mask if left else None, unembed=False)  # (B, T, D), the final normed stream
        last = mask.shape[1] - 1 if left else mask.long().sum(1) - 1  # left padding ends every row at T - 1
        rows = torch.arange(len(tokens), device=tokens.device)
        return self.score_states(h[rows, last])

    def score_states(self, h):
        """The final normed stream (..., D) -> raw scores (...): the head, in fp32 even inside a bf16
        context (a score is one dot product; bf16 would round the reward itself)."""
        with cpu_bf16(h.device, False):
            return self.head(h.float())[..., 0]

    def forward(self, sequences: list[list[int]], left=False):
        """Token lists -> (B,) normalised scores, each read from its last READS tokens."""
        tokens, mask = pad([s[-READS:] for s in sequences], left=left, device=self.head.weight.device)
        return (self.raw(tokens, mask, left) - self.mean) / self.std


def stage1_hash(adapter_dir) -> str:
    return cli.file_sha256(Path(adapter_dir) / "adapter_model.safetensors")


def reward_model(tuned: sft.Tuned, opts: Options) -> RewardModel:
    """A fresh reward model on the stage-1 model (whose adapter is folded into its weights, for good)."""
    lora.fold(tuned.model)
    torch.manual_seed(opts.seed)
    lora.add_lora(tuned.model, r=opts.lora_r, alpha=opts.lora_alpha, dropout=0.0)
    return RewardModel(tuned.model, bf16=not opts.fp32)


def rm_parameters(rm: RewardModel) -> dict:
    """Every trainable tensor of the reward model by name: its LoRA (PEFT keys) and its head."""
    return {**lora.peft_keys(rm.model), "head.weight": rm.head.weight, "head.bias": rm.head.bias}


def save_rm(rm: RewardModel, path: Path, tuned: sft.Tuned, opts: Options, extra: dict):
    """rm/: the LoRA as a PEFT adapter, head.safetensors, rm.json (the stage-1 adapter it was built on and
    the hash of its weights, the normalisation, and how it was trained)."""
    lora.save_adapter(rm.model, path, base_model=tuned.base_model)
    head = {"weight": rm.head.weight.detach().cpu().contiguous(), "bias": rm.head.bias.detach().cpu().contiguous()}
    cli.write_atomically(path / "head.safetensors", lambda tmp: save_file(head, tmp))
    info = {"stage1_adapter": tuned.adapter, "stage1_sha256": stage1_hash(tuned.adapter), "base_model": tuned.base_model,
            "mean": rm.mean, "std": rm.std, "bf16": rm.bf16, "options": asdict(opts), **extra}
    cli.write_atomically(path / "rm.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


def load_rm(path, allow_other_base=False) -> tuple[RewardModel, sft.Tuned, dict]:
    """(the reward model, the stage-1 model it was built on, rm.json). The stage-1 adapter is loaded
    from where rm.json says, and refused if its weights changed since (another stage 1)."""
    path = Path(path)
    info = cli.read_json(path / "rm.json", "--rm")
    if not isinstance(info, dict) or "stage1_adapter" not in info:
        raise BadInput(f"--rm {path}: rm.json does not name the stage-1 adapter it was built on")
    adapter = info["stage1_adapter"]
    if not (Path(adapter) / "adapter_model.safetensors").exists() or stage1_hash(adapter) != info.get("stage1_sha256"):
        raise BadInput(f"--rm {path} was built on the stage-1 adapter in {adapter}, which is gone or has changed "
                       "since; retrain it with rlaif.py train-rm")
    tuned = sft.load_tuned(adapter, info.get("base_model", ""), allow_other_base=allow_other_base)
    lora.fold(tuned.model)
    lora.load_adapter(tuned.model, path)
    rm = RewardModel(tuned.model, info.get("mean", 0.0), info.get("std", 1.0), info.get("bf16", False))  # as trained
    try:
        with safe_open(str(path / "head.safetensors"), framework="pt") as f:
            with torch.no_grad():
                rm.head.weight.copy_(f.get_tensor("weight"))
                rm.head.bias.copy_(f.get_tensor("bias"))
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise BadInput(f"--rm {path}: head.safetensors is not a reward model's head ({type(e).__name__})") from None
    return rm.eval(), tuned, info


def bradley_terry(r_a, r_b, label):
    """-E[y log s(r_a - r_b) + (1 - y) log s(r_b - r_a)]: the Bradley-Terry loss with soft labels y = P(a
    better), in the numerically stable form of binary cross-entropy on the logit r_a - r_b."""
    return F.binary_cross_entropy_with_logits(r_a - r_b, label)


def read_pairs(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no pairs there; make them with python rlaif.py label")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            ok = all(isinstance(row[k], list) and row[k] for k in ("prompt_ids", "a_ids", "b_ids")) and \
                isinstance(row["label"], (int, float)) and 0 <= row["label"] <= 1
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise BadInput(f"{path}:{n}: not a pair rlaif.py label wrote")
        rows.append(row)
    if not rows:
        raise BadInput(f"{path} holds no pairs")
    return rows


def pair_batch(rm: RewardModel, rows):
    """(r_a, r_b) (P,) for pairs: both replies of every pair in one right-padded forward."""
    r = rm([row["prompt_ids"] + row["a_ids"] for row in rows] + [row["prompt_ids"] + row["b_ids"] for row in rows])
    return r[: len(rows)], r[len(rows) :]


def pairs_backward(rm: RewardModel, batch, per_piece):
    """The Bradley-Terry loss of a batch of pairs and its gradient, per_piece pairs (two sequences each)
    at a time: each piece's loss is its share of the batch's mean, so the accumulated gradient is the
    whole batch's, at a piece's memory (sft.py's --split-above). -> (loss, r_a, r_b)."""
    loss, r_a, r_b = 0.0, [], []
    for j in range(0, len(batch), per_piece):
        part = batch[j : j + per_piece]
        a, b = pair_batch(rm, part)
        part_loss = bradley_terry(a, b, torch.tensor([row["label"] for row in part], device=a.device))
        (part_loss * len(part) / len(batch)).backward()
        loss += part_loss.item() * len(part) / len(batch)
        r_a.append(a.detach())
        r_b.append(b.detach())
    return loss, torch.cat(r_a), torch.cat(r_b)


@torch.no_grad()
def rm_validation(rm, rows, batch) -> dict:
    rm.eval()
    losses, right = [], []
    for j in range(0, len(rows), batch):
        part = rows[j : j + batch]
        r_a, r_b = pair_batch(rm, part)
        y = torch.tensor([row["label"] for row in part], device=r_a.device)
        losses.append(bradley_terry(r_a, r_b, y).item() * len(part))
        right += [float((a > b) == (t > 0.5)) for a, b, t in zip(r_a.tolist(), r_b.tolist(), y.tolist()) if t != 0.5]
    rm.model.train()
    return {"loss": sum(losses) / len(rows), "accuracy": float(np.mean(right)) if right else None}


def train_rm(opts: Options) -> dict:
    out = Path(opts.out) / "rm"
    ckpt = out / sft.CHECKPOINT
    if opts.resume and not ckpt.exists():
        raise BadInput(f"--resume: there is no checkpoint at {ckpt}")
    if not opts.resume and ckpt.exists():
        raise BadInput(f"{ckpt} exists: pass --resume to continue that run, or choose a new --out")
    rows = read_pairs(Path(opts.out) / "pairs.jsonl")
    tuned = sft.load_tuned(opts.adapter, opts.model, allow_other_base=opts.allow_other_base)
    rm = reward_model(tuned, opts)
    # Validation pairs are whole prompts' pairs, chosen by a seeded shuffle of the prompts.
    prompts = sorted({(r["session"], r["index"], r["speaker"]) for r in rows})
    random.Random(opts.seed).shuffle(prompts)
    held = set(prompts[: max(1, round(opts.val_pairs * len(prompts)))])
    val = [r for r in rows if (r["session"], r["index"], r["speaker"]) in held]
    train = [r for r in rows if (r["session"], r["index"], r["speaker"]) not in held]
    params = list(rm_parameters(rm).values())
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=True)
    metrics = out / "metrics.jsonl"
    step, log = 0, []
    if opts.resume:
        tensors, state = sft.load_checkpoint(ckpt, optimizer)
        with torch.no_grad():
            for name, p in rm_parameters(rm).items():
                p.copy_(tensors[name])
        step = state["step"]
        log = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        log = [row for row in log if row["step"] <= step]
        print(f"resuming at step {step}/{opts.max_steps}", file=sys.stderr)
    cli.write_atomically(metrics, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in log)))
    print(f"reward model: {len(train)} training pairs, {len(val)} validation pairs; LoRA r={opts.lora_r} on the "
          f"folded stage-1 model {tuned.adapter}", file=sys.stderr)

    def save():
        save_rm(rm, out, tuned, opts, {"pairs": len(rows)})
        sft.save_checkpoint(ckpt, rm_parameters(rm), optimizer, {"step": step, "options": asdict(opts)})
        plot_rm(log, out / "loss.png")

    stop = sft.stop_requests(lambda line: tqdm.write(line))
    # Batches of similar length, in an order that is a function of (seed, epoch): sft.py's batching.
    lengths = [min(READS, len(r["prompt_ids"]) + max(len(r["a_ids"]), len(r["b_ids"]))) for r in train]
    batches = lambda epoch: sft.epoch_batches(lengths, opts.rm_batch, opts.seed, epoch)
    per_epoch = len(batches(0))
    rm.model.train()
    bar = cli.progress(total=opts.max_steps, initial=step, unit="step")
    while step < opts.max_steps:
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = sft.lr_at(step, opts)
        epoch, position = divmod(step, per_epoch)  # the batch is a function of the step: resumable
        indices = batches(epoch)[position]
        batch = [train[i] for i in indices]
        per_piece = max(1, opts.split_above // (2 * max(lengths[i] for i in indices))) if opts.split_above else len(batch)
        loss, r_a, r_b = pairs_backward(rm, batch, per_piece)
        if not math.isfinite(loss):  # before the optimizer spreads it into the reward model
            raise sft.TrainingDiverged(f"the reward model's loss became {loss} at step {step + 1}; "
                                       f"the last good checkpoint is in {ckpt}")
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ms = (time.time() - t0) * 1000
        accuracy = float(((r_a > r_b) == torch.tensor([row["label"] > 0.5 for row in batch], device=r_a.device)).float().mean())
        row = {"step": step, "loss": loss, "accuracy": accuracy, "grad_norm": norm, "lr": sft.lr_at(step - 1, opts),
               "ms": round(ms)}
        line = (f"step {step}/{opts.max_steps} | loss {loss:.4f} | acc {accuracy:.2f} | norm {norm:.2f} | "
                f"lr {row['lr']:.1e} | {ms:.0f} ms")
        if step % opts.eval_every == 0 or step == opts.max_steps:
            v = rm_validation(rm, val, opts.rm_batch)
            row.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
            line += f" | val {v['loss']:.4f} (acc {v['accuracy']:.2f}; constant 0.5: {math.log(2):.4f})"
        log.append(row)
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(line)
        bar.update(1)
        if step % opts.save_every == 0 or step == opts.max_steps or stop:
            save()
        if stop:
            sft.quit_stopped(step, stop[0], bar)
    bar.close()
    # Normalise: the stage-1 model's own replies (the sampled side of the training pairs) get mean 0, std 1.
    rm.eval()
    with torch.no_grad():
        own = [row["prompt_ids"] + (row["b_ids"] if row["label"] == 1.0 else row["a_ids"]) for row in rows
               if row["kind"] == "real-vs-sample"] or [row["prompt_ids"] + row["a_ids"] for row in rows]
        raw = torch.cat([rm(own[j : j + opts.batch_size]) for j in range(0, len(own), opts.batch_size)])
    rm.mean, rm.std = float(raw.mean()), float(raw.std().clamp(min=1e-6))
    save()
    return {"steps": step, "train_pairs": len(train), "val_pairs": len(val), "final": log[-1], "path": str(out),
            "normalisation": {"mean": rm.mean, "std": rm.std}}


def plot_rm(log, path):
    plt = cli.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in log]
    if steps:
        ax1.plot(steps, [r["loss"] for r in log], lw=0.6, alpha=0.5, label="train")
        val = [(r["step"], r["val_loss"], r["val_accuracy"]) for r in log if "val_loss" in r]
        if val:
            ax1.plot([v[0] for v in val], [v[1] for v in val], "o-", label="validation")
            ax2.plot([v[0] for v in val], [v[2] for v in val], "o-", label="validation accuracy")
    ax1.axhline(math.log(2), ls="--", c="gray", label="constant 0.5")
    ax1.set(xlabel="step", ylabel="Bradley-Terry loss", title="Reward model")
    ax2.set(xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax1.legend()
    ax2.legend()
    cli.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# eval-rm: is the reward model sane, and is it more than a length detector?

def heldout_pairs(opts: Options, tuned, tags, held_out, speakers, data) -> list[dict]:
    """Real-vs-sample pairs on held-out prompts, made once per (stage-1 adapter, seed, count,
    precision) and kept in --out (sampling them is most of eval-rm's time)."""
    path = Path(opts.out) / "heldout_pairs.jsonl"
    key = {"stage1_sha256": stage1_hash(tuned.adapter), "seed": opts.seed, "n": opts.heldout, "speakers": speakers,
           "bf16": not opts.fp32}
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]) == key:
            return [json.loads(line) for line in lines[1:]]
    items = prompts_from(tuned.tok, held_out, tags, speakers, data, opts.heldout)
    rows, _ = real_vs_sample(tuned, items, opts.seed + 7, opts.batch_size, "sampling (held-out)", not opts.fp32)
    cli.write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in [key] + rows)))
    return rows


def pair_metrics(r_a, r_b, y, len_a, len_b) -> dict:
    """Scores r_a, r_b of pairs with labels y (1: a is the better) and lengths in words -> the reward
    model's accuracy, log loss and Brier score beside length-only rules and constant predictions."""
    p = 1 / (1 + np.exp(-(r_a - r_b)))  # P(a better) by the reward model
    right = ((r_a > r_b) == (y == 1)).astype(float)
    shorter = np.where(len_a == len_b, 0.5, ((len_a < len_b) == (y == 1)).astype(float))  # "the shorter wins"
    matched = np.abs(len_a - len_b) <= 2
    real_len, other_len = np.where(y == 1, len_a, len_b), np.where(y == 1, len_b, len_a)
    return {
        "accuracy": float(right.mean()), "accuracy_interval": wilson(right.sum(), len(y)),
        "shorter_wins": float(shorter.mean()), "shorter_wins_interval": wilson(shorter.sum(), len(y)),
        # the strongest rule on length alone: "the shorter wins" or "the longer wins", whichever does better
        # here (picked on these very pairs, which can only flatter the baseline)
        "length_only": float(max(shorter.mean(), 1 - shorter.mean())),
        "real_is_shorter": float((real_len < other_len).mean()),
        "length_matched": {"pairs": int(matched.sum()), "accuracy": float(right[matched].mean()) if matched.any() else None,
                           "interval": wilson(right[matched].sum(), int(matched.sum())),
                           "shorter_wins": float(shorter[matched].mean()) if matched.any() else None},
        "log_loss": float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))), "log_loss_constant": math.log(2),
        "brier": float(np.mean((p - y) ** 2)), "brier_constant": 0.25,
        "score_length_correlation": float(np.corrcoef(np.concatenate([r_a, r_b]), np.concatenate([len_a, len_b]))[0, 1]),
    }


def eval_rm(opts: Options, rm: RewardModel | None = None, tuned=None) -> dict:
    rm_dir = Path(opts.rm or Path(opts.out) / "rm")
    if rm is None:
        rm, tuned, _ = load_rm(rm_dir, opts.allow_other_base)
    data = sft.data_settings(tuned.training, opts)
    messages, _ = load_pair(data.data)
    tags = {s: tag(s) for s in dict.fromkeys(m.speaker for m in messages)}
    _, held_out = split_sessions(messages, data.session_gap_hours, data.val_frac)
    speakers = [tag(x) for x in opts.speakers.split(",")] if opts.speakers else sorted(set(tags.values()))
    with lora.disabled(rm.model):  # the stage-1 model samples: its own folded weights, no reward LoRA
        rows = heldout_pairs(opts, tuned, tags, held_out, speakers, data)
    with torch.no_grad():
        scored = [pair_batch(rm, rows[j : j + opts.rm_batch]) for j in range(0, len(rows), opts.rm_batch)]
    r_a = torch.cat([a for a, _ in scored]).cpu().numpy()
    r_b = torch.cat([b for _, b in scored]).cpu().numpy()
    y = np.array([r["label"] for r in rows])
    words = lambda text: len(text.split())
    result = {"pairs": len(rows), "rm": str(rm_dir), "stage1_adapter": tuned.adapter,
              **pair_metrics(r_a, r_b, y, np.array([words(r["a"]) for r in rows]), np.array([words(r["b"]) for r in rows])),
              "padding": padding_check(rm, rows[:4])}
    plot_calibration(1 / (1 + np.exp(-(r_a - r_b))), y, Path(opts.out) / "rm_calibration.png")
    cli.write_atomically(Path(opts.out) / "rm_eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return result


@torch.no_grad()
def padding_check(rm: RewardModel, rows) -> float:
    """The largest change in a reply's score between scoring it alone, in a right-padded batch and in a
    left-padded batch with longer and shorter sequences: 0 up to rounding, or the score reads a pad."""
    sequences = [r["prompt_ids"] + r["a_ids"] for r in rows]
    alone = torch.cat([rm([s]) for s in sequences])
    right, left = rm(sequences), rm(sequences, left=True)
    return float(max((alone - right).abs().max(), (alone - left).abs().max()))


def plot_calibration(p, y, path):
    plt = cli.pyplot()
    bins = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(p, bins) - 1, 0, 9)
    centres, freq, counts = [], [], []
    for b in range(10):
        if (which == b).any():
            centres.append(p[which == b].mean())
            freq.append(y[which == b].mean())
            counts.append(int((which == b).sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="gray", label="perfectly calibrated")
    ax.plot(centres, freq, "o-", label="reward model")
    for c, f, n in zip(centres, freq, counts):
        ax.annotate(str(n), (c, f), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="predicted P(a is the better reply)", ylabel="share where a was the better reply",
           title="Reward model calibration (held-out pairs)", xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    cli.save_figure(fig, path)


def markdown(r: dict) -> str:
    iv = lambda x: f"[{x[0]:.3f}, {x[1]:.3f}]"
    m = r["length_matched"]
    return "\n".join([
        f"Reward model {r['rm']} (on {r['stage1_adapter']}), {r['pairs']} held-out real-vs-sample pairs.", "",
        "| held-out pairs | n | reward model | the shorter wins | length alone (shorter or longer wins) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| all | {r['pairs']} | {r['accuracy']:.3f} {iv(r['accuracy_interval'])} | {r['shorter_wins']:.3f} | "
        f"{r['length_only']:.3f} |",
        f"| length-matched (within 2 words) | {m['pairs']} | "
        + (f"{m['accuracy']:.3f} {iv(m['interval'])}" if m["accuracy"] is not None else "-")
        + f" | {m['shorter_wins'] if m['shorter_wins'] is None else round(m['shorter_wins'], 3)} | - |", "",
        f"Log loss {r['log_loss']:.4f} (constant 0.5: {r['log_loss_constant']:.4f}); Brier {r['brier']:.4f} (constant: "
        f"0.25); the real reply is the shorter in {r['real_is_shorter']:.0%} of pairs; correlation of score with length "
        f"{r['score_length_correlation']:+.3f}; largest score change from padding {r['padding']:.1e}."])


def main():
    command, argv = cli.command(sys.argv[1:], COMMANDS, "rlaif.py")
    opts = parse_options(Options, argv=argv)
    if command == "revise":
        r = revise(opts)
        print(f"{r['rows']} replies, {r['revised']} revised at least once; rounds: {r['rounds']}; wrote {r['path']}")
        for row in r["examples"]:
            print(f"\n{chr(10).join(row['context'][-2:])}\n{row['speaker']} {row['original']}\n  revised: {row['reply']}")
    elif command == "label":
        r = label(opts)
        print(f"{r['pairs']} {r['kind']} pairs ({r['identical_skipped']} identical skipped) -> {r['path']}")
        if r["judge_report"]:
            j, s = r["judge_report"], r["judge_report"]["sanity"]
            print(f"judge {j['judge']}: position bias (mean P(A)) {j['position_bias']:.3f}, order agreement "
                  f"{j['order_agreement']:.3f}; sanity: picks the real next message in {s['accuracy']:.3f} of {s['pairs']} "
                  f"held-out pairs, 95% interval [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}]")
            if j["warning"]:
                print(f"warning: {j['warning']}", file=sys.stderr)
    elif command == "train-rm":
        r = train_rm(opts)
        print(f"reward model in {r['path']}: {r['steps']} steps on {r['train_pairs']} pairs; normalised by "
              f"mean {r['normalisation']['mean']:.3f}, std {r['normalisation']['std']:.3f}\n")
        print(markdown(eval_rm(opts)))
    else:
        print(markdown(eval_rm(opts)))


if __name__ == "__main__":
    exit_on_bad_input(main)
