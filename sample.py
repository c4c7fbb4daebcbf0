"""Talk to the simulation: reply as either person, autocomplete yourself, chat, or let both of them talk.

    python sample.py --speaker FRIEND --prompt "[RIYA] you coming?"     # the friend's reply
    python sample.py --speaker RIYA --prompt "[FRIEND] where are u"     # autocomplete yourself
    python sample.py --speaker FRIEND --prompt "[RIYA] hi" --n 5        # five replies, one batch
    python sample.py --speaker FRIEND --prompt "[RIYA] hi" --compare    # base vs fine-tuned, same seed
    python sample.py --chat --me RIYA --speaker FRIEND                  # you type as Riya
    python sample.py --loop 20 --prompt "[RIYA] hey"                    # both people, 20 messages
    python sample.py --speaker FRIEND --prompt "[RIYA] how was your day?" --steer happy:2   # happier
    python sample.py --speaker FRIEND --prompt "[RIYA] where are you from again?" --memory  # memory.py's

A prompt is chat lines in the training format ("[TAG] text", one message per line); the reply is the
next message of --speaker, and it ends where that message ends: at the newline that closes a turn.
Uses the adapter sft.py wrote (out/adapter) unless --adapter DIR or --base; the adapter's
adapter_config.json names the model it was trained on, and its training.json how much context it was
trained with (the prompt keeps at most that many of the latest messages and tokens). --steer adds
steering vectors that steer.py saved to the residual stream, at every position of the prompt and of
every decoded token, in every mode.
"""
import functools
import math
import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated

import torch
from safetensors import SafetensorError, safe_open

import lora
import memory as mem  # as mem: Options.memory is the flag
import sft
from cli import POSITIVE, BadInput, Range, exit_on_bad_input, parse_options, progress
from model import add, cpu_bf16, pad, prefill_once
from prep import TAG_LINE, one_line, read_export, tag


@dataclass
class Options:
    speaker: Annotated[str, "who replies: a tag from the data, e.g. FRIEND"] = "FRIEND"
    prompt: Annotated[str, "the conversation so far, '[TAG] text' lines ('\\n' for a line break)"] = ""
    adapter: Annotated[str, "adapter directory from sft.py"] = sft.ADAPTER
    base: Annotated[bool, "no adapter: the base model alone"] = False
    allow_other_base: Annotated[bool, "load the adapter even onto a base model other than the one it was "
                                      "trained on"] = False
    model: Annotated[str, "base model (default: the one the adapter was trained on; with --base, "
                          f"{sft.Options.model})"] = ""
    compare: Annotated[bool, "print base and fine-tuned replies side by side, same seed"] = False
    chat: Annotated[bool, "interactive: you type as --me, the model answers as --speaker"] = False
    me: Annotated[str, "your tag in --chat"] = "RIYA"
    loop: Annotated[int, "let the model play both people for this many messages after --prompt", Range(0)] = 0
    n: Annotated[int, "replies to sample at once (one batch)", Range(1)] = 1
    max_new_tokens: Annotated[int, "longest reply, in tokens", Range(1)] = 60
    temperature: Annotated[float, "0 = greedy", Range(0)] = 0.8
    top_k: Annotated[int, "keep the k most likely tokens; 0 = all", Range(0)] = 0
    top_p: Annotated[float, "keep the most likely tokens up to this probability mass", Range(0, 1, low_open=True)] = 0.95
    min_p: Annotated[float, "drop tokens less likely than min_p times the most likely one", Range(0, 1)] = 0.0
    repetition_penalty: Annotated[float, "divide the logits of tokens already in the conversation", POSITIVE] = 1.1
    no_repeat_ngram: Annotated[int, "--loop: never repeat an n-gram of the conversation; 0 = off", Range(0)] = 4
    max_run: Annotated[int, "--loop: after this many messages in a row, the other person writes", Range(1)] = 4
    data: Annotated[str, "--loop: the training data, to count replayed training messages (default: the "
                         "data the adapter was trained on)"] = ""
    seed: Annotated[int, "random seed"] = 0
    memory: Annotated[bool, "put what the two said about themselves (memory.py build) before the prompt; in "
                            "--chat and --loop the simulation's own new disclosures are written back, marked "
                            "simulated"] = False
    memory_file: Annotated[str, "--memory: its file (default: memory.jsonl next to the adapter)"] = ""
    memory_contrast: Annotated[float, "--memory: context-aware decoding, sample from (1 + a) x the logits with "
                                      "the memory - a x those with its lines' form only, tag and date (two "
                                      "forwards a token); 0 = off",
                               Range(0)] = 0.0
    steer: Annotated[str, "steering vectors from steer.py, NAME:ALPHA[,NAME:ALPHA...]: NAME is "
                          "out/steer/NAME.safetensors or a path, ALPHA scales its saved setting (1 = as "
                          "found, -1 = the opposite); with --compare, both columns"] = ""


SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def sampling_settings(opts: Options) -> dict:
    """The options that decide how a reply is sampled, e.g. for a results file to record."""
    return {k: getattr(opts, k) for k in SAMPLING}


def sampling_logprobs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution we sample from, as log-probs (B, V) with -inf outside it: the logits divided by
    the temperature, then cut by top-k, top-p and min-p, in transformers' order. PPO scores its
    rollouts with this same function: a mismatch would bias its KL estimate."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(~nucleus(logits.softmax(-1), top_p), float("-inf"))
    if min_p:  # https://arxiv.org/abs/2407.01082: a cut relative to the top token's probability
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits.log_softmax(-1)


def nucleus(probs, top_p):
    """probs (B, V) -> (B, V) bool: the most likely tokens up to the first that brings their mass to
    top_p (nucleus sampling, https://arxiv.org/abs/1904.09751). Looked for among the top k tokens, k
    growing 4x from 64 until every row's nucleus ends inside them: a chat model's nucleus holds a few
    dozen to a few hundred tokens, and sorting a whole 49,152-token vocabulary at every step took
    14 ms on 2 CPU cores, a fifth of a batch-8 decoding step."""
    V = probs.shape[-1]
    k = min(64, V)
    while True:
        top = probs.topk(k, dim=-1)  # (B, k), most likely first
        before = top.values.cumsum(-1) - top.values  # the mass of the tokens ahead of each
        if k == V or bool((before[:, -1] >= top_p).all()):  # every row's last one is outside
            break
        k = min(4 * k, V)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top.indices, before < top_p)


def draw(logprobs, generator):
    """One token per row of the distribution logprobs (B, V), by inverting its cumulative distribution
    at a uniform number: exact, never a token of probability 0, and on a CPU ~40x cheaper
    than torch.multinomial over a large vocabulary (0.2 ms against 8.6 ms for 8 x 49,152)."""
    cdf = logprobs.exp().double().cumsum(-1)  # (B, V); summed in fp64, so no token's share rounds away
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    u = torch.minimum(u, torch.nextafter(cdf[:, -1:], torch.zeros_like(u)))  # below the total, even rounded
    return torch.searchsorted(cdf, u, right=True)[:, 0]  # the first token whose cdf passes u


def penalize(logits, seen_ids, penalty):
    """CTRL's repetition penalty (https://arxiv.org/abs/1909.05858), as transformers applies it: a token
    already seen (seen_ids (B, S), repeats allowed) has its positive logit divided by the penalty, its
    negative one multiplied. Gathered and scattered back, so only the seen tokens are touched."""
    if penalty == 1.0:
        return logits
    x = logits.gather(1, seen_ids)
    return logits.scatter(1, seen_ids, torch.where(x > 0, x / penalty, x * penalty))


