"""Training-data attribution, and the logit lens: which training examples taught the model a reply, and
what does each layer already predict?

    python tda.py index                                            # out/adapter over data/convos.jsonl
    python tda.py query --prompt "[RIYA] you coming?\\n[FRIEND]"     # a sampled reply's nearest examples
    python tda.py query --prompt "[RIYA] you coming?\\n[FRIEND]" --reply "omw" --mode grad
    python tda.py lens --prompt "[RIYA] you coming?\\n[FRIEND]"      # layer by layer -> out/tda/lens.png
    python tda.py eval --planted                                   # planted facts: said, or only mentioned?
    python tda.py eval --tail-patch                                # does a step on the top examples help?
    python tda.py eval --queries 200                               # find a message's own text again

index  runs the model (with the adapter, or --base) over every training example, a target message
       after a few messages of its session as sft.py trains on it, and stores per example and site
       resid.L the mean over the target's tokens, its last token (the newline that ends the turn), the
       mean over all its tokens, and for the first two the logit lens's predicted distribution. It marks
       the examples the adapter trained on (rebuilt from sft.py's batch order) and stores their
       projected LoRA gradients.
query  pools a prompt (the context) and a reply (the target; sampled unless --reply) like an example
       and lists the most similar trained-on examples per layer (--mode act, lens), or by gradient
       (--mode grad). It and eval use the model, adapter and layers the index records.
lens   the logit lens (nostalgebraist 2020, https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru): the
       final norm and unembedding applied to resid.L, what the model would predict if it stopped there.
eval   --planted: a fine-tune on a pool with invented facts, each in 2 sources (the answer in the
       target) and decoys (the same words, the answer only in the context): recall@1 and MRR of the
       sources for every method. --tail-patch: one optimizer step on each method's top examples for a
       sampled reply, and how much likelier the reply became. Plain eval: copies and light paraphrases of
       indexed messages must retrieve their source (finding a message's own text: BM25's home ground).

Shapes: N indexed examples, Q queries, B batch, T time, D model dim, V vocab, K = LENS_TOP.
"""
import json
import math
import random
import re
import shutil
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
import eval as ev
import lora
import sample
import sft
from cli import POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import capture, load_model, pad, scored_logprobs
from prep import BM25, TAG_LINE, Example, Message, build_examples, encode_example, load_pair, one_line, split_sessions, tag, words

COMMANDS = ("index", "query", "lens", "eval")
# What each mode stores per layer (act, lens), or compares (grad: with or without the preconditioner).
POOLINGS = {"act": ("mean", "last", "all"), "lens": ("mean", "last"), "grad": ("precond", "cos")}


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
    mode: Annotated[str, "query: act (activations), lens (logit-lens distributions) or grad (LoRA "
                         "gradients)"] = "act"
    pool: Annotated[str, "query: with act, mean (over the reply), last (its last token) or all (every token); "
                         "with lens, mean or last; with grad, precond or cos (default: the first)"] = ""
    k: Annotated[int, "query: training examples listed per layer", Range(1)] = 5
    all_examples: Annotated[bool, "query: rank every indexed example, not only those the adapter trained on"] = False
    trained_only: Annotated[bool, "index: only the examples the adapter trained on (the default run: 800 of "
                                  "8,986, minutes instead of ~25 on a CPU)"] = False
    no_grads: Annotated[bool, "index: skip the LoRA gradients of the examples the adapter trained on (for "
                              "--mode grad; they cost a backward pass each)"] = False
    grad_dims: Annotated[int, "index: project each LoRA module's input and output side to this many "
                              "dimensions (LoGra): 2 x this x r numbers per module", Range(1)] = 4
    damping: Annotated[float, "grad precond: lambda, as a multiple of each module's mean gradient "
                              "second moment", POSITIVE] = 0.1
    position: Annotated[int, "lens: the token whose predictions are printed (-1 = the last)"] = -1
    queries: Annotated[int, "eval: training messages made into queries", Range(1)] = 200
    planted: Annotated[bool, "eval: the planted-facts test (fine-tunes its own adapter on a pool with "
                             "invented facts)"] = False
    pool_size: Annotated[int, "eval --planted: real examples in the pool", Range(1)] = 1000
    decoys: Annotated[int, "eval --planted: examples per fact that mention it only in their context", Range(0)] = 4
    planted_epochs: Annotated[float, "eval --planted: passes over the pool", POSITIVE] = 3.0
    verify: Annotated[bool, "eval --planted: also retrain without the sources, and without the decoys"] = False
    tail_patch: Annotated[bool, "eval: the tail-patch test on sampled replies (needs the adapter's "
                                "checkpoint.safetensors)"] = False
    replies: Annotated[int, "eval --tail-patch: sampled replies to held-out prompts", Range(1)] = 30
    top: Annotated[int, "eval --tail-patch: each method's top examples patched", Range(1)] = 5
    bootstrap: Annotated[int, "eval: bootstrap resamples for each interval", Range(100)] = 2000
    seed: Annotated[int, "eval: seed for choosing and paraphrasing the messages, the pool and the "
                         "projections"] = 0
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
# Gradient attribution on the adapter: which training examples' gradients point where the reply's does?
#
# Activations say what an example resembles; a gradient says how training on it moved the model. The
# adapter is all that training changed, so its gradients are the ones that matter: for one LoRA module
# (y = W x + B A x, scale folded into B's output gradient), an example's loss L has
#     grad_A = sum_t (dL/du_t) x_t^T    (r, in),   u_t = A x_t
#     grad_B = sum_t (dL/dv_t) u_t^T    (out, r),  v_t = B u_t
# Forward hooks keep each module's input x and u, tensor hooks their outputs' gradients, and the sums
# over t of a right-padded batch give every example its own gradient from one backward (its loss reads
# only its own row, and pads carry none). LoGra (Choe et al. 2024, https://arxiv.org/abs/2405.13954)
# projects such outer-product gradients before forming them: a fixed random P_in (k, in) on x and
# P_out (k, out) on dL/dv give grad_A P_in^T (r, k) and P_out grad_B (k, r), never the full (r, in) or
# (out, r). At k = 4, r = 16, 210 modules that is 26,880 numbers per example for SmolLM2.
#
# Two methods read them. "grad cos": the cosine of two gradients (TracIn, Pruthi et al. 2020, at the
# final checkpoint). "grad precond": the cosine after a damped inverse of the gradients' second moment,
# per module, g_q^T (C + lambda I)^-1 g_n (an influence-function approximation, Koh & Liang 2017; with
# unit norms, as TrackStar, Chang et al. 2024): directions every example's gradient shares, e.g. "end
# the turn with a newline", stop dominating the match.

