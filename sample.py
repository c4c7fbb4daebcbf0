"""Talk to the simulation: reply as either person, autocomplete yourself, chat, or let both of them talk.

    python sample.py --speaker FRIEND --prompt "[RIYA] you coming?"     # the friend's reply
    python sample.py --speaker RIYA --prompt "[FRIEND] where are u"     # autocomplete yourself
    python sample.py --speaker FRIEND --prompt "[RIYA] hi" --n 5        # five replies, one batch
    python sample.py --speaker FRIEND --prompt "[RIYA] hi" --compare    # base vs fine-tuned, same seed
    python sample.py --chat --me RIYA --speaker FRIEND                  # you type as Riya
    python sample.py --loop 20 --prompt "[RIYA] hey"                    # both people, 20 messages
    python sample.py --speaker FRIEND --prompt "[RIYA] how was your day?" --steer happy:2   # happier

A prompt is chat lines in the training format ("[TAG] text", one message per line); the reply is the
next message of --speaker, and it ends where that message ends: at the newline that closes a turn.
Uses the adapter sft.py wrote (out/adapter) unless --adapter DIR or --base; the adapter's
adapter_config.json names the model it was trained on. --steer adds steering vectors that steer.py saved
to the residual stream, at every position of the prompt and of every decoded token, in every mode.
"""
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import torch
from safetensors import SafetensorError, safe_open

import lora
from model import BadInput, KVCache, add, exit_on_bad_input, load_model, parse_options
from prep import TAG_LINE, one_line, read_export, tag


@dataclass
class Options:
    speaker: Annotated[str, "who replies: a tag from the data, e.g. FRIEND"] = "FRIEND"
    prompt: Annotated[str, "the conversation so far, '[TAG] text' lines ('\\n' for a line break)"] = ""
    adapter: Annotated[str, "adapter directory from sft.py"] = "out/adapter"
    base: Annotated[bool, "no adapter: the base model alone"] = False
    model: Annotated[str, "base model (default: the one the adapter was trained on)"] = ""
    compare: Annotated[bool, "print base and fine-tuned replies side by side, same seed"] = False
    chat: Annotated[bool, "interactive: you type as --me, the model answers as --speaker"] = False
    me: Annotated[str, "your tag in --chat"] = "RIYA"
    loop: Annotated[int, "let the model play both people for this many messages after --prompt"] = 0
    n: Annotated[int, "replies to sample at once (one batch)"] = 1
    max_new_tokens: Annotated[int, "longest reply, in tokens"] = 60
    temperature: Annotated[float, "0 = greedy"] = 0.8
    top_k: Annotated[int, "keep the k most likely tokens; 0 = all"] = 0
    top_p: Annotated[float, "keep the most likely tokens up to this probability mass"] = 0.95
    min_p: Annotated[float, "drop tokens less likely than min_p times the most likely one"] = 0.0
    repetition_penalty: Annotated[float, "divide the logits of tokens already in the conversation"] = 1.1
    no_repeat_ngram: Annotated[int, "--loop: never repeat an n-gram of the conversation; 0 = off"] = 4
    max_run: Annotated[int, "--loop: after this many messages in a row, the other person writes"] = 4
    data: Annotated[str, "--loop: the training data, to count replayed training messages"] = "data/convos.jsonl"
    seed: Annotated[int, "random seed"] = 0
    steer: Annotated[str, "steering vectors from steer.py, NAME:ALPHA[,NAME:ALPHA...]: NAME is "
                          "out/steer/NAME.safetensors or a path, ALPHA scales its saved setting (1 = as "
                          "found, -1 = the opposite); with --compare, both columns"] = ""


def sampling_logprobs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution we sample from, as log-probs (B, V) with -inf outside it. PPO scores its
    rollouts with this same function: a mismatch would bias its KL estimate."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if min_p:  # https://arxiv.org/abs/2407.01082: a cut relative to the top token's probability
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if top_p < 1.0:  # nucleus sampling (https://arxiv.org/abs/1904.09751): the smallest set with mass >= top_p
        sorted_probs, order = logits.softmax(-1).sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # tokens after the mass is reached
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits.log_softmax(-1)


