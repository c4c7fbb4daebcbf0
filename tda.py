"""Training-data attribution from activations, and the logit lens: which training examples does a reply
resemble inside the model, and what does each layer already predict?

    python tda.py index                                            # out/adapter over data/convos.jsonl
    python tda.py query --prompt "[RIYA] you coming?\\n[FRIEND]"     # a sampled reply's nearest examples
    python tda.py query --prompt "[RIYA] you coming?\\n[FRIEND]" --reply "omw" --mode lens
    python tda.py lens --prompt "[RIYA] you coming?\\n[FRIEND]"      # layer by layer -> out/tda/lens.png
    python tda.py eval --queries 200                               # recall@1/@10 against BM25

index  runs the model (with the adapter, or --base) over every training example, a target message
       after a few messages of its session as sft.py trains on it, and stores per example and site
       resid.L the mean over the target's tokens, its last token (the newline that ends the turn), the
       mean over all its tokens, and for the first two the logit lens's predicted distribution.
query  pools a prompt (the context) and a reply (the target; sampled unless --reply) like an example
       and lists the most similar training examples per layer. It and eval use the model, adapter and
       layers the index records; both need an index built first.
lens   the logit lens (nostalgebraist 2020, https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru): the
       final norm and unembedding applied to resid.L, what the model would predict if it stopped there.
eval   copies and light paraphrases of indexed messages must retrieve their source: recall@1/@10 of
       every layer, pooling and mode, against BM25 over the messages' text.

Shapes: N indexed examples, Q queries, B batch, T time, D model dim, V vocab, K = LENS_TOP.
"""
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import cli
import sample
import sft
from cli import BadInput, Range, exit_on_bad_input, parse_options
from model import capture, pad
from prep import BM25, TAG_LINE, Message, build_examples, encode_example, load_pair, one_line, split_sessions, tag, words

COMMANDS = ("index", "query", "lens", "eval")
POOLINGS = {"act": ("mean", "last", "all"), "lens": ("mean", "last")}  # what each mode stores per layer


@dataclass
class Options:
    data: Annotated[str, "index: the chat history (default: the data the adapter was trained on)"] = ""
    adapter: Annotated[str, "index, lens: adapter directory from sft.py"] = sft.ADAPTER
    base: Annotated[bool, "index, lens: no adapter, the base model alone"] = False
    allow_other_base: Annotated[bool, "load the adapter even onto a base model other than the one it was "
                                      "trained on"] = False
    model: Annotated[str, f"index, lens: base model (default: the adapter's; with --base, {sft.Options.model})"] = ""
    layers: Annotated[str, "index: sites resid.L to store, e.g. 7,15,22 (default: at 1/4, 1/2 and 3/4 "
                           "of the depth)"] = ""
    context_messages: Annotated[int | None, "index: at most this many earlier messages before each target "
                                            "(default: 2 on a CPU; on a GPU, as the adapter was trained)", Range(0)] = 2
    batch_size: Annotated[int, "sequences per forward", Range(1)] = 16
    index: Annotated[str, "the index file: index writes it, query and eval read it"] = "out/tda/index.safetensors"
    prompt: Annotated[str, "query, lens: chat lines, for query ending in the replier's tag ('\\n' for a "
                           "line break)"] = ""
    reply: Annotated[str, "query: the reply to attribute (default: sample one as sample.py would)"] = ""
    mode: Annotated[str, "query: act (activations) or lens (logit-lens distributions)"] = "act"
    pool: Annotated[str, "query: mean (over the reply), last (its last token) or all (every token)"] = "mean"
    k: Annotated[int, "query: training examples listed per layer", Range(1)] = 5
    position: Annotated[int, "lens: the token whose predictions are printed (-1 = the last)"] = -1
    queries: Annotated[int, "eval: training messages made into queries", Range(1)] = 200
    seed: Annotated[int, "eval: seed for choosing and paraphrasing the messages"] = 0
    out: Annotated[str, "folder for lens.png and eval.json"] = "out/tda"


# An indexed example is a training example as sft.py builds it: a target after up to 8 messages of its
# session. On the shipped data that is 950k tokens to run; with up to 2 messages it is 380k, 40% of the
# time, and 150k of them are the targets, all that mean and last pooling read. So a CPU indexes a
# short context and a GPU the context sft.py trained with (None: the adapter's training.json).
GPU_DEFAULTS = dict(context_messages=None)

