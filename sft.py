"""Fine-tune a LoRA adapter on two people's chat history: one plain PyTorch loop, top to bottom.

    python sft.py --data data/convos.jsonl              # CPU: the embedded SmolLM2-135M, ~10 minutes
    python sft.py --data data/convos.jsonl --resume     # carry on after a crash or Ctrl-C
    python sft.py --data chat.txt --model mistralai/Mistral-7B-v0.1   # on a GPU (its defaults)
    torchrun --nproc-per-node 4 sft.py --data data/convos.jsonl       # several GPUs (or CPU processes)

Writes into --out: adapter/ (PEFT format: loads here and in Hugging Face PEFT, plus training.json, the
options it was trained with, which every later stage reads), metrics.jsonl, loss.png, and
checkpoint.safetensors (adapter, optimizer, RNG and step, no pickle: resuming continues exactly where
the run stopped).
"""
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import cli
import lora
from cli import FRACTION, POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import fingerprint, greedy, load_model, pad, scored_logprobs
from prep import TAG_LINE, Example, Message, build_examples, encode_example, load_pair, shared_prefix


@dataclass
class Options:
    data: Annotated[str, "chat history: canonical JSONL or any export prep.py reads"] = "data/convos.jsonl"
    model: Annotated[str, "smollm2-135m, a local HF directory, or a Hub id"] = "smollm2-135m"
    out: Annotated[str, "output directory"] = "out"
    resume: Annotated[bool, "continue the run in --out from its checkpoint"] = False
    max_steps: Annotated[int, "optimizer steps", Range(1)] = 100
    epochs: Annotated[float, "train for this many passes over the training examples instead of --max-steps; "
                             "0 = use --max-steps", Range(0)] = 0.0
    batch_size: Annotated[int, "examples per micro-batch, per process", Range(1)] = 8
    grad_accum: Annotated[int, "micro-batches per optimizer step, per process", Range(1)] = 1
    lr: Annotated[float, "peak learning rate", POSITIVE] = 1e-3
    min_lr: Annotated[float, "learning rate at the end of the cosine decay", Range(0)] = 1e-4
    warmup_steps: Annotated[int, "linear warmup steps", Range(0)] = 10
    weight_decay: Annotated[float, "AdamW weight decay on the adapter", Range(0)] = 0.0
    grad_clip: Annotated[float, "clip the gradient norm to this", POSITIVE] = 1.0
    lora_r: Annotated[int, "LoRA rank", Range(1)] = 16
    lora_alpha: Annotated[int, "LoRA alpha (scale alpha/r)", POSITIVE] = 32
    lora_dropout: Annotated[float, "dropout on the adapter path", Range(0, 1, high_open=True)] = 0.0
    rslora: Annotated[bool, "scale alpha/sqrt(r) (rank-stabilised LoRA)"] = False
    examples: Annotated[str, "also train on these rows: JSONL of {\"context\": [chat lines], \"speaker\": tag, "
                             "\"reply\": text}, e.g. rlaif.py's revisions; loss on the reply and its newline"] = ""
    examples_only: Annotated[bool, "train on --examples alone, not on the chat history's examples"] = False
    init_adapter: Annotated[str, "start from this adapter's weights (same rank, alpha and targets) instead of "
                                 "a fresh adapter"] = ""
    tag_loss: Annotated[bool, "also put loss on the target's speaker tag, so the model learns who talks next "
                              "(validation still scores the text alone)"] = False
    context_messages: Annotated[int, "at most this many earlier messages before a target", Range(0)] = 8
    session_gap_hours: Annotated[float, "a silence this long starts a new session", POSITIVE] = 3.0
    val_frac: Annotated[float, "fraction of sessions (the latest) held out", FRACTION] = 0.1
    val_examples: Annotated[int, "held-out examples the validation loss is measured on", Range(1)] = 64
    max_len: Annotated[int, "tokens per example (older context is dropped to fit)", Range(2)] = 512
    recency_half_life_days: Annotated[float, "weight a message by 0.5^(age/half-life); 0 = off", Range(0)] = 0.0
    eval_every: Annotated[int, "steps between validation losses and sample replies", Range(1)] = 25
    save_every: Annotated[int, "steps between checkpoints", Range(1)] = 25
    samples: Annotated[int, "held-out replies generated at each evaluation", Range(0)] = 3
    grad_checkpoint: Annotated[bool, "recompute activations in the backward pass of every micro-batch "
                                     "(saves memory, costs ~30%% of a step)"] = False
    # What a backward pass keeps is ~1.2 MB per token of the micro-batch for SmolLM2 in fp32 (30 layers:
    # each linear layer's input, SwiGLU's three 1536-wide tensors, q, k, v), and glibc's malloc, reusing
    # freed blocks of other sizes, holds up to twice that: the default run's longest batch (8 x 343
    # tokens) took 6.8 GB of its 7 GB peak. Cutting batches into pieces of whole sequences, run one
    # after another, caps both at the piece's size, recomputes nothing and gives the same gradient; at
    # 512 tokens the default run peaks at 2.8 GB, its steps as fast as unsplit (README, sft.py section).
    split_above: Annotated[int, "run a micro-batch of more than this many tokens (padded) as pieces of whole "
                                "sequences, each at most this size, one after another, with the same "
                                "gradient; 0 = never", Range(0)] = 512
    seed: Annotated[int, "seed for the adapter's init, the examples and the batch order"] = 0