def banned_ngrams(history: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of history: those that followed its last n-1 tokens before."""
    if n <= 0 or len(history) < n:
        return []
    prefix = history[len(history) - n + 1 :]
    return [history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == prefix]


@functools.cache
def turn_ends(tok) -> torch.Tensor:
    """(V,) bool: the tokens that end a turn, end-of-sequence and every token whose text holds a newline.
    Decoded once per tokenizer, so that the decoding loop never decodes."""
    ends = torch.tensor(["\n" in tok.decode([t]) for t in range(tok.vocab_size)])
    if tok.eos_id is not None:
        ends[tok.eos_id] = True
    return ends


@dataclass
class Reply:
    ids: list[int]  # the tokens sampled, the turn-ending one included if it came
    logprobs: list[float]  # each token's log-prob under the distribution it was sampled from
    ended: bool  # False: cut off by max_new_tokens before its turn ended


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], opts: Options, ends=None, hooks=None,
                 no_repeat_ngram=0, context_ids=None, contrast=0.0, baseline_ids=None) -> list[Reply]:
    """Replies to each prompt (token ids; a prompt ends with the speaker's tag), one left-padded batch,
    through the KV cache. ends (V,) bool: the tokens that end a turn (turn_ends); a reply stops at the
    first (None: every reply runs to max_new_tokens). The repetition penalty (and no_repeat_ngram,
    which --loop uses) count the conversation so far: the prompt, or context_ids where given (each
    prompt without the memory lines before it: a remembered fact is there to be restated, and a 1.1
    penalty on SmolLM2's leading logits, 9-11, costs a copied token 0.8-1 nats). contrast = a > 0 (with
    context_ids): context-aware decoding (Shi et al. 2023, https://arxiv.org/abs/2305.14739), the
    logits (1 + a) x those after the prompt - a x those after baseline_ids (default context_ids), so
    what the memory makes likelier counts more; two forwards a token. Each token's log-prob is taken
    from exactly the distribution it was drawn from: contrast, temperature, top-k, top-p, min-p,
    penalty and blocking applied (at temperature 0, greedy, from the penalised logits' log-softmax)."""
    device = model.embed_tokens.weight.device
    B, V = len(prompt_ids), model.cfg.vocab_size
    stops = torch.zeros(V, dtype=torch.bool, device=device)  # a model's vocabulary may outnumber its tokenizer's
    if ends is not None:
        stops[: len(ends)] = ends[:V].to(device)
    # The conversation so far, for the penalty: the context, its padding replaced by its last token (a
    # repeat changes nothing), then each new token as it comes.
    contrast, context_ids = (contrast, context_ids) if context_ids else (0.0, prompt_ids)
    baseline_ids = baseline_ids or context_ids
    tokens, mask = pad(context_ids, left=True, device=device)  # (B, C)
    C = tokens.shape[1]
    history = torch.cat([torch.where(mask, tokens, tokens[:, -1:]),
                         torch.zeros(B, opts.max_new_tokens, dtype=torch.long, device=device)], dim=1)
    generator = torch.Generator(device).manual_seed(opts.seed)
    # Each distinct prompt is run once; rows that repeat it (several samples of one reply) copy its keys
    # and values. Prefill is most of the time when short replies follow long prompts.
    cache, last = prefill_once(model, prompt_ids, opts.max_new_tokens, hooks)
    logits = model.unembed(last)  # (B, V): only the last position's logits are needed
    if contrast:
        plain_cache, plain_last = prefill_once(model, baseline_ids, opts.max_new_tokens, hooks)
        plain = model.unembed(plain_last)  # (B, V): the same rows after the baseline
    logp = torch.zeros(B, opts.max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(1, opts.max_new_tokens + 1):
        if contrast:
            logits = (1 + contrast) * logits.float() - contrast * plain.float()
        logits = penalize(logits.float(), history[:, : C + n - 1], opts.repetition_penalty)
        if no_repeat_ngram:
            for b in range(B):
                banned = banned_ngrams(context_ids[b] + history[b, C : C + n - 1].tolist(), no_repeat_ngram)
                logits[b, banned] = float("-inf")
        if opts.temperature == 0:
            dist = logits.log_softmax(-1)
            next_ids = logits.argmax(-1)
        else:
            dist = sampling_logprobs(logits, opts.temperature, opts.top_k, opts.top_p, opts.min_p)
            next_ids = draw(dist, generator)
        next_ids = next_ids.masked_fill(done, 0)  # finished rows decode padding, which is never used
        history[:, C + n - 1], logp[:, n - 1] = next_ids, dist.gather(1, next_ids[:, None])[:, 0]
        done |= stops[next_ids]
        if done.all():
            break
        # Decoding runs in fp32 even inside model.cpu_bf16: a step is bound by reading the weights, and
        # autocast would add a bf16 copy of every weight per token (measured 102 -> 129 ms for 16 rows).
        with cpu_bf16(device, False):
            logits = model(next_ids[:, None], cache=cache, hooks=hooks)[:, -1]
            if contrast:
                plain = model(next_ids[:, None], cache=plain_cache, hooks=hooks)[:, -1]
    new = history[:, C:]
    hit = stops[new[:, :n]]  # (B, n): where turns end; a reply keeps its tokens up to its first
    lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, n).tolist()
    return [Reply(row[:k], scores[:k], ended)
            for row, scores, ended, k in zip(new[:, :n].tolist(), logp[:, :n].tolist(), done.tolist(), lengths)]


def generate_in_batches(model, prompt_ids: list[list[int]], opts: Options, ends=None, batch_size=16,
                        desc="sampling") -> list[Reply]:
    """generate_ids over many prompts, batch_size at a time, taking the prompts in order of length: a
    batch is left-padded to its longest prompt, and in chat order a batch padded to ~1.45x its real
    tokens (600 reward-model prompts, 16 a batch). Batch j (from prompt j on) is seeded opts.seed + j;
    the replies come back in the prompts' order."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out = [None] * len(prompt_ids)
    for j in progress(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        part = order[j : j + batch_size]
        for i, r in zip(part, generate_ids(model, [prompt_ids[i] for i in part], replace(opts, seed=opts.seed + j), ends)):
            out[i] = r
    return out


def reply_text(tok, prompt_ids: list[int], reply_ids: list[int]) -> str:
    """A reply's tokens -> its text on one line, without the newline that ended it. Decoded together
    with the prompt: SentencePiece drops a piece's leading space when it is decoded on its own."""
    return one_line(tok.decode(prompt_ids + reply_ids)[len(tok.decode(prompt_ids)) :].split("\n")[0])


# Shown after a reply that --max-new-tokens cut off before its turn ended (never fed back as context).
CUT = " [cut: --max-new-tokens]"


def generate(model, tok, prompts: list[str], opts: Options, hooks=None, no_repeat_ngram=0, mark_cut=False,
             contexts: list[str] | None = None, baselines: list[str] | None = None) -> list[str]:
    """The replies to prompts (text), as text: generate_ids, stopping where each turn ends. mark_cut:
    a reply that never ended ends in CUT. With a memory: contexts, each prompt without its memory lines
    (the conversation, for the penalty), and baselines, what opts.memory_contrast subtracts; a reply
    ends where it copies a memory line's date."""
    encode = lambda texts: [tok.encode(t) for t in texts] if texts else None
    ids = encode(prompts)
    replies = generate_ids(model, ids, opts, turn_ends(tok), hooks, no_repeat_ngram, encode(contexts),
                           opts.memory_contrast, encode(baselines))
    texts = [reply_text(tok, i, r.ids) + (CUT if mark_cut and not r.ended else "") for i, r in zip(ids, replies)]
    return [mem.COPIED_DATE.split(t, 1)[0] for t in texts] if contexts else texts


def prompt_for(lines: list[str], speaker_tag: str) -> str:
    """Chat lines -> the text the model continues: the lines, then the speaker's tag."""
    return "".join(line + "\n" for line in lines) + speaker_tag


def reply_to(model, tok, memory: list[str], lines: list[str], speaker_tag: str, opts: Options, hooks=None, n=1,
             **kw) -> list[str]:
    """n replies of speaker_tag to the chat lines, with the memory's lines ([]: none) before them:
    generate, told which part of the prompt is the conversation, and for --memory-contrast, a baseline
    that keeps the memory lines' form (tag and date) without their text. Against the bare
    conversation, a contrast of 1 also amplified the lines' form: a memory-trained adapter copied a
    date into 82% of 50 answers (56% against the form-kept baseline)."""
    if not memory:
        return generate(model, tok, [prompt_for(lines, speaker_tag)] * n, opts, hooks, **kw)
    return generate(model, tok, [prompt_for(memory + lines, speaker_tag)] * n, opts, hooks,
                    contexts=[prompt_for(lines, speaker_tag)] * n,
                    baselines=[prompt_for([mem.form(x) for x in memory] + lines, speaker_tag)] * n, **kw)


def trim(lines: list[str], tok, budget: int, max_lines: int | None = None) -> list[str]:
    """The latest lines (at most max_lines) whose tokens fit the budget: a long chat forgets its
    oldest messages, as training examples hold only the latest few."""
    lines = lines[-max_lines:] if max_lines else lines
    while len(lines) > 1 and len(tok.encode("\n".join(lines))) > budget:
        lines = lines[1:]
    return lines


def parse_prompt(prompt: str) -> list[str]:
    lines = [l.strip() for l in prompt.replace("\\n", "\n").splitlines() if l.strip()]
    for line in lines:
        if not TAG_LINE.match(line):
            raise BadInput(f"--prompt line {line!r} does not start with a speaker tag like [RIYA]")
    return lines


# Steering vectors, as steer.py saves them: tensors v_pos, v_neg (D,) and metadata (strings) naming the
# model and adapter they were made on, the layer they steer (steer_layer) and their setting (alpha_pos,
# alpha_neg). Reading them lives here, in the earlier stage, so that steer.py imports sample.py and
# never the reverse.

def steering_hook(v_pos, v_neg, alpha_pos: float, alpha_neg: float):
    """The hook that steers: adds alpha_pos * v_pos - alpha_neg * v_neg at every position."""
    return add(alpha_pos * v_pos - alpha_neg * v_neg)


def read_steering(path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A steering vector file -> (v_pos, v_neg, metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            v_pos, v_neg = f.get_tensor("v_pos"), f.get_tensor("v_neg")
        meta = {**meta, "steer_layer": int(meta["steer_layer"]), "alpha_pos": float(meta["alpha_pos"]),
                "alpha_neg": float(meta["alpha_neg"])}
    except (SafetensorError, KeyError, ValueError):
        raise BadInput(f"--steer: {path} is not a steering vector file from steer.py") from None
    return v_pos, v_neg, meta


def steering_path(name: str, flag="--steer") -> Path:
    """A vector's name (out/steer/NAME.safetensors) or path -> its file, which must exist."""
    path = Path(name) if name.endswith(".safetensors") or "/" in name else Path(f"out/steer/{name}.safetensors")
    if not path.exists():
        raise BadInput(f"{flag} {name}: no steering vector at {path}; make one with python steer.py search")
    return path


def steering_hooks(spec: str, model, made_on: dict) -> dict:
    """--steer "happy:2,sad:-1" -> hooks {site: fn}. Each vector adds ALPHA * (alpha_pos * v_pos -
    alpha_neg * v_neg) at its layer; vectors that share a site are summed into one hook, because a hooks
    dict holds one function per site. made_on: {"model": ..., "adapter": ...}, what is loaded now; a
    vector made on something else gets a warning (a direction can carry over, but it is not checked)."""
    w = model.embed_tokens.weight
    deltas = {}
    for item in spec.split(","):
        name, _, text = item.strip().rpartition(":")
        try:
            alpha = float(text)
        except ValueError:
            alpha = math.nan
        if not name or not math.isfinite(alpha):
            raise BadInput(f"--steer {item.strip()!r}: expected NAME:ALPHA, e.g. happy:2 (several: happy:2,calm:1)")
        path = steering_path(name)
        v_pos, v_neg, meta = read_steering(path)
        if v_pos.shape != (model.cfg.dim,) or v_neg.shape != (model.cfg.dim,):
            raise BadInput(f"--steer {name}: {path} holds vectors of shape {tuple(v_pos.shape)}, but this "
                           f"model's residual stream has {model.cfg.dim} dimensions")
        if not 0 <= meta["steer_layer"] <= model.cfg.n_layers:
            raise BadInput(f"--steer {name}: {path} steers resid.{meta['steer_layer']}; this model has "
                           f"resid.0 .. resid.{model.cfg.n_layers}")
        made = {"model": meta.get("model", "?"), "adapter": meta.get("adapter", "")}  # "" = no adapter
        where = lambda adapter: Path(adapter).resolve() if adapter else None
        if made["model"] != made_on["model"] or where(made["adapter"]) != where(made_on["adapter"]):
            print(f"warning: --steer {name} was made on {made['model']} with adapter {made['adapter'] or 'none'}; "
                  f"this is {made_on['model']} with adapter {made_on['adapter'] or 'none'}", file=sys.stderr)
        site = f"resid.{meta['steer_layer']}"
        delta = alpha * (meta["alpha_pos"] * v_pos.float() - meta["alpha_neg"] * v_neg.float())
        deltas[site] = deltas.get(site, 0) + delta
    return {site: add(d.to(w.device, w.dtype)) for site, d in deltas.items()}


def loop(model, tok, lines, opts: Options, tags: list[str], hooks=None, fit=None, data="",
         say=functools.partial(print, flush=True)):
    """Both people, opts.loop messages; the model picks who writes next. Simulated chats drift into
    loops: one person talking to themselves (each of their lines makes the next likelier), a message
    repeated verbatim, a training message replayed. We cap runs of one speaker, block n-grams of the
    conversation, penalise its tokens, resample a verbatim repeat at a higher temperature, and report
    how often each happened. fit(lines): (memory lines, chat lines) the model sees (default: no
    memory, what fits its window); data: the training data, to count replays; say(line): where each
    new line goes."""
    fit = fit or (lambda lines: ([], trim(lines, tok, model.cfg.max_seq_len - opts.max_new_tokens)))
    training = set()
    if data and Path(data).exists():
        training = {one_line(m.text).lower() for m in read_export(data)[0]}
    stats = {"messages": 0, "resampled repeats": 0, "verbatim repeats kept": 0, "training replays": 0,
             "forced turn changes": 0}
    for i in range(opts.loop):
        memory, context = fit(lines)
        speaker = next_speaker(model, tok, memory + context, tags, opts.seed + i, hooks=hooks)
        last = [l.split("]")[0] + "]" for l in lines[-opts.max_run :]]
        if len(last) == opts.max_run and set(last) == {speaker}:
            speaker = next(t for t in tags if t != speaker)
            stats["forced turn changes"] += 1
        texts = [l.split("] ", 1)[-1].lower() for l in lines]
        for attempt in range(3):  # a verbatim repeat is resampled, warmer each time, twice at most
            warmer = replace(opts, seed=opts.seed + 1000 * attempt + i, temperature=opts.temperature + 0.3 * attempt)
            reply = reply_to(model, tok, memory, context, speaker, warmer, hooks, no_repeat_ngram=opts.no_repeat_ngram)[0]
            if reply.lower() not in texts:
                break
            stats["verbatim repeats kept" if attempt == 2 else "resampled repeats"] += 1
        stats["training replays"] += reply.lower() in training
        stats["messages"] += 1
        lines.append(f"{speaker} {reply}")
        say(lines[-1])
    words = " ".join(l.split("] ", 1)[-1] for l in lines[-opts.loop :]).split()
    stats["distinct-1"] = round(len(set(words)) / max(1, len(words)), 3)
    stats["distinct-2"] = round(len(set(zip(words, words[1:]))) / max(1, len(words) - 1), 3)
    return stats


@torch.inference_mode()
def next_speaker(model, tok, lines, tags, seed=0, sample=True, hooks=None):
    """Who writes next: each tag's probability after the last line (tags are several tokens)."""
    text = "".join(line + "\n" for line in lines)
    scores = []
    for t in tags:
        context, full = tok.encode(text), tok.encode(text + t)
        logits = model(torch.tensor([full], device=model.embed_tokens.weight.device),
                       hooks=hooks)[0, len(context) - 1 : -1]
        scores.append(logits.float().log_softmax(-1).gather(-1, torch.tensor(full[len(context) :])[:, None].to(logits.device)).sum())
    probs = torch.stack(scores).softmax(0)
    if not sample:
        return tags[int(probs.argmax())]
    return tags[int(torch.multinomial(probs.cpu(), 1, generator=torch.Generator().manual_seed(seed)))]


def remembering(opts: Options, tuned, tok, budget: int, context_messages: int):
    """--memory: (fit, remember). fit(lines) -> (the memory's lines for this context (memory.recall,
    within min(its budget, half the prompt's)), the latest lines that still fit after them);
    remember(line) writes a simulated line's disclosures back to the file, marked simulated."""
    path = Path(opts.memory_file) if opts.memory_file else Path(tuned.adapter or ".") / "memory.jsonl"
    entries = mem.load(path)
    names = {tag(e.speaker): e.speaker for e in entries}  # a tag -> the name the data gives them
    room = min(mem.BUDGET, budget // 2)

    def fit(lines):
        recalled = [mem.render(e) for e in mem.recall(entries, lines, datetime.now(), tok, room)]
        used = len(tok.encode("".join(line + "\n" for line in recalled), start=False)) if recalled else 0
        return recalled, trim(lines, tok, budget - used, context_messages)

    def remember(line):
        speaker_tag, text = TAG_LINE.match(line).group(), line[TAG_LINE.match(line).end() :].strip()
        entries[:] = mem.write_back(entries, names.get(speaker_tag, speaker_tag.strip("[]")), text, datetime.now())
        mem.save(entries, path)

    return fit, remember


def main():
    opts = parse_options(Options)
    if opts.memory_contrast and not opts.memory:
        raise BadInput("--memory-contrast reads the memory: add --memory")
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    hooks = steering_hooks(opts.steer, model, {"model": tuned.base_model, "adapter": tuned.adapter}) \
        if opts.steer else None
    # The model sees what it was trained on: at most the latest context_messages lines, within max_len.
    settings = sft.data_settings(tuned.training, opts)
    budget = min(settings.max_len, model.cfg.max_seq_len) - opts.max_new_tokens
    fit = lambda lines: ([], trim(lines, tok, budget, settings.context_messages))  # (memory lines, chat lines)
    remember = lambda line: None  # --chat and --loop hand each simulated line to it
    if opts.memory:
        fit, remember = remembering(opts, tuned, tok, budget, settings.context_messages)
    speaker = tag(opts.speaker)
    lines = parse_prompt(opts.prompt)
    if opts.loop:
        if not lines:
            raise BadInput("--loop needs an opening --prompt, e.g. --prompt \"[RIYA] hey\"")
        tags = sorted({speaker} | {TAG_LINE.match(l).group() for l in lines})
        if len(tags) != 2:
            raise BadInput(f"--loop plays two people; the prompt and --speaker name {tags}")
        for line in lines:
            print(line)
        stats = loop(model, tok, lines, opts, tags, hooks, fit, settings.data,
                     say=lambda line: (print(line, flush=True), remember(line)))
        print("\nrepetition: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    elif opts.chat:
        me = tag(opts.me)
        print(f"you are {me}, the model is {speaker}; an empty line or Ctrl-D ends the chat", file=sys.stderr)
        for text in sys.stdin:
            if not text.strip():
                break
            lines.append(f"{me} {one_line(text)}")
            reply = reply_to(model, tok, *fit(lines), speaker, opts, hooks, mark_cut=True)[0]
            print(f"{speaker} {reply}", flush=True)
            lines.append(f"{speaker} {reply.removesuffix(CUT)}")
            remember(lines[-1])
    else:
        memory, context = fit(lines)
        replies = reply_to(model, tok, memory, context, speaker, opts, hooks, opts.n, mark_cut=True)
        if opts.compare and not opts.base:
            with lora.disabled(model):  # steered too: the columns differ by the adapter alone
                base_replies = reply_to(model, tok, memory, context, speaker, opts, hooks, opts.n, mark_cut=True)
            width = max(len(r) for r in base_replies)
            print(f"{'base':<{width}} | fine-tuned")
            for b, r in zip(base_replies, replies):
                print(f"{b:<{width}} | {r}")
        else:
            for r in replies:
                print(f"{speaker} {r}")


if __name__ == "__main__":
    exit_on_bad_input(main)