# The logit lens's distribution is V wide (49,152 for SmolLM2): dense, 9k examples x 3 layers x 2
# poolings would be 10 GB. Its mass sits on few tokens, so we store each distribution's top K
# probabilities and its full L2 norm; a cosine then sums p_e * p_q over the tokens both top lists
# hold and divides by the exact norms (a slight underestimate where the tails overlap).
LENS_TOP = 128


def load_indexed_model(settings: dict) -> sft.Tuned:
    """The model and tokenizer an index was built with."""
    # The index records the model it was built on; the fingerprint was checked then.
    return sft.load_tuned(settings["adapter"], settings["model"], base=not settings["adapter"], allow_other_base=True)


def parse_layers(text: str, n_layers: int) -> list[int]:
    if not text:
        return sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4})
    try:
        layers = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise BadInput(f"--layers {text!r}: expected numbers separated by commas, e.g. 7,15,22") from None
    if not all(0 <= L <= n_layers for L in layers):
        raise BadInput(f"--layers {text}: this model's sites are resid.0 .. resid.{n_layers}")
    return layers


# ---------------------------------------------------------------------------------------------------
# Pooling: one vector per sequence and site, read from a right-padded batch.

def pool_stream(model, x, real, target, L) -> dict:
    """One site's stream x (B, T, D) of a right-padded batch -> its vectors per sequence, named by layer
    L. real, target (B, T) bool: real tokens, and the target message's tokens. Every mean is a sum under
    a mask divided by that mask's count, so padding never enters one (a mean over the padded row would
    average in the pads' streams and change with the batch a sequence lands in)."""
    B, T, _ = x.shape
    rows = torch.arange(B, device=x.device)
    last = torch.where(target, torch.arange(T, device=x.device), -1).amax(1)  # (B,) the last target token
    h = x.float()

    def masked_mean(mask):  # (B, T) -> (B, D)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    # "all" takes in the first token, whose stream in SmolLM2 has a norm near 25,000 from the middle layers
    # on (~150 elsewhere: a "massive activation", https://arxiv.org/abs/2402.17762), so it dominates that
    # mean; the eval shows what it costs.
    out = {f"act.mean.{L}": masked_mean(target), f"act.last.{L}": h[rows, last], f"act.all.{L}": masked_mean(real)}

    def probs(v):  # the logit lens: resid.L (..., D) -> the next-token distribution (..., V)
        return model.unembed(model.norm(v)).float().softmax(-1)

    p_mean = torch.stack([probs(x[b, target[b]]).mean(0) for b in range(B)])  # (B, V), one at a time: small
    for pooling, p in (("mean", p_mean), ("last", probs(x[rows, last]))):
        top = p.topk(min(LENS_TOP, p.shape[-1]))  # (B, K)
        out[f"lens.{pooling}.{L}.ids"] = top.indices.int()
        out[f"lens.{pooling}.{L}.p"] = top.values
        out[f"lens.{pooling}.{L}.norm"] = p.norm(dim=-1)  # (B,) of the whole distribution
    return out