# On a GPU the command line fine-tunes Mistral-7B: these replace the CPU defaults above unless given.
# (The CPU defaults fit ~10 minutes on 2 cores: under one epoch, so no dropout; it costs 20% of a step.)
GPU_DEFAULTS = dict(model="mistralai/Mistral-7B-v0.1", lr=2e-4, min_lr=2e-5, max_steps=1000, batch_size=4,
                    grad_accum=4, lora_dropout=0.05, max_len=1024, grad_checkpoint=True, val_examples=256,
                    eval_every=100, save_every=100, split_above=0)  # recomputing, not splitting: a GPU wants big matmuls
# A resumed run must be the same run: these may not change between the checkpoint and --resume.
# (--data is checked by the file's hash, so the same file under another spelling of its path is fine.)
SAME_ON_RESUME = ("model", "batch_size", "grad_accum", "lora_r", "lora_alpha", "rslora", "tag_loss", "examples",
                  "examples_only", "init_adapter",
                  "context_messages", "session_gap_hours", "val_frac", "max_len", "seed")
# What a later stage needs to rebuild this run's examples and split exactly. It reads them from the
# adapter's training.json (see data_settings), never from the defaults above, which may not be the run's.
DATA_SETTINGS = ("data", "context_messages", "session_gap_hours", "val_frac", "max_len")
ADAPTER = str(Path(Options.out) / "adapter")  # where the default run's adapter lands: later stages' --adapter
CHECKPOINT = "checkpoint.safetensors"


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


