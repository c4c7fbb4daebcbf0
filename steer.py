"""Paired activation steering: find a direction in the residual stream that makes the simulated person
happier (or sadder), check that steering along it keeps them coherent, and save it for sample.py.

    python steer.py search                      # out/adapter; data/steer/happy.json -> out/steer/happy.safetensors
    python steer.py search --base --trials 40   # the model alone, more random settings
    python steer.py probe --base --layer 12     # a probe's direction -> out/steer/happy_probe.safetensors
    python sample.py --speaker FRIEND --prompt "[RIYA] how was your day?" --steer happy:2

search: every statement of the contrast pairs (near-identical, "Today was a good day." / "Today was a
bad day.") runs through the model once, and its stream at every site resid.L is pooled (its last token,
or the mean over its tokens); v_pos(L), v_neg(L) are the means over the positive and over the negative
statements. Steering at layer S adds alpha_pos * v_pos - alpha_neg * v_neg to resid.S at every position
of the prompt and of every decoded token (ActAdd, https://arxiv.org/abs/2308.10248; contrastive
activation addition, https://arxiv.org/abs/2312.06681). A small grid and --trials random settings of
(L, S, pooling, alpha_pos, alpha_neg) are scored by the concept score, log p(the reply opens with a
positive concept word) - log p(... a negative one) after the speaker's tag of each evaluation prompt,
under two coherence bounds against the same model unsteered: the KL divergence of next-token
distributions on neutral chat lines (--max-kl), and the perplexity it gives to steered replies over
the one it gives to its own (--max-ppl-ratio). The best setting within both is saved to
out/steer/NAME.safetensors (tensors v_pos, v_neg; metadata: model, adapter, layers, pooling, alphas,
scores) and a few of its replies are printed next to unsteered ones.

probe: a logistic-regression probe on rated messages (rating 1-5 -> soft label (rating - 1) / 4) reads
resid.L; its weight vector is the direction, saved in the same format to steer at resid.L.

Shapes: N texts, L sites (resid.0 .. resid.n_layers), B batch, T time, D model dim, V vocab, P positions.
"""
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cli
import sample
import sft
from cli import POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import capture, pad, scored_logprobs
from prep import TAG_LINE

COMMANDS = ("search", "probe")


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
    trials: Annotated[int, "search: random settings tried after the grid", Range(0)] = 24
    max_distance: Annotated[int, "search: the steering layer lies at most this many layers from the "
                                 "extraction layer", Range(0)] = 4
    max_kl: Annotated[float, "coherence bound: mean KL(unsteered || steered) per token on the neutral "
                             "lines, in nats", POSITIVE] = 0.2
    max_ppl_ratio: Annotated[float, "coherence bound: perplexity of steered replies under the unsteered "
                                    "model, over that of unsteered replies", POSITIVE] = 2.0
    sample_tokens: Annotated[int, "longest reply sampled for the perplexity check, in tokens", Range(1)] = 20
    layer: Annotated[int, "probe: the site resid.L it reads and steers; -1 = the middle layer", Range(-1)] = -1
    l2: Annotated[float, "probe: L2 penalty on its weights", Range(0)] = 1e-2
    strength: Annotated[float, "probe: how hard its saved setting pushes, as a fraction of the stream's "
                               "norm at --layer", POSITIVE] = 0.2
    name: Annotated[str, "the vector's name, out/steer/NAME.safetensors (default: the concept; probe: "
                         "CONCEPT_probe)"] = ""
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
def perplexity(model, tok, prompts, replies) -> float:
    """exp(mean NLL per token) of the replies after their prompts under model as it is (no hooks)."""
    rows = [(tok.encode(p), tok.encode(" " + r, start=False)) for p, r in zip(prompts, replies) if r]
    if not rows:
        return float("inf")  # nothing but empty replies is no sign of coherence
    tokens, mask = pad([p + r for p, r in rows], left=True, device=model.embed_tokens.weight.device)
    scored = torch.zeros_like(mask)  # (B, T): the reply's tokens
    for b, (_, r) in enumerate(rows):
        scored[b, -len(r) :] = True
    return (-scored_logprobs(model, tokens, scored, mask=mask)).mean().exp().item()


