"""Speed: our model, decoding and LoRA step against transformers and PEFT, in one run.

    python bench.py                          # CPU: the embedded SmolLM2-135M in fp32 (~15 minutes on 2 cores)
    python bench.py --repeats 7 --only sft   # one measurement, more repeats

For ours and theirs, on the same weights, dtype and inputs:

    prefill   tokens/s of one forward over --prefill-len tokens, batch 1
    decode1   greedy decoding through the KV cache, batch 1: --new-tokens after a --prompt-len prompt
              (the end of a real chat prompt; ours: model.greedy, theirs: generate(do_sample=False));
              tokens/s counts the new tokens
    decode8   the same, 8 prompts at once
    sample8   sampling, 8 replies at once to decode8's prompts, with sample.py's default settings
              (temperature, top-p, repetition penalty; ours: sample.generate_ids, theirs:
              generate(do_sample=True) with the same settings). The two random generators differ, so
              what is compared is the first step's sampling distribution (total variation distance);
              and our rate against our own decode8
    sft       one LoRA fine-tuning step (forward, backward, gradient clipping, AdamW) on a batch of real
              training examples from --data, exactly as sft.py takes it (ours: sft.loss_fn on our LoRA;
              theirs: transformers' loss from labels on a PEFT LoRA); tokens/s counts real tokens

Each measurement runs in a fresh process (bench.py starts them), so its peak memory is its own: the
peak above the loaded model and inputs, i.e. activations, KV cache, gradients and optimizer state
(CPU: resident memory, GPU: torch's allocations). Warm-up runs are excluded; the median of --repeats
is reported beside the fastest run, and a measurement whose runs spread by more than a quarter is
flagged (a disturbed machine, not a real difference). On a GPU it also runs a Mistral-7B-shaped
model with random bf16 weights built on the device (speed doesn't depend on weight values; both sides
get the same values), and reports batch-1 decoding against the memory-bandwidth bound (weight bytes
read per token over the measured copy bandwidth) and the LoRA step as model-FLOPs utilisation
(against the measured bf16 matmul rate). Prints a markdown table and writes --out (JSON).
"""
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
from safetensors.torch import load_file, save_file

from cli import BadInput, Range, exit_on_bad_input, parse_options, write_atomically
from lora import TARGETS
from model import config_from_hf, greedy, load_model

TASKS = ("prefill", "decode1", "decode8", "sample8", "sft")
SPREAD = 0.25  # runs of one measurement further apart than this, (slowest - fastest) / fastest, are flagged


@dataclass
class Options:
    only: Annotated[str, "comma-separated measurements to run (default: all of " + ", ".join(TASKS) + ")"] = ""
    repeats: Annotated[int, "timed runs per measurement and round (the median of all is reported)", Range(1)] = 5
    rounds: Annotated[int, "rounds of ours-then-theirs, alternating who goes first: the machine's drift "
                           "between processes falls on both sides", Range(1)] = 2
    warmup: Annotated[int, "untimed runs first (allocator, caches, lazy init)", Range(0)] = 1
    prefill_len: Annotated[int, "tokens in the prefill forward", Range(1)] = 512
    prompt_len: Annotated[int, "prompt tokens before decoding", Range(1)] = 16
    new_tokens: Annotated[int, "tokens decoded per run", Range(1)] = 64
    sft_batch: Annotated[int, "examples in the LoRA step's batch", Range(1)] = 8
    data: Annotated[str, "chat history the LoRA step's batch comes from"] = "data/convos.jsonl"
    out: Annotated[str, "JSON results"] = "out/bench.json"
    worker: Annotated[str, "internal: run one measurement (JSON spec) in this process and print its result"] = ""


# Mistral-7B-v0.1's config.json (the part the forward reads), for the random-weight GPU runs.
MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                  tie_word_embeddings=False, hidden_act="silu")
LORA = dict(r=16, alpha=32, targets=TARGETS)