@torch.inference_mode()
def pool(model, rows, layers, batch_size, desc="pooling") -> dict:
    """rows: [(tokens, target mask)] -> {name: one row per sequence, in rows' order}: for each layer L,
    act.{mean,last,all}.L (N, D); lens.{mean,last}.L.ids and .p (N, K), .norm (N,)."""
    device = model.embed_tokens.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
    parts = defaultdict(list)
    for start in cli.progress(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = [rows[i] for i in order[start : start + batch_size]]
        tokens, real = pad([ids for ids, _ in batch], device=device)
        target = pad([mask for _, mask in batch], device=device)[0].bool()  # (B, T): the target's tokens
        acts = {}
        model(tokens, hooks=capture(acts, *(f"resid.{L}" for L in layers)), unembed=False)
        for L in layers:
            for name, v in pool_stream(model, acts[f"resid.{L}"], real, target, L).items():
                parts[name].append(v.cpu())
    back = torch.tensor(order).argsort()  # batch order -> rows' order
    return {name: torch.cat(v)[back] for name, v in parts.items()}


def similarity(index: dict, queries: dict, key: str, vocab_size: int):
    """Cosine similarity (Q, N) of each query to each indexed example under key: act.{pool}.L, the
    activations, or lens.{pool}.L, the logit lens's distributions (stored sparsely, see LENS_TOP)."""
    if key.startswith("act."):
        return F.normalize(queries[key], dim=-1) @ F.normalize(index[key], dim=-1).T
    ids, p = index[f"{key}.ids"], index[f"{key}.p"]  # (N, K)
    N, K = ids.shape
    where = torch.stack([torch.arange(N).repeat_interleave(K), ids.flatten().long()])  # (2, N*K)
    examples = torch.sparse_coo_tensor(where, p.flatten(), (N, vocab_size), check_invariants=True)  # (N, V)
    q = torch.zeros(len(queries[f"{key}.ids"]), vocab_size)
    q.scatter_(1, queries[f"{key}.ids"].long(), queries[f"{key}.p"])  # (Q, V), its top K only
    dots = torch.sparse.mm(examples, q.T).T  # (Q, N): sums over the tokens both top lists hold
    return dots / (queries[f"{key}.norm"][:, None] * index[f"{key}.norm"][None, :])


# ---------------------------------------------------------------------------------------------------
# The index: one safetensors file, written atomically, its settings and pointers in the metadata.

def training_examples(data: sft.DataSettings, tok, context_messages):
    """(train examples as sft.py's split makes them, with up to context_messages of context, and per
    example a pointer to its target message: its number in load_pair(data)'s messages, session,
    speaker, time and text, and how many context messages the example holds)."""
    messages, _ = load_pair(data.data)
    train, _ = build_examples(messages, tok, context_messages, data.session_gap_hours, data.val_frac, data.max_len)
    train_sessions, _ = split_sessions(messages, data.session_gap_hours, data.val_frac)
    number = {m: i for i, m in enumerate(messages)}  # messages are unique: clean() drops duplicates
    pointers = []
    for e in train:
        m = train_sessions[e.session][e.index]
        pointers.append({"message": number[m], "session": e.session, "speaker": m.speaker, "time": m.time.isoformat(),
                         "text": m.text, "context": e.text[: e.cut].count("\n")})
    return train, pointers


def build_index(opts: Options) -> Path:
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    layers = parse_layers(opts.layers, model.cfg.n_layers)
    data = sft.data_settings(tuned.training, opts)
    context_messages = data.context_messages if opts.context_messages is None else opts.context_messages
    examples, pointers = training_examples(data, tok, context_messages)
    n_tokens = sum(len(e.tokens) for e in examples)
    print(f"indexing {len(examples)} training examples ({n_tokens} tokens) of {data.data} at "
          f"{', '.join(f'resid.{L}' for L in layers)}")
    t0 = time.time()
    tensors = pool(model, [(e.tokens, e.loss_mask) for e in examples], layers, opts.batch_size, desc="indexing")
    metadata = {"model": tuned.base_model, "adapter": tuned.adapter, "data": data.data,
                "layers": ",".join(map(str, layers)), "context_messages": str(context_messages),
                "max_len": str(data.max_len), "vocab_size": str(model.cfg.vocab_size),
                "examples": json.dumps(pointers, ensure_ascii=False)}  # safetensors metadata holds strings
    path = Path(opts.index)
    # fp32: exact round trips, and a few outlier dimensions of the stream can leave fp16's range. ~240 MB
    # for SmolLM2 on the shipped data; 1.4 GB for Mistral-7B's 4096-wide stream.
    cli.write_atomically(path, lambda p: save_file(tensors, p, metadata))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MB) in {time.time() - t0:.0f} s")
    return path


def load_index(path):
    """(tensors, settings, pointers) of an index file build_index wrote."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--index {path}: no index there; build one first with `python tda.py index`")
    try:
        with safe_open(str(path), framework="pt") as f:
            settings, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        pointers = json.loads(settings.pop("examples"))
    except (SafetensorError, TypeError, KeyError, ValueError) as e:
        raise BadInput(f"--index {path} is not an index tda.py wrote ({type(e).__name__}: {e})") from None
    settings["layers"] = [int(L) for L in settings["layers"].split(",")]
    settings.setdefault("max_len", str(sft.Options.max_len))  # indexes from before it was recorded
    for key in ("context_messages", "max_len", "vocab_size"):
        settings[key] = int(settings[key])
    return tensors, settings, pointers


# ---------------------------------------------------------------------------------------------------
# Queries.

def prompt_lines(prompt: str) -> list[str]:
    """--prompt -> its chat lines, the last of which is the replying speaker's tag alone."""
    lines = sample.parse_prompt(prompt)
    if not lines or TAG_LINE.match(lines[-1]).group() != lines[-1]:
        raise BadInput('--prompt must end with the replying speaker\'s tag on a line of its own, e.g. '
                       '"[RIYA] you coming?\\n[FRIEND]"')
    return lines