def penalize(logits, seen, penalty):
    """CTRL's repetition penalty (https://arxiv.org/abs/1909.05858), as transformers applies it: a token
    already seen has its positive logit divided by the penalty, its negative one multiplied."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def banned_ngrams(history: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of history: those that followed its last n-1 tokens before."""
    if n <= 0 or len(history) < n:
        return []
    prefix = history[len(history) - n + 1 :]
    return [history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == prefix]


@torch.inference_mode()
def generate(model, tok, prompts: list[str], opts: Options, hooks=None) -> list[str]:
    """Replies to each prompt (which ends with the speaker's tag), one batch, through the KV cache.
    A reply stops at the newline that ends its message (or at end-of-sequence). The repetition
    penalty and n-gram blocking count the prompt: the conversation so far."""
    device = model.embed_tokens.weight.device
    ids = [tok.encode(p) for p in prompts]
    B, T = len(ids), max(len(i) for i in ids)
    tokens = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(ids):  # left padding: every prompt ends at the same position
        tokens[b, T - len(row) :], mask[b, T - len(row) :] = torch.tensor(row), 1
    V = model.cfg.vocab_size
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    for b, row in enumerate(ids):
        seen[b, row] = True
    generator = torch.Generator(device).manual_seed(opts.seed)
    cache = KVCache(model.cfg, B, T + opts.max_new_tokens, device, model.embed_tokens.weight.dtype)
    last = model(tokens.to(device), mask=mask.to(device), cache=cache, hooks=hooks, unembed=False)[:, -1]
    logits = model.unembed(last)  # (B, V): only the last position's logits are needed
    out, done = [[] for _ in range(B)], [False] * B
    for _ in range(opts.max_new_tokens):
        logits = penalize(logits.float(), seen, opts.repetition_penalty)
        for b in range(B):
            logits[b, banned_ngrams(ids[b] + out[b], opts.no_repeat_ngram)] = float("-inf")
        if opts.temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            logprobs = sampling_logprobs(logits, opts.temperature, opts.top_k, opts.top_p, opts.min_p)
            next_ids = torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]
        for b, t in enumerate(next_ids.tolist()):
            if not done[b]:
                out[b].append(t)
                seen[b, t] = True
                done[b] = t == tok.eos_id or "\n" in tok.decode([t])
        if all(done):
            break
        logits = model(next_ids[:, None], cache=cache, hooks=hooks)[:, -1]
    # Decode prompt and reply together (SentencePiece drops a piece's leading space on its own).
    return [one_line(tok.decode(i + o)[len(tok.decode(i)) :].split("\n")[0]) for i, o in zip(ids, out)]


def prompt_for(lines: list[str], speaker_tag: str) -> str:
    """Chat lines -> the text the model continues: the lines, then the speaker's tag."""
    return "".join(line + "\n" for line in lines) + speaker_tag


def trim(lines: list[str], tok, budget: int) -> list[str]:
    """The latest lines whose tokens fit the budget: a long chat forgets its oldest messages."""
    while len(lines) > 1 and len(tok.encode("\n".join(lines))) > budget:
        lines = lines[1:]
    return lines


def parse_prompt(prompt: str) -> list[str]:
    lines = [l.strip() for l in prompt.replace("\\n", "\n").splitlines() if l.strip()]
    for line in lines:
        if not TAG_LINE.match(line):
            raise BadInput(f"--prompt line {line!r} does not start with a speaker tag like [RIYA]")
    return lines