def lr_at(step, opts):
    """Linear warmup, then cosine decay to min_lr. A pure function of the step, so resuming needs no
    scheduler state."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, opts.max_steps - opts.warmup_steps)
    return opts.min_lr + 0.5 * (opts.lr - opts.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(lengths: list[int], batch_size, seed, epoch):
    """Batches (lists of indices) of items of similar length (less padding), in a random order that
    depends only on (seed, epoch), so the data position of a resumed run is a function of its step."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 64  # sort by length within chunks: batches stay random but pad little
    order = [i for c in range(0, len(order), chunk) for i in sorted(order[c : c + chunk], key=lambda i: lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_at(examples, batch_size, seed):
    """g -> the example indices of global micro-batch g, epoch after epoch (one epoch kept at a time)."""
    lengths = [len(e.tokens) for e in examples]
    per_epoch = len(epoch_batches(lengths, batch_size, seed, 0))
    cache = {}

    def indices(g):
        epoch, index = divmod(g, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_batches(lengths, batch_size, seed, epoch)
        return cache[epoch][index]

    return indices


def collate(examples, device, tag_loss=False):
    """Right-padded tokens (B, T) and loss weights (B, T): the target's tokens (and with tag_loss its
    speaker tag's) carry the example's weight."""
    tokens, _ = pad([e.tokens for e in examples], device=device)
    weights = torch.zeros(tokens.shape)
    for b, e in enumerate(examples):
        weights[b, : len(e.tokens)] = torch.tensor(e.loss_mask, dtype=torch.float) * e.weight
        if tag_loss:
            weights[b, e.tag_start : e.loss_mask.index(True) if True in e.loss_mask else len(e.tokens)] = e.weight
    return tokens, weights.to(device)


def loss_fn(model, tokens, weights, checkpoint=False, total_weight=None):
    """Weighted mean negative log-likelihood of the target tokens: (sum w * nll) / (sum w), or divided by
    total_weight, the whole micro-batch's, for a piece of one. Only the target message's tokens (~1 in
    10 here) are unembedded (model.scored_logprobs)."""
    scored = weights > 0
    nll = -scored_logprobs(model, tokens, scored, checkpoint=checkpoint)  # (N,)
    w = weights[:, 1:]
    return (nll * w[scored[:, 1:]]).sum() / (w.sum() if total_weight is None else total_weight)


def pieces(examples, max_tokens):
    """Consecutive groups of whole examples, each at most max_tokens once padded to its longest (an
    example longer than that goes alone); max_tokens 0: one group."""
    groups = [[]]
    for e in examples:
        longest = max([len(x.tokens) for x in groups[-1]] + [len(e.tokens)])
        if groups[-1] and max_tokens and (len(groups[-1]) + 1) * longest > max_tokens:
            groups.append([])
        groups[-1].append(e)
    return groups


@torch.no_grad()
def evaluate(model, examples, batch_size, device, autocast):
    """Mean negative log-likelihood per target token over the examples."""
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        tokens, weights = collate(examples[i : i + batch_size], device)
        weights = (weights > 0).float()  # validation is unweighted
        with autocast:
            total += loss_fn(model, tokens, weights).item() * weights[:, 1:].sum().item()
        count += weights[:, 1:].sum().item()
    model.train()
    return total / count


def sample_replies(model, tok, examples, n, device):
    """Greedy replies to the first n held-out prompts, beside what was really said."""
    model.eval()
    lines = []
    for e in examples[:n]:
        prompt, real = e.text[: e.cut], e.text[e.cut :].strip()
        ids = tok.encode(prompt)
        stop = lambda new: "\n" in tok.decode(new[0].tolist())  # the end of the reply's line
        new = greedy(model, torch.tensor([ids], device=device), 40, stop)[0].tolist()
        reply = tok.decode(ids + new)[len(tok.decode(ids)) :].split("\n")[0].strip()
        lines.append(f"  {prompt.splitlines()[-1]} {reply}    (real: {real})")
    model.train()
    return lines


def plot(rows, path: Path):
    plt = cli.pyplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    base = next((r["base_val_loss"] for r in rows if "base_val_loss" in r), None)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.6, alpha=0.35, c="C0", label="train")
        window = 10  # the per-step loss is noisy (batches of different people and lengths): show a trend
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, c="C0", label=f"train, mean of {window} steps")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    if base is not None:
        ax.axhline(base, ls="--", c="gray", label=f"base model, validation ({base:.3f})")
    ax.set(xlabel="step", ylabel="loss (nats / target token)", title="LoRA fine-tuning")
    ax.legend()
    cli.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# Around the loop: processes, checkpoints, signals. (rlaif.py and ppo.py train with these too.)

def setup_distributed():
    """(rank, world size, device, ddp). Launched by torchrun: one process per GPU (or CPU, with gloo)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu"), False
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    return dist.get_rank(), dist.get_world_size(), device, True


def save_checkpoint(path, tensors: dict, optimizer, state: dict):
    """A training checkpoint as one safetensors file, written atomically: the given tensors (the
    adapter), the optimizer's tensors and the RNG states as tensors; state (step, options, ...), the
    optimizer's settings and the RNG states that are plain numbers as JSON in its metadata. No pickle:
    a checkpoint is a file people pass around, and loading one must never run code."""
    opt = optimizer.state_dict()
    out = {f"model.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()}
    for i, param_state in opt["state"].items():
        out.update({f"optimizer.{i}.{name}": t.contiguous().cpu() for name, t in param_state.items()})
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"state": json.dumps(state), "optimizer": json.dumps(opt["param_groups"]),
            "rng": json.dumps({"python": [version, list(mt), gauss],
                               "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]})}
    cli.write_atomically(Path(path), lambda tmp: save_file(out, tmp, meta))


def load_checkpoint(path, optimizer) -> tuple[dict, dict]:
    """Restore the optimizer and the RNG states from a checkpoint save_checkpoint wrote; returns (the
    given tensors, state). Anything else, a pickle included, is refused before any of it is read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        state, groups, rng = (json.loads(meta[k]) for k in ("state", "optimizer", "rng"))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise BadInput(f"{path} is not a checkpoint this project wrote ({type(e).__name__}); "
                       "it was not loaded") from None
    per_param = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            per_param.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return {k.removeprefix("model."): t for k, t in tensors.items() if k.startswith("model.")}, state


def check_run_dir(out: Path, resume: bool):
    """A new run never overwrites an old one; --resume needs a checkpoint this version can read."""
    ckpt, old = out / CHECKPOINT, out / "checkpoint.pt"
    if resume and not ckpt.exists() and old.exists():
        raise BadInput(f"{old} is a pickled checkpoint from an older sft.py: it can't be loaded safely "
                       "(unpickling runs code), so it is not loaded; start a new run with another --out")
    if resume and not ckpt.exists():
        raise BadInput(f"--resume: there is no checkpoint at {ckpt}")
    if not resume and (ckpt.exists() or old.exists()):
        raise BadInput(f"{ckpt if ckpt.exists() else old} exists: pass --resume to continue that run, "
                       "or choose a new --out")


def stop_requests(say) -> list:
    """Ctrl-C, or SIGTERM (what schedulers send before they kill): the list gets the signal's number,
    and the loop finishes its step, saves and exits. A second one quits at once."""
    requested = []

    def handler(signum, _frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        say(f"{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit now)")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return requested


def quit_stopped(step, signum, bar, say=tqdm.write):
    """The end of a run stopped by a signal, its checkpoint written: how to go on, exit status 128 + signal."""
    bar.close()
    say(f"stopped at step {step}; continue with --resume")
    sys.exit(128 + signum)


def examples(opts: Options, messages, drops, tok, say):
    """(train, validation) examples: a target message after up to N of its predecessors, the held-out
    sessions' examples thinned to a fixed, evenly spread --val-examples (each evaluation stays cheap)."""
    train_set, val_set = build_examples(messages, tok, opts.context_messages, opts.session_gap_hours,
                                        opts.val_frac, opts.max_len, opts.recency_half_life_days or None,
                                        opts.seed)
    val_set = val_set[:: max(1, len(val_set) // opts.val_examples)][: opts.val_examples]
    speakers = ", ".join(f"{s} {n}" for s, n in Counter(m.speaker for m in messages).most_common())
    say(f"data: {len(messages)} messages ({speakers}); dropped: {dict(drops) or 'none'}")
    if opts.examples:
        extra = rows_as_examples(opts.examples, tok, opts.max_len)
        train_set = extra if opts.examples_only else train_set + extra
        say(f"--examples {opts.examples}: {len(extra)} examples" + (" (alone)" if opts.examples_only else " added"))
    elif opts.examples_only:
        raise BadInput("--examples-only needs --examples FILE")
    say(f"examples: {len(train_set)} train, {len(val_set)} validation (latest sessions)")
    return train_set, val_set


def rows_as_examples(path, tok, max_len) -> list[Example]:
    """JSONL rows {"context": [chat lines], "speaker": tag, "reply": text} -> training examples
    (examples_from_rows); a malformed row is one sentence naming its line."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if Path(path).exists() else ():
        try:
            row = json.loads(line)
            context, speaker, reply = row["context"], row["speaker"], row["reply"]
            ok = isinstance(context, list) and all(isinstance(c, str) and TAG_LINE.match(c) for c in context) \
                and isinstance(speaker, str) and TAG_LINE.fullmatch(speaker) and isinstance(reply, str) and reply.strip()
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise BadInput(f"--examples {path}:{n}: expected {{\"context\": [\"[TAG] text\", ...], \"speaker\": \"[TAG]\", "
                           "\"reply\": text}")
        rows.append(row)
    examples = examples_from_rows(rows, tok, max_len)
    if not examples:
        raise BadInput(f"--examples {path}: no rows to train on" + ("" if Path(path).exists() else " (no such file)"))
    return examples


def examples_from_rows(rows: list[dict], tok, max_len) -> list[Example]:
    """Rows {"context", "speaker", "reply"} -> training examples, built as prep.encode_example builds one
    from the chat history. Rows marked "revised": false (a revision round that changed nothing) are
    left out."""
    examples = []
    for row in rows:
        if row.get("revised") is False:
            continue
        # The lines already carry their tags: speakers are the tags themselves.
        lines = [Message(None, TAG_LINE.match(c).group(), c[TAG_LINE.match(c).end() :].strip()) for c in row["context"]]
        speaker = row["speaker"]
        target = Message(None, speaker, row["reply"])
        tags = {m.speaker: m.speaker for m in lines + [target]}
        tokens, mask, text, cut = encode_example(tok, lines, target, tags, max_len)
        examples.append(Example(tokens, mask, 1.0, text, cut, -1, -1, shared_prefix(tokens, tok.encode(text[: cut - len(speaker)]))))
    return examples


def start_from(model, adapter_dir):
    """Copy an adapter's weights into the model's fresh adapter of the same shape (--init-adapter)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise BadInput(f"--init-adapter {adapter_dir}: no adapter_model.safetensors there")
    try:
        saved, params = load_file(path), lora.peft_keys(model)
    except SafetensorError:
        raise BadInput(f"--init-adapter {adapter_dir}: {path.name} is not a readable safetensors file") from None
    if saved.keys() != params.keys() or any(saved[k].shape != p.shape for k, p in params.items()):
        raise BadInput(f"--init-adapter {adapter_dir}: its rank or targets differ from this run's (--lora-r, "
                       "--lora-alpha); give the same settings it was trained with")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(saved[key])


def resume(opts: Options, model, optimizer, say):
    """Load the checkpoint in --out into the adapter, optimizer and RNGs: (step, base loss, metric rows)."""
    out = Path(opts.out)
    tensors, state = load_checkpoint(out / CHECKPOINT, optimizer)
    changed = [k for k in SAME_ON_RESUME if state["options"][k] != getattr(opts, k)]
    if changed:
        raise BadInput(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from "
                       f"the checkpoint's ({', '.join(str(state['options'][k]) for k in changed)})")
    if state.get("data_sha256") != cli.file_sha256(opts.data):
        raise BadInput(f"--resume: --data {opts.data} is not the file the run was trained on "
                       f"({state['options']['data']}): its contents differ")
    params = lora.peft_keys(model)
    if tensors.keys() != params.keys():
        raise BadInput(f"{out / CHECKPOINT} holds another adapter than this run builds")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    metrics = out / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
    say(f"resuming at step {state['step']}/{opts.max_steps}")
    # Steps logged after the checkpoint are forgotten: they are redone.
    return state["step"], state["base_val_loss"], [r for r in rows if r["step"] <= state["step"]]


# ---------------------------------------------------------------------------------------------------
# The run.

def train(opts: Options):
    rank, world, device, ddp = setup_distributed()
    main = rank == 0  # evaluation, samples and files are the first process's job
    say = tqdm.write if main else (lambda *a, **k: None)
    out = Path(opts.out)
    ckpt_path, metrics_path = out / CHECKPOINT, out / "metrics.jsonl"
    check_run_dir(out, opts.resume)

    messages, drops = load_pair(opts.data)  # before loading a model: a bad file fails fast
    model, tok = load_model(opts.model, device=device)
    train_set, val_set = examples(opts, messages, drops, tok, say)
    if opts.epochs:  # the number of steps that many passes take; the schedule then reads max_steps
        per_epoch = len(epoch_batches([len(e.tokens) for e in train_set], opts.batch_size, opts.seed, 0))
        opts = replace(opts, max_steps=max(1, math.ceil(opts.epochs * per_epoch / (opts.grad_accum * world))))
        say(f"--epochs {opts.epochs:g}: {opts.max_steps} steps")
    say(f"model {opts.model} on {device} | {world} process(es)")

    # The adapter: the only trainable parameters. Seeded identically on every process.
    torch.manual_seed(opts.seed)
    lora.add_lora(model, r=opts.lora_r, alpha=opts.lora_alpha, dropout=opts.lora_dropout, rslora=opts.rslora)
    if opts.init_adapter and not opts.resume:
        start_from(model, opts.init_adapter)
    params = lora.lora_parameters(model)
    # fused: one kernel updates every adapter tensor, instead of a handful of ops per tensor.
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()  # CPU: fp32
    say(f"LoRA r={opts.lora_r} on {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")

    if opts.resume:
        step, base_val, rows = resume(opts, model, optimizer, say)
    else:
        step, base_val, rows = 0, None, []
        if main:
            with lora.disabled(model):
                base_val = evaluate(model, val_set, opts.batch_size, device, autocast)
            rows.append({"step": 0, "base_val_loss": base_val})
            say(f"base model validation loss {base_val:.4f}")
    if main:
        cli.write_atomically(metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    # world: with steps_done (below) and the options, which examples the run trained on is a function of
    # this file (tda.py rebuilds it from batch_at).
    training = {**asdict(opts), "base_fingerprint": fingerprint(model), "data_sha256": cli.file_sha256(opts.data),
                "world": world}

    def save():
        if main:
            lora.save_adapter(model, out / "adapter", base_model=opts.model, training={**training, "steps_done": step})
            # Every process is seeded alike and draws alike, so the first one's RNG serves them all.
            save_checkpoint(ckpt_path, lora.peft_keys(model), optimizer, {
                "step": step, "options": asdict(opts), "data_sha256": training["data_sha256"], "base_val_loss": base_val,
                "micro_batches_done": step * opts.grad_accum * world})  # the data position
            plot(rows, out / "loss.png")

    stop = stop_requests(say)
    net = DistributedDataParallel(model) if ddp else model
    batch = batch_at(train_set, opts.batch_size, opts.seed)
    model.train()
    start_time, bar = time.time(), cli.progress(total=opts.max_steps, initial=step, disable=not main, unit="step")
    while step < opts.max_steps:
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opts)
        loss_sum, tokens_seen = 0.0, 0
        for micro in range(opts.grad_accum):
            # Global micro-batch g goes to process g % world: one process with grad_accum 2k sees the
            # same batches per step as 2 processes with grad_accum k.
            micro_batch = [train_set[i] for i in batch((step * opts.grad_accum + micro) * world + rank)]
            total_weight = collate(micro_batch, device, opts.tag_loss)[1][:, 1:].sum()
            parts = pieces(micro_batch, opts.split_above)
            for p, part in enumerate(parts):
                tokens, weights = collate(part, device, opts.tag_loss)
                # DDP all-reduces gradients in the last backward of a step only
                sync = not ddp or (micro == opts.grad_accum - 1 and p == len(parts) - 1)
                with nullcontext() if sync else net.no_sync(), autocast:
                    # Each piece's loss is its share of its micro-batch's mean over target tokens;
                    # dividing by the number of micro-batches makes the accumulated gradient their
                    # mean, not their sum.
                    loss = loss_fn(net, tokens, weights, opts.grad_checkpoint, total_weight)
                    (loss / opts.grad_accum).backward()
                loss_sum += loss.item()
            tokens_seen += sum(len(e.tokens) for e in micro_batch)
        stats = torch.tensor([loss_sum / opts.grad_accum, tokens_seen, float(bool(stop))], device=device)
        if ddp:  # DDP averaged the gradients; average the logged loss and agree on stopping too
            dist.all_reduce(stats)
            stats[0] /= world
        loss_value, tokens_seen, stopping = stats[0].item(), int(stats[1]), bool(stats[2])
        if not math.isfinite(loss_value):  # stop before the optimizer spreads it into the adapter
            kept = f"the last good checkpoint is in {ckpt_path}" if ckpt_path.exists() else "nothing was saved yet"
            raise TrainingDiverged(f"the loss became {loss_value} at step {step + 1}; {kept}. Try a lower --lr.")
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ms = (time.time() - t0) * 1000
        row = {"step": step, "loss": loss_value, "grad_norm": norm, "lr": lr_at(step - 1, opts),
               "ms": round(ms), "tok_per_s": round(tokens_seen / ms * 1000)}
        line = (f"step {step}/{opts.max_steps} | loss {loss_value:.4f} | norm {norm:.2f} | "
                f"lr {row['lr']:.1e} | {ms:.0f} ms | {row['tok_per_s'] / 1000:.2f}k tok/s")
        evaluating = main and (step % opts.eval_every == 0 or step == opts.max_steps)
        if evaluating:
            row["val_loss"] = evaluate(model, val_set, opts.batch_size, device, autocast)
            line += f" | val {row['val_loss']:.4f} (base {base_val:.4f})"
        rows.append(row)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        say(line)
        if evaluating:
            for sample in sample_replies(model, tok, val_set, opts.samples, device):
                say(sample)
        bar.update(1)
        if step % opts.save_every == 0 or step == opts.max_steps or stopping:
            save()
        if stopping:
            quit_stopped(step, stop[0] if stop else signal.SIGINT, bar, say)
    bar.close()
    elapsed = time.time() - start_time
    final = rows[-1].get("val_loss")
    if main:
        say(f"done: validation loss {base_val:.4f} (base) -> {final:.4f} (fine-tuned) in "
            f"{elapsed / 60:.1f} min; adapter in {out / 'adapter'}")
    if ddp:
        dist.destroy_process_group()
    return {"base_val_loss": base_val, "val_loss": final, "seconds": elapsed}


# ---------------------------------------------------------------------------------------------------
# What the stages after this one load: the model with the adapter sft.py wrote, and the data settings
# it was trained with.

@dataclass
class Tuned:
    model: torch.nn.Module  # base + adapter (or the base alone), in eval mode
    tok: object
    base_model: str  # the base model's name or path
    adapter: str  # the adapter's directory; "" = none
    training: dict  # the options the adapter was trained with (sft.py's defaults where unknown)


def load_tuned(adapter: str = ADAPTER, model: str = "", base: bool = False, allow_other_base=False) -> Tuned:
    """The fine-tuned model: the base that adapter_config.json names (unless model overrides it) with
    the adapter; or with base=True the base model alone (model, else sft.py's default). An adapter is
    refused on a base other than the one it was trained on (training.json's fingerprint), unless
    allow_other_base."""
    if base:
        name = model or Options.model
        return Tuned(*load_model(name), name, "", asdict(Options()))
    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise BadInput(f"--adapter {adapter}: no adapter there; train one with sft.py, pass --adapter DIR, "
                       "or use --base for the model without one")
    config = cli.read_json(path / "adapter_config.json")
    name = model or (config.get("base_model_name_or_path") if isinstance(config, dict) else None)
    if not isinstance(name, str) or not name:
        raise BadInput(f"{path / 'adapter_config.json'} does not name its base model "
                       "(base_model_name_or_path); pass --model")
    training = lora.read_training(path)
    net, tok = load_model(name)
    trained_on = (training or {}).get("base_fingerprint")
    if trained_on and trained_on != fingerprint(net) and not allow_other_base:
        raise BadInput(f"--adapter {adapter} was trained on {training.get('model')} (fingerprint {trained_on}), "
                       f"but {name} is another model (fingerprint {fingerprint(net)}); pass --allow-other-base "
                       "to load it anyway")
    lora.load_adapter(net, path)
    if training is None:
        training = asdict(Options())
        print(f"note: {path} has no {lora.TRAINING} (not written by this sft.py); assuming sft.py's defaults "
              f"{ {k: training[k] for k in DATA_SETTINGS} }", file=sys.stderr)
    return Tuned(net.eval(), tok, name, str(adapter), training)  # eval(): no dropout in the new modules


@dataclass(frozen=True)
class DataSettings:
    data: str
    context_messages: int
    session_gap_hours: float
    val_frac: float
    max_len: int


def data_settings(training: dict, opts) -> DataSettings:
    """The data settings a later stage builds examples with: the adapter's training values, except
    where the user gave a flag (a field of opts of the same name that isn't None or ""), which wins;
    a flag that differs from training is said once."""
    values = {}
    for key in DATA_SETTINGS:
        trained, given = training.get(key, getattr(Options, key)), getattr(opts, key, None)
        if given in (None, ""):
            values[key] = trained
            continue
        if given != trained:
            print(f"note: --{key.replace('_', '-')} {given}: the adapter was trained with {trained}", file=sys.stderr)
        values[key] = given
    return DataSettings(**values)


def main():
    try:
        train(parse_options(Options, GPU_DEFAULTS))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    exit_on_bad_input(main)