def sampling(opts: Options):
    # sample.py's default sampling (its reply mode), seeded and short: what a user of --steer sees.
    return sample.Options(max_new_tokens=opts.sample_tokens, seed=opts.seed)


def unsteered(model, tok, data, opts: Options) -> dict:
    """What every setting is measured against: the concept words, the unsteered model's concept score,
    next-token distributions on the neutral lines, and perplexity of its own sampled replies."""
    replies = sample.generate(model, tok, data["prompts"], sampling(opts))
    words = concept_words(tok, data)
    return {"words": words, "concept": concept_score(model, tok, data["prompts"], words),
            "neutral": next_token_logprobs(model, tok, data["neutral"]),
            "ppl": perplexity(model, tok, data["prompts"], replies)}


def score(model, tok, data, ref: dict, hooks, opts: Options) -> dict:
    """One steering setting (as hooks): its concept score, KL and perplexity ratio, and whether both
    are within bounds. Replies are sampled only when the KL is: otherwise the setting is out already
    and sampling is most of the time a setting takes."""
    concept = concept_score(model, tok, data["prompts"], ref["words"], hooks)
    kl = kl_divergence(ref["neutral"], next_token_logprobs(model, tok, data["neutral"], hooks))
    ratio = None
    if kl <= opts.max_kl:
        replies = sample.generate(model, tok, data["prompts"], sampling(opts), hooks=hooks)
        ratio = perplexity(model, tok, data["prompts"], replies) / ref["ppl"]
    ok = kl <= opts.max_kl and ratio is not None and ratio <= opts.max_ppl_ratio
    return {"concept": concept, "kl": kl, "ppl_ratio": ratio, "ok": ok}


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
# concept score levels off above r ~ 0.3; so the search tries r from 0.05 to 0.35 and |t| up to 0.15.
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


def alphas(s: Setting, vectors: dict, norms) -> tuple[float, float]:
    """(alpha_pos, alpha_neg) of a setting. vectors: {pooling: (v_pos, v_neg) (L, D)}; norms (L,)."""
    v_pos, v_neg = (v[s.extract] for v in vectors[s.pooling])
    a = s.r * norms[s.steer] / (v_pos - v_neg).norm()
    gap = s.t * norms[s.steer] / ((v_pos + v_neg) / 2).norm()
    return (a + gap / 2).item(), (a - gap / 2).item()