def load_adapted(adapter, model=""):
    """(model with the adapter, tokenizer, base model name). The base is the one adapter_config.json
    names, unless model overrides it."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise BadInput(f"--adapter {adapter}: no adapter there; train one with sft.py, pass --adapter DIR, "
                       "or use --base for the model without one")
    base = model or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    net, tok = load_model(base)
    lora.load_adapter(net, adapter)
    return net.eval(), tok, base  # eval(): the new adapter modules too (no dropout)


def load(opts: Options):
    """(model with the adapter unless --base, tokenizer, base model name)."""
    if opts.base:
        name = opts.model or "smollm2-135m"
        return *load_model(name), name
    return load_adapted(opts.adapter, opts.model)


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
        path = Path(name) if name.endswith(".safetensors") or "/" in name else Path(f"out/steer/{name}.safetensors")
        if not path.exists():
            raise BadInput(f"--steer {name}: no steering vector at {path}; make one with python steer.py search")
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


def loop(model, tok, lines, opts: Options, tags: list[str], hooks=None):
    """Both people, opts.loop messages; the model picks who writes next. Simulated chats drift into
    loops: one person talking to themselves (each of their lines makes the next likelier), a message
    repeated verbatim, a training message replayed. We cap runs of one speaker, block n-grams of the
    conversation, penalise its tokens, resample a verbatim repeat at a higher temperature, and report
    how often each happened."""
    training = set()
    if Path(opts.data).exists():
        training = {one_line(m.text).lower() for m in read_export(opts.data)[0]}
    stats = {"messages": 0, "resampled repeats": 0, "verbatim repeats kept": 0, "training replays": 0,
             "forced turn changes": 0}
    budget = model.cfg.max_seq_len - opts.max_new_tokens
    for i in range(opts.loop):
        context = trim(lines, tok, budget)
        speaker = next_speaker(model, tok, context, tags, opts.seed + i, hooks=hooks)
        last = [l.split("]")[0] + "]" for l in lines[-opts.max_run :]]
        if len(last) == opts.max_run and set(last) == {speaker}:
            speaker = next(t for t in tags if t != speaker)
            stats["forced turn changes"] += 1
        texts = [l.split("] ", 1)[-1].lower() for l in lines]
        for attempt in range(3):  # a verbatim repeat is resampled, warmer each time, twice at most
            warmer = replace(opts, seed=opts.seed + 1000 * attempt + i, temperature=opts.temperature + 0.3 * attempt)
            reply = generate(model, tok, [prompt_for(context, speaker)], warmer, hooks)[0]
            if reply.lower() not in texts:
                break
            stats["verbatim repeats kept" if attempt == 2 else "resampled repeats"] += 1
        stats["training replays"] += reply.lower() in training
        stats["messages"] += 1
        lines.append(f"{speaker} {reply}")
        print(lines[-1], flush=True)
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


def main():
    opts = parse_options(Options)
    model, tok, name = load(opts)
    hooks = steering_hooks(opts.steer, model, {"model": name, "adapter": "" if opts.base else opts.adapter}) \
        if opts.steer else None
    speaker = tag(opts.speaker)
    lines = parse_prompt(opts.prompt)
    budget = model.cfg.max_seq_len - opts.max_new_tokens
    if opts.loop:
        if not lines:
            raise BadInput("--loop needs an opening --prompt, e.g. --prompt \"[RIYA] hey\"")
        tags = sorted({speaker} | {TAG_LINE.match(l).group() for l in lines})
        if len(tags) != 2:
            raise BadInput(f"--loop plays two people; the prompt and --speaker name {tags}")
        for line in lines:
            print(line)
        stats = loop(model, tok, lines, opts, tags, hooks)
        print("\nrepetition: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    elif opts.chat:
        opts = replace(opts, no_repeat_ngram=0)
        me = tag(opts.me)
        print(f"you are {me}, the model is {speaker}; an empty line or Ctrl-D ends the chat", file=sys.stderr)
        for text in sys.stdin:
            if not text.strip():
                break
            lines.append(f"{me} {one_line(text)}")
            lines = trim(lines, tok, budget)
            reply = generate(model, tok, [prompt_for(lines, speaker)], opts, hooks)[0]
            lines.append(f"{speaker} {reply}")
            print(lines[-1], flush=True)
    else:
        opts = replace(opts, no_repeat_ngram=0)  # n-gram blocking is for --loop
        prompts = [prompt_for(trim(lines, tok, budget), speaker)] * opts.n
        replies = generate(model, tok, prompts, opts, hooks)
        if opts.compare and not opts.base:
            with lora.disabled(model):  # steered too: the columns differ by the adapter alone
                base_replies = generate(model, tok, prompts, opts, hooks)
            width = max(len(r) for r in base_replies)
            print(f"{'base':<{width}} | fine-tuned")
            for b, r in zip(base_replies, replies):
                print(f"{b:<{width}} | {r}")
        else:
            for r in replies:
                print(f"{speaker} {r}")


if __name__ == "__main__":
    exit_on_bad_input(main)
