"""Fine-tune a LoRA adapter on two people's chat history: one plain PyTorch loop, top to bottom.

    python sft.py --data data/convos.jsonl              # CPU: the embedded SmolLM2-135M, ~10 minutes
    python sft.py --data data/convos.jsonl --resume     # carry on after a crash or Ctrl-C
    python sft.py --data chat.txt --model mistralai/Mistral-7B-v0.1   # on a GPU (its defaults)
    torchrun --nproc-per-node 4 sft.py --data data/convos.jsonl       # several GPUs (or CPU processes)

Writes into --out: adapter/ (PEFT format: loads here and in Hugging Face PEFT), metrics.jsonl, loss.png,
and checkpoint.pt (optimizer, RNG and step: resuming continues exactly where the run stopped).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import lora
from model import BadInput, exit_on_bad_input, greedy, load_model, parse_options, token_logprobs
from prep import build_examples, load_pair


@dataclass
class Options:
    data: Annotated[str, "chat history: canonical JSONL or any export prep.py reads"] = "data/convos.jsonl"
    model: Annotated[str, "smollm2-135m, a local HF directory, or a Hub id"] = "smollm2-135m"
    out: Annotated[str, "output directory"] = "out"
    resume: Annotated[bool, "continue the run in --out from its checkpoint"] = False
    max_steps: Annotated[int, "optimizer steps"] = 100
    batch_size: Annotated[int, "examples per micro-batch, per process"] = 8
    grad_accum: Annotated[int, "micro-batches per optimizer step, per process"] = 1
    lr: Annotated[float, "peak learning rate"] = 1e-3
    min_lr: Annotated[float, "learning rate at the end of the cosine decay"] = 1e-4
    warmup_steps: Annotated[int, "linear warmup steps"] = 10
    weight_decay: Annotated[float, "AdamW weight decay on the adapter"] = 0.0
    grad_clip: Annotated[float, "clip the gradient norm to this"] = 1.0
    lora_r: Annotated[int, "LoRA rank"] = 16
    lora_alpha: Annotated[int, "LoRA alpha (scale alpha/r)"] = 32
    lora_dropout: Annotated[float, "dropout on the adapter path"] = 0.0
    rslora: Annotated[bool, "scale alpha/sqrt(r) (rank-stabilised LoRA)"] = False
    context_messages: Annotated[int, "at most this many earlier messages before a target"] = 8
    session_gap_hours: Annotated[float, "a silence this long starts a new session"] = 3.0
    val_frac: Annotated[float, "fraction of sessions (the latest) held out"] = 0.1
    val_examples: Annotated[int, "held-out examples the validation loss is measured on"] = 64
    max_len: Annotated[int, "tokens per example (older context is dropped to fit)"] = 512
    recency_half_life_days: Annotated[float, "weight a message by 0.5^(age/half-life); 0 = off"] = 0.0
    eval_every: Annotated[int, "steps between validation losses and sample replies"] = 25
    save_every: Annotated[int, "steps between checkpoints"] = 25
    samples: Annotated[int, "held-out replies generated at each evaluation"] = 3
    grad_checkpoint: Annotated[bool, "recompute activations in the backward pass (saves memory)"] = False
    seed: Annotated[int, "seed for the adapter's init, the examples and the batch order"] = 0


# On a GPU the command line fine-tunes Mistral-7B: these replace the CPU defaults above unless given.
# (The CPU defaults fit ~10 minutes on 2 cores: under one epoch, so no dropout; it costs 20% of a step.)
GPU_DEFAULTS = dict(model="mistralai/Mistral-7B-v0.1", lr=2e-4, min_lr=2e-5, max_steps=1000, batch_size=4,
                    grad_accum=4, lora_dropout=0.05, max_len=1024, grad_checkpoint=True, val_examples=256,
                    eval_every=100, save_every=100)
# A resumed run must be the same run: these may not change between the checkpoint and --resume.
SAME_ON_RESUME = ("data", "model", "batch_size", "grad_accum", "lora_r", "lora_alpha", "rslora",
                  "context_messages", "session_gap_hours", "val_frac", "max_len", "seed")


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


def lr_at(step, opts):
    """Linear warmup, then cosine decay to min_lr. A pure function of the step, so resuming needs no
    scheduler state."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, opts.max_steps - opts.warmup_steps)
    return opts.min_lr + 0.5 * (opts.lr - opts.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(examples, batch_size, seed, epoch):
    """Batches of similar length (less padding), in a random order that depends only on (seed, epoch),
    so the data position of a resumed run is a function of its step."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 64  # sort by length within chunks: batches stay random but pad little
    order = [i for c in range(0, len(order), chunk)
             for i in sorted(order[c : c + chunk], key=lambda i: len(examples[i].tokens))]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, device):
    """Right-padded tokens (B, T), loss weights (B, T). Right padding needs no attention mask:
    causal attention never looks ahead, so pads at the end are invisible to the real tokens."""
    T = max(len(e.tokens) for e in examples)
    tokens = torch.zeros(len(examples), T, dtype=torch.long)
    weights = torch.zeros(len(examples), T)
    for b, e in enumerate(examples):
        tokens[b, : len(e.tokens)] = torch.tensor(e.tokens)
        weights[b, : len(e.tokens)] = torch.tensor(e.loss_mask, dtype=torch.float) * e.weight
    return tokens.to(device), weights.to(device)


def loss_fn(model, tokens, weights, checkpoint=False):
    """Weighted mean negative log-likelihood of the target tokens: (sum w * nll) / (sum w)."""
    h = model(tokens[:, :-1], checkpoint=checkpoint, unembed=False)  # (B, T-1, D): position t predicts t+1
    w = weights[:, 1:]
    scored = w > 0  # (B, T-1)
    # Only the target message's tokens carry loss (~1 in 10 here), so only they are unembedded: the
    # (N, V) fp32 logits and their log-softmax were most of a step's memory, and a fifth of its work.
    unembed = getattr(model, "module", model).unembed  # DistributedDataParallel wraps our model
    nll = -token_logprobs(unembed(h[scored]), tokens[:, 1:][scored])  # (N,)
    return (nll * w[scored]).sum() / w.sum()


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
        new = greedy(model, torch.tensor([ids]), 40, stop)[0].tolist()
        reply = tok.decode(ids + new)[len(tok.decode(ids)) :].split("\n")[0].strip()
        lines.append(f"  {prompt.splitlines()[-1]} {reply}    (real: {real})")
    model.train()
    return lines


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    lora.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def train(opts: Options):
    # Distributed data parallel when launched by torchrun: one process per GPU (or CPU, with gloo).
    cuda = torch.cuda.is_available()
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    else:
        rank, world, device = 0, 1, torch.device("cuda" if cuda else "cpu")
    main = rank == 0
    say = tqdm.write if main else (lambda *a, **k: None)
    out = Path(opts.out)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    if opts.resume and not ckpt_path.exists():
        raise BadInput(f"--resume: there is no checkpoint at {ckpt_path}")
    if not opts.resume and ckpt_path.exists():
        raise BadInput(f"{ckpt_path} exists: pass --resume to continue that run, or choose a new --out")
    ckpt = torch.load(ckpt_path, weights_only=False) if opts.resume else None
    if ckpt:
        changed = [k for k in SAME_ON_RESUME if ckpt["options"][k] != getattr(opts, k)]
        if changed:
            raise BadInput(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from "
                           f"the checkpoint's ({', '.join(str(ckpt['options'][k]) for k in changed)})")

    # Data: two people's messages -> examples (a target message after up to N of its predecessors).
    messages, drops = load_pair(opts.data)
    model, tok = load_model(opts.model, device=device)
    train_set, val_set = build_examples(messages, tok, opts.context_messages, opts.session_gap_hours,
                                        opts.val_frac, opts.max_len, opts.recency_half_life_days or None,
                                        opts.seed)
    # A fixed, evenly spread subset of the held-out examples keeps each evaluation cheap.
    val_set = val_set[:: max(1, len(val_set) // opts.val_examples)][: opts.val_examples]
    speakers = ", ".join(f"{s} {n}" for s, n in Counter(m.speaker for m in messages).most_common())
    say(f"data: {len(messages)} messages ({speakers}); dropped: {dict(drops) or 'none'}")
    say(f"examples: {len(train_set)} train, {len(val_set)} validation (latest sessions) | "
        f"model {opts.model} on {device} | {world} process(es)")

    # The adapter: the only trainable parameters. Seeded identically on every process.
    torch.manual_seed(opts.seed)
    lora.add_lora(model, r=opts.lora_r, alpha=opts.lora_alpha, dropout=opts.lora_dropout, rslora=opts.rslora)
    params = lora.lora_parameters(model)
    # fused: one kernel updates every adapter tensor, instead of a handful of ops per tensor.
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()  # CPU: fp32
    say(f"LoRA r={opts.lora_r} on {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")

    rows = []
    if ckpt:
        model.load_state_dict(ckpt["lora"], strict=False)  # the adapter only; the base is the checkpoint's
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        if cuda and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        step, base_val = ckpt["step"], ckpt["base_val_loss"]
        if metrics_path.exists():  # forget steps logged after the checkpoint: they are redone
            rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
            rows = [r for r in rows if r["step"] <= step]
        say(f"resuming at step {step}/{opts.max_steps}")
    else:
        step, base_val = 0, None
        if main:  # evaluation, samples and files are the first process's job
            with lora.disabled(model):
                base_val = evaluate(model, val_set, opts.batch_size, device, autocast)
            rows.append({"step": 0, "base_val_loss": base_val})
            say(f"base model validation loss {base_val:.4f}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def checkpoint():
        if main:
            lora.save_adapter(model, out / "adapter", base_model=opts.model)
            # Written to a temporary file, then renamed: a crash mid-save keeps the previous checkpoint.
            lora.write_atomically(ckpt_path, lambda tmp: torch.save({
                "step": step, "options": asdict(opts), "base_val_loss": base_val,
                "lora": {k: v for k, v in model.state_dict().items() if "lora_" in k},
                "optimizer": optimizer.state_dict(),
                # Every process is seeded alike and draws alike, so the first one's RNG serves them all.
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state() if cuda else None},
                "micro_batches_done": step * opts.grad_accum * world,  # the data position
            }, tmp))
            plot(rows, out / "loss.png")

    def log(row):
        rows.append(row)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # Ctrl-C: finish the step, save, exit. (A second Ctrl-C quits at once.)
    interrupted = []

    def on_sigint(*_):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        say("Ctrl-C: saving a checkpoint after this step (press again to quit now)")

    signal.signal(signal.SIGINT, on_sigint)

    net = DistributedDataParallel(model) if ddp else model
    model.train()
    batches_per_epoch = len(epoch_batches(train_set, opts.batch_size, opts.seed, 0))
    epoch_cache = {}
    start_time, bar = time.time(), tqdm(total=opts.max_steps, initial=step, disable=not main, unit="step")
    while step < opts.max_steps:
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opts)
        loss_sum, tokens_seen = 0.0, 0
        for micro in range(opts.grad_accum):
            # Global micro-batch g goes to process g % world: one process with grad_accum 2k sees the
            # same batches per step as 2 processes with grad_accum k.
            g = (step * opts.grad_accum + micro) * world + rank
            epoch, index = divmod(g, batches_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: epoch_batches(train_set, opts.batch_size, opts.seed, epoch)}
            batch = [train_set[i] for i in epoch_cache[epoch][index]]
            tokens, weights = collate(batch, device)
            sync = ddp and micro < opts.grad_accum - 1
            with net.no_sync() if sync else nullcontext(), autocast:
                loss = loss_fn(net, tokens, weights, opts.grad_checkpoint)
                # Each micro-batch's loss is a mean over its tokens; dividing by the number of
                # micro-batches makes the accumulated gradient their mean, not their sum.
                (loss / opts.grad_accum).backward()
            loss_sum += loss.item()
            tokens_seen += sum(len(e.tokens) for e in batch)
        stats = torch.tensor([loss_sum / opts.grad_accum, tokens_seen, float(bool(interrupted))], device=device)
        if ddp:  # DDP averaged the gradients; average the logged loss and agree on stopping too
            dist.all_reduce(stats)
            stats[0] /= world
        loss_value, tokens_seen, stop = stats[0].item(), int(stats[1]), bool(stats[2])
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
        if step % opts.eval_every == 0 or step == opts.max_steps:
            if main:
                row["val_loss"] = evaluate(model, val_set, opts.batch_size, device, autocast)
                line += f" | val {row['val_loss']:.4f} (base {base_val:.4f})"
            log(row)
            say(line)
            if main:
                for sample in sample_replies(model, tok, val_set, opts.samples, device):
                    say(sample)
        else:
            log(row)
            say(line)
        bar.update(1)
        if step % opts.save_every == 0 or step == opts.max_steps or stop:
            checkpoint()
        if stop:
            bar.close()
            say(f"stopped at step {step}; continue with --resume")
            sys.exit(130)
    bar.close()
    elapsed = time.time() - start_time
    final = rows[-1].get("val_loss")
    if main:
        say(f"done: validation loss {base_val:.4f} (base) -> {final:.4f} (fine-tuned) in "
            f"{elapsed / 60:.1f} min; adapter in {out / 'adapter'}")
    if ddp:
        dist.destroy_process_group()
    return {"base_val_loss": base_val, "val_loss": final, "seconds": elapsed}


def main():
    try:
        train(parse_options(Options, GPU_DEFAULTS))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    exit_on_bad_input(main)
