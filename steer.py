"""Paired activation steering: find a direction in the residual stream that makes the simulated person
happier (or sadder), check that steering along it keeps them coherent, save it for sample.py, and judge
it by whole replies against controls.

    python steer.py search                      # out/adapter; data/steer/happy.json -> out/steer/happy.safetensors
    python steer.py search --base --trials 40   # the model alone, more random settings
    python steer.py eval --name happy           # held-out prompts, vector vs random vs prompting -> out/steer/eval_happy.*
    python steer.py probe --base --layer 12     # a probe's direction -> out/steer/happy_probe.safetensors
    python steer.py learn                       # a push fitted to the model's own replies -> out/steer/happy_learned.safetensors
    python sample.py --speaker FRIEND --prompt "[RIYA] how was your day?" --steer happy:2

search: every statement of the contrast pairs (near-identical, "Today was a good day." / "Today was a
bad day.") runs through the model once, and its stream at every site resid.L is pooled (its last token,
or the mean over its tokens); v_pos(L), v_neg(L) are the means over the positive and over the negative
statements. Steering at layer S adds alpha_pos * v_pos - alpha_neg * v_neg to resid.S at every position
of the prompt and of every decoded token (ActAdd, https://arxiv.org/abs/2308.10248; contrastive
activation addition, https://arxiv.org/abs/2312.06681). A small grid and --trials random settings of
(L, S, pooling, alpha_pos, alpha_neg) are tried on the selection half of the file's prompts (the test
half is eval's) and real contexts from the training sessions, under three bounds against the same model
unsteered: the KL divergence of next-token distributions on neutral chat lines (--max-kl), the
perplexity it gives to steered replies over the one it gives to its own (--max-ppl-ratio), and the cost
to the person, the rise in NLL of the replier's real messages from the training sessions
(--max-nll-rise; the KL on neutral lines did not predict it: eval measured +0.13 nats/token on held-out
messages for a setting at KL 0.06 of the 0.2 allowed). Each drawn setting is first scaled along its own
direction until that rise lies just under its bound, so that directions are compared at equal cost.
Within all three bounds, the few whose sampled replies (2 per prompt) VADER finds happiest are scored
again with 8 replies per prompt (--rescore, --replies), and the happiest by that is saved to
out/steer/NAME.safetensors (tensors v_pos, v_neg; metadata: model, adapter, layers, pooling, alphas,
scores on both halves) and a few of its replies are printed next to unsteered ones. (The first-token
concept score, log p(a positive concept word opens the reply) - log p(a negative one), is still
reported.)

eval: whole sampled replies to the test prompts and real held-out contexts, at several alphas, for the
saved vector, a random direction of the same norm at the same layer, and the replier's own upbeat (or
downbeat) lines placed before the prompt; judged by VADER and by the unsteered model, each checked
against rated messages; with the cost to the person (held-out NLL), perplexity, distinct-2, empties;
and the reference all of them are read against, the ideal tilt of the unsteered replies toward VADER
(to first order, what the cheapest possible "happier" would cost the person).

learn: a push at one site fitted by Adam to raise the VADER of the model's own replies at training
contexts (estimated from unsteered replies by importance weights), with the first-order cost to the
person projected out, scaled to the cost bound and saved in the same format.

probe: a logistic-regression probe on rated messages (rating 1-5 -> soft label (rating - 1) / 4) reads
resid.L; its weight vector is the direction, saved in the same format to steer at resid.L.

Shapes: N texts, L sites (resid.0 .. resid.n_layers), B batch, T time, D model dim, V vocab, P positions.
"""
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import cli
import eval as ev
import sample
import sft
from cli import POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import add, capture, continuation_logprobs, cpu_bf16, pad, scored_logprobs
from prep import TAG_LINE, build_examples, load_pair

COMMANDS = ("search", "probe", "eval", "learn")


@dataclass
class Options:
    pairs: Annotated[str, "contrast pairs, concept words, evaluation prompts and neutral lines (JSON; "
                          "probe: its prompts and lines score the probe's direction)"] = "data/steer/happy.json"
    labels: Annotated[str, "probe: rated messages, JSONL lines {\"text\": ..., \"rating\": 1-5}"] = \
        "data/steer/happy_ratings.jsonl"
    adapter: Annotated[str, "adapter directory from sft.py"] = sft.ADAPTER
    base: Annotated[bool, "no adapter: the base model alone"] = False
    allow_other_base: Annotated[bool, "load the adapter even onto a base model other than the one it was "
                                      "trained on"] = False
    model: Annotated[str, f"base model (default: the adapter's; with --base, {sft.Options.model})"] = ""
    trials: Annotated[int, "search: random settings tried after the grid", Range(0)] = 16
    rescore: Annotated[int, "search: the best N settings of the screen (2 replies per prompt) are scored again "
                            "with --replies per prompt, and that chooses; 0 = the screen chooses", Range(0)] = 5
    max_distance: Annotated[int, "search: the steering layer lies at most this many layers from the "
                                 "extraction layer", Range(0)] = 4
    max_kl: Annotated[float, "coherence bound: mean KL(unsteered || steered) per token on the neutral "
                             "lines, in nats", POSITIVE] = 0.2
    max_ppl_ratio: Annotated[float, "coherence bound: perplexity of steered replies under the unsteered "
                                    "model, over that of unsteered replies", POSITIVE] = 2.0
    max_nll_rise: Annotated[float, "bound on the cost to the person: the rise in mean NLL per token of real "
                                   "messages of the replier from the training sessions (eval measures held-out "
                                   "ones), in nats; the search scales each setting to just under it", POSITIVE] = 0.03
    cost_messages: Annotated[int, "search, probe, learn: training-session messages of the replier for that bound",
                             Range(1)] = 48
    sample_tokens: Annotated[int, "longest reply sampled for the perplexity check, in tokens", Range(1)] = 20
    layer: Annotated[int, "probe: the site resid.L it reads and steers, -1 = the middle layer; learn: the site it "
                          "steers, -1 = two thirds of the depth", Range(-1)] = -1
    l2: Annotated[float, "probe: L2 penalty on its weights", Range(0)] = 1e-2
    strength: Annotated[float, "probe: how hard its saved setting pushes, as a fraction of the stream's "
                               "norm at --layer", POSITIVE] = 0.2
    name: Annotated[str, "the vector's name, out/steer/NAME.safetensors (default: the concept; probe: "
                         "CONCEPT_probe; eval: the vector to judge, a name or a path)"] = ""
    alphas: Annotated[str, "eval: multiples of the saved setting to try, comma-separated"] = "-2,-1,-0.5,0,0.5,1,2"
    replies: Annotated[int, "eval: sampled replies per prompt and condition (the same seeds in each); search: "
                            "per prompt for the re-score", Range(1)] = 8
    contexts: Annotated[int, "real contexts of the replier added to the prompts: search, from training sessions "
                             "to the selection half; eval, from held-out sessions to the test half", Range(0)] = 16
    held_out: Annotated[int, "eval: real held-out messages of the replier whose NLL measures the cost", Range(1)] = 64
    tilt_samples: Annotated[int, "eval: unsteered replies per test prompt and per held-out context for the ideal "
                                 "tilt, the reference every condition is read against; 0 = none", Range(0)] = 16
    bootstrap: Annotated[int, "eval: bootstrap resamples for each interval", Range(100)] = 2000
    learn_contexts: Annotated[int, "learn: real contexts from the training sessions whose replies it learns from",
                              Range(1)] = 128
    learn_replies: Annotated[int, "learn: unsteered replies sampled per context", Range(2)] = 16
    learn_steps: Annotated[int, "learn: Adam steps, 4 contexts each", Range(1)] = 64
    lr: Annotated[float, "learn: Adam's learning rate for the push", POSITIVE] = 0.1
    seed: Annotated[int, "seed for the random settings, the sampled replies and the probe's split"] = 0


# ---------------------------------------------------------------------------------------------------
# Inputs: the pairs file and the ratings file, checked, so that a mistake is one sentence, not a traceback.

def strings(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(s, str) and s.strip() for s in x)