def query_row(tok, prompt: str, reply: str, max_len: int):
    """A prompt and a reply -> (tokens, target mask), tokenised by prep.encode_example exactly as a
    training example with that context and target (cut to the index's max_len), so a query is pooled
    like one."""
    lines = prompt_lines(prompt)
    # Messages whose speakers are already tags; no time (rendering reads none).
    context = [Message(None, TAG_LINE.match(l).group(), l[TAG_LINE.match(l).end() :].strip()) for l in lines[:-1]]
    target = Message(None, lines[-1], reply)
    tags = {m.speaker: m.speaker for m in context + [target]}
    tokens, mask, _, _ = encode_example(tok, context, target, tags, max_len)
    return tokens, mask


def query(opts: Options):
    """(the reply, {layer: [(example number, score)], best first}, the index's pointers)."""
    if opts.mode not in POOLINGS:
        raise BadInput(f"--mode {opts.mode}: act or lens")
    if opts.pool not in POOLINGS[opts.mode]:
        raise BadInput(f"--pool {opts.pool}: with --mode {opts.mode}, one of {', '.join(POOLINGS[opts.mode])}")
    index, settings, pointers = load_index(opts.index)
    lines = prompt_lines(opts.prompt)
    tuned = load_indexed_model(settings)
    model, tok = tuned.model, tuned.tok
    prompt = sample.prompt_for(lines[:-1], lines[-1])
    reply = opts.reply or sample.generate(model, tok, [prompt], sample.Options())[0]  # sample.py's defaults
    q = pool(model, [query_row(tok, opts.prompt, reply, settings["max_len"])], settings["layers"], 1, desc="query")
    hits = {}
    for L in settings["layers"]:
        scores = similarity(index, q, f"{opts.mode}.{opts.pool}.{L}", settings["vocab_size"])[0]  # (N,)
        top = scores.topk(min(opts.k, len(scores)))
        hits[L] = list(zip(top.indices.tolist(), top.values.tolist()))
    return reply, hits, pointers


def print_hits(hits, pointers, opts: Options):
    for L, rows in hits.items():
        print(f"\nresid.{L} ({opts.mode}, {opts.pool} pooling)\n rank   score  speaker    date        message")
        for rank, (i, score) in enumerate(rows, 1):
            p = pointers[i]
            text = one_line(p["text"])
            text = text if len(text) <= 80 else text[:77] + "..."
            print(f"{rank:>5}  {score:6.3f}  {tag(p['speaker']):<10} {p['time'][:10]}  {text}")


# ---------------------------------------------------------------------------------------------------
# The logit lens.

@torch.inference_mode()
def logit_lens(model, ids: list[int], positions: list[int]):
    """Logits (n_layers + 1, P, V): the final norm and unembedding applied to resid.L at each position,
    for L = 0 .. n_layers. At L = n_layers this is the model's own output (the stream before the norm)."""
    sites = [f"resid.{L}" for L in range(model.cfg.n_layers + 1)]
    acts = {}
    model(torch.tensor([ids], device=model.embed_tokens.weight.device), hooks=capture(acts, *sites), unembed=False)
    return torch.stack([model.unembed(model.norm(acts[s][0, positions])) for s in sites]).float()


def lens(opts: Options) -> Path:
    text = opts.prompt.replace("\\n", "\n")
    if not text.strip():
        raise BadInput('lens needs --prompt, e.g. --prompt "[RIYA] you coming?\\n[FRIEND]"')
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    ids = tok.encode(text)
    if not -len(ids) <= opts.position < len(ids):
        raise BadInput(f"--position {opts.position}: the prompt has {len(ids)} tokens")
    position = opts.position % len(ids)
    shown = sorted(set(range(max(0, len(ids) - 12), len(ids))) | {position})  # the heatmap's columns
    probs = logit_lens(model, ids, shown).softmax(-1)  # (n_layers + 1, P, V)
    show = lambda i: repr(tok.decode([i]))
    print(f"top 5 next tokens at position {position} of {len(ids)} (after {show(ids[position])}), layer by layer:")
    for L, p in enumerate(probs[:, shown.index(position)]):
        top = p.topk(5)
        pairs = zip(top.indices.tolist(), top.values.tolist())
        print(f"resid.{L:<3} " + "  ".join(f"{show(i):>12} {v:.2f}" for i, v in pairs))
    top1 = probs.max(-1)  # values, indices: (n_layers + 1, P)
    path = Path(opts.out) / "lens.png"
    plot_lens(top1.values.numpy(), [[show(i)[1:-1] for i in row] for row in top1.indices.tolist()],
              [f"{j}: {show(ids[j])[1:-1]}" for j in shown], path)
    print(f"wrote {path}")
    return path