def settings(n_layers: int, trials: int, max_distance: int, seed: int) -> list[Setting]:
    """A small grid (the contrastive vector read and added at a third, half and two thirds of the depth,
    three strengths), then `trials` random settings. Sites resid.1 .. resid.{n_layers - 1} only:
    resid.0 is the token embedding and resid.{n_layers} goes straight to the unembedding (a bias on the
    logits), whereas a push between blocks leaves later blocks to turn it into what is said."""
    middle = sorted({n_layers // 3, n_layers // 2, 2 * n_layers // 3} - {0})
    grid = [Setting(L, L, "mean", r, 0.0) for L in middle for r in (0.1, 0.2, 0.3)]
    rng = random.Random(seed)
    for _ in range(trials):
        L = rng.randint(1, n_layers - 1)
        S = rng.randint(max(1, L - max_distance), min(n_layers - 1, L + max_distance))
        grid.append(Setting(L, S, rng.choice(("mean", "last")), round(rng.uniform(0.05, 0.35), 2),
                            round(rng.uniform(-0.15, 0.15), 2)))
    return grid


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
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok, name, adapter = tuned.model, tuned.tok, tuned.base_model, tuned.adapter
    vectors = contrast_vectors(model, tok, data["pairs"])
    norms = pooled_streams(model, tok, data["prompts"])["norm"].mean(1)  # (L,): the stream's mean norm
    ref = unsteered(model, tok, data, opts)
    rows = []
    for s in cli.progress(settings(model.cfg.n_layers, opts.trials, opts.max_distance, opts.seed), desc="search",
                  unit="setting"):
        alpha_pos, alpha_neg = alphas(s, vectors, norms)
        v_pos, v_neg = (v[s.extract] for v in vectors[s.pooling])
        hooks = {f"resid.{s.steer}": sample.steering_hook(v_pos, v_neg, alpha_pos, alpha_neg)}
        rows.append({**asdict(s), "alpha_pos": alpha_pos, "alpha_neg": alpha_neg,
                     **score(model, tok, data, ref, hooks, opts)})
    accepted = [r for r in rows if r["ok"]]
    result = {"concept": data["concept"], "model": name, "adapter": adapter,
              "unsteered": {"concept": ref["concept"], "ppl": ref["ppl"]}, "rows": rows, "best": None}
    if accepted:
        best = result["best"] = max(accepted, key=lambda r: r["concept"])
        v_pos, v_neg = (v[best["extract"]] for v in vectors[best["pooling"]])
        path = result["path"] = Path("out/steer") / f"{opts.name or data['concept']}.safetensors"
        save_vector(path, v_pos, v_neg, {
            "kind": "pairs", "concept": data["concept"], "source": opts.pairs, "model": name, "adapter": adapter,
            "extract_layer": best["extract"], "steer_layer": best["steer"], "pooling": best["pooling"],
            "alpha_pos": best["alpha_pos"], "alpha_neg": best["alpha_neg"], "r": best["r"], "t": best["t"],
            "concept_score": best["concept"], "unsteered_concept_score": ref["concept"], "kl": best["kl"],
            "ppl_ratio": best["ppl_ratio"], "max_kl": opts.max_kl, "max_ppl_ratio": opts.max_ppl_ratio})
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
    out = [f"Concept {result['concept']!r} on {result['model']}, adapter {result['adapter'] or 'none'}. "
           f"Unsteered: concept score {u['concept']:.2f}, perplexity of its replies {u['ppl']:.2f}. r, t: the "
           "push along v_pos - v_neg and along their mean, as fractions of the stream's norm. Best within the "
           "bounds first; ppl ratio '-' = not sampled (the KL already rules it out).", "",
           "| extract | steer | pooling | r | t | alpha_pos | alpha_neg | concept | KL | ppl ratio | ok |",
           "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(result["rows"], key=lambda r: (not r["ok"], -r["concept"])):
        ratio = "-" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.2f}"
        out.append(f"| {r['extract']} | {r['steer']} | {r['pooling']} | {r['r']:.2f} | {r['t']:+.2f} | "
                   f"{r['alpha_pos']:.3f} | {r['alpha_neg']:.3f} | {r['concept']:.2f} | {r['kl']:.3f} | {ratio} | "
                   f"{'yes' if r['ok'] else 'no'} |")
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
        "kl": scores["kl"], "ppl_ratio": scores["ppl_ratio"], "held_out_accuracy": held_out["accuracy"],
        "held_out_correlation": held_out["correlation"], "l2": opts.l2})
    return {"layer": L, "examples": len(texts), "held_out": held_out, "cosine_with_pairs": cosine, "alpha": alpha,
            "unsteered_concept": ref["concept"], **scores, "path": path, "seconds": time.time() - t0}


def main():
    command, argv = cli.command(sys.argv[1:], COMMANDS, "steer.py")
    opts = parse_options(Options, argv=argv)
    if command == "search":
        result = search(opts)
        print(markdown(result))
        best = result["best"]
        if best is None:
            raise BadInput(f"no setting stayed within --max-kl {opts.max_kl} and --max-ppl-ratio "
                           f"{opts.max_ppl_ratio}; loosen them or try more --trials")
        ratio = best["ppl_ratio"]
        print(f"\nbest: extract resid.{best['extract']}, steer resid.{best['steer']}, {best['pooling']} pooling, "
              f"alpha_pos {best['alpha_pos']:.3f}, alpha_neg {best['alpha_neg']:.3f} (r {best['r']:.2f}, "
              f"t {best['t']:+.2f}): concept {best['concept']:.2f} (unsteered {result['unsteered']['concept']:.2f}), "
              f"KL {best['kl']:.3f}, ppl ratio {ratio:.2f}")
        print_samples(result["sample_prompts"], result["samples"])
        print(f"\nwrote {result['path']}; {len(result['rows'])} settings in {result['seconds'] / 60:.1f} min")
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