def read_pairs(path) -> dict:
    """The pairs file (data/steer/happy.json shows every part), checked."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"--pairs {path}: no such file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"--pairs {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    ok = (isinstance(d, dict) and isinstance(d.get("concept"), str) and strings(d.get("prompts"))
          and strings(d.get("neutral")) and isinstance(d.get("pairs"), list) and len(d["pairs"]) > 0
          and all(isinstance(p, list) and len(p) == 2 and strings(p) for p in d["pairs"])
          and isinstance(d.get("concept_words"), dict)
          and all(strings(d["concept_words"].get(k)) for k in ("positive", "negative")))
    if not ok:
        raise BadInput(f"--pairs {path}: expected {{\"concept\": name, \"pairs\": [[positive, negative], ...], "
                       "\"concept_words\": {\"positive\": [...], \"negative\": [...]}, \"prompts\": [...], "
                       "\"neutral\": [...]}, every list non-empty")
    for p in d["prompts"]:  # the concept score reads the reply's first token: right after the tag
        if not TAG_LINE.fullmatch(p.splitlines()[-1].strip()):
            raise BadInput(f"--pairs {path}: prompt {p!r} does not end with the replier's tag on its own line, "
                           "e.g. \"[RIYA] how was your day?\\n[FRIEND]\"")
    return d


def read_ratings(path) -> tuple[list[str], torch.Tensor]:
    """The probe's labelled messages: (texts, ratings (N,))."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"--labels {path}: no such file")
    texts, ratings = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, rating = row["text"], float(row["rating"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise BadInput(f"--labels {path} line {i}: expected {{\"text\": ..., \"rating\": 1-5}}") from None
        if not (isinstance(text, str) and text.strip() and 1 <= rating <= 5):
            raise BadInput(f"--labels {path} line {i}: expected a non-empty text and a rating from 1 to 5")
        texts.append(text)
        ratings.append(rating)
    if not (any(r >= 4 for r in ratings) and any(r <= 2 for r in ratings)):
        raise BadInput(f"--labels {path}: needs messages rated 4-5 and messages rated 1-2")
    return texts, torch.tensor(ratings)


# ---------------------------------------------------------------------------------------------------
# Reading the stream: every site from one forward.

@torch.inference_mode()
def pooled_streams(model, tok, texts, batch_size=32) -> dict:
    """texts -> {"last": (L, N, D), "mean": (L, N, D), "norm": (L, N)}: at every site resid.0 ..
    resid.n_layers, each text's stream at its last token, its mean over its tokens, and its mean norm.
    Means leave out the first token and padding. The first token is an attention sink whose stream
    is ~100x the others' norm in the middle layers (SmolLM2 at resid.10: 23,900 against 130), so it
    would swamp a mean, and it is the same for every text: it says nothing about the concept."""
    device = model.embed_tokens.weight.device
    sites = [f"resid.{i}" for i in range(model.cfg.n_layers + 1)]
    out = {"last": [], "mean": [], "norm": []}
    for j in range(0, len(texts), batch_size):
        tokens, mask = pad([tok.encode(t) for t in texts[j : j + batch_size]], left=True, device=device)
        acts = {}
        model(tokens, mask=mask, hooks=capture(acts, *sites), unembed=False)
        x = torch.stack([acts[s] for s in sites]).float()  # (L, B, T, D)
        inner = (mask.bool() & (mask.cumsum(-1) > 1)).float()  # (B, T) real tokens but the first
        count = inner.sum(-1).clamp(min=1)  # (B,)
        out["last"].append(x[:, :, -1])  # left padding: the last real token is the last position
        out["mean"].append((x * inner[None, :, :, None]).sum(2) / count[None, :, None])
        out["norm"].append((x.norm(dim=-1) * inner).sum(-1) / count)
    return {k: torch.cat(v, dim=1) for k, v in out.items()}


def contrast_vectors(model, tok, pairs) -> dict:
    """[[positive, negative], ...] -> {pooling: (v_pos, v_neg)}, each (L, D): the mean pooled stream of
    the positive and of the negative statements at every site."""
    pos = pooled_streams(model, tok, [p for p, _ in pairs])
    neg = pooled_streams(model, tok, [n for _, n in pairs])
    return {k: (pos[k].mean(1), neg[k].mean(1)) for k in ("last", "mean")}


# ---------------------------------------------------------------------------------------------------
# Scores: the concept, and coherence against the unsteered model.

def word_ids(tok, words) -> list[int]:
    # The reply's first token: the format writes "[FRIEND] great", so a word is scored with its leading
    # space. A word of several tokens counts by its first.
    return sorted({tok.encode(" " + w, start=False)[0] for w in words})


def concept_words(tok, data) -> tuple[list[int], list[int]]:
    pos, neg = (word_ids(tok, data["concept_words"][k]) for k in ("positive", "negative"))
    both = set(pos) & set(neg)  # a first token on both sides would cancel itself out
    pos, neg = [t for t in pos if t not in both], [t for t in neg if t not in both]
    if not pos or not neg:
        raise BadInput("--pairs: the positive and negative concept words need first tokens of their own")
    return pos, neg


@torch.inference_mode()
def concept_score(model, tok, prompts, words, hooks=None) -> float:
    """Mean over prompts of log sum p(positive words) - log sum p(negative words) as the reply's first
    token. words: (positive token ids, negative token ids)."""
    tokens, mask = pad([tok.encode(p) for p in prompts], left=True, device=model.embed_tokens.weight.device)
    last = model(tokens, mask=mask, hooks=hooks, unembed=False)[:, -1]  # (B, D)
    logp = model.unembed(last).float().log_softmax(-1)  # (B, V)
    pos, neg = words
    return (logp[:, pos].logsumexp(-1) - logp[:, neg].logsumexp(-1)).mean().item()


@torch.inference_mode()
def next_token_logprobs(model, tok, texts, hooks=None):
    """The next-token distributions at every real position of the texts, as log-probs (P, V)."""
    tokens, mask = pad([tok.encode(t) for t in texts], left=True, device=model.embed_tokens.weight.device)
    h = model(tokens, mask=mask, hooks=hooks, unembed=False)[mask.bool()]  # (P, D)
    return model.unembed(h).float().log_softmax(-1)


def kl_divergence(reference, steered) -> float:
    # KL(unsteered || steered), mean per position: how much worse the steered model predicts text the
    # unsteered one finds ordinary. Zero when steering changes nothing.
    return (reference.exp() * (reference - steered)).sum(-1).mean().item()


@torch.inference_mode()
def perplexity(model, tok, prompts, replies, chunk=32) -> float:
    """exp(mean NLL per token) of the replies after their prompts under model as it is (no hooks).
    The tokens are those of one forward over prompt + reply: the prompt encoded as a document, the
    reply as its continuation. eval asks for 8 short replies to each long prompt, so each distinct
    prompt in a chunk runs once and its replies share it (model.continuation_logprobs)."""
    rows = [(tok.encode(p), tok.encode(" " + r, start=False)) for p, r in zip(prompts, replies) if r]
    if not rows:
        return float("inf")  # nothing but empty replies is no sign of coherence
    nll = 0.0
    for j in range(0, len(rows), chunk):
        prompt_ids, reply_ids = zip(*rows[j : j + chunk])
        nll -= continuation_logprobs(model, prompt_ids, reply_ids).sum().item()
    return math.exp(nll / sum(len(r) for _, r in rows))


def sampling(opts: Options):
    # sample.py's default sampling (its reply mode), seeded and short: what a user of --steer sees.
    return sample.Options(max_new_tokens=opts.sample_tokens, seed=opts.seed)


SEARCH_REPLIES = 2  # sampled replies per prompt for a setting's whole-reply score and perplexity


def replies_to(model, tok, prompts, opts: Options, hooks=None, n=SEARCH_REPLIES) -> tuple[list[str], list[str]]:
    """(each prompt n times, a sampled reply to each), the same seed for every setting."""
    repeated = [p for p in prompts for _ in range(n)]
    return repeated, sample.generate(model, tok, repeated, sampling(opts), hooks=hooks)


def unsteered(model, tok, data, opts: Options) -> dict:
    """What every setting is measured against: the concept words, the unsteered model's concept score,
    next-token distributions on the neutral lines, and the perplexity and VADER score of its own
    sampled replies."""
    asked, replies = replies_to(model, tok, data["prompts"], opts)
    words = concept_words(tok, data)
    return {"words": words, "concept": concept_score(model, tok, data["prompts"], words),
            "neutral": next_token_logprobs(model, tok, data["neutral"]),
            "ppl": perplexity(model, tok, asked, replies), "reply_score": vader(replies).mean().item(),
            "nll": held_out_nll(model, tok, data["cost"])}


def score(model, tok, data, ref: dict, hooks, opts: Options, nll_rise=None) -> dict:
    """One steering setting (as hooks): its first-token concept score, KL, and, when the KL is within
    its bound, the whole-reply score (VADER over sampled replies) and perplexity ratio, and when that
    too is within bounds, the rise in NLL of the replier's real messages (data["cost"]; nll_rise: that
    rise, already measured); whether all three bounds hold. Each later measure runs only when the
    earlier bounds hold: a setting already out costs no more time."""
    concept = concept_score(model, tok, data["prompts"], ref["words"], hooks)
    kl = kl_divergence(ref["neutral"], next_token_logprobs(model, tok, data["neutral"], hooks))
    ratio = reply_score = None
    if kl <= opts.max_kl:
        asked, replies = replies_to(model, tok, data["prompts"], opts, hooks)
        ratio = perplexity(model, tok, asked, replies) / ref["ppl"]
        reply_score = vader(replies).mean().item()
    if ratio is not None and ratio <= opts.max_ppl_ratio and nll_rise is None:
        nll_rise = held_out_nll(model, tok, data["cost"], hooks) - ref["nll"]
    ok = ratio is not None and ratio <= opts.max_ppl_ratio and nll_rise <= opts.max_nll_rise  # ratio: the KL held
    return {"concept": concept, "reply_score": reply_score, "kl": kl, "ppl_ratio": ratio, "nll_rise": nll_rise, "ok": ok}


# ---------------------------------------------------------------------------------------------------
# The search.
#
# How hard a setting pushes, whatever the layer: the stream's norm grows ~20x with depth (SmolLM2: 44 at
# resid.1, 680 at resid.29) and the vectors with it, so one raw alpha means something else at every
# layer. Write the push as
#     alpha_pos v_pos - alpha_neg v_neg = a (v_pos - v_neg) + (alpha_pos - alpha_neg) m,
# a = (alpha_pos + alpha_neg) / 2, m = (v_pos + v_neg) / 2 the statements' common mean, and choose the
# alphas so that each part's norm is a fraction of the stream's mean norm at the steering layer: r along
# the contrast, t along the common direction. Equal alphas (t = 0) give the classic contrastive vector.
# Unequal ones also move the stream along m, which is ~10x longer than v_pos - v_neg (SmolLM2, mean
# pooling, resid.10: 112 against 9.8), so a small difference in the alphas is already a large push: that
# is what the coherence bounds police. On SmolLM2 (mean pooling, layers 10 and 20) the KL on the neutral
# lines stays under 0.2 nats up to r ~ 0.2, reaches 0.5 near r = 0.4 and 2.5-5 at r = 1, while the
# concept score levels off above r ~ 0.3; so the search draws r from 0.05 to 0.35 and |t| up to 0.15,
# and then scales both to the cost bound (to_the_bound, below): what it draws is a direction, t / r, and
# a first guess at the strength.
#
# The bounds' defaults: a setting is saved as ALPHA 1 of a knob (sample.py --steer happy:2 is twice it).
# On SmolLM2 twice a setting at KL 0.5 was word salad, while twice one at KL 0.2 still read as chat
# (KL ~0.5-0.7), hence --max-kl 0.2. The unsteered model's own replies vary in perplexity by up to 1.6x
# from one seed to another (8.4 to 13.7 over seeds 0-3), so --max-ppl-ratio 2 sits just above that noise.

@dataclass(frozen=True)
class Setting:
    extract: int  # the site resid.L the vectors are read at
    steer: int  # the site resid.S they are added at
    pooling: str  # "last" token or "mean" over tokens
    r: float  # push along v_pos - v_neg, as a fraction of the stream's mean norm at resid.S
    t: float  # push along (v_pos + v_neg) / 2, likewise

    def times(self, f: float) -> "Setting":
        """The same direction, f times as hard."""
        return Setting(self.extract, self.steer, self.pooling, self.r * f, self.t * f)


def alphas(s: Setting, vectors: dict, norms) -> tuple[float, float]:
    """(alpha_pos, alpha_neg) of a setting. vectors: {pooling: (v_pos, v_neg) (L, D)}; norms (L,)."""
    v_pos, v_neg = (v[s.extract] for v in vectors[s.pooling])
    a = s.r * norms[s.steer] / (v_pos - v_neg).norm()
    gap = s.t * norms[s.steer] / ((v_pos + v_neg) / 2).norm()
    return (a + gap / 2).item(), (a - gap / 2).item()


def settings(n_layers: int, trials: int, max_distance: int, seed: int) -> list[Setting]:
    """A small grid (the contrastive vector read and added at a third, half and two thirds of the depth),
    then `trials` random settings. Sites resid.1 .. resid.{n_layers - 1} only:
    resid.0 is the token embedding and resid.{n_layers} goes straight to the unembedding (a bias on the
    logits), whereas a push between blocks leaves later blocks to turn it into what is said."""
    middle = sorted({n_layers // 3, n_layers // 2, 2 * n_layers // 3} - {0})
    grid = [Setting(L, L, "mean", 0.1, 0.0) for L in middle]  # one strength: to_the_bound scales it
    rng = random.Random(seed)
    for _ in range(trials):
        L = rng.randint(1, n_layers - 1)
        S = rng.randint(max(1, L - max_distance), min(n_layers - 1, L + max_distance))
        grid.append(Setting(L, S, rng.choice(("mean", "last")), round(rng.uniform(0.05, 0.35), 2),
                            round(rng.uniform(-0.15, 0.15), 2)))
    return grid


# Every direction is compared at the same cost. The rise in the replier's NLL grows faster than the push
# (SmolLM2, eval's held-out messages: alpha 0.5 -> 1 raised it 0.036 -> 0.131 at resid.20 and 0.018 ->
# 0.053 at resid.26; the search's training messages: r 0.1 -> 0.062 at resid.20, 0.071 -> 0.036, about
# r^1.5), the whole-reply score about linearly. So ranking settings at the strength they were drawn at
# ranks pushes, not directions: it chose a weak direction that happened to be drawn gently (resid.26:
# VADER +0.106 for +0.053 nats) over a better one drawn too hard (resid.20 at half its drawn strength:
# +0.150 for +0.036). Each drawn setting is therefore measured, scaled along its own direction to
# AIM * bound by the power law rise ~ r^k (k = 1.5 at first, then fitted to the last two measures), and
# measured again, at most twice, until its rise lies within [AIM^2 * bound, bound]; then the other
# bounds and the score are read at that strength.
AIM = 0.9  # aim a little under the bound: the power law is only roughly so
FIRST_POWER = 1.5
MAX_SCALE = 3.0  # a direction that costs nearly nothing is pushed at most 3x per step, not to infinity


def to_the_bound(s, rise_of, bound: float, measures: int = 3) -> tuple:
    """s (a Setting, or anything with a strength .r and .times(f)) scaled along its direction until
    rise_of(s), its NLL rise, lies just under bound: (the last one measured, its rise, [[r, rise], ...]
    for every measure), after at most `measures` measures."""
    rise = rise_of(s)
    tried = [[s.r, rise]]
    for _ in range(measures - 1):
        if AIM ** 2 * bound <= rise <= bound:
            break
        k = FIRST_POWER
        if len(tried) > 1 and min(tried[-1][1], tried[-2][1]) > 0 and tried[-1][0] != tried[-2][0]:
            (r0, c0), (r1, c1) = tried[-2:]
            k = min(3.0, max(1.0, math.log(c1 / c0) / math.log(r1 / r0)))  # the law as measured here
        f = min(MAX_SCALE, (AIM * bound / rise) ** (1 / k)) if rise > 0 else MAX_SCALE
        s = s.times(f)
        rise = rise_of(s)
        tried.append([s.r, rise])
    return s, rise, tried


# Choosing among the candidates within the bounds. Scaled to equal cost, their screen scores (VADER
# of 2 replies per prompt, 48 replies) differ by about their standard error (~0.05; VADER's standard
# deviation over sampled replies is 0.37), so the top of the screen is partly luck: on the shipped
# data the screen's best, +0.108 over unsteered, re-scored at -0.005 with 8 replies per prompt, while
# its fourth, resid.20, re-scored at +0.103. So the best few are re-scored with --replies per prompt
# (a standard error near 0.025) and the re-score chooses; the screen only decides which few.

def choose(accepted: list[dict], rescore, k: int) -> dict:
    """The row to save: of the k rows with the best screen score ("reply_score"), the one whose
    rescore(row) is highest, stored in each as "rescored"; k = 0: the screen's best."""
    top = sorted(accepted, key=lambda r: -r["reply_score"])[: max(k, 1)]
    if not k:
        return top[0]
    for r in top:
        r["rescored"] = rescore(r)
    return max(top, key=lambda r: r["rescored"])


def replies_side_by_side(model, tok, prompts, conditions: dict, opts: Options, n=2) -> dict:
    """{label: hooks} -> {label: n replies per prompt}, every condition with the same seed."""
    repeated = [p for p in prompts for _ in range(n)]
    return {label: sample.generate(model, tok, repeated, sample.Options(seed=opts.seed), hooks=hooks)
            for label, hooks in conditions.items()}


def save_vector(path: Path, v_pos, v_neg, meta: dict):
    """v_pos, v_neg (D,) and the metadata (as strings: all safetensors metadata holds), atomically, in
    the format sample.read_steering reads."""
    tensors = {"v_pos": v_pos.float().contiguous().cpu(), "v_neg": v_neg.float().contiguous().cpu()}
    cli.write_atomically(path, lambda p: save_file(tensors, p, {k: str(v) for k, v in meta.items()}))


def search(opts: Options) -> dict:
    """Every setting's scores, the best one within the bounds (None if none is), saved, and replies
    with it, without it and with the opposite."""
    t0 = time.time()
    data = read_pairs(opts.pairs)
    selection, test = split_prompts(data["prompts"], opts.seed)
    data = {**data, "prompts": selection}  # the test half is eval's alone
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok, name, adapter = tuned.model, tuned.tok, tuned.base_model, tuned.adapter
    # The replier's training-session messages: every other one's reply for the cost bound, and real
    # contexts from the rest beside the file's prompts (eval likewise adds held-out ones to its half).
    speaker = replier(selection)
    theirs = replier_examples(tuned, speaker, False, opts)
    data["cost"] = spread(theirs[0::2], opts.cost_messages)
    data["prompts"] = selection + [e.text[: e.cut] for e in spread([e for e in theirs[1::2] if e.text[: e.cut] != speaker],
                                                                   opts.contexts)]
    vectors = contrast_vectors(model, tok, data["pairs"])
    norms = pooled_streams(model, tok, selection)["norm"].mean(1)  # (L,): the stream's mean norm
    ref = unsteered(model, tok, data, opts)

    def hooks_of(s: Setting) -> dict:
        v_pos, v_neg = (v[s.extract] for v in vectors[s.pooling])
        return {f"resid.{s.steer}": sample.steering_hook(v_pos, v_neg, *alphas(s, vectors, norms))}

    rise_of = lambda s: held_out_nll(model, tok, data["cost"], hooks_of(s)) - ref["nll"]
    rows = []
    for s in cli.progress(settings(model.cfg.n_layers, opts.trials, opts.max_distance, opts.seed), desc="search",
                          unit="setting"):
        s, rise, tried = to_the_bound(s, rise_of, opts.max_nll_rise)
        alpha_pos, alpha_neg = alphas(s, vectors, norms)
        rows.append({**asdict(s), "alpha_pos": alpha_pos, "alpha_neg": alpha_neg, "tried": tried,
                     **score(model, tok, data, ref, hooks_of(s), opts, nll_rise=rise)})
    accepted = [r for r in rows if r["ok"]]
    result = {"concept": data["concept"], "model": name, "adapter": adapter,
              "unsteered": {"concept": ref["concept"], "ppl": ref["ppl"], "reply_score": ref["reply_score"]},
              "rows": rows, "best": None}
    if accepted:
        # The screen's scores (SEARCH_REPLIES per prompt) rank the candidates; the best few are scored
        # again with --replies per prompt, and that score chooses (see choose).
        rescore = lambda hooks: vader(replies_to(model, tok, data["prompts"], opts, hooks, n=opts.replies)[1]).mean().item()
        result["unsteered"]["rescored_reply_score"] = rescore(None) if opts.rescore else None
        setting_of = lambda row: Setting(*(row[k] for k in ("extract", "steer", "pooling", "r", "t")))
        best = result["best"] = choose(accepted, lambda row: rescore(hooks_of(setting_of(row))), opts.rescore)
        v_pos, v_neg = (v[best["extract"]] for v in vectors[best["pooling"]])
        hooks = hooks_of(setting_of(best))
        on_test = lambda h: vader(replies_to(model, tok, test, opts, h)[1]).mean().item()  # recorded, never chosen on
        result["test"] = {"reply_score": on_test(hooks), "unsteered_reply_score": on_test(None)}
        path = result["path"] = Path("out/steer") / f"{opts.name or data['concept']}.safetensors"
        save_vector(path, v_pos, v_neg, {
            "kind": "pairs", "concept": data["concept"], "source": opts.pairs, "model": name, "adapter": adapter,
            "extract_layer": best["extract"], "steer_layer": best["steer"], "pooling": best["pooling"],
            "alpha_pos": best["alpha_pos"], "alpha_neg": best["alpha_neg"], "r": best["r"], "t": best["t"],
            "concept_score": best["concept"], "unsteered_concept_score": ref["concept"], "kl": best["kl"],
            "selection_reply_score": best["reply_score"], "unsteered_selection_reply_score": ref["reply_score"],
            "rescored_reply_score": best.get("rescored"), "replies_rescored": opts.replies if opts.rescore else 0,
            "unsteered_rescored_reply_score": result["unsteered"]["rescored_reply_score"],
            "test_reply_score": result["test"]["reply_score"],
            "unsteered_test_reply_score": result["test"]["unsteered_reply_score"],
            "ppl_ratio": best["ppl_ratio"], "nll_rise": best["nll_rise"], "max_kl": opts.max_kl,
            "max_ppl_ratio": opts.max_ppl_ratio, "max_nll_rise": opts.max_nll_rise})
        site, a_pos, a_neg = f"resid.{best['steer']}", best["alpha_pos"], best["alpha_neg"]
        label = path.stem
        result["samples"] = replies_side_by_side(model, tok, data["prompts"][:3], {
            "unsteered": None, f"{label}:1": {site: sample.steering_hook(v_pos, v_neg, a_pos, a_neg)},
            f"{label}:-1": {site: sample.steering_hook(v_pos, v_neg, -a_pos, -a_neg)}}, opts)
        result["sample_prompts"] = data["prompts"][:3]
    result["seconds"] = time.time() - t0
    return result


def markdown(result: dict) -> str:
    u = result["unsteered"]
    out = [f"Concept {result['concept']!r} on {result['model']}, adapter {result['adapter'] or 'none'}, on the "
           f"selection half of the prompts and real contexts from training sessions. Unsteered: reply score (VADER) {u['reply_score']:.3f}, first-token "
           f"concept score {u['concept']:.2f}, perplexity of its replies {u['ppl']:.2f}. r, t: the push along "
           "v_pos - v_neg and along their mean, as fractions of the stream's norm, after scaling to the NLL bound "
           "(scaled: r -> NLL rise at each measure); re-scored: VADER of --replies replies per prompt, for the "
           "screen's best few, which chooses. Best reply score within the bounds first; '-' = not measured "
           "(an earlier bound already rules it out).", "",
           "| extract | steer | pooling | r | t | alpha_pos | alpha_neg | reply score | re-scored | concept | KL | ppl ratio | NLL rise | scaled | ok |",
           "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    key = lambda r: (not r["ok"], -(r["reply_score"] if r["reply_score"] is not None else -math.inf), -r["concept"])
    for r in sorted(result["rows"], key=key):
        ratio = "-" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.2f}"
        reply = "-" if r["reply_score"] is None else f"{r['reply_score']:.3f}"
        rise = "-" if r.get("nll_rise") is None else f"{r['nll_rise']:+.3f}"
        scaled = " -> ".join(f"{x:.3f}: {y:+.3f}" for x, y in r.get("tried", []))
        again = f"{r['rescored']:.3f}" if "rescored" in r else "-"
        out.append(f"| {r['extract']} | {r['steer']} | {r['pooling']} | {r['r']:.3f} | {r['t']:+.3f} | "
                   f"{r['alpha_pos']:.3f} | {r['alpha_neg']:.3f} | {reply} | {again} | {r['concept']:.2f} | {r['kl']:.3f} | {ratio} | {rise} | "
                   f"{scaled} | {'yes' if r['ok'] else 'no'} |")
    return "\n".join(out)


def print_samples(prompts, samples: dict):
    n = len(next(iter(samples.values()))) // len(prompts)
    width = max(len(label) for label in samples)
    for i, prompt in enumerate(prompts):
        print("\n" + prompt)
        for label, replies in samples.items():
            for reply in replies[i * n : (i + 1) * n]:
                print(f"  {label:<{width}} | {reply}")


# ---------------------------------------------------------------------------------------------------
# Judging whole replies: VADER, and the unsteered model asked.

def split_prompts(prompts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """The pairs file's prompts in two disjoint halves, seeded: (selection, the search chooses on it;
    test, only eval reads it)."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    half = (len(prompts) + 1) // 2
    return [prompts[i] for i in sorted(order[:half])], [prompts[i] for i in sorted(order[half:])]


# VADER (Hutto & Gilbert 2014), a sentiment lexicon with rules for negation, intensifiers, capitals,
# "!!!" and emoticons, built for social-media text: what a chat reply is. Its compound score lies in
# [-1, 1]; >= 0.05 is its authors' threshold for positive.
VADER = SentimentIntensityAnalyzer()
POSITIVE_AT = 0.05


def vader(texts: list[str]) -> torch.Tensor:
    """(N,) VADER's compound score of each text; an empty reply scores 0 (neutral)."""
    return torch.tensor([VADER.polarity_scores(t)["compound"] for t in texts])


JUDGE = 'Message: "{text}"\nQuestion: is the person who wrote this happy or sad?\nAnswer:'


@torch.inference_mode()
def judge_scores(model, tok, texts: list[str], batch_size=32) -> torch.Tensor:
    """(N,) log p(" happy") - log p(" sad") as the model's answer about each text (call it unsteered)."""
    happy, sad = (tok.encode(w, start=False)[0] for w in (" happy", " sad"))
    out = []
    for j in range(0, len(texts), batch_size):
        tokens, mask = pad([tok.encode(JUDGE.format(text=t)) for t in texts[j : j + batch_size]], left=True,
                           device=model.embed_tokens.weight.device)
        logp = model.unembed(model(tokens, mask=mask, unembed=False)[:, -1]).float().log_softmax(-1)  # (B, V)
        out.append((logp[:, happy] - logp[:, sad]).cpu())
    return torch.cat(out)


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's of the ranks, ties given their mean rank."""
    def ranks(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():  # ties: the mean of their ranks
            r[x == v] = r[x == v].mean()
        return r
    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


# ---------------------------------------------------------------------------------------------------
# eval: the saved vector against a random direction and a prompt, on prompts the search never saw.

def replier(prompts: list[str]) -> str:
    """The tag every prompt ends with: whose reply is steered."""
    return prompts[0].splitlines()[-1].strip()


def spread(xs: list, n: int) -> list:
    """n items spread evenly over xs (all of them if fewer)."""
    return xs[:: max(1, len(xs) // n)][:n]


def replier_examples(tuned, speaker: str, held_out: bool, opts: Options) -> list:
    """The examples (prep.build_examples, with the adapter's data settings) whose reply is speaker's:
    from the held-out sessions (eval's cost) or the training ones (the search's bound, so that eval's
    cost is measured on messages the search never saw)."""
    settings = sft.data_settings(tuned.training, type("Flags", (), {})())
    messages, _ = load_pair(settings.data)
    split = build_examples(messages, tuned.tok, settings.context_messages, settings.session_gap_hours,
                           settings.val_frac, settings.max_len)[1 if held_out else 0]
    theirs = [e for e in split if e.text[: e.cut].endswith("\n" + speaker) or e.text[: e.cut] == speaker]
    if not theirs:
        raise BadInput(f"--pairs {opts.pairs}: its prompts' replier {speaker} never writes in the "
                       f"{'held-out' if held_out else 'training'} sessions of {settings.data}")
    return theirs


def eval_prompts(data, tuned, opts: Options) -> tuple[list[str], str, list]:
    """(the test prompts: the pairs file's test half and real contexts from held-out sessions, each
    ending in the replier's tag; that tag; held-out examples of the replier, whose NLL is the cost)."""
    _, test = split_prompts(data["prompts"], opts.seed)
    speaker = replier(test)
    theirs = replier_examples(tuned, speaker, True, opts)
    contexts = [e.text[: e.cut] for e in spread([e for e in theirs if e.text[: e.cut] != speaker], opts.contexts)]
    return test + contexts, speaker, spread(theirs, opts.held_out)


def with_line(prompt: str, line: str) -> str:
    """The prompt with one more chat line just before the replier's tag."""
    head, _, tag_line = prompt.rpartition("\n")
    return f"{head}\n{line}\n{tag_line}" if head else f"{line}\n{tag_line}"


@torch.inference_mode()
def held_out_nll(model, tok, examples, hooks=None, line="") -> float:
    """Mean NLL per token of the real replies of examples (their target tokens after their context;
    held-out ones in eval, training ones for the search's bound), steered by hooks or with line just
    before the replier's tag."""
    return per_token(message_nlls(model, tok, examples, hooks, line))


def per_token(scores: ev.Scores) -> float:
    """The messages' summed NLL over their summed tokens."""
    nll, tokens = np.array(list(scores.nll.values())).sum(0)
    return float(nll / tokens)


@torch.inference_mode()
def message_nlls(model, tok, examples, hooks=None, line="") -> ev.Scores:
    """Each example's real reply scored: Scores.nll[k] = (its summed NLL, its tokens) for examples[k], so
    that two conditions pair message by message (eval.contrast). Every condition encodes the prompt the
    same way (the reply's tokens kept as the example has them), so only the condition differs."""
    scores = ev.Scores()
    for batch, scored, rows in message_batches(model, tok, examples, line):
        lp = scored_logprobs(model, batch, scored, hooks=hooks)  # (N,), row by row
        for k, part in zip(rows, lp.split(scored[:, 1:].sum(1).tolist())):  # the tokens after the first are scored
            scores.nll[k] = (-part.sum().item(), len(part))
    return scores


def message_batches(model, tok, examples, line="", size=16) -> list:
    """The examples' real replies after their contexts (line just before the replier's tag, if given), as
    batches (tokens (B, T), scored (B, T) bool, each row's index in examples) of similar lengths: less
    padding to compute."""
    device = model.embed_tokens.weight.device
    rows = []
    for k, e in enumerate(examples):
        prompt = tok.encode(with_line(e.text[: e.cut], line) if line else e.text[: e.cut])
        reply = e.tokens[e.loss_mask.index(True) :]
        rows.append((prompt + reply, [False] * len(prompt) + [True] * len(reply), k))
    rows.sort(key=lambda r: len(r[0]))
    return [(pad([r for r, _, _ in rows[j : j + size]], device=device)[0],
             pad([m for _, m, _ in rows[j : j + size]], device=device)[0].bool(),
             [k for _, _, k in rows[j : j + size]]) for j in range(0, len(rows), size)]


# The reference: the ideal tilt. However replies are made happier, the cheapest way to raise their mean
# VADER by a given amount is, to first order, the exponential tilt of the unsteered model's replies,
#     p_lam(reply | c) = p(reply | c) exp(lam VADER(reply)) / Z_c(lam),   Z_c(lam) = E_p[exp(lam VADER)],
# the distribution closest to the model's (in KL) with that higher mean. It is a reference, not a
# method: it reads the judge itself (best-of-n reranking by VADER approximates it). Nor is it a strict
# bound: it is closest to the model's own replies while the cost is read on the person's real ones
# (less upbeat: VADER 0.14 against the model's 0.25 at the same held-out contexts), and both of its
# sides are estimated from samples; on the shipped data the vector at alpha 0.5 sat a little above it.
# Its cost to the person is exact per message: the tilt reweights the judged reply (its first
# --sample-tokens tokens, to a line's end) and leaves the rest of the message as it was, so a real
# message's NLL rises by
#     log Z_c(lam) - lam VADER(its judged part),
# summed over messages, over their tokens (as held_out_nll counts them). Z_c is estimated from
# --tilt-samples replies at each held-out context, and the tilted mean VADER on the test prompts by
# self-normalised weights over as many replies per prompt; both estimates sit a little low with few
# replies (on the shipped data, +0.20 cost +0.015 to +0.018 nats/token from two disjoint sets of 16
# replies per context, +0.016 from 32).
TILT_LAMBDAS = torch.arange(0, 6.0001, 0.02, dtype=torch.float64)  # lam >= 0: happier only


def judged_part(tok, e, n_tokens: int) -> str:
    """The part of an example's real reply the tilt reweights, cut as sampled replies are: its first
    n_tokens tokens, up to a line's end."""
    return tok.decode(e.tokens[e.loss_mask.index(True) :][:n_tokens]).split("\n")[0]


def tilt_curves(S, C, real, tokens) -> dict:
    """S (P, n): VADER of n unsteered replies per test prompt; C (M, n): per held-out context; real (M,):
    VADER of each real message's judged part; tokens (M,): its tokens -> for each lam of TILT_LAMBDAS,
    the tilt's change in mean VADER and in positive share over the prompts, and its held-out NLL change
    in nats per token."""
    lam = TILT_LAMBDAS[:, None, None]  # (K, 1, 1)
    w = torch.softmax(lam * S[None], -1)  # (K, P, n): each prompt's replies reweighted
    positive = (S >= POSITIVE_AT).double()
    log_z = torch.logsumexp(lam * C[None], -1) - math.log(C.shape[1])  # (K, M)
    return {"lambda": TILT_LAMBDAS.tolist(),
            "vader_change": ((w * S).sum(-1) - S.mean(-1)).mean(-1).tolist(),
            "positive_change": ((w * positive).sum(-1) - positive.mean(-1)).mean(-1).tolist(),
            "nll_change": ((log_z - TILT_LAMBDAS[:, None] * real).sum(-1) / tokens.sum()).tolist()}


def tilt_at(curves: dict, given: str, value: float, wanted: str):
    """curves[wanted] at the smallest lam where curves[given] reaches value; None if it never does."""
    return next((y for x, y in zip(curves[given], curves[wanted]) if x >= value), None)


def ideal_tilt(model, tok, prompts, held_out, opts: Options) -> dict:
    """The tilt's curves (tilt_curves) from --tilt-samples unsteered replies to each test prompt and at
    each held-out example's context, seeds apart from the conditions'."""
    n = opts.tilt_samples

    def scores(contexts, seed):  # (len(contexts), n), 8 contexts a batch: n rows each, long contexts
        out = [vader(sample.generate(model, tok, [c for c in contexts[j : j + 8] for _ in range(n)],
                                     sample.Options(max_new_tokens=opts.sample_tokens, seed=seed + j)))
               for j in range(0, len(contexts), 8)]
        return torch.cat(out).view(len(contexts), n).double()

    real = vader([judged_part(tok, e, opts.sample_tokens) for e in held_out]).double()
    tokens = torch.tensor([len(e.tokens) - e.loss_mask.index(True) for e in held_out], dtype=torch.float64)
    S, C = scores(prompts, opts.seed + 1), scores([e.text[: e.cut] for e in held_out], opts.seed + 2)
    return {"samples_per_context": n, "real_vader": real.mean().item(), **tilt_curves(S, C, real, tokens),
            "prompt_vader": S.tolist(), "context_vader": C.tolist(), "real_vader_each": real.tolist(),
            "real_tokens": tokens.tolist()}  # what the curves were made from, for their intervals


def tilt_gain_intervals(tilt: dict, costs: list[float], n_boot: int, seed: int) -> list:
    """For each held-out cost, the 95% bootstrap interval of the tilt's VADER gain at that cost: the test
    prompts and the held-out messages each resampled, the curves made again and read at the cost (both
    of the tilt's sides are samples). None where some resample's curve never reaches the cost."""
    S, C, real, tokens = (torch.tensor(tilt[k], dtype=torch.float64)
                          for k in ("prompt_vader", "context_vader", "real_vader_each", "real_tokens"))
    rng = np.random.default_rng(seed)
    gains = []  # (n_boot, len(costs))
    for _ in range(n_boot):
        p, m = (torch.from_numpy(rng.integers(0, len(x), len(x))) for x in (S, C))
        curves = tilt_curves(S[p], C[m], real[m], tokens[m])
        gains.append([tilt_at(curves, "nll_change", c, "vader_change") for c in costs])
    return [None if any(g[j] is None for g in gains) else np.percentile([g[j] for g in gains], [2.5, 97.5]).tolist()
            for j in range(len(costs))]


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = sorted({float(a) for a in text.split(",")})
    except ValueError:
        raise BadInput(f"--alphas {text!r}: expected numbers separated by commas, e.g. -1,0,1") from None
    if not all(math.isfinite(a) for a in alphas) or not any(a > 0 for a in alphas):
        raise BadInput(f"--alphas {text}: finite numbers, at least one of them above 0")
    return alphas


def conditions(meta, v_pos, v_neg, alphas, data, speaker, seed) -> list[dict]:
    """Every (condition, alpha) to sample: the saved vector at each alpha (0 once: unsteered) and a
    random direction of the same norm at the same site at each |alpha| >= 1; and the prompt baseline
    at each distinct ceil(|alpha|): that many of the pairs' positive statements (negative ones for
    alpha < 0) as the replier's own lines before their turn."""
    push = meta["alpha_pos"] * v_pos.float() - meta["alpha_neg"] * v_neg.float()  # (D,) alpha 1 of the vector
    g = torch.Generator().manual_seed(seed)
    random_push = torch.randn(push.shape, generator=g).to(push.device)
    random_push = random_push * push.norm() / random_push.norm()
    site = f"resid.{meta['steer_layer']}"
    out = [{"condition": "unsteered", "alpha": 0.0, "hooks": None, "line": "", "push_norm": 0.0}]
    # The control runs where the claims are made (|alpha| >= 1), not at every alpha: each condition
    # costs as much as any other, and the small alphas of a random push add little to the comparison.
    strong = [a for a in alphas if abs(a) >= 1] or alphas
    for name, p, at in (("vector", push, alphas), ("random", random_push, strong)):
        for a in at:
            if a != 0:
                out.append({"condition": name, "alpha": a, "hooks": {site: add(a * p)}, "line": "",
                            "push_norm": abs(a) * p.norm().item()})
    levels = sorted({math.copysign(math.ceil(abs(a)), a) for a in alphas if a != 0})
    for level in levels:
        side = 0 if level > 0 else 1
        said = [pair[side] for pair in data["pairs"][: int(abs(level))]]
        out.append({"condition": "prompt", "alpha": level, "hooks": None, "push_norm": 0.0,
                    "line": "\n".join(f"{speaker} {s[0].lower() + s[1:]}" for s in said)})
    return out


def evaluate(opts: Options) -> dict:
    t0 = time.time()
    path = sample.steering_path(opts.name or read_pairs(opts.pairs)["concept"], "--name")
    v_pos, v_neg, meta = sample.read_steering(path)
    data = read_pairs(opts.pairs)
    texts, ratings = read_ratings(opts.labels)
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    if v_pos.shape != (model.cfg.dim,):
        raise BadInput(f"{path}: vectors of {v_pos.shape[0]} dimensions, this model's stream has {model.cfg.dim}")
    v_pos, v_neg = (v.to(model.embed_tokens.weight.device) for v in (v_pos, v_neg))
    prompts, speaker, held_out = eval_prompts(data, tuned, opts)
    alphas = parse_alphas(opts.alphas)
    # The judges, checked against human ratings first.
    agreement = {"vader": spearman(vader(texts), ratings), "local judge": spearman(judge_scores(model, tok, texts), ratings)}
    print(f"{len(prompts)} test prompts x {opts.replies} replies; judges' Spearman with {opts.labels}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items()))
    repeated = [p for p in prompts for _ in range(opts.replies)]
    rows, replies_of = [], {}
    for c in cli.progress(conditions(meta, v_pos, v_neg, alphas, data, speaker, opts.seed), desc="conditions",
                          unit="condition"):
        asked = [with_line(p, c["line"]) for p in repeated] if c["line"] else repeated
        replies = sample.generate(model, tok, asked, sampling(opts), hooks=c["hooks"])  # the same seed everywhere
        compound = vader(replies).view(len(prompts), opts.replies)  # (P, n)
        judged = judge_scores(model, tok, replies).view(len(prompts), opts.replies)
        positive = (compound >= POSITIVE_AT).float()  # (P, n)
        words = [len(r.split()) for r in replies]
        messages = message_nlls(model, tok, held_out, c["hooks"], c["line"])
        rows.append({"condition": c["condition"], "alpha": c["alpha"], "push_norm": c["push_norm"],
                     "vader_per_prompt": compound.mean(1).tolist(), "judge_per_prompt": judged.mean(1).tolist(),
                     "positive_per_prompt": positive.mean(1).tolist(), "positive_share": positive.mean().item(),
                     "held_out_nll": per_token(messages), "message_nll": [messages.nll[k] for k in range(len(held_out))],
                     "ppl": perplexity(model, tok, repeated, replies), "distinct_2": ev.distinct(replies, 2),
                     "empty": sum(not r.strip() for r in replies) / len(replies), "words": sum(words) / len(words)})
        replies_of[c["condition"], c["alpha"]] = replies
    tilt = ideal_tilt(model, tok, prompts, held_out, opts) if opts.tilt_samples else None
    return summarise(rows, replies_of, prompts, agreement, opts, tilt, {
        "vector": str(path), "setting": {k: meta.get(k) for k in ("steer_layer", "extract_layer", "alpha_pos", "alpha_neg")},
        "model": tuned.base_model, "adapter": tuned.adapter, "speaker": speaker, "prompts": len(prompts),
        "test_prompts_from_pairs": len(split_prompts(data["prompts"], opts.seed)[1]), "held_out_messages": len(held_out),
        "replies_per_prompt": opts.replies, "seconds": round(time.time() - t0)})


def summarise(rows, replies_of, prompts, agreement, opts, tilt, settings) -> dict:
    """Per row: means with bootstrap intervals over prompts, paired differences from unsteered (the
    cost's interval over the held-out messages, paired likewise), and for
    the vector and random rows the share of prompts whose score rises with alpha; for each vector row
    that raises VADER at a cost, what the ideal tilt (if measured) gains at that cost and pays for that gain."""
    base = next(r for r in rows if r["condition"] == "unsteered")
    v0 = np.array(base["vader_per_prompt"])
    for r in rows:
        v = np.array(r["vader_per_prompt"])
        r["vader"] = ev.mean_with_interval(v, opts.bootstrap, opts.seed)
        r["vader_change"] = ev.mean_with_interval(v - v0, opts.bootstrap, opts.seed)  # paired, prompt by prompt
        r["positive_change"] = ev.mean_with_interval(np.array(r["positive_per_prompt"]) - base["positive_per_prompt"],
                                                     opts.bootstrap, opts.seed)
        r["judge"] = float(np.mean(r["judge_per_prompt"]))
        r["nll_change"] = r["held_out_nll"] - base["held_out_nll"]
        # The cost's interval resamples the held-out messages, paired (one draw of 64 messages of the
        # same push read +0.016 where 256 others read +0.021).
        scores = [ev.Scores(nll=dict(enumerate(map(tuple, x["message_nll"])))) for x in (r, base)]
        c = ev.contrast(*scores, "token", opts.bootstrap, opts.seed)
        r["nll_change_interval"] = [c["low"], c["high"]]
    read = [r for r in rows if tilt and r["condition"] == "vector" and r["vader_change"]["mean"] > 0 and r["nll_change"] > 0]
    intervals = tilt_gain_intervals(tilt, [r["nll_change"] for r in read], opts.bootstrap, opts.seed) if read else []
    for r, interval in zip(read, intervals):
        r["tilt"] = {"vader_change_at_this_cost": tilt_at(tilt, "nll_change", r["nll_change"], "vader_change"),
                     "interval": interval,
                     "nll_change_for_this_vader": tilt_at(tilt, "vader_change", r["vader_change"]["mean"], "nll_change")}
    steerable = {}
    for name in ("vector", "random"):
        line = sorted([base] + [r for r in rows if r["condition"] == name], key=lambda r: r["alpha"])
        a = np.array([r["alpha"] for r in line])
        scores = np.array([r["vader_per_prompt"] for r in line])  # (alphas, P)
        slope = ((a - a.mean())[:, None] * (scores - scores.mean(0))).sum(0) / ((a - a.mean()) ** 2).sum()  # (P,)
        steerable[name] = {"steerable": float((slope > 0).mean()), "anti_steerable": float((slope < 0).mean())}
    samples = {f"{c} {a:+g}": replies[: opts.replies * 2 : opts.replies] for (c, a), replies in replies_of.items()
               if c == "unsteered" or abs(a) == 1}
    return {"settings": {**asdict(opts), **settings}, "agreement": agreement, "rows": rows, "steerable": steerable,
            "verdict": verdict(rows), "tilt": tilt, "samples": samples, "sample_prompts": prompts[:2]}


def verdict(rows) -> str:
    """Does the vector beat the prompt baseline at equal cost? The vector's alpha whose held-out NLL
    rise is closest to the prompt's at +1 line, compared on VADER's rise."""
    prompt = next((r for r in rows if r["condition"] == "prompt" and r["alpha"] == 1), None)
    vectors = [r for r in rows if r["condition"] == "vector" and r["alpha"] > 0]
    if prompt is None or not vectors:
        return "no prompt baseline at +1 to compare with"
    near = min(vectors, key=lambda r: abs(r["nll_change"] - prompt["nll_change"]))
    better = near["vader_change"]["mean"] > prompt["vader_change"]["mean"]
    return (f"at about the prompt's cost (held-out NLL {prompt['nll_change']:+.3f} nats/token for one upbeat line; "
            f"the vector at alpha {near['alpha']:g}: {near['nll_change']:+.3f}), the vector raises VADER by "
            f"{near['vader_change']['mean']:+.3f} and the prompt by {prompt['vader_change']['mean']:+.3f}: "
            + ("steering beats prompting." if better else "prompting does as well or better than steering."))


def eval_markdown(r: dict) -> str:
    s = r["settings"]
    unreliable = [k for k, v in r["agreement"].items() if v < 0.6]
    out = [f"steer.py eval {Path(s['vector']).stem}: {s['prompts']} test prompts ({s['test_prompts_from_pairs']} from "
           f"the pairs file's test half, the rest real held-out contexts) x {s['replies_per_prompt']} replies, the "
           f"same seeds in every condition; cost on {s['held_out_messages']} real held-out messages of {s['speaker']}. "
           "Judges' Spearman with the rated messages: " + ", ".join(f"{k} {v:.2f}" for k, v in r["agreement"].items())
           + (f" ({', '.join(unreliable)}: below 0.6, unreliable)" if unreliable else "") + ".", "",
           "| condition | alpha | VADER | change [95%] | positive | its change [95%] | judge | held-out NLL change [95%] "
           "| ppl | distinct-2 | empty | words |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in sorted(r["rows"], key=lambda x: (x["condition"] != "unsteered", x["condition"], x["alpha"])):
        ch, pos, (low, high) = x["vader_change"], x["positive_change"], x["nll_change_interval"]
        out.append(f"| {x['condition']} | {x['alpha']:+g} | {x['vader']['mean']:.3f} | {ch['mean']:+.3f} "
                   f"[{ch['interval'][0]:+.3f}, {ch['interval'][1]:+.3f}] | {x['positive_share']:.2f} | "
                   f"{pos['mean']:+.2f} [{pos['interval'][0]:+.2f}, {pos['interval'][1]:+.2f}] | {x['judge']:+.2f} | "
                   f"{x['nll_change']:+.4f} [{low:+.4f}, {high:+.4f}] | {x['ppl']:.1f} | {x['distinct_2']:.2f} | "
                   f"{x['empty']:.2f} | {x['words']:.1f} |")
    st = r["steerable"]
    out += ["", f"Prompts whose VADER score rises with alpha: vector {st['vector']['steerable']:.0%} "
            f"(falls: {st['vector']['anti_steerable']:.0%}), random {st['random']['steerable']:.0%}.",
            "", "Verdict: " + r["verdict"]]
    tilt = r.get("tilt")
    if tilt:
        out += ["", f"The reference, the ideal tilt of the unsteered replies toward VADER ({tilt['samples_per_context']} "
                "replies per context; a reference for what a given cost can buy, not a rival: it reads the judge):"]
        for x in r["rows"]:
            t = x.get("tilt")
            if t:
                gain, cost, iv = t["vader_change_at_this_cost"], t["nll_change_for_this_vader"], t.get("interval")
                within = f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else ""
                out.append(f"- vector {x['alpha']:+g}: {x['vader_change']['mean']:+.3f} for {x['nll_change']:+.4f} nats/token; "
                           f"the tilt gains {'more than the curve holds' if gain is None else f'{gain:+.3f}{within}'} at that cost "
                           f"and pays {'-' if cost is None else f'{cost:+.4f}'} for that gain")
    return "\n".join(out)


def plot_eval(r: dict, path: Path):
    """Concept (VADER) against cost (held-out NLL rise), one curve per condition over its alphas, with
    the intervals over prompts (VADER) and over held-out messages (the cost)."""
    plt = cli.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next(x for x in r["rows"] if x["condition"] == "unsteered")
    for k, name in enumerate(("vector", "random", "prompt")):
        line = sorted([base] + [x for x in r["rows"] if x["condition"] == name], key=lambda x: x["alpha"])
        xs, ys = [x["nll_change"] for x in line], [x["vader"]["mean"] for x in line]
        err = [[y - x["vader"]["interval"][0] for x, y in zip(line, ys)], [x["vader"]["interval"][1] - y for x, y in zip(line, ys)]]
        xerr = [[c - x["nll_change_interval"][0] for x, c in zip(line, xs)], [x["nll_change_interval"][1] - c for x, c in zip(line, xs)]]
        ax.errorbar(xs, ys, yerr=err, xerr=xerr, marker="o", capsize=3, c=f"C{k}", label=name)
        for x, y, row in zip(xs, ys, line):
            ax.annotate(f"{row['alpha']:+g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{k}")
    tilt = r.get("tilt")
    if tilt:
        shown = [k for k, x in enumerate(tilt["nll_change"]) if x <= max(row["nll_change"] for row in r["rows"])]
        ax.plot([tilt["nll_change"][k] for k in shown], [base["vader"]["mean"] + tilt["vader_change"][k] for k in shown],
                "k--", lw=1, label="ideal tilt (a reference: it reads VADER)")
    ax.set(xlabel="held-out NLL change (nats/token): the cost to sounding like the person",
           ylabel="VADER compound of the replies", title=f"steering {Path(r['settings']['vector']).stem}: concept vs cost")
    ax.legend(loc="upper left", fontsize=8)
    cli.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# Probe directions.
#
# Features are centred and divided by one number, their RMS norm, not standardised dimension by
# dimension: a direction has to live in the stream's own coordinates to be added to it, and per-dimension
# scaling would let the few quiet dimensions of a residual stream dominate the weights. With one global
# scale the L2 penalty means the same at every layer, and a stronger penalty pulls w towards the
# difference of the rating-weighted means (the gradient at w = 0), the contrastive direction again.

def train_probe(X, y, l2: float, steps: int = 100):
    """Logistic regression with soft labels: X (N, D) features, y (N,) in [0, 1] -> (w (D,), b) with
    logit = X @ w + b in X's own coordinates. Full-batch L-BFGS on BCE-with-logits + l2 * |w|^2."""
    X, y = X.float(), y.float()
    mu = X.mean(0)
    scale = (X - mu).pow(2).sum(-1).mean().sqrt()
    Z = (X - mu) / scale  # (N, D), rows of RMS norm 1
    w = torch.zeros(X.shape[1], device=X.device, requires_grad=True)
    b = torch.zeros((), device=X.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits(Z @ w + b, y) + l2 * w.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    w_x = w.detach() / scale  # the same logits for un-normalised X: Z @ w = (X - mu) @ (w / scale)
    return w_x, b.detach() - mu @ w_x


def probe_metrics(logit, rating) -> dict:
    """Accuracy of sign(logit) against rating > 3 (messages rated 3 left out) and Pearson's r with the ratings."""
    clear = rating != 3
    accuracy = ((logit[clear] > 0) == (rating[clear] > 3)).float().mean().item()
    return {"accuracy": accuracy, "correlation": torch.corrcoef(torch.stack([logit, rating]))[0, 1].item()}


def probe(opts: Options) -> dict:
    """Train on 3/4 of the rated messages, report on the held-out 1/4, then train on all of them and save
    the direction w/|w| as a steering vector at --layer: v_pos = +w s/2, v_neg = -w s/2, s the distance
    between the means of the messages rated 4-5 and 1-2 along w. So alpha_pos = alpha_neg = 1 moves the
    stream by that distance, as it moves it by the mean difference for contrast pairs."""
    t0 = time.time()
    data = read_pairs(opts.pairs)
    texts, rating = read_ratings(opts.labels)
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok, name, adapter = tuned.model, tuned.tok, tuned.base_model, tuned.adapter
    data["cost"] = spread(replier_examples(tuned, replier(data["prompts"]), False, opts), opts.cost_messages)
    n = model.cfg.n_layers
    L = n // 2 if opts.layer == -1 else opts.layer
    if not 0 <= L <= n:
        raise BadInput(f"--layer {opts.layer}: this model's sites are resid.0 .. resid.{n} (-1 = the middle)")
    streams = pooled_streams(model, tok, texts)
    X, norm = streams["mean"][L], streams["norm"][L].mean()  # (N, D), the stream's mean norm there
    rating = rating.to(X.device)
    y = (rating - 1) / 4
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(opts.seed))
    test, train = order[: len(texts) // 4], order[len(texts) // 4 :]
    w, b = train_probe(X[train], y[train], opts.l2)
    held_out = probe_metrics(X[test] @ w + b, rating[test])
    w, b = train_probe(X, y, opts.l2)
    direction = w / w.norm()
    s = ((X[rating >= 4].mean(0) - X[rating <= 2].mean(0)) @ direction).item()
    if s <= 0:
        raise BadInput(f"--labels {opts.labels}: the probe at resid.{L} does not rank the messages rated 4-5 "
                       "above those rated 1-2; try another --layer or a smaller --l2")
    v_pos, v_neg = direction * s / 2, -direction * s / 2
    alpha = (opts.strength * norm / s).item()  # alpha * s = strength * the stream's norm
    v_pair_pos, v_pair_neg = (v[L] for v in contrast_vectors(model, tok, data["pairs"])["mean"])
    cosine = F.cosine_similarity(direction, v_pair_pos - v_pair_neg, dim=0).item()
    ref = unsteered(model, tok, data, opts)
    scores = score(model, tok, data, ref, {f"resid.{L}": sample.steering_hook(v_pos, v_neg, alpha, alpha)}, opts)
    concept = data["concept"]
    path = Path("out/steer") / f"{opts.name or concept + '_probe'}.safetensors"
    save_vector(path, v_pos, v_neg, {
        "kind": "probe", "concept": concept, "source": opts.labels, "model": name, "adapter": adapter,
        "extract_layer": L, "steer_layer": L, "pooling": "mean", "alpha_pos": alpha, "alpha_neg": alpha,
        "r": opts.strength, "t": 0.0, "concept_score": scores["concept"], "unsteered_concept_score": ref["concept"],
        "kl": scores["kl"], "ppl_ratio": scores["ppl_ratio"], "nll_rise": scores["nll_rise"],
        "held_out_accuracy": held_out["accuracy"],
        "held_out_correlation": held_out["correlation"], "l2": opts.l2})
    return {"layer": L, "examples": len(texts), "held_out": held_out, "cosine_with_pairs": cosine, "alpha": alpha,
            "unsteered_concept": ref["concept"], **scores, "path": path, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------------
# Learned directions: the policy gradient, taken many times.
#
# The pairs' direction is read off 40 written statements. learn fits a push delta (D,) at resid.S to
# the model's own replies instead. At each of --learn-contexts real contexts from the training sessions
# the unsteered model samples --learn-replies replies r_i, judged V_i by VADER, and the steered model's
# mean VADER there is estimated from those same replies by self-normalised importance weights:
#     J_c(delta) = sum_i softmax_i(log p_delta(r_i | c) - log p_0(r_i | c)) V_i - mean_i V_i,
# zero at delta = 0, with the policy gradient (1/n) sum_i (V_i - mean V) grad log p(r_i | c) there.
# p is the model's own distribution (temperature 1, no penalty), not the sampler's that drew the replies
# (temperature 0.8, repetition penalty 1.1): weighted by the sampler's (shipped data, the same replies),
# the fitted push scored +0.110 against +0.203 on the search's selection prompts and 32 other training
# contexts (one among those it learns from; the difference's standard error 0.027): perhaps its sharper
# weights leave fewer replies counting.
# Adam climbs the mean of J_c over contexts (each step a few contexts, --learn-steps steps: by default
# two passes over 128 contexts). The push's 576 numbers (SmolLM2's width) are fitted to a few thousand
# replies, and more contexts helped (shipped data, each push scaled to the bound, on the search's
# selection prompts and 32 other training contexts, 8 replies each): 64 contexts +0.141, 128 +0.203
# (the difference's standard error 0.026), 256 +0.190, in 6.7, 10.3 and 19.6 min. The site, two thirds
# of the depth, was a first pick that held: fitted at resid.10, 15 and 25 instead, +0.167, +0.140 and
# +0.166 on the same prompts, against +0.168 and +0.203 for two runs of the resid.20 fit (at cosine 0.999
# with each other: sampled replies drift apart with the push, so scores move by ~0.03). Then the
# first-order gradient of the person's NLL is projected out of the push: a fit that also minimised that
# NLL (shipped data) bought its budget by fitting the friend better, cosine -0.64 with the gradient and a
# first-order cost of -0.027, which is not happiness. Last, it is scaled to just under --max-nll-rise on
# the search's cost messages, like every search setting, and saved in the same format (v_pos = the push,
# v_neg = 0, alphas 1 and 0). It reads the judge it is graded by: eval's VADER gain is then partly VADER's
# taste (on the shipped data the gain was in words, "love", "great", "awesome", not in the "!" it also added).

@dataclass(frozen=True)
class Strength:
    r: float  # the push's norm

    def times(self, f: float) -> "Strength":
        return Strength(self.r * f)


def reply_logprobs(model, rows, hooks=None):
    """rows [(prompt ids, reply ids)] -> (B,): log p(reply | prompt), summed over the reply's tokens. Each
    distinct prompt runs once (continuation_states): the replies sampled after one context share its
    prefill, most of the work, and gradients reach it too."""
    prompts, replies = [list(p) for p, _ in rows], [list(r) for _, r in rows]
    lp = continuation_logprobs(model, prompts, replies, hooks=hooks)  # (N,), reply after reply
    row = torch.tensor([b for b, r in enumerate(replies) for _ in r], device=lp.device)
    return torch.zeros(len(rows), dtype=lp.dtype, device=lp.device).index_add(0, row, lp)


def importance_gain(lp, lp0, V):
    """J_c: the mean of V (n,) under the steered model, estimated from replies sampled unsteered (their
    log-probs lp under it, lp0 unsteered) by self-normalised importance weights, less the plain mean."""
    return (torch.softmax(lp - lp0, 0) * V).sum() - V.mean()


def nll_gradient(model, tok, examples, site: str):
    """d(mean NLL per token of the examples' real replies) / d(a push added at site), at no push: (D,)."""
    d = torch.zeros(model.cfg.dim, device=model.embed_tokens.weight.device, requires_grad=True)
    batches = message_batches(model, tok, examples)
    count = sum(int(scored[:, 1:].sum()) for _, scored, _ in batches)
    with torch.enable_grad():
        for tokens, scored, _ in batches:
            (-scored_logprobs(model, tokens, scored, hooks={site: lambda x: x + d}).sum() / count).backward()
    return d.grad


LEARN_BATCH = 4  # contexts a step (each with its --learn-replies replies)


def learn(opts: Options) -> dict:
    """Fit, project and scale a push (see above), save it to out/steer/NAME.safetensors (default
    CONCEPT_learned), and return what was measured on the way."""
    t0 = time.time()
    data = read_pairs(opts.pairs)
    selection, _ = split_prompts(data["prompts"], opts.seed)
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    n_layers = model.cfg.n_layers
    S = 2 * n_layers // 3 if opts.layer == -1 else opts.layer
    if not 1 <= S < n_layers:
        raise BadInput(f"--layer {opts.layer}: learn steers resid.1 .. resid.{n_layers - 1} (-1 = two thirds of the depth)")
    site = f"resid.{S}"
    speaker = replier(selection)
    theirs = replier_examples(tuned, speaker, False, opts)  # training sessions only: eval's are never read
    cost = spread(theirs[0::2], opts.cost_messages)  # the search's cost messages: the same bound
    others = [e for e in theirs[0::2] if all(e is not c for c in cost)]
    gradient_messages = spread(others, opts.cost_messages) or cost
    contexts = [tok.encode(e.text[: e.cut]) for e in spread([e for e in theirs[1::2] if e.text[: e.cut] != speaker],
                                                              opts.learn_contexts)]
    for p in model.parameters():
        p.requires_grad_(False)  # only the push is learned; autograd records nothing below resid.S

    # The unsteered replies, their VADER, and their log-probs without the push.
    n, ends = opts.learn_replies, sample.turn_ends(tok)
    rows, V = [], []  # per context: [(prompt ids, reply ids)] and the replies' VADER (n,)
    for j in cli.progress(range(0, len(contexts), 8), desc="replies", unit="batch"):
        ids = [c for c in contexts[j : j + 8] for _ in range(n)]
        replies = sample.generate_ids(model, ids, replace(sampling(opts), seed=opts.seed + j), ends)
        for k in range(0, len(ids), n):
            rows.append([(ids[k], r.ids) for r in replies[k : k + n]])
            V.append(vader([sample.reply_text(tok, ids[k], r.ids) for r in replies[k : k + n]]).to(model.embed_tokens.weight.device))
    with torch.no_grad(), cpu_bf16(model.embed_tokens.weight.device):
        lp0 = [reply_logprobs(model, r) for r in rows]

    delta = torch.zeros(model.cfg.dim, device=model.embed_tokens.weight.device, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=opts.lr)
    hooks = {site: lambda x: x + delta}
    rng = random.Random(opts.seed)
    order, gains = [], []
    for _ in cli.progress(range(opts.learn_steps), desc="learn", unit="step"):
        if len(order) < LEARN_BATCH:
            order += rng.sample(range(len(rows)), len(rows))  # passes over the contexts, each shuffled
        batch, order = order[:LEARN_BATCH], order[LEARN_BATCH:]
        adam.zero_grad()
        with torch.enable_grad(), cpu_bf16(model.embed_tokens.weight.device):
            gain = sum(importance_gain(reply_logprobs(model, rows[c], hooks), lp0[c], V[c]) for c in batch) / len(batch)
            (-gain).backward()
        adam.step()
        gains.append(gain.item())

    g = nll_gradient(model, tok, gradient_messages, site)
    fitted = delta.detach()
    push = fitted - (fitted @ g) / (g @ g) * g  # no first-order cost on the person's messages
    unit = push / push.norm()
    ref = held_out_nll(model, tok, cost)
    rise_of = lambda x: held_out_nll(model, tok, cost, {site: add(x.r * unit)}) - ref
    strength, rise, tried = to_the_bound(Strength(push.norm().item()), rise_of, opts.max_nll_rise, measures=6)
    if rise > opts.max_nll_rise:
        raise BadInput(f"the learned push at {site} could not be scaled under --max-nll-rise {opts.max_nll_rise} "
                       f"(it measured {rise:+.4f} nats/token at norm {strength.r:.3g}); try another --layer")
    path = Path("out/steer") / f"{opts.name or data['concept'] + '_learned'}.safetensors"
    cosine = F.cosine_similarity(fitted, g, dim=0).item()
    save_vector(path, strength.r * unit, torch.zeros_like(unit), {
        "kind": "learned", "concept": data["concept"], "model": tuned.base_model, "adapter": tuned.adapter,
        "extract_layer": S, "steer_layer": S, "alpha_pos": 1.0, "alpha_neg": 0.0, "nll_rise": rise,
        "contexts": len(rows), "replies_per_context": n, "steps": opts.learn_steps, "lr": opts.lr,
        "fitted_norm": fitted.norm().item(), "cosine_with_nll_gradient": cosine, "max_nll_rise": opts.max_nll_rise})
    return {"site": site, "path": path, "contexts": len(rows), "replies": n, "first_gains": gains[:3], "last_gains": gains[-3:],
            "fitted_norm": fitted.norm().item(), "cosine_with_nll_gradient": cosine, "norm": strength.r, "nll_rise": rise,
            "tried": tried, "seconds": time.time() - t0}


def main():
    command, argv = cli.command(sys.argv[1:], COMMANDS, "steer.py")
    opts = parse_options(Options, argv=argv)
    if command == "search":
        result = search(opts)
        print(markdown(result))
        best = result["best"]
        if best is None:
            raise BadInput(f"no setting stayed within --max-kl {opts.max_kl}, --max-ppl-ratio {opts.max_ppl_ratio} "
                           f"and --max-nll-rise {opts.max_nll_rise}; loosen them or try more --trials")
        ratio = best["ppl_ratio"]
        print(f"\nbest: extract resid.{best['extract']}, steer resid.{best['steer']}, {best['pooling']} pooling, "
              f"alpha_pos {best['alpha_pos']:.3f}, alpha_neg {best['alpha_neg']:.3f} (r {best['r']:.2f}, "
              f"t {best['t']:+.2f}): reply score {best['reply_score']:.3f} (unsteered "
              f"{result['unsteered']['reply_score']:.3f}"
              + ("" if "rescored" not in best else f"; re-scored {best['rescored']:.3f} against "
                 f"{result['unsteered']['rescored_reply_score']:.3f}")
              + f"; on the test half {result['test']['reply_score']:.3f} against "
              f"{result['test']['unsteered_reply_score']:.3f}), concept {best['concept']:.2f}, KL {best['kl']:.3f}, "
              f"ppl ratio {ratio:.2f}, NLL rise {best['nll_rise']:+.3f} nats/token")
        print_samples(result["sample_prompts"], result["samples"])
        print(f"\nwrote {result['path']}; {len(result['rows'])} settings in {result['seconds'] / 60:.1f} min")
    elif command == "eval":
        r = evaluate(opts)
        stem = Path(r["settings"]["vector"]).stem
        out = Path("out/steer")
        cli.write_atomically(out / f"eval_{stem}.json", lambda p: p.write_text(json.dumps(r, indent=2) + "\n"))
        plot_eval(r, out / f"eval_{stem}.png")
        print(eval_markdown(r))
        print_samples(r["sample_prompts"], {k: v[:2] for k, v in r["samples"].items()})
        print(f"\nwrote {out / f'eval_{stem}.json'} and eval_{stem}.png in {r['settings']['seconds'] / 60:.1f} min")
    elif command == "learn":
        r = learn(opts)
        print(f"learned a push at {r['site']} from {r['contexts']} training contexts x {r['replies']} replies: the estimated "
              f"VADER gain per step went {', '.join(f'{x:+.3f}' for x in r['first_gains'])} ... "
              f"{', '.join(f'{x:+.3f}' for x in r['last_gains'])} (on the replies it learns from); fitted norm "
              f"{r['fitted_norm']:.3g}, cosine with the person's NLL gradient {r['cosine_with_nll_gradient']:+.2f} (projected out)")
        print(f"scaled to norm {r['norm']:.3g}: NLL rise {r['nll_rise']:+.4f} nats/token on the cost messages")
        print(f"wrote {r['path']} in {r['seconds'] / 60:.1f} min; judge it with python steer.py eval --name {r['path'].stem}")
    else:
        r = probe(opts)
        ratio = "-" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.2f}"
        print(f"probe at resid.{r['layer']} on {r['examples']} rated messages: held-out accuracy "
              f"{r['held_out']['accuracy']:.2f}, correlation with the ratings {r['held_out']['correlation']:.2f}; "
              f"cosine with the pairs' contrast vector {r['cosine_with_pairs']:.2f}")
        print(f"steering along it at alpha {r['alpha']:.3f} (strength {opts.strength}): concept {r['concept']:.2f} "
              f"(unsteered {r['unsteered_concept']:.2f}), KL {r['kl']:.3f}, ppl ratio {ratio}, "
              f"{'within' if r['ok'] else 'outside'} the bounds")
        print(f"wrote {r['path']} in {r['seconds']:.0f} s")


if __name__ == "__main__":
    exit_on_bad_input(main)