def plot_lens(top_p, top_tokens, columns, path: Path):
    """Rows resid.0 .. resid.n_layers, a column per input token; each cell is the lens's top next token
    there, coloured by its probability."""
    plt = cli.pyplot()
    n_sites, P = top_p.shape
    fig, ax = plt.subplots(figsize=(1.1 * P + 2.5, 0.3 * n_sites + 1.8))
    image = ax.imshow(top_p, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for L in range(n_sites):
        for j in range(P):
            ax.text(j, L, top_tokens[L][j][:10], ha="center", va="center", fontsize=6,
                    color="white" if top_p[L, j] > 0.6 else "black")
    ax.set_xticks(range(P), columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n_sites), [f"resid.{L}" for L in range(n_sites)], fontsize=6)
    ax.set(xlabel="input token (its column: the token predicted after it)", title="Logit lens: top next token")
    fig.colorbar(image, ax=ax, label="probability")
    cli.save_figure(fig, path, dpi=150)


# ---------------------------------------------------------------------------------------------------
# Evaluation: can a copy or a light paraphrase of a training message find it again?

# Light paraphrases: rule-based edits a person might make retyping a message. Each takes (text, rng).
CONTRACTIONS = {"do not": "don't", "did not": "didn't", "is not": "isn't", "cannot": "can't", "i am": "i'm",
                "you are": "you're", "it is": "it's", "that is": "that's", "i will": "i'll", "i have": "i've"}


def no_punctuation(text, rng):  # lowercase, and drop punctuation (apostrophes too: "dont")
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def swap_words(text, rng):  # two neighbours change places
    w = text.split()
    i = rng.randrange(max(1, len(w) - 1))
    return " ".join(w[:i] + w[i : i + 2][::-1] + w[i + 2 :])


def drop_word(text, rng):  # one word goes
    w = text.split()
    del w[rng.randrange(len(w))]
    return " ".join(w)


def typo(text, rng):  # two neighbouring letters of a word of 4+ letters change places
    w = text.split()
    long = [i for i, x in enumerate(w) if len(x) >= 4 and x.isalpha()]
    if long:
        i = rng.choice(long)
        j = rng.randrange(len(w[i]) - 1)
        w[i] = w[i][:j] + w[i][j + 1] + w[i][j] + w[i][j + 2 :]
    return " ".join(w)


def contraction(text, rng):  # "do not" <-> "don't": the first pair the text holds, in a seeded order
    pairs = list(CONTRACTIONS.items())
    rng.shuffle(pairs)
    for a, b in [x for pair in pairs for x in (pair, pair[::-1])]:
        new = re.sub(rf"\b{re.escape(a)}\b", b, text, count=1, flags=re.IGNORECASE)
        if new != text:
            return new
    return text


def paraphrase(text: str, rng: random.Random) -> str:
    """Two different edits that each change the text, picked in a seeded order."""
    edits = [no_punctuation, swap_words, drop_word, typo, contraction]
    rng.shuffle(edits)
    done = 0
    for edit in edits:
        new = edit(text, rng)
        if new != text:
            text, done = new, done + 1
        if done == 2:
            break
    return text


def rank_of(scores, sources):
    """scores (Q, N), sources (Q,) -> (Q,) each source's rank, 1 = first (ties count in its favour)."""
    return (scores > scores.gather(1, sources[:, None])).sum(1) + 1