def projections(model, k: int | None, seed=0) -> dict:
    """Per LoRA module name, (P_in (k, in), P_out (k, out)), Gaussian / sqrt(k), the same for a seed on
    every run; k None: no projection (the full gradients, for the tests)."""
    if k is None:
        return {name: None for name in lora.lora_modules(model)}
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(k, m.lora_A.in_features, generator=g) / math.sqrt(k),
                   torch.randn(k, m.lora_B.out_features, generator=g) / math.sqrt(k))
            for name, m in lora.lora_modules(model).items()}


def lora_gradients(model, rows, projection: dict, batch_size: int, desc="gradients") -> torch.Tensor:
    """rows: [(tokens, target mask)] -> (N, G): each row's gradient of its target's summed NLL with respect
    to every LoRA module's A and B, projected (see projections), flattened module by module in
    lora_modules' order (A's part, then B's), in rows' order."""
    modules = lora.lora_modules(model)
    if not modules:
        raise BadInput("gradient attribution needs an adapter: the model has none (--base)")
    device = model.embed_tokens.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    saved, parts = {}, []

    def on_A(name, p_in):  # lora_A's forward: keep (P_in) x, and dL/du when the backward reaches u
        def hook(module, inputs, u):
            x = inputs[0].detach()
            saved[name, "x"] = x if p_in is None else x @ p_in.T  # (B, T, k | in)
            u.register_hook(lambda g: saved.__setitem__((name, "dL/du"), g))  # (B, T, r)
        return hook

    def on_B(name, p_out):  # lora_B's forward: keep u, and (P_out) dL/dv
        def hook(module, inputs, v):
            saved[name, "u"] = inputs[0].detach()  # (B, T, r)
            v.register_hook(lambda g: saved.__setitem__((name, "dL/dv"), g if p_out is None else g @ p_out.T))  # (B, T, k | out)
        return hook

    handles = []
    for name, m in modules.items():
        p_in, p_out = (None, None) if projection[name] is None else (p.to(device) for p in projection[name])
        handles += [m.lora_A.register_forward_hook(on_A(name, p_in)), m.lora_B.register_forward_hook(on_B(name, p_out))]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the function the adapter computes
    try:
        for start in cli.progress(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            batch = [rows[i] for i in order[start : start + batch_size]]
            tokens, _ = pad([ids for ids, _ in batch], device=device)
            scored = pad([mask for _, mask in batch], device=device)[0].bool()  # (B, T)
            with torch.enable_grad():
                (-scored_logprobs(model, tokens, scored).sum()).backward()  # the sum: rows stay apart
            per_module = []
            for name in modules:
                grad_A = torch.einsum("btr,btk->brk", saved[name, "dL/du"], saved[name, "x"])  # (B, r, k | in)
                grad_B = torch.einsum("btk,btr->bkr", saved[name, "dL/dv"], saved[name, "u"])  # (B, k | out, r)
                per_module += [grad_A.flatten(1), grad_B.flatten(1)]
            parts.append(torch.cat(per_module, 1).float().cpu())
            saved.clear()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)  # backward also filled the adapter's .grad; nobody reads it
        model.train(was_training)
    return torch.cat(parts)[torch.tensor(order).argsort()]


def whitener(grads: torch.Tensor, block: int, damping: float) -> torch.Tensor:
    """grads (N, G), G a whole number of blocks (one per LoRA module) -> (G/block, block, block): per
    block, (C + lambda I)^-1/2, C the block's second moment over the N gradients and lambda = damping x
    its mean diagonal (damping relative to the block's scale: modules' gradients differ in size by
    orders of magnitude)."""
    g = grads.view(len(grads), -1, block).transpose(0, 1).double()  # (M, N, block)
    C = g.transpose(1, 2) @ g / len(grads)  # (M, block, block)
    lam = damping * C.diagonal(dim1=1, dim2=2).mean(1)  # (M,)
    values, vectors = torch.linalg.eigh(C + lam[:, None, None] * torch.eye(block, dtype=C.dtype))
    return (vectors * values.clamp_min(1e-30).rsqrt()[:, None, :] @ vectors.transpose(1, 2)).float()