# ---------------------------------------------------------------------------------------------------
# One measurement, in its own process.

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_now(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM (peak resident) := current


def peak(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def seeded_weights(model, prefix=""):
    """Fill every parameter from a generator seeded by its name's rank: two models with the same
    parameter names (after the prefix) get the same values. Norm weights 1, the rest N(0, 0.02)."""
    gen = torch.Generator(next(model.parameters()).device)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted((n.removeprefix(prefix), p) for n, p in model.named_parameters())):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                gen.manual_seed(i)
                p.normal_(0.0, 0.02, generator=gen)


def load(impl: str, model_name: str, device):
    """(model, vocab size). ours: model.py; theirs: transformers, same weights."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if model_name == "smollm2-135m":
        if impl == "ours":
            model, _ = load_model("smollm2-135m", dtype=dtype, device=device)
            return model, model.cfg.vocab_size
        import smollm2
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(smollm2.converted_dir(), dtype=dtype).to(device).eval()
        return model, model.config.vocab_size
    # Mistral-7B-shaped, random weights made on the device.
    torch.set_default_dtype(dtype)
    if impl == "ours":
        from model import Mistral

        with torch.device(device):
            model = Mistral(config_from_hf(MISTRAL_7B))
        seeded_weights(model)
    else:
        from transformers import MistralConfig, MistralForCausalLM

        with torch.device(device):
            model = MistralForCausalLM(MistralConfig(**MISTRAL_7B))
        seeded_weights(model, prefix="model.")
    torch.set_default_dtype(torch.float32)
    return model.eval(), MISTRAL_7B["vocab_size"]


def training_examples(opts: Options):
    """sft.py's training examples of --data, tokenised for the embedded model."""
    import smollm2
    from model import load_tokenizer
    from prep import build_examples, load_pair

    messages, _ = load_pair(opts.data)
    return build_examples(messages, load_tokenizer(smollm2.converted_dir()))[0]


def sft_batch(opts: Options, model_name: str, vocab: int, device):
    """(tokens (B, T), loss weights (B, T), real tokens): a typical batch of sft.py's first epoch (the
    median by length) for the embedded model; random tokens with the same shape and mask for the 7B
    shape (its tokenizer isn't here)."""
    import sft

    examples = training_examples(opts)
    batches = sorted(sft.epoch_batches([len(e.tokens) for e in examples], opts.sft_batch, 0, 0),
                     key=lambda b: max(len(examples[i].tokens) for i in b))
    batch = [examples[i] for i in batches[len(batches) // 2]]
    tokens, weights = sft.collate(batch, device)
    if model_name != "smollm2-135m":
        tokens = torch.randint(0, vocab, tokens.shape, generator=torch.Generator().manual_seed(0)).to(device)
    return tokens, (weights > 0).float(), sum(len(e.tokens) for e in batch)


def prompts(opts: Options, batch: int, model_name: str, vocab: int, device):
    """(batch, --prompt-len) tokens: the last --prompt-len tokens of real chat prompts (ending in the
    replier's tag, spread over the training examples of --data) for the embedded model, so that
    sampling meets the distributions it meets in use (the nucleus, and so what top-p costs, depends on
    how sure the model is); random tokens for the 7B shape, whose tokenizer isn't here."""
    if model_name != "smollm2-135m":
        return torch.randint(0, vocab, (batch, opts.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    examples = [e for e in training_examples(opts) if e.loss_mask.index(True) >= opts.prompt_len]
    chosen = [examples[i * len(examples) // batch] for i in range(batch)]
    return torch.tensor([e.tokens[: e.loss_mask.index(True)][-opts.prompt_len :] for e in chosen]).to(device)


def step_fn(impl: str, model, tokens, weights, device):
    """One LoRA step as a closure returning the loss; LoRA r=16, alpha=32 on all 7 projections."""
    cuda = device.type == "cuda"
    if impl == "ours":
        import lora
        import sft

        lora.add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets=LORA["targets"])
        params = lora.lora_parameters(model)
        loss_fn = lambda: sft.loss_fn(model, tokens, weights, checkpoint=cuda)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=list(LORA["targets"]), task_type="CAUSAL_LM"))
        if cuda:  # sft.py's GPU default, on both sides
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        labels = tokens.masked_fill(weights == 0, -100)  # transformers shifts labels itself
        loss_fn = lambda: model(input_ids=tokens, labels=labels).loss
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # sft.py's, on both sides
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    return step


def measure(spec: dict) -> dict:
    opts = Options(**spec["options"])
    device = torch.device(spec["device"])
    impl, task, model_name = spec["impl"], spec["task"], spec["model"]
    model, vocab = load(impl, model_name, device)
    if impl == "theirs":
        # generate() stops a row at the end-of-sequence token, and min_new_tokens would forbid that token
        # instead, changing the distribution; ours decodes a fixed number of tokens with no stop rule. So
        # theirs gets no end-of-sequence token: the same work and the same function on both sides.
        model.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(0)
    extra = {}
    if task == "prefill":
        tokens = torch.randint(0, vocab, (1, opts.prefill_len), generator=gen).to(device)
        n_tokens = opts.prefill_len
        run = (lambda: model(tokens)) if impl == "ours" else (lambda: model(input_ids=tokens, use_cache=False).logits)
        run = torch.inference_mode()(run)
    elif task in ("decode1", "decode8"):
        B = 1 if task == "decode1" else 8
        prompt = prompts(opts, B, model_name, vocab, device)
        n_tokens = B * opts.new_tokens
        if impl == "ours":
            run = lambda: greedy(model, prompt, opts.new_tokens)
        else:  # no end-of-sequence token (see theirs_never_stop): both decode every token
            run = lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                         max_new_tokens=opts.new_tokens, pad_token_id=0)[:, opts.prompt_len :]
        run = torch.inference_mode()(run)
    elif task == "sample8":
        import sample

        prompt = prompts(opts, 8, model_name, vocab, device)  # the same prompts as decode8
        n_tokens = 8 * opts.new_tokens
        settings = sample.Options(max_new_tokens=opts.new_tokens)  # sample.py's defaults
        if impl == "ours":  # ends=None: no reply stops early; theirs has no end-of-sequence token either
            run = lambda: sample.generate_ids(model, prompt.tolist(), settings)
        else:
            torch.manual_seed(0)
            kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                      temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                      repetition_penalty=settings.repetition_penalty, pad_token_id=0)
            run = lambda: model.generate(**kw, max_new_tokens=opts.new_tokens)
        extra["first_step"] = first_step_distribution(impl, model, prompt, settings, spec["dump"])
    else:
        tokens, weights, n_tokens = sft_batch(opts, model_name, vocab, device)
        run = step_fn(impl, model, tokens, weights, device)

    # Page in every weight first: a memory-mapped checkpoint is read lazily, and its pages arriving
    # during the first run must not count as that run's memory.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    sync(device)
    base = memory_now(device)
    reset_peak(device)
    for i in range(opts.warmup):
        out = run()
        if task == "sft" and i == 0:
            extra["first_loss"] = out  # both adapters start as a no-op: the base model's loss
        if task.startswith("decode") and i == 0:
            extra["tokens"] = out.tolist()  # every new token of every row: both sides must decode the same
    seconds = []
    for _ in range(opts.repeats):
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        seconds.append(time.perf_counter() - t)
    return {"n_tokens": n_tokens, "seconds": seconds, "peak_mib": (peak(device) - base) / 2**20, **extra}


@torch.inference_mode()
@torch.inference_mode()
def first_step_distribution(impl, model, prompt, settings, path) -> str:
    """Write the distribution the first new token of each prompt is sampled from, as log-probs (B, V),
    to path: ours through sample.py's own penalty and warpers, theirs as generate's processed scores."""
    if impl == "ours":
        import sample

        logits = sample.penalize(model(prompt)[:, -1].float(), prompt, settings.repetition_penalty)
        logp = sample.sampling_logprobs(logits, settings.temperature, settings.top_k, settings.top_p, settings.min_p)
    else:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                             temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                             repetition_penalty=settings.repetition_penalty, pad_token_id=0, max_new_tokens=1,
                             output_scores=True, return_dict_in_generate=True)
        logp = out.scores[0].float().log_softmax(-1)
    save_file({"logprobs": logp.cpu().contiguous()}, path)
    return path


# ---------------------------------------------------------------------------------------------------
# The device's own limits (GPU): what decoding and training are measured against.

def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    x = torch.empty(2**29, dtype=torch.bfloat16, device=device)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * x.element_size() * 10 / (time.perf_counter() - t)


def matmul_flops(device) -> float:
    """FLOP/s of a large bf16 matmul: the rate a perfect training step would run at."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 2 * 8192**3 * 20 / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------------
# The run: every measurement in a subprocess, then the table.

def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh Python process; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                         text=True, cwd=Path(__file__).parent)
    if out.returncode != 0:
        raise RuntimeError(f"{spec['impl']} {spec['task']} on {spec['model']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(opts: Options) -> dict:
    tasks = opts.only.split(",") if opts.only else list(TASKS)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise BadInput(f"--only {opts.only}: no measurement {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    cuda = torch.cuda.is_available()
    runs = [("smollm2-135m", "cpu")] + ([("mistral-7b-shaped", "cuda")] if cuda else [])
    results = {"device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "options": asdict(opts), "rows": []}
    for model_name, device in runs:
        for task in tasks:
            row = {"model": model_name, "device": device, "task": task}
            for r in range(opts.rounds):
                for impl in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                    dump = str(Path(opts.out).with_name(f".{task}_{impl}_{model_name}.safetensors"))
                    spec = {"model": model_name, "device": device, "task": task, "impl": impl, "dump": dump,
                            "options": {**asdict(opts), "worker": ""}}
                    print(f"{model_name} {device} {task}: {impl} (round {r + 1})...", file=sys.stderr, flush=True)
                    result = run_worker(spec)
                    if impl in row:  # pool the rounds: all timed runs, the largest peak
                        result = {**row[impl], "seconds": row[impl]["seconds"] + result["seconds"],
                                  "peak_mib": max(row[impl]["peak_mib"], result["peak_mib"])}
                    row[impl] = result
                    row[impl]["tokens_per_s"] = row[impl]["n_tokens"] / statistics.median(row[impl]["seconds"])
            row["ratio"] = row["ours"]["tokens_per_s"] / row["theirs"]["tokens_per_s"]
            for impl in ("ours", "theirs"):
                times = row[impl]["seconds"]
                row[impl]["best_tokens_per_s"] = row[impl]["n_tokens"] / min(times)
                row[impl]["spread"] = (max(times) - min(times)) / min(times)
            if task == "sample8":  # the same distribution on both sides, and our cost of sampling over greedy
                p, q = (load_file(row[impl]["first_step"])["logprobs"].exp() for impl in ("ours", "theirs"))
                row["first_step_tv"] = 0.5 * (p - q).abs().sum(-1).max().item()
                for impl in ("ours", "theirs"):
                    Path(row[impl].pop("first_step")).unlink()
            results["rows"].append(row)
        greedy8 = next((r for r in results["rows"] if r["model"] == model_name and r["task"] == "decode8"), None)
        for row in results["rows"]:
            if row["model"] == model_name and row["task"] == "sample8" and greedy8:
                row["of_greedy8"] = row["ours"]["tokens_per_s"] / greedy8["ours"]["tokens_per_s"]
    if cuda:
        dev = torch.device("cuda")
        bw, flops = copy_bandwidth(dev), matmul_flops(dev)
        weight_bytes = sum(mistral_7b_params().values()) * 2  # bf16: every weight is read once per token
        results["gpu"] = {"copy_bandwidth_gb_s": bw / 1e9, "bf16_matmul_tflops": flops / 1e12,
                          "decode1_bound_tok_s": bw / weight_bytes}
        for row in results["rows"]:
            if row["model"] != "mistral-7b-shaped":
                continue
            if row["task"] == "decode1":
                row["of_bound"] = row["ours"]["tokens_per_s"] / results["gpu"]["decode1_bound_tok_s"]
            if row["task"] == "sft":
                n = sum(mistral_7b_params().values())
                # A LoRA step's model FLOPs per token: 2N forward + 2N backward to the activations (the
                # frozen weights need no gradient of their own); the adapters and attention are extra.
                row["mfu"] = {impl: 4 * n * row[impl]["tokens_per_s"] / flops for impl in ("ours", "theirs")}
    return results


def mistral_7b_params() -> dict:
    """Parameters by part, from MISTRAL_7B (norms left out: they are 0.004% of them)."""
    c = MISTRAL_7B
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    return {"embed": V * D, "lm_head": V * D, "attention": L * (2 * D * D + 2 * D * kv), "mlp": L * 3 * D * F}


def markdown(r: dict) -> str:
    o = r["options"]
    out = [f"{r['device']}, torch {r['torch']}; median (and fastest) of {o['rounds']} x {o['repeats']} runs, "
           f"each process after {o['warmup']} warm-up", "",
           "| model | measurement | ours tok/s | theirs tok/s | ours/theirs | ours fastest | theirs fastest | "
           "ours peak MiB | theirs peak MiB |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    names = {"prefill": f"prefill ({o['prefill_len']} tokens)",
             "decode1": f"decode, batch 1 ({o['new_tokens']} tokens)",
             "decode8": f"decode, batch 8 ({o['new_tokens']} tokens each)",
             "sample8": f"sample, batch 8 ({o['new_tokens']} tokens each)",
             "sft": f"LoRA step ({o['sft_batch']} examples)"}
    for row in r["rows"]:
        ours, theirs = row["ours"], row["theirs"]
        out.append(f"| {row['model']} | {names[row['task']]} | {ours['tokens_per_s']:.1f} | {theirs['tokens_per_s']:.1f} | "
                   f"{row['ratio']:.2f}x | {ours['best_tokens_per_s']:.1f} | {theirs['best_tokens_per_s']:.1f} | "
                   f"{ours['peak_mib']:.0f} | {theirs['peak_mib']:.0f} |")
    notes = []
    for row in r["rows"]:
        name = f"{row['model']} {row['task']}"
        for impl in ("ours", "theirs"):
            if row[impl]["spread"] > SPREAD:
                notes.append(f"{name}: {impl} runs spread by {row[impl]['spread']:.0%} (fastest to slowest): "
                             "the machine was disturbed; rerun before trusting this row")
        if "tokens" in row["ours"]:
            same = row["ours"]["tokens"] == row["theirs"]["tokens"]
            notes.append(f"{name}: every decoded token of every row is {'the same' if same else 'NOT the same'} "
                         "on both sides")
        if "first_step_tv" in row:
            notes.append(f"{name}: the first step's sampling distributions differ by total variation "
                         f"{row['first_step_tv']:.1e} (max over rows); ours samples at {row['of_greedy8']:.0%} of "
                         "our greedy batch-8 rate")
        if "first_loss" in row["ours"]:
            notes.append(f"{name}: first-step loss ours {row['ours']['first_loss']:.5f}, "
                         f"theirs {row['theirs']['first_loss']:.5f}")
        if "of_bound" in row:
            notes.append(f"{row['model']} decode batch 1: {row['of_bound']:.0%} of the memory-bandwidth bound "
                         f"({r['gpu']['decode1_bound_tok_s']:.0f} tok/s at {r['gpu']['copy_bandwidth_gb_s']:.0f} GB/s)")
        if "mfu" in row:
            notes.append(f"{row['model']} LoRA step: model-FLOPs utilisation ours {row['mfu']['ours']:.0%}, theirs "
                         f"{row['mfu']['theirs']:.0%} (of {r['gpu']['bf16_matmul_tflops']:.0f} TFLOP/s measured)")
    return "\n".join(out + [""] + [f"- {n}" for n in notes])


def main():
    opts = parse_options(Options)
    if opts.worker:
        print(json.dumps(measure(json.loads(opts.worker))))
        return
    results = bench(opts)
    write_atomically(opts.out, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    print(markdown(results))
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    exit_on_bad_input(main)