def evaluate(opts: Options) -> dict:
    if opts.queries < 1:
        raise BadInput(f"--queries {opts.queries}: at least 1")
    index, settings, pointers = load_index(opts.index)
    texts = [one_line(p["text"]) for p in pointers]
    count = Counter(t.lower() for t in texts)
    # A message written twice has no single source to find, and a short one little to paraphrase.
    candidates = [i for i, t in enumerate(texts) if count[t.lower()] == 1 and len(t.split()) >= 5]
    if not candidates:
        raise BadInput(f"--index {opts.index}: no indexed message is unique and 5+ words long to query with")
    rng = random.Random(opts.seed)
    sources = rng.sample(candidates, min(opts.queries, len(candidates)))
    # Queries: the message alone after its speaker's tag, with no context (so unless its example had none,
    # the indexed vectors saw a context the query lacks), and the same with two light edits.
    queries = {"copy": [texts[i] for i in sources], "paraphrase": [paraphrase(texts[i], rng) for i in sources]}
    tuned = load_indexed_model(settings)
    model, tok = tuned.model, tuned.tok
    bm25 = BM25([words(t) for t in texts])
    methods = ["BM25"] + [f"{mode}.{p}.{L}" for mode, pools in POOLINGS.items() for p in pools
                          for L in settings["layers"]]
    ranks = defaultdict(dict)  # method -> query kind -> (Q,) the source's rank
    target = torch.tensor(sources)
    for kind, qs in queries.items():
        ranks["BM25"][kind] = rank_of(torch.tensor(np.stack([bm25.scores(words(q)) for q in qs])), target)
        rows = [query_row(tok, tag(pointers[i]["speaker"]), q, settings["max_len"]) for i, q in zip(sources, qs)]
        pooled = pool(model, rows, settings["layers"], opts.batch_size, desc=f"{kind} queries")
        for key in methods[1:]:
            ranks[key][kind] = rank_of(similarity(index, pooled, key, settings["vocab_size"]), target)
    recall = {m.replace(".", " ", 1).replace(".", " resid.", 1):  # "act.mean.7" -> "act mean resid.7"
              {f"{kind} R@{k}": (ranks[m][kind] <= k).float().mean().item() for kind in queries for k in (1, 10)}
              for m in methods}
    score = lambda kind, m: (recall[m][f"{kind} R@1"], recall[m][f"{kind} R@10"])
    best = {kind: [m for m in recall if score(kind, m) == max(score(kind, x) for x in recall)] for kind in queries}
    settings = {**asdict(opts), **settings, "examples": len(pointers), "queries": len(sources),
                "copies_equal_to_their_example": sum(pointers[i]["context"] == 0 for i in sources)}
    return {"settings": settings, "recall": recall, "best": best,
            "paraphrases": [{"message": texts[i], "query": q} for i, q in zip(sources[:5], queries["paraphrase"])]}


def markdown(r: dict) -> str:
    s = r["settings"]
    adapter = f"adapter {s['adapter']}" if s["adapter"] else "no adapter"
    out = [f"{s['queries']} queries against {s['examples']} indexed training examples of {s['data']} "
           f"({s['model']}, {adapter}, up to {s['context_messages']} context messages). Each query is a unique "
           f"message of 5+ words after its speaker's tag, no context: copied (for "
           f"{s['copies_equal_to_their_example']} of them the indexed example had no context either: the "
           f"same sequence), and lightly paraphrased (e.g. {r['paraphrases'][0]['message']!r} -> "
           f"{r['paraphrases'][0]['query']!r}).", "",
           "| method | copy R@1 | copy R@10 | paraphrase R@1 | paraphrase R@10 |",
           "| --- | ---: | ---: | ---: | ---: |"]
    out += [f"| {m} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |" for m, row in r["recall"].items()]
    best = [f"{kind}: {' = '.join(ms)} (R@1 {r['recall'][ms[0]][f'{kind} R@1']:.3f})" for kind, ms in r["best"].items()]
    out += ["", "Best by R@1, then R@10: " + "; ".join(best) + "."]
    return "\n".join(out)


def main():
    command, argv = cli.command(sys.argv[1:], COMMANDS, "tda.py")
    opts = parse_options(Options, GPU_DEFAULTS, argv)
    if command == "index":
        build_index(opts)
    elif command == "query":
        reply, hits, pointers = query(opts)
        print(f"{prompt_lines(opts.prompt)[-1]} {reply}" + ("" if opts.reply else "   (sampled)"))
        print_hits(hits, pointers, opts)
    elif command == "lens":
        lens(opts)
    else:
        result = evaluate(opts)
        path = Path(opts.out) / "eval.json"
        cli.write_atomically(path, lambda p: p.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n"))
        print(markdown(result))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    exit_on_bad_input(main)