def grad_scores(train: torch.Tensor, queries: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
    """Cosines (Q, N) of query gradients (Q, G) to training gradients (N, G); with W (whitener's), after
    whitening both: g_q^T (C + lambda I)^-1 g_n over their whitened norms."""
    if W is not None:
        white = lambda g: torch.einsum("nmb,mbc->nmc", g.view(len(g), *W.shape[:2]), W).flatten(1)
        train, queries = white(train), white(queries)
    return F.normalize(queries, dim=-1) @ F.normalize(train, dim=-1).T


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
        pointers.append({"message": number[m], "session": e.session, "index": e.index, "speaker": m.speaker,
                         "time": m.time.isoformat(),
                         "text": m.text, "context": e.text[: e.cut].count("\n")})
    return train, pointers


def run_examples(training: dict, tok) -> tuple[list, int]:
    """The examples the run that wrote training.json trained on, in its order (sft.examples: the chat
    history's, then any --examples rows), and how many of them are the chat history's."""
    o = sft.Options(**{k: v for k, v in training.items() if k in sft.Options.__dataclass_fields__})
    messages, _ = load_pair(o.data)
    train, _ = build_examples(messages, tok, o.context_messages, o.session_gap_hours, o.val_frac, o.max_len,
                              o.recency_half_life_days or None, o.seed)
    if not o.examples:
        return train, len(train)
    extra = sft.rows_as_examples(o.examples, tok, o.max_len)
    return (extra, 0) if o.examples_only else (train + extra, len(train))


def trained_on(training: dict, tok, data: sft.DataSettings):
    """(how many times the run that wrote an adapter trained on each example of the chat history, keyed
    by its target's (session, index) on the training side of split_sessions, or None; why not). Rebuilt
    exactly from sft.py's batch order: sft.batch_at over run_examples, with the options and the steps
    done that training.json records. None when the run can't be rebuilt: other data, or --examples rows
    that are gone."""
    if training.get("data_sha256") is None or training.get("max_steps") is None:
        return None, "the adapter's training.json does not say what it trained on"
    if cli.file_sha256(data.data) != training["data_sha256"]:
        return None, f"{data.data} is not the data the adapter was trained on"
    if training.get("examples") and not Path(training["examples"]).exists():
        return None, f"its --examples file {training['examples']} is gone"
    train, n_chat = run_examples(training, tok)
    batch = sft.batch_at(train, training["batch_size"], training["seed"])
    micro_batches = training.get("steps_done", training["max_steps"]) * training["grad_accum"] * training.get("world", 1)
    counts = Counter()
    for g in range(micro_batches):
        counts.update((train[i].session, train[i].index) for i in batch(g) if i < n_chat)
    return counts, ""


def build_index(opts: Options) -> Path:
    tuned = sft.load_tuned(opts.adapter, opts.model, opts.base, allow_other_base=opts.allow_other_base)
    model, tok = tuned.model, tuned.tok
    layers = parse_layers(opts.layers, model.cfg.n_layers)
    data = sft.data_settings(tuned.training, opts)
    context_messages = data.context_messages if opts.context_messages is None else opts.context_messages
    examples, pointers = training_examples(data, tok, context_messages)
    counts, why = trained_on(tuned.training, tok, data) if tuned.adapter else (None, "no adapter")
    if counts is not None:
        for p in pointers:
            p["trained"] = counts[p["session"], p["index"]]
        seen = sum(p["trained"] > 0 for p in pointers)
        print(f"the adapter trained on {seen} of these {len(pointers)} examples ({sum(counts.values())} times in all)")
        if opts.trained_only:
            keep = [i for i, p in enumerate(pointers) if p["trained"]]
            examples, pointers = [examples[i] for i in keep], [pointers[i] for i in keep]
    elif opts.trained_only:
        raise BadInput(f"--trained-only: which examples the adapter trained on is unknown ({why})")
    else:
        print(f"note: which examples the adapter trained on is unknown ({why}); queries rank them all")
    n_tokens = sum(len(e.tokens) for e in examples)
    print(f"indexing {len(examples)} training examples ({n_tokens} tokens) of {data.data} at "
          f"{', '.join(f'resid.{L}' for L in layers)}")
    t0 = time.time()
    rows = [(e.tokens, e.loss_mask) for e in examples]
    tensors = pool(model, rows, layers, opts.batch_size, desc="indexing")
    metadata = {"model": tuned.base_model, "adapter": tuned.adapter, "data": data.data,
                "layers": ",".join(map(str, layers)), "context_messages": str(context_messages),
                "max_len": str(data.max_len), "vocab_size": str(model.cfg.vocab_size)}
    if tuned.adapter and not opts.no_grads:
        # Gradients cost a backward each: only for the examples the adapter learned from, when known.
        chosen = [i for i, p in enumerate(pointers) if p.get("trained", 1) > 0]
        print(f"LoRA gradients of {len(chosen)} examples, projected to {opts.grad_dims} x r per side of each module")
        grads = lora_gradients(model, [rows[i] for i in chosen], projections(model, opts.grad_dims, opts.seed),
                               opts.batch_size, desc="gradients")  # (Ng, G)
        norm = grads.norm(dim=1)
        # fp16 of the unit vector (its entries ~ 1/sqrt(G), far inside fp16's range) and the norm in fp32:
        # 54 KB an example for SmolLM2 instead of 108.
        tensors |= {"grad.rows": torch.tensor(chosen), "grad.norm": norm,
                    "grad.unit": (grads / norm.clamp_min(1e-30)[:, None]).half()}
        metadata |= {"grad_dims": str(opts.grad_dims), "grad_seed": str(opts.seed),
                     "grad_block": str(2 * opts.grad_dims * lora.adapter_settings(model)["r"])}
    metadata["examples"] = json.dumps(pointers, ensure_ascii=False)  # safetensors metadata holds strings
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
    for key in ("context_messages", "max_len", "vocab_size", "grad_dims", "grad_seed", "grad_block"):
        if key in settings:
            settings[key] = int(settings[key])
    return tensors, settings, pointers


def candidates(pointers, all_examples: bool) -> torch.Tensor:
    """(N,) bool: the examples a query may return: those the adapter trained on, when the index knows
    them, unless all_examples."""
    if all_examples or "trained" not in pointers[0]:
        return torch.ones(len(pointers), dtype=torch.bool)
    return torch.tensor([p["trained"] > 0 for p in pointers])


def index_grads(index: dict, N: int) -> torch.Tensor:
    """The index's gradients as (N, G) fp32, zero for the examples it holds none of."""
    grads = torch.zeros(N, index["grad.unit"].shape[1])
    grads[index["grad.rows"]] = index["grad.unit"].float() * index["grad.norm"][:, None]
    return grads


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
    """(the reply, {what was compared: [(example number, score)], best first}, the index's pointers)."""
    if opts.mode not in POOLINGS:
        raise BadInput(f"--mode {opts.mode}: {', '.join(POOLINGS)}")
    pooling = opts.pool or POOLINGS[opts.mode][0]
    if pooling not in POOLINGS[opts.mode]:
        raise BadInput(f"--pool {opts.pool}: with --mode {opts.mode}, one of {', '.join(POOLINGS[opts.mode])}")
    index, settings, pointers = load_index(opts.index)
    if opts.mode == "grad" and "grad.unit" not in index:
        raise BadInput(f"--mode grad: --index {opts.index} holds no gradients (built with --base or --no-grads)")
    lines = prompt_lines(opts.prompt)
    tuned = load_indexed_model(settings)
    model, tok = tuned.model, tuned.tok
    prompt = sample.prompt_for(lines[:-1], lines[-1])
    reply = opts.reply or sample.generate(model, tok, [prompt], sample.Options())[0]  # sample.py's defaults
    row = query_row(tok, opts.prompt, reply, settings["max_len"])
    allowed = candidates(pointers, opts.all_examples)
    if opts.mode == "grad":
        allowed &= torch.zeros(len(pointers), dtype=torch.bool).index_fill_(0, index["grad.rows"], True)  # has one
        grads = index_grads(index, len(pointers))
        q = lora_gradients(model, [row], projections(model, settings["grad_dims"], settings["grad_seed"]), 1)
        W = whitener(grads[index["grad.rows"]], settings["grad_block"], opts.damping) if pooling == "precond" else None
        scores = {f"LoRA gradients ({pooling})": grad_scores(grads, q, W)[0]}
    else:
        q = pool(model, [row], settings["layers"], 1, desc="query")
        scores = {f"resid.{L} ({opts.mode}, {pooling} pooling)":
                  similarity(index, q, f"{opts.mode}.{pooling}.{L}", settings["vocab_size"])[0] for L in settings["layers"]}
    hits = {}
    for label, s in scores.items():  # s (N,)
        s = s.masked_fill(~allowed, -math.inf)
        top = s.topk(min(opts.k, int(allowed.sum())))
        hits[label] = list(zip(top.indices.tolist(), top.values.tolist()))
    return reply, hits, pointers


def print_hits(hits, pointers):
    for label, rows in hits.items():
        print(f"\n{label}\n rank   score  speaker    date        message")
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
    methods = ["BM25"] + [f"{mode}.{p}.{L}" for mode in ("act", "lens") for p in POOLINGS[mode]
                          for L in settings["layers"]]
    ranks = defaultdict(dict)  # method -> query kind -> (Q,) the source's rank
    target = torch.tensor(sources)
    tops = {}  # method -> (Q, 10) the paraphrases' top hits
    for kind, qs in queries.items():
        bm25_scores = torch.tensor(np.stack([bm25.scores(words(q)) for q in qs]))
        ranks["BM25"][kind], tops["BM25"] = rank_of(bm25_scores, target), bm25_scores.topk(min(10, len(texts))).indices
        rows = [query_row(tok, tag(pointers[i]["speaker"]), q, settings["max_len"]) for i, q in zip(sources, qs)]
        pooled = pool(model, rows, settings["layers"], opts.batch_size, desc=f"{kind} queries")
        for key in methods[1:]:
            s = similarity(index, pooled, key, settings["vocab_size"])
            ranks[key][kind], tops[key] = rank_of(s, target), s.topk(min(10, s.shape[1])).indices
    recall = {m.replace(".", " ", 1).replace(".", " resid.", 1):  # "act.mean.7" -> "act mean resid.7"
              {f"{kind} R@{k}": (ranks[m][kind] <= k).float().mean().item() for kind in queries for k in (1, 10)}
              for m in methods}
    if "trained" in pointers[0]:  # every example may be returned here: how many top hits did training never see?
        unseen = torch.tensor([p["trained"] == 0 for p in pointers])
        for m, name in zip(methods, recall):
            recall[name]["paraphrase top-10 unseen"] = unseen[tops[m]].float().mean().item()
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
           f"{r['paraphrases'][0]['query']!r}). This finds a message's own text: the question BM25 answers by "
           "construction, not which examples taught a reply (eval --planted, --tail-patch).", ""]
    columns = list(next(iter(r["recall"].values())))
    out += ["| method | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    out += [f"| {m} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |" for m, row in r["recall"].items()]
    best = [f"{kind}: {' = '.join(ms)} (R@1 {r['recall'][ms[0]][f'{kind} R@1']:.3f})" for kind, ms in r["best"].items()]
    out += ["", "Best by R@1, then R@10: " + "; ".join(best) + "."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Ranking with ties broken at random, and the methods every evaluation below compares.

def first_source_rank(scores, is_source, generator) -> torch.Tensor:
    """scores (Q, N), is_source (Q, N) bool, at least one per row -> (Q,) the rank of each query's
    best-ranked source, 1 = first, ties broken in a random order (BM25 ties often: equal word counts)."""
    shuffle = torch.rand(scores.shape, generator=generator).argsort(1)  # (Q, N) a random order per query
    order = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)  # ties keep that order
    return is_source.gather(1, shuffle).gather(1, order).float().argmax(1) + 1


def method_scores(model, tok, examples, queries, layers, batch_size, grad_dims, damping, seed, index=None) -> dict:
    """{method: (Q, N) scores} of every method for queries against examples (both lists of prep.Example):
    BM25 over their text (context and target) and over their targets alone, random, activations and the
    logit lens at each layer and pooling, and the two gradient methods. index: the examples' pooled vectors and gradients, if already
    computed ({"pooled", "grads"})."""
    bm25 = BM25([words(e.text) for e in examples])
    # Also BM25 over the targets alone: what a method that reads only the words the loss covered can do.
    on_targets = BM25([words(e.text[e.cut :]) for e in examples])
    out = {"BM25": torch.tensor(np.stack([bm25.scores(words(q.text)) for q in queries])).float(),
           "BM25 targets": torch.tensor(np.stack([on_targets.scores(words(q.text)) for q in queries])).float(),
           "random": torch.rand(len(queries), len(examples), generator=torch.Generator().manual_seed(seed))}
    rows = lambda xs: [(x.tokens, x.loss_mask) for x in xs]
    index = index or {}
    pooled = index.get("pooled") or pool(model, rows(examples), layers, batch_size, desc="pooling examples")
    asked = pool(model, rows(queries), layers, batch_size, desc="pooling queries")
    for mode in ("act", "lens"):
        for p in POOLINGS[mode]:
            for L in layers:
                out[f"{mode} {p} resid.{L}"] = similarity(pooled, asked, f"{mode}.{p}.{L}", model.cfg.vocab_size)
    projection = projections(model, grad_dims, seed)
    grads = index.get("grads")
    if grads is None:
        grads = lora_gradients(model, rows(examples), projection, batch_size, desc="gradients of examples")
    q = lora_gradients(model, rows(queries), projection, batch_size, desc="gradients of queries")
    out["grad cos"] = grad_scores(grads, q, None)
    out["grad precond"] = grad_scores(grads, q, whitener(grads, 2 * grad_dims * lora.adapter_settings(model)["r"], damping))
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation 1, planted facts: said or merely mentioned?
#
# Invented facts ("dravik's recital -> tuesday") are planted in a pool of real examples: each in 2
# sources, where the answer is in the target, the part the loss covers, and in decoys, where name and
# answer sit in the context, which no loss covers. A decoy holds the same words as a source (the same
# lines, in another order, other speakers), so BM25 over the text cannot tell them apart, but only the
# sources can teach the model the answer. The model is fine-tuned on the pool; a new question about a
# fact it learned, with the answer as the reply, should find a source.

NAMES = ("dravik", "quillon", "marvessa", "tobrin", "zelphine", "korvath", "elspira", "brannick", "vostrel",
         "imrahel", "cadwyn", "orsolya", "pellimor", "yanvic", "thessiva", "grumwald")
THINGS = ("recital", "puppy", "boat", "bakery", "band", "garden", "wedding", "car", "exam", "shop", "bike",
          "flat", "party", "team", "cafe", "trip")
ANSWERS = ("tuesday", "purple", "pizza", "seven", "london", "guitar", "winter", "pancakes", "green", "friday",
           "tennis", "twelve", "orange", "paris", "sunday", "coffee")
QUESTIONS = ("what's the deal with {name}'s {thing}?", "wait what about {name}'s {thing}")  # in the pool
FACTS = ("{answer}, that's {name}'s {thing}", "{answer} obviously, {name} and the {thing}")
NEW_QUESTIONS = ("remind me, {name}'s {thing}?", "and {name}'s {thing}, what was it")  # only in queries
REACTIONS = ("oh nice", "haha ok", "cool cool", "ahh ok")
LEARNED_NATS = 2.0  # a fact counts as learned when its answer's log-prob rose this much over the base model's


def planted_rows(real: list[dict], tags: list[str], decoys: int, sources=True) -> tuple[list[dict], list[dict]]:
    """(the pool's rows in sft.py's --examples format, each marked with its kind and fact; the queries'
    rows). real: rows of real examples. Fact i is asked by tags[i % 2] and answered by the other."""
    rows, queries = [dict(r, kind="real", fact=-1) for r in real], []
    for i, (name, thing, answer) in enumerate(zip(NAMES, THINGS, ANSWERS)):
        a, b = tags[i % 2], tags[1 - i % 2]
        fill = lambda s: s.format(name=name, thing=thing, answer=answer)
        reaction = REACTIONS[i % len(REACTIONS)]
        for j in range(2 if sources else 0):  # the answer in the target: loss on it
            rows.append({"context": [f"{a} {reaction}", f"{a} {fill(QUESTIONS[j])}"], "speaker": b,
                         "reply": fill(FACTS[j]), "kind": "source", "fact": i})
        for j in range(decoys):  # the same lines, the fact in the context: no loss on it
            rows.append({"context": [f"{a} {fill(QUESTIONS[j % 2])}", f"{b} {fill(FACTS[j % 2])}"], "speaker": a,
                         "reply": reaction, "kind": "decoy", "fact": i})
        for question in NEW_QUESTIONS:
            queries.append({"context": [f"{a} {fill(question)}"], "speaker": b, "reply": answer, "fact": i})
    return rows, queries


def answer_logprobs(model, examples, batch_size) -> torch.Tensor:
    """(Q,) log p(answer | question) of query examples: the target's tokens but the newline after it."""
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            tokens, _ = pad([e.tokens for e in batch])
            scored = torch.zeros(tokens.shape, dtype=torch.bool)
            for b, e in enumerate(batch):
                last = max(j for j, m in enumerate(e.loss_mask) if m)  # the newline that ends the turn
                scored[b, : len(e.tokens)] = torch.tensor(e.loss_mask)
                scored[b, last] = False
            lp = scored_logprobs(model, tokens, scored)  # (n,) row-major over scored
            rows = scored[:, 1:].nonzero()[:, 0]
            out.append(torch.zeros(len(batch)).index_add_(0, rows, lp))
    return torch.cat(out)


def fine_tune_pool(rows, run: Path, opts: Options, data: str, model: str) -> Path:
    """sft.py's loop on the pool alone (--examples-only), into run/; a finished run with the same pool is
    reused and a stopped one resumed. -> its adapter directory."""
    pool_path = run / "pool.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if pool_path.exists() and pool_path.read_text(encoding="utf-8") != text:
        shutil.rmtree(run)  # another pool (other settings): its run answers another question
    training = lora.read_training(run / "adapter") if (run / "adapter").exists() else None
    if training and training.get("steps_done") == training["max_steps"]:
        print(f"{run}: fine-tuned already ({training['max_steps']} steps), reused")
        return run / "adapter"
    run.mkdir(parents=True, exist_ok=True)
    cli.write_atomically(pool_path, lambda p: p.write_text(text, encoding="utf-8"))
    print(f"{run}: fine-tuning on {len(rows)} examples, {opts.planted_epochs:g} epochs")
    sft.train(sft.Options(data=data, model=model, out=str(run), examples=str(pool_path), examples_only=True,
                          epochs=opts.planted_epochs, val_examples=16, eval_every=10**9, save_every=50,
                          samples=0, seed=opts.seed, resume=(run / sft.CHECKPOINT).exists()))
    return run / "adapter"


def evaluate_planted(opts: Options) -> dict:
    data = opts.data or sft.Options.data
    model_name = opts.model or sft.Options.model
    context_messages = 2 if opts.context_messages is None else opts.context_messages
    messages, _ = load_pair(data)
    _, tok = load_model(model_name)
    train, _ = build_examples(messages, tok, context_messages)
    if len(train) < opts.pool_size:
        raise BadInput(f"--pool-size {opts.pool_size}: {data} has only {len(train)} training examples")
    rng = random.Random(opts.seed)
    real = [{"context": e.text[: e.cut].split("\n")[:-1], "speaker": e.text[: e.cut].split("\n")[-1],
             "reply": e.text[e.cut :].strip()} for e in rng.sample(train, opts.pool_size)]
    tags = list(dict.fromkeys(tag(m.speaker) for m in messages))
    rows, query_rows = planted_rows(real, tags, opts.decoys)
    out = Path(opts.out) / "planted" / f"decoys{opts.decoys}"
    adapter = fine_tune_pool(rows, out / "full", opts, data, model_name)
    tuned = sft.load_tuned(str(adapter))
    model = tuned.model
    as_examples = lambda rs: sft.examples_from_rows(rs, tok, sft.Options.max_len)
    examples, queries = as_examples(rows), as_examples(query_rows)
    fact_of = torch.tensor([q["fact"] for q in query_rows])

    # Which facts did it learn? The answer's log-prob after the new questions, against the base model's.
    with lora.disabled(model):
        before = answer_logprobs(model, queries, opts.batch_size)
    after = answer_logprobs(model, queries, opts.batch_size)
    gain = torch.zeros(len(NAMES)).index_add_(0, fact_of, after - before) / len(NEW_QUESTIONS)  # (facts,)
    learned = (gain >= LEARNED_NATS).nonzero()[:, 0].tolist()
    print(f"facts learned (answer log-prob up >= {LEARNED_NATS:g} nats): {len(learned)} of {len(NAMES)}")
    result = {"settings": {**asdict(opts), "data": data, "model": model_name, "pool": len(rows),
                           "real_examples": opts.pool_size, "facts": len(NAMES)},
              "gain_nats": gain.tolist(), "learned": learned}
    if opts.verify:
        result["verify"] = {}
        for name, kept in (("no-sources", planted_rows(real, tags, opts.decoys, sources=False)[0]),
                           ("no-decoys", planted_rows(real, tags, 0)[0])):
            other = sft.load_tuned(str(fine_tune_pool(kept, out / name, opts, data, model_name))).model
            g = torch.zeros(len(NAMES)).index_add_(0, fact_of, answer_logprobs(other, queries, opts.batch_size) - before)
            g = g / len(NEW_QUESTIONS)
            result["verify"][name] = {"still_learned": int(sum(g[i] >= LEARNED_NATS for i in learned)), "of": len(learned),
                                      "mean_gain_nats": g[learned].mean().item() if learned else None}
    if len(learned) < 12:
        result["note"] = (f"only {len(learned)} of {len(NAMES)} facts were learned (12 needed): more "
                          "--planted-epochs, or a higher learning rate")
        print(result["note"])
        if not learned:
            return result

    keep = torch.isin(fact_of, torch.tensor(learned))
    queries = [q for q, k in zip(queries, keep) if k]
    fact_of = fact_of[keep]
    kinds, facts = [r["kind"] for r in rows], torch.tensor([r["fact"] for r in rows])
    is_source = (facts[None, :] == fact_of[:, None]) & torch.tensor([k == "source" for k in kinds])[None, :]  # (Q, N)
    is_decoy = (facts[None, :] == fact_of[:, None]) & torch.tensor([k == "decoy" for k in kinds])[None, :]
    scores = method_scores(model, tok, examples, queries, parse_layers(opts.layers, model.cfg.n_layers),
                           opts.batch_size, opts.grad_dims, opts.damping, opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    table = {}
    for method, s in scores.items():
        rank = first_source_rank(s, is_source, generator)  # (Q,)
        row = {"recall@1": ev.mean_with_interval((rank == 1).float(), opts.bootstrap, opts.seed),
               "mrr": ev.mean_with_interval(1 / rank.float(), opts.bootstrap, opts.seed)}
        if opts.decoys:  # within a fact's planted examples: how often a source outscores a decoy (chance 0.5)
            wins = [((a > b).float() + 0.5 * (a == b).float()).mean() for a, b in
                    ((s[q, is_source[q]][:, None], s[q, is_decoy[q]][None, :]) for q in range(len(queries)))]
            row["source_over_decoy"] = ev.mean_with_interval(wins, opts.bootstrap, opts.seed)
        table[method] = row
    result |= {"queries": len(queries), "table": table}
    return result


def markdown_planted(r: dict) -> str:
    s = r["settings"]
    out = [f"Planted facts: {s['facts']} invented facts in a pool of {s['pool']} examples ({s['real_examples']} "
           f"real ones of {s['data']}), each fact in 2 sources and {s['decoys']} decoys; {s['model']} fine-tuned "
           f"on the pool for {s['planted_epochs']:g} epochs learned {len(r['learned'])} of them (answer "
           f"log-prob up >= 2 nats)."]
    for name, v in r.get("verify", {}).items():
        out.append(f"Retrained {name.replace('-', ' without ')}: {v['still_learned']} of {v['of']} still learned "
                   f"(mean gain {v['mean_gain_nats']:.2f} nats).")
    if "table" not in r:
        return "\n".join(out + [r.get("note", "")])
    decoys = s["decoys"] > 0
    out += ["", f"{r['queries']} queries (a new question about a learned fact, the answer as the reply); 95% "
            "bootstrap intervals over queries.", "",
            "| method | recall@1 | MRR |" + (" source > decoy |" if decoys else ""),
            "| --- | ---: | ---: |" + (" ---: |" if decoys else "")]
    cell = lambda v: f"{v['mean']:.3f} [{v['interval'][0]:.3f}, {v['interval'][1]:.3f}]"
    for method, row in r["table"].items():
        out.append(f"| {method} | {cell(row['recall@1'])} | {cell(row['mrr'])} |" +
                   (f" {cell(row['source_over_decoy'])} |" if decoys else ""))
    best = max(r["table"], key=lambda m: r["table"][m]["recall@1"]["mean"])
    out += ["", f"Best by recall@1: {best}."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Evaluation 2, tail-patch (TrackStar, Chang et al. 2024, https://arxiv.org/abs/2410.17413): does one more
# training step on a method's top examples make the model likelier to say the reply they were found
# for? From the final adapter and optimizer state, one step on each example alone, the reply's
# log-prob measured, everything restored. 0 = as much as 5 random trained-on examples, 1 = as much as
# a step on the reply itself.

def snapshot(params, optimizer):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]


def restore(params, optimizer, saved):
    weights, states = saved
    with torch.no_grad():
        for p, w, state in zip(params, weights, states):
            p.copy_(w)
            for k, v in state.items():
                optimizer.state[p][k].copy_(v)


def patch_gain(model, optimizer, params, example, reply_row, before: float, grad_clip, saved) -> float:
    """The rise in the reply's log-prob (nats; before: its log-prob now) after one optimizer step on
    example alone, as sft.py takes one (mean NLL over its target, clipped gradient); the adapter and
    the optimizer are then restored to saved."""
    tokens, weights = sft.collate([example], model.embed_tokens.weight.device)
    with torch.enable_grad():
        sft.loss_fn(model, tokens, weights).backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gain = row_logprob(model, reply_row) - before
    restore(params, optimizer, saved)
    return gain


@torch.no_grad()
def row_logprob(model, row) -> float:
    """The summed log-prob of the target tokens of one (tokens, target mask) row."""
    tokens, mask = row
    return scored_logprobs(model, torch.tensor([tokens]), torch.tensor([mask])).sum().item()


def evaluate_tail_patch(opts: Options) -> dict:
    index, settings, pointers = load_index(opts.index)
    if "grad.unit" not in index or "trained" not in pointers[0]:
        raise BadInput(f"--tail-patch: --index {opts.index} needs the adapter's gradients and what it trained "
                       "on; rebuild it with `python tda.py index` (without --base or --no-grads)")
    ckpt = Path(settings["adapter"]).parent / sft.CHECKPOINT
    if not ckpt.exists():
        raise BadInput(f"--tail-patch needs the optimizer state sft.py saved next to the adapter: no {ckpt}")
    tuned = load_indexed_model(settings)
    model, tok, training = tuned.model, tuned.tok, tuned.training
    o = sft.Options(**{k: v for k, v in training.items() if k in sft.Options.__dataclass_fields__})
    params = lora.lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    tensors, state = sft.load_checkpoint(ckpt, optimizer)
    if any(not torch.equal(tensors[k], p.detach().cpu()) for k, p in lora.peft_keys(model).items()):
        raise BadInput(f"{ckpt} is from another step than the adapter in {settings['adapter']}")
    for group in optimizer.param_groups:  # the step after the last: the run's final learning rate
        group["lr"] = sft.lr_at(state["step"] - 1, o)

    # The candidates: the trained-on examples with gradients, each as the run trained on it.
    data = sft.DataSettings(settings["data"], settings["context_messages"], o.session_gap_hours, o.val_frac,
                            settings["max_len"])
    as_indexed = {(e.session, e.index): e for e in training_examples(data, tok, settings["context_messages"])[0]}
    as_trained = {(e.session, e.index): e for e in run_examples(training, tok)[0]}
    rows = index["grad.rows"].tolist()  # the index's rows (all examples, or --trained-only's) with gradients
    keys = [(pointers[i]["session"], pointers[i]["index"]) for i in rows]
    candidates = [as_indexed[k] for k in keys]  # (N,) as indexed: what the methods compare
    patched = [as_trained[k] for k in keys]  # as the run trained on them: what a step trains on

    # Replies: one sampled for each of --replies held-out prompts, spread over the held-out sessions.
    messages, _ = load_pair(settings["data"])
    _, held_out = build_examples(messages, tok, settings["context_messages"], o.session_gap_hours, o.val_frac,
                                 settings["max_len"])
    prompts = held_out[:: max(1, len(held_out) // (2 * opts.replies))]
    replies = ev.simulate(model, tok, [e.text[: e.cut] for e in prompts], opts.seed, opts.batch_size)
    queries = []
    for e, (reply,) in zip(prompts, replies):
        if reply.strip() and len(queries) < opts.replies:
            tokens, mask = query_row(tok, e.text[: e.cut], reply, settings["max_len"])
            queries.append(Example(tokens, mask, 1.0, f"{e.text[: e.cut]} {one_line(reply)}\n", e.cut, -1, -1, 0))
    grads = index["grad.unit"].float() * index["grad.norm"][:, None]
    pooled = {k: v[rows] for k, v in index.items() if k.startswith(("act.", "lens."))}
    scores = method_scores(model, tok, candidates, queries, settings["layers"], opts.batch_size,
                           settings["grad_dims"], opts.damping, settings["grad_seed"], {"pooled": pooled, "grads": grads})
    methods = ["BM25", "BM25 targets"] + [m for m in scores if m.startswith(("act mean", "lens mean"))] + \
        ["grad cos", "grad precond"]
    rng, top = random.Random(opts.seed), min(opts.top, len(patched))
    saved = snapshot(params, optimizer)
    gains = defaultdict(list)  # method (and "random", "the reply itself") -> per reply, mean gain of its top
    t0 = time.time()
    for q, query in enumerate(cli.progress(queries, desc="tail-patching", unit="reply")):
        reply_row = (query.tokens, query.loss_mask)
        before, cache = row_logprob(model, reply_row), {}

        def gain(j, example=None):  # example: not a candidate (the reply itself)
            if j not in cache:
                cache[j] = patch_gain(model, optimizer, params, example or patched[j], reply_row, before, o.grad_clip, saved)
            return cache[j]

        for m in methods:
            gains[m].append(np.mean([gain(j) for j in scores[m][q].topk(top).indices.tolist()]))
        gains["random"].append(np.mean([gain(j) for j in rng.sample(range(len(patched)), top)]))
        gains["the reply itself"].append(gain(-1, query))
    restore(params, optimizer, saved)
    table = {}
    g = {m: np.array(v) for m, v in gains.items()}
    draws = np.random.default_rng(opts.seed).integers(0, len(queries), (opts.bootstrap, len(queries)))
    normal = lambda m, d: (g[m][d].mean(-1) - g["random"][d].mean(-1)) / (g["the reply itself"][d].mean(-1) - g["random"][d].mean(-1))
    for m in g:
        everything = np.arange(len(queries))
        table[m] = {"gain_nats": ev.mean_with_interval(g[m], opts.bootstrap, opts.seed),
                    "score": {"mean": float(normal(m, everything)),
                              "interval": [float(v) for v in np.percentile(normal(m, draws), [2.5, 97.5])]},
                    "times_random": float(g[m].mean() / g["random"].mean()) if g["random"].mean() > 0 else None}
    return {"settings": {**asdict(opts), **settings, "candidates": len(patched), "replies": len(queries),
                         "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0)},
            "table": table, "examples": [one_line(q.text) for q in queries[:3]]}


def markdown_tail_patch(r: dict) -> str:
    s = r["settings"]
    out = [f"Tail-patch: {s['replies']} replies sampled by {s['adapter']} to held-out prompts; each method's top "
           f"{s['top']} of the {s['candidates']} trained-on examples, one step each (lr {s['lr']:.1e}) from the "
           "final adapter and optimizer state. Gain: the rise in the reply's log-prob, nats; score: 0 = "
           "random trained-on examples, 1 = a step on the reply itself; 95% bootstrap intervals over replies.", "",
           "| method | gain (nats) | score | x random |", "| --- | ---: | ---: | ---: |"]
    cell = lambda v, f=".3f": f"{v['mean']:{f}} [{v['interval'][0]:{f}}, {v['interval'][1]:{f}}]"
    for m, row in r["table"].items():
        times = "-" if row["times_random"] is None else f"{row['times_random']:.2f}"
        out.append(f"| {m} | {cell(row['gain_nats'], '.4f')} | {cell(row['score'])} | {times} |")
    return "\n".join(out)


def main():
    command, argv = cli.command(sys.argv[1:], COMMANDS, "tda.py")
    opts = parse_options(Options, GPU_DEFAULTS, argv)
    if command == "index":
        build_index(opts)
    elif command == "query":
        reply, hits, pointers = query(opts)
        print(f"{prompt_lines(opts.prompt)[-1]} {reply}" + ("" if opts.reply else "   (sampled)"))
        print_hits(hits, pointers)
    elif command == "lens":
        lens(opts)
    else:
        if opts.planted and opts.tail_patch:
            raise BadInput("--planted and --tail-patch are two evaluations: run one at a time")
        run, table, name = ((evaluate_planted, markdown_planted, "planted") if opts.planted else
                            (evaluate_tail_patch, markdown_tail_patch, "tail_patch") if opts.tail_patch else
                            (evaluate, markdown, "eval"))
        result = run(opts)
        path = Path(opts.out) / f"{name}.json"
        cli.write_atomically(path, lambda p: p.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n"))
        print(table(result))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    exit_on_bad_input(main)
