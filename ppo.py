"""RL against the reward model, stage 3: make the simulated person more like the real one by what the
reward model learned, while a KL penalty keeps them close to the fine-tuned model. RLOO on a CPU, PPO
on a GPU, in one visible loop.

    python ppo.py                                      # RLOO: out/adapter + out/rlaif/rm -> out/ppo
    python ppo.py --algo ppo --steps 4                 # PPO (the GPU default), small
    python ppo.py --resume                             # carry on after a crash, Ctrl-C or SIGTERM
    python ppo.py --check-rm out/rlaif2/rm             # also: does a second reward model prefer the result?
    python ppo.py --ptx-only --out out/ptx_only        # the baseline: the real replies alone, no RL
    python sample.py --adapter out/ppo/adapter --speaker FRIEND --prompt "[RIYA] hey"

The models. The stage-1 adapter is folded into the base weights once and a fresh LoRA trains on top,
so switching that LoRA off gives exactly the stage-1 model: the KL reference, with one copy of the
weights, and a KL of exactly 0 at step 0. The reward model (rlaif.py) is a frozen copy; PPO's critic
starts from another copy of it (its LoRA and head, trainable). The reward model names the stage-1
adapter it was built on, and a different --adapter is refused.

The loop, in cleanrl's order:
  1. prompts from the training sessions, both speakers, chosen by (seed, step)
  2. rollouts through the KV cache, plain temperature sampling only (top-k, top-p, min-p and the
     repetition penalty would make the sampled distribution differ from the scored one)
  3. log-probs of the replies under the policy (same temperature) and the reference, the reward
     model's score at each reply's last real token, minus a penalty for a reply that never ended
  4. RLOO (k replies per prompt, each one's baseline the mean reward of the other k - 1; Ahmadian et
     al. 2024, https://arxiv.org/abs/2402.14740) or PPO (per-token KL penalty, GAE, whitened
     advantages, clipped policy and value losses, several epochs with early stop on approximate KL;
     the N+ implementation details, https://arxiv.org/abs/2403.17031)
  5. AdamW on the trainable LoRA (and critic), gradient clipping, a finite-loss check first. Beside the
     RL loss, gamma times the NLL of the person's real reply to each of the step's prompts (the
     training sessions' own next messages; InstructGPT's "PPO-ptx", Ouyang et al. 2022,
     https://arxiv.org/abs/2203.02155): the KL penalty only sees the policy's own replies, and the
     real ones are what eval.py's NLL measures. Every step logs that NLL's rise over stage 1.

Precision. On a CPU that does bf16 in hardware, RLOO's prefills, scoring forwards and update multiply
in bf16 (model.cpu_bf16); decoding stays fp32 (it is bound by reading the weights). The scoring and
training forwards round alike, so step 0's KL of exactly 0 and RLOO's ratio of exactly 1 still hold;
what bf16 costs is a gap between the sampler's log-probs and the scoring forward's, logged every step
("gap": the mean |difference| per reply token: ~3e-2 in bf16, ~2e-6 in fp32). --fp32 turns it off.
PPO stays fp32 on a CPU: its clipping and early stop read small log-prob ratios, which bf16 rounds.
The reward model scores as it was trained (rm.json).

Writes into --out: adapter/ (stage 1 and this LoRA stacked into one PEFT adapter: sample.py, eval.py
and PEFT load it), metrics.jsonl, ppo.png, heldout.jsonl (sample replies with their scores), and
checkpoint.safetensors.

Shapes: B replies, P prompts, k replies per prompt, T sequence (prompt + reply), R reply tokens, D model dim.
"""
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import torch
from tqdm import tqdm

import cli
import lora
import rlaif
import sample
import sft
from cli import FRACTION, POSITIVE, BadInput, Range, exit_on_bad_input, parse_options
from model import continuation_logprobs, continuation_states, cpu_bf16, pad, token_logprobs
from prep import load_pair, split_sessions, tag

ALGOS = ("rloo", "ppo")


@dataclass
class Options:
    adapter: Annotated[str, "the stage-1 adapter (sft.py, or sft.py on revisions); the reward model's own"] = sft.ADAPTER
    rm: Annotated[str, "the reward model from rlaif.py train-rm"] = "out/rlaif/rm"
    out: Annotated[str, "output folder"] = "out/ppo"
    algo: Annotated[str, "rloo or ppo"] = "rloo"
    resume: Annotated[bool, "continue the run in --out from its checkpoint"] = False
    steps: Annotated[int, "optimizer rounds (each: rollouts, scoring, update)", Range(1)] = 40
    prompts: Annotated[int, "prompts per step", Range(1)] = 8
    k: Annotated[int, "replies per prompt (RLOO's group; PPO samples k too)", Range(1)] = 4
    pool: Annotated[int, "training-session prompts the steps draw from", Range(1)] = 2000
    temperature: Annotated[float, "sampling temperature, the same when scoring", POSITIVE] = rlaif.SAMPLING.temperature
    max_new_tokens: Annotated[int, "longest reply", Range(1)] = rlaif.SAMPLING.max_new_tokens
    # Accepted as flags only to be refused: any of them makes the sampled distribution differ from the one
    # scored, which biases the KL estimate (negative KL is the classic symptom).
    top_k: Annotated[int, "refused unless 0: see the module's notes", Range(0)] = 0
    top_p: Annotated[float, "refused unless 1", Range(0, 1, low_open=True)] = 1.0
    min_p: Annotated[float, "refused unless 0", Range(0, 1)] = 0.0
    repetition_penalty: Annotated[float, "refused unless 1", POSITIVE] = 1.0
    # The KL penalty is measured on the policy's own replies, and there it stayed small (~0.4 nats per
    # reply) while eval.py's NLL of the people's real held-out messages rose by 1.4% (beta 0.2, 40 steps)
    # or 2.6% (beta 0.05, 27 steps, more reward): the policy drifted where it does not sample. The
    # person's real replies are the direct guard (ptx_coef; README, ppo.py's section).
    kl_coef: Annotated[float, "beta: the KL penalty per nat (k1 estimator: log pi - log pi_ref)", Range(0)] = 0.05
    ptx_coef: Annotated[float, "gamma: weight of the NLL of the person's real replies to the step's prompts (their "
                               "actual next messages) beside the RL loss, per reply; 0 = RL alone", Range(0)] = 0.5
    ptx_only: Annotated[bool, "the baseline for what RL adds: train on those real replies alone (gamma times their "
                              "NLL), no rollouts, the same prompts, steps and checks"] = False
    unended_penalty: Annotated[float, "subtracted from the score of a reply that never ended its turn", Range(0)] = 1.0
    max_kl: Annotated[float, "stop the run when the mean KL per reply (nats) passes this", POSITIVE] = 10.0
    # With the real replies in the loss, 2e-4 spent a fifth of eval.py's (c) budget and gained 0.21 std
    # of reward; 4e-4 gained 0.50 for +1.0% of (c) (README, ppo.py's section).
    lr: Annotated[float, "peak learning rate", POSITIVE] = 4e-4
    min_lr: Annotated[float, "learning rate at the end of the cosine decay", Range(0)] = 2e-5
    warmup_steps: Annotated[int, "linear warmup steps", Range(0)] = 2
    max_steps: Annotated[int | None, "the schedule's length (default: --steps)", Range(1)] = None
    grad_clip: Annotated[float, "clip the gradient norm to this", POSITIVE] = 1.0
    lora_r: Annotated[int, "the policy's LoRA rank", Range(1)] = 16
    lora_alpha: Annotated[int, "its LoRA alpha", POSITIVE] = 32
    micro_batch: Annotated[int, "replies per forward and backward (memory; the update is their mean)", Range(1)] = 8
    fp32: Annotated[bool, "rloo: compute in fp32 even on a CPU that does bf16 in hardware, where by default "
                          "prefills, scoring and the update run in bf16 (a step ~20% faster; decoding stays fp32; "
                          "see model.cpu_bf16). PPO runs in fp32 on a CPU"] = False
    # PPO
    epochs: Annotated[int, "ppo: passes over each step's rollouts", Range(1)] = 4
    minibatches: Annotated[int, "ppo: minibatches per pass", Range(1)] = 2
    clip: Annotated[float, "ppo: policy and value clipping range", FRACTION] = 0.2
    vf_coef: Annotated[float, "ppo: weight of the value loss", Range(0)] = 0.1
    gamma: Annotated[float, "ppo: discount", Range(0, 1)] = 1.0
    lam: Annotated[float, "ppo: GAE lambda", Range(0, 1)] = 0.95
    target_kl: Annotated[float, "ppo: stop a step's epochs once the approximate KL to its rollout policy passes "
                                "this; 0 = never", Range(0)] = 0.1
    # Evaluation and files
    heldout: Annotated[int, "held-out prompts scored every --eval-every steps (fixed seed)", Range(1)] = 32
    eval_every: Annotated[int, "steps between held-out evaluations", Range(1)] = 10
    save_every: Annotated[int, "steps between checkpoints", Range(1)] = 10
    check_rm: Annotated[str, "at the end, a second reward model (another seed, other prompts) compares the "
                             "result's held-out replies with stage 1's (default: none)"] = ""
    check_prompts: Annotated[int, "held-out prompts of that comparison, one reply each from both", Range(1)] = 200
    seed: Annotated[int, "seed for prompts, samples, the LoRA and minibatches"] = 0
    allow_other_base: Annotated[bool, "load the adapter even onto a base model other than the one it was "
                                      "trained on"] = False


# On a GPU: PPO, as the N+ details run it, with more of everything (its lr unmeasured: 4e-4 was chosen on
# the CPU's RLOO runs, so a 7B model keeps the more cautious 2e-4).
GPU_DEFAULTS = dict(algo="ppo", steps=200, prompts=32, k=2, heldout=128, eval_every=20, save_every=20, micro_batch=16,
                    lr=2e-4)


# ---------------------------------------------------------------------------------------------------
# Pure functions, each tested against a hand computation or a for-loop.

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask):
    """Zero mean, unit variance over the real (masked) entries, as the N+ details whiten advantages."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_k1(logp, ref):
    """log pi - log pi_ref per token: unbiased for KL(pi || ref) when tokens come from pi."""
    return logp - ref


def kl_k3(logp, ref):
    """exp(ref - logp) - 1 - (ref - logp) per token: also unbiased, never negative, lower variance
    (http://joschu.net/blog/kl-approx.html)."""
    d = ref - logp
    return d.exp() - 1 - d


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over each reply's tokens: rewards, values, mask (B, R).
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0); A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), 0 where mask is."""
    B, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, device=rewards.device)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros(B, device=rewards.device)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards, k: int):
    """rewards (P * k,), k consecutive replies per prompt -> each minus the mean of the other k - 1."""
    groups = rewards.view(-1, k)  # (P, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).view(-1)


def policy_loss(logp, old_logp, advantages, mask, clip):
    """The clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1 - c, 1 + c)), r = pi / pi_old.
    Returns (loss, share of tokens where clipping bound)."""
    ratio = (logp - old_logp).exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, clip):
    """0.5 * mean over real tokens of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ---------------------------------------------------------------------------------------------------
# Rollouts, scored.

@dataclass
class Rollouts:
    prompt_ids: list  # [P * k] token lists
    reply_ids: list  # [P * k] token lists, as sampled
    tokens: torch.Tensor  # (B, T) prompt + reply, right-padded
    reply: torch.Tensor  # (B, T) bool: the reply's tokens
    logp: torch.Tensor  # (B, T) the policy's log-probs of the reply tokens, at the temperature (0 elsewhere)
    ref: torch.Tensor  # (B, T) the reference's
    score: torch.Tensor  # (B,) the reward model's normalised score, minus the unended penalty
    ended: torch.Tensor  # (B,) bool
    speakers: list  # [B] the replying tag
    prompts: list  # [P] the step's prompts (row b answers prompts[which[b]]), each with its real reply "real_ids"
    which: list  # [P * k] b // k
    real: torch.Tensor  # (P,) the policy's log p of each prompt's real reply, summed over its tokens
    real_ref: torch.Tensor  # (P,) the reference's
    sampler_gap: float  # mean |log-prob as sampled - log-prob as scored| over the reply tokens: ~1e-6 in fp32


def per_token(model, prompts, which, reply_ids, reply, temperature, micro_batch, met=None):
    """(B, T) log-probs of the reply tokens under model at the temperature (0 elsewhere; reply (B, T)
    marks where they sit), micro_batch replies at a time; and the person's real reply to each prompt
    (prompts[which[b]] is row b's): (U,) its log p summed over its tokens, at temperature 1 (the model's
    own distribution, as eval.py scores it), for the U prompts whose real reply this call ran, and
    their indices. Each micro-batch is one forward (model.continuation_states): each distinct prompt
    in it runs once, continued by its sampled replies and by the real reply of each prompt first met
    there (met: the prompts an earlier call already ran; updated), so the real replies' NLL (PPO-ptx)
    costs no second run of the prompts, which are most of each sequence."""
    out, real, ran = torch.zeros(reply.shape, device=reply.device), [], []
    met = set() if met is None else met
    for j in range(0, len(which), micro_batch):
        part = slice(j, j + micro_batch)
        new = [i for i in dict.fromkeys(which[part]) if i not in met]
        met.update(new)
        continuations = reply_ids[part] + [prompts[i]["real_ids"] for i in new]
        h = continuation_states(model, [prompts[i]["prompt_ids"] for i in which[part] + new], continuations)  # (N + M, D)
        targets = torch.tensor([t for c in continuations for t in c], device=h.device)
        n = int(reply[part].sum())  # the sampled replies' tokens come first, then the real replies'
        logits = model.unembed(h)
        out[part][reply[part]] = token_logprobs(logits[:n] / temperature, targets[:n])
        real += [x.sum() for x in token_logprobs(logits[n:], targets[n:]).split([len(prompts[i]["real_ids"]) for i in new])]
        ran += new
    return out, torch.stack(real) if real else torch.zeros(0, device=reply.device), ran


def ptx(opts: Options, real, prompts: int):
    """gamma times the summed log p of real replies, per prompt (the RL loss's unit), or 0 without a
    graph when gamma is 0 (the real replies then run for the log alone, and need no backward)."""
    return opts.ptx_coef * real.sum() / prompts if opts.ptx_coef else 0.0


def real_logprobs(model, prompts, micro_batch):
    """(P,) log p of each prompt's real reply (the person's own next message, "real_ids") after it,
    summed over its tokens, at temperature 1 (the model's own distribution, as eval.py scores it)."""
    out = []
    for j in range(0, len(prompts), micro_batch):
        part = prompts[j : j + micro_batch]
        lp = continuation_logprobs(model, [p["prompt_ids"] for p in part], [p["real_ids"] for p in part])
        out += [x.sum() for x in lp.split([len(p["real_ids"]) for p in part])]
    return torch.stack(out)


def real_nll_rise(real, real_ref, prompts) -> float:
    """nats per token by which the policy's NLL of the real replies exceeds stage 1's."""
    return ((real_ref - real).sum() / sum(len(p["real_ids"]) for p in prompts)).item()


def ptx_prompts(opts: Options) -> int:
    """Prompts per forward for their real replies: as many as an RL micro-batch holds. The reference's
    log-probs are taken in the same groups, so at step 0 the rise is exactly 0."""
    return max(1, opts.micro_batch // opts.k)


def ptx_backward(policy, prompts, opts: Options) -> torch.Tensor:
    """--ptx-only's update: gamma times the mean NLL of the prompts' real replies (per reply, the RL
    loss's unit), backpropagated as many prompts at a time as an RL micro-batch holds: each prompt's
    whole forward is kept for the backward (all 8 at once took a run from 2.9 to 8 GB). (With RL, the
    real replies ride in the RL loss's own forward: per_token.) -> their log-probs (P,), detached."""
    size = ptx_prompts(opts)
    out = []
    for j in range(0, len(prompts), size):
        with torch.set_grad_enabled(opts.ptx_coef > 0):
            real = real_logprobs(policy, prompts[j : j + size], size)
            if opts.ptx_coef > 0:
                loss = -ptx(opts, real, len(prompts))
                if not torch.isfinite(loss):
                    raise sft.TrainingDiverged(f"the real replies' NLL became {loss.item()}")
                loss.backward()
        out.append(real.detach())
    return torch.cat(out)


@torch.no_grad()
def collect(policy, tok, rm, prompts, opts: Options, seed: int, reward=None) -> Rollouts:
    """k replies to each prompt (k consecutive rows per prompt), and everything the update needs.
    reward(prompt ids, reply ids) -> score replaces the reward model (tests use a toy one)."""
    ids = [p["prompt_ids"] for p in prompts for _ in range(opts.k)]
    settings = sample.Options(temperature=opts.temperature, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                              max_new_tokens=opts.max_new_tokens, seed=seed)
    policy.eval()
    replies = sample.generate_ids(policy, ids, settings, sample.turn_ends(tok))
    device = policy.embed_tokens.weight.device
    tokens, real = pad([p + r.ids for p, r in zip(ids, replies)], device=device)
    reply = torch.zeros_like(real)
    for b, (p, r) in enumerate(zip(ids, replies)):
        reply[b, len(p) : len(p) + len(r.ids)] = True
    reply_ids, which = [r.ids for r in replies], [b // opts.k for b in range(len(ids))]
    logp, real, _ = per_token(policy, prompts, which, reply_ids, reply, opts.temperature, opts.micro_batch)
    with lora.disabled(policy):  # the stage-1 model
        ref, real_ref, _ = per_token(policy, prompts, which, reply_ids, reply, opts.temperature, opts.micro_batch)
    if reward is None:
        score = torch.cat([rm([p + r.ids for p, r in zip(ids[j : j + opts.micro_batch], replies[j : j + opts.micro_batch])])
                           for j in range(0, len(ids), opts.micro_batch)])
    else:
        score = torch.tensor([float(reward(p, r.ids)) for p, r in zip(ids, replies)], device=device)
    ended = torch.tensor([r.ended for r in replies], device=device)
    score = score.to(device) - opts.unended_penalty * (~ended).float()
    # The sampler's own log-probs against the scoring forward's: rounding only, or the policy scored is not
    # the policy sampled (in bf16 the two forwards round differently, by ~1e-2 per token).
    sampled = torch.tensor([lp for r in replies for lp in r.logprobs], device=device)
    gap = (logp[reply] - sampled).abs().mean().item() if len(sampled) else 0.0
    return Rollouts(ids, reply_ids, tokens, reply, logp, ref, score, ended,
                    [p["speaker"] for p in prompts for _ in range(opts.k)], prompts, which, real, real_ref, gap)


# ---------------------------------------------------------------------------------------------------
# The updates. Each returns its statistics; the first forward's |ratio - 1| is the check that sampling,
# scoring and training all see one distribution. For RLOO it is exactly 0 on a CPU in fp32 (the same
# weights, ops and micro-batches as the scoring forward); PPO's shuffled minibatches group the
# prompts differently, so its first ratio is off by rounding only (~2e-6).

def rloo_update(policy, optimizer, params, ro: Rollouts, opts: Options) -> dict:
    kl = kl_k1(ro.logp, ro.ref).sum(1)  # (B,) nats per reply
    rewards = ro.score - opts.kl_coef * kl  # the KL penalty on the whole reply, its one action
    advantages = rloo_advantages(rewards, opts.k)
    policy.train()
    first_ratio, B, met, real = None, len(ro.tokens), set(), torch.zeros(len(ro.prompts), device=ro.real_ref.device)
    for j in range(0, B, opts.micro_batch):  # the micro-batches of collect's scoring forward: the same numbers
        part = slice(j, j + opts.micro_batch)
        logp, real_part, ran = per_token(policy, ro.prompts, ro.which[part], ro.reply_ids[part], ro.reply[part],
                                         opts.temperature, opts.micro_batch, met)
        if first_ratio is None:
            first_ratio = masked_mean(((logp - ro.logp[part]).exp() - 1).abs().detach(), ro.reply[part].float()).item()
        # REINFORCE with the leave-one-out baseline: the mean over replies of -A * log pi(reply); and gamma
        # times the mean NLL of the prompts' real replies.
        loss = -(advantages[part] * logp.sum(1)).sum() / B - ptx(opts, real_part, len(ro.prompts))
        if not torch.isfinite(loss):
            raise sft.TrainingDiverged(f"the RLOO loss became {loss.item()}")
        loss.backward()
        real[ran] = real_part.detach()
    norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"ratio_dev": first_ratio, "grad_norm": norm, "advantage_std": advantages.std().item(),
            "real_nll_rise": real_nll_rise(real, ro.real_ref, ro.prompts)}


def aligned(x, reply, R: int):
    """(B, T) values at the reply's tokens -> (B, R) left-aligned, and its mask (B, R)."""
    lengths = reply.sum(1)
    start = reply.float().argmax(1)  # each row's first reply position
    index = (start[:, None] + torch.arange(R, device=x.device)).clamp(max=x.shape[1] - 1)
    mask = torch.arange(R, device=x.device)[None] < lengths[:, None]
    return x.gather(1, index) * mask, mask.float()


def values_of(critic, prompt_ids, reply_ids, reply, micro_batch):
    """(B, T) the critic's value of the state before each reply token: its head on the final normed
    stream at the position that predicts that token (0 elsewhere), on the scale of the rewards
    (normalised scores). Each distinct prompt in a micro-batch runs once, as in per_token."""
    out = torch.zeros(reply.shape, device=reply.device)
    for j in range(0, len(prompt_ids), micro_batch):
        part = slice(j, j + micro_batch)
        h = continuation_states(critic.model, prompt_ids[part], reply_ids[part])  # (N, D)
        out[part][reply[part]] = (critic.score_states(h) - critic.mean) / critic.std
    return out


def ppo_update(policy, critic, optimizer, params, ro: Rollouts, opts: Options, seed: int) -> dict:
    with torch.no_grad():
        old_values = values_of(critic, ro.prompt_ids, ro.reply_ids, ro.reply, opts.micro_batch)
    kl_tok = kl_k1(ro.logp, ro.ref) * ro.reply  # (B, T)
    rewards = -opts.kl_coef * kl_tok  # the KL penalty on every token, the score on the last
    last = ro.reply.float().cumsum(1).argmax(1)  # each reply's last token
    rewards[torch.arange(len(rewards)), last] += ro.score
    R = int(ro.reply.sum(1).max())
    r_al, mask = aligned(rewards, ro.reply, R)
    v_al, _ = aligned(old_values, ro.reply, R)
    advantages, returns = gae(r_al, v_al, mask, opts.gamma, opts.lam)
    advantages = masked_whiten(advantages, mask)
    old_al, _ = aligned(ro.logp, ro.reply, R)
    rng = random.Random(seed)
    B, stats = len(ro.tokens), {"ratio_dev": None, "clip_frac": [], "approx_kl": [], "value_loss": [], "epochs": 0}
    rises = []  # the first epoch's (real log p, reference's, prompts) per minibatch
    policy.train()
    critic.train()
    for epoch in range(opts.epochs):
        order = rng.sample(range(B), B)
        size = max(1, B // opts.minibatches)
        kls = []
        for m in range(0, B, size):
            picked = order[m : m + size]
            rows = torch.tensor(picked, device=ro.tokens.device)
            prompt_ids, reply_ids = [ro.prompt_ids[i] for i in picked], [ro.reply_ids[i] for i in picked]
            reply = ro.reply[rows]
            # One forward for the minibatch, with its prompts' real replies (each prompt once): each
            # minibatch is an optimizer step, so it carries their NLL too.
            logp, real, mine = per_token(policy, ro.prompts, [ro.which[i] for i in picked], reply_ids, reply,
                                         opts.temperature, len(rows))
            values = values_of(critic, prompt_ids, reply_ids, reply, opts.micro_batch)
            lp, mm = aligned(logp, reply, R)
            v, _ = aligned(values, reply, R)
            if stats["ratio_dev"] is None:
                stats["ratio_dev"] = masked_mean(((lp - old_al[rows]).exp() - 1).abs().detach(), mm).item()
            pg, clip_frac = policy_loss(lp, old_al[rows], advantages[rows], mm, opts.clip)
            vf = value_loss(v, v_al[rows], returns[rows], mm, opts.clip)
            loss = pg + opts.vf_coef * vf - ptx(opts, real, len(mine))
            if not torch.isfinite(loss):
                raise sft.TrainingDiverged(f"the PPO loss became {loss.item()}")
            loss.backward()
            if epoch == 0:
                rises.append((real.detach(), ro.real_ref[mine], [ro.prompts[i] for i in mine]))
            torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                log_ratio = lp - old_al[rows]
                kls.append(masked_mean(log_ratio.exp() - 1 - log_ratio, mm).item())  # k3 of pi_old || pi
            stats["clip_frac"].append(clip_frac.item())
            stats["value_loss"].append(vf.item())
        stats["approx_kl"].append(sum(kls) / len(kls))
        stats["epochs"] = epoch + 1
        if opts.target_kl and stats["approx_kl"][-1] > opts.target_kl:
            break
    residual = (returns - v_al) * mask
    variance = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    explained = 1 - masked_mean((residual - masked_mean(residual, mask)) ** 2, mask) / variance.clamp(min=1e-8)
    return {"ratio_dev": stats["ratio_dev"], "clip_frac": sum(stats["clip_frac"]) / len(stats["clip_frac"]),
            "approx_kl": stats["approx_kl"][-1], "value_loss": sum(stats["value_loss"]) / len(stats["value_loss"]),
            "explained_variance": explained.item(), "epochs": stats["epochs"],
            "real_nll_rise": real_nll_rise(torch.cat([r for r, _, _ in rises]), torch.cat([f for _, f, _ in rises]),
                                           [p for _, _, ps in rises for p in ps])}


# ---------------------------------------------------------------------------------------------------
# The models and the prompts.

def check_sampling(opts: Options):
    cut = {"--top-k": opts.top_k != 0, "--top-p": opts.top_p != 1.0, "--min-p": opts.min_p != 0.0,
           "--repetition-penalty": opts.repetition_penalty != 1.0}
    wrong = [flag for flag, bad in cut.items() if bad]
    if wrong:
        raise BadInput(f"{', '.join(wrong)}: PPO samples with temperature alone, because it must score each reply under "
                       "exactly the distribution it was drawn from; a cut or penalised distribution biases its KL")
    if opts.algo not in ALGOS:
        raise BadInput(f"--algo {opts.algo}: rloo or ppo")
    if opts.ptx_only and opts.ptx_coef == 0:
        raise BadInput("--ptx-only with --ptx-coef 0 trains nothing")
    if opts.algo == "rloo" and opts.k < 2:
        raise BadInput("--k 1: RLOO needs at least 2 replies per prompt (each one's baseline is the others)")


def load_models(opts: Options):
    """(policy: the folded stage-1 model with a fresh LoRA, its tokenizer, the stage-1 Tuned, the frozen
    reward model, the critic or None)."""
    rm, rm_tuned, info = rlaif.load_rm(opts.rm, opts.allow_other_base)
    if Path(info["stage1_adapter"]).resolve() != Path(opts.adapter).resolve():
        raise BadInput(f"--rm {opts.rm} was built on the stage-1 adapter {info['stage1_adapter']}, not on --adapter "
                       f"{opts.adapter}; train a reward model on this one (rlaif.py) or pass its adapter")
    for p in rm.parameters():
        p.requires_grad_(False)
    tuned = sft.load_tuned(opts.adapter, allow_other_base=opts.allow_other_base)
    lora.fold(tuned.model)  # stage 1, for good: disabling the new LoRA gives it back exactly
    torch.manual_seed(opts.seed)
    lora.add_lora(tuned.model, r=opts.lora_r, alpha=opts.lora_alpha, dropout=0.0)  # dropout off: ratios stay 1
    critic = None
    if opts.algo == "ppo":
        critic, _, _ = rlaif.load_rm(opts.rm, opts.allow_other_base)  # its own copy: the critic trains
        for p in rlaif.rm_parameters(critic).values():
            p.requires_grad_(True)
    return tuned.model, tuned.tok, tuned, rm, critic


def prompt_pool(tuned: sft.Tuned, opts: Options, heldout=None):
    """(training-session prompts to draw from, held-out prompts to evaluate on), both speakers;
    heldout: how many held-out prompts (default --heldout)."""
    data = sft.data_settings(tuned.training, opts)
    messages, _ = load_pair(data.data)
    tags = {s: tag(s) for s in dict.fromkeys(m.speaker for m in messages)}
    train_sessions, held_out = split_sessions(messages, data.session_gap_hours, data.val_frac)
    speakers = sorted(set(tags.values()))
    return (rlaif.prompts_from(tuned.tok, train_sessions, tags, speakers, data, opts.pool),
            rlaif.prompts_from(tuned.tok, held_out, tags, speakers, data, heldout or opts.heldout))


def trainable(policy, critic) -> dict:
    out = {f"policy.{k}": p for k, p in lora.peft_keys(policy).items()}
    if critic is not None:
        out.update({f"critic.{k}": p for k, p in rlaif.rm_parameters(critic).items()})
    return out


@torch.no_grad()
def heldout_scores(policy, tok, rm, prompts, opts: Options, reward=None) -> tuple[dict, list]:
    """One reply per held-out prompt (seed fixed: every evaluation sees the same draws): the mean score,
    its spread, ended share and length, and the rise of the real replies' NLL over stage 1 (a small,
    quick stand-in for eval.py's); and (prompt, reply, score) rows."""
    ro = collect(policy, tok, rm, prompts, replace(opts, k=1), seed=10**6 + opts.seed, reward=reward)
    rows = [{"speaker": p["speaker"], "context": p["context"][-2:], "reply": sample.reply_text(tok, p["prompt_ids"], r),
             "score": s} for p, r, s in zip(prompts, ro.reply_ids, ro.score.tolist())]
    kl = kl_k1(ro.logp, ro.ref).sum(1)
    return {"score": ro.score.mean().item(), "score_std": ro.score.std().item() if len(prompts) > 1 else 0.0,
            "ended": ro.ended.float().mean().item(), "length": ro.reply.sum(1).float().mean().item(),
            "kl": kl.mean().item(), "real_nll_rise": real_nll_rise(ro.real, ro.real_ref, prompts)}, rows


def distinct_2(replies: list[list[int]]) -> float:
    grams = [tuple(r[j : j + 2]) for r in replies for j in range(len(r) - 1)]
    return len(set(grams)) / max(1, len(grams))


def plot(log, path):
    plt = cli.pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    steps = [r["step"] for r in log if "score" in r]
    ax1.plot(steps, [r["score"] for r in log if "score" in r], lw=0.8, label="rollout score")
    held = [(r["step"], r["heldout_score"]) for r in log if "heldout_score" in r]
    if held:
        ax1.plot(*zip(*held), "o-", label="held-out score (fixed prompts and seed)")
    ax1.set(xlabel="step", ylabel="reward model score (stage 1: mean 0, std 1)", title="Score")
    ax2.plot(steps, [r["kl"] for r in log if "score" in r], lw=0.8, label="KL k1 (nats/reply)")
    ax2.plot(steps, [r["kl_k3"] for r in log if "score" in r], lw=0.8, label="KL k3")
    ax2.set(xlabel="step", ylabel="nats per reply", title="KL to stage 1")
    ax3.plot([r["step"] for r in log if "real_nll_rise" in r], [r["real_nll_rise"] for r in log if "real_nll_rise" in r],
             lw=0.8, label="the step's prompts (training)")
    held = [(r["step"], r["heldout_real_nll_rise"]) for r in log if "heldout_real_nll_rise" in r]
    if held:
        ax3.plot(*zip(*held), "o-", label="held-out prompts")
    ax3.axhline(0, c="gray", lw=0.5)
    ax3.set(xlabel="step", ylabel="nats per token over stage 1", title="NLL of the people's real replies")
    for ax in (ax1, ax2, ax3):
        ax.legend()
    cli.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# The run.

def train(opts: Options, reward=None, models=None, pools=None) -> dict:
    """The loop. reward, models, pools replace the reward model, the loaded models and the prompt pools
    (tests pass a toy reward and a tiny model)."""
    check_sampling(opts)
    opts = replace(opts, max_steps=opts.max_steps or opts.steps)
    out = Path(opts.out)
    ckpt, metrics = out / sft.CHECKPOINT, out / "metrics.jsonl"
    sft.check_run_dir(out, opts.resume)
    policy, tok, tuned, rm, critic = models or load_models(opts)
    # bf16 for RLOO only: PPO reads its policy's change from log-prob ratios across minibatches and epochs,
    # which bf16 rounds (in one toy run its reward rose 0.13 -> 0.35 in bf16, where fp32 passes the test's 0.43).
    fast = lambda: cpu_bf16(policy.embed_tokens.weight.device, opts.algo == "rloo" and not opts.fp32)
    pool, heldout = pools or prompt_pool(tuned, opts)
    params = trainable(policy, critic)
    optimizer = torch.optim.AdamW(list(params.values()), lr=opts.lr, fused=True)
    step, log = 0, []
    if opts.resume:
        tensors, state = sft.load_checkpoint(ckpt, optimizer)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        step = state["step"]
        log = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        log = [row for row in log if row["step"] <= step]
    cli.write_atomically(metrics, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in log)))

    def save():
        sft.save_checkpoint(ckpt, params, optimizer, {"step": step, "options": asdict(opts)})
        if models is None:
            lora.save_stacked(policy, opts.adapter, out / "adapter")
        plot(log, out / "ppo.png")

    def record(row):
        log.append(row)
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate_heldout(row):
        with fast():
            held, rows = heldout_scores(policy, tok, rm, heldout, opts, reward)
        row.update({f"heldout_{k}": v for k, v in held.items()})
        cli.write_atomically(out / "heldout.jsonl", lambda tmp: tmp.write_text(
            "".join(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in rows)))
        return rows

    if step == 0:
        row = {"step": 0}
        rows = evaluate_heldout(row)
        record(row)
        tqdm.write(f"step 0 (stage 1): held-out score {row['heldout_score']:+.3f}, ended {row['heldout_ended']:.2f}; "
                   f"e.g. {rows[0]['speaker']} {rows[0]['reply']!r} ({rows[0]['score']:+.2f})")
    stop = sft.stop_requests(tqdm.write)
    bar = cli.progress(total=opts.steps, initial=step, unit="step")
    while step < opts.steps:
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = sft.lr_at(step, opts)
        # 1. prompts, chosen by (seed, step): a resumed run draws what the uninterrupted one would.
        rng = random.Random(opts.seed * 1_000_003 + step)
        prompts = [pool[j] for j in rng.sample(range(len(pool)), min(opts.prompts, len(pool)))]
        if opts.ptx_only:  # the baseline: the same prompts' real replies alone, no rollouts
            with torch.no_grad(), lora.disabled(policy), fast():
                real_ref = real_logprobs(policy, prompts, ptx_prompts(opts))
            policy.train()
            with fast():
                real = ptx_backward(policy, prompts, opts)
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), opts.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "real_nll_rise": real_nll_rise(real, real_ref, prompts), "grad_norm": norm,
                   "lr": sft.lr_at(step - 1, opts), "seconds": {"update": round(time.time() - t0, 1)}}
            line = f"step {step}/{opts.steps} | real nll {row['real_nll_rise']:+.3f} | norm {norm:.2f} | {time.time() - t0:.0f} s"
        else:
            # 2-3. rollouts, and their log-probs, reference log-probs and scores
            with fast():
                ro = collect(policy, tok, rm, prompts, opts, seed=opts.seed * 1000 + step, reward=reward)
            t1 = time.time()
            if not torch.isfinite(ro.score).all():
                raise sft.TrainingDiverged(f"a reward became {ro.score[~torch.isfinite(ro.score)][0].item()} at step "
                                           f"{step + 1}; " + (f"the last good checkpoint is in {ckpt}" if ckpt.exists()
                                                              else "nothing was saved yet"))
            kl, k3 = kl_k1(ro.logp, ro.ref).sum(1), (kl_k3(ro.logp, ro.ref) * ro.reply).sum(1)
            # 4-5. the update
            with fast():
                if opts.algo == "rloo":
                    stats = rloo_update(policy, optimizer, list(params.values()), ro, opts)
                else:
                    stats = ppo_update(policy, critic, optimizer, list(params.values()), ro, opts, seed=opts.seed * 7919 + step)
            step += 1
            t2 = time.time()
            lengths = ro.reply.sum(1).float()
            row = {"step": step, "score": ro.score.mean().item(), "kl": kl.mean().item(), "kl_k3": k3.mean().item(),
                   **stats, "entropy": (-ro.logp.sum() / ro.reply.sum()).item(),  # mean -log p of the sampled tokens
                   "length": lengths.mean().item(), "ended": ro.ended.float().mean().item(),
                   "distinct_2": distinct_2(ro.reply_ids), "sampler_gap": ro.sampler_gap, "lr": sft.lr_at(step - 1, opts),
                   "seconds": {"rollout": round(t1 - t0, 1), "update": round(t2 - t1, 1)}}
            for speaker in sorted(set(ro.speakers)):
                mine = torch.tensor([s == speaker for s in ro.speakers], device=ro.score.device)
                row[f"score {speaker}"] = ro.score[mine].mean().item()
            line = (f"step {step}/{opts.steps} | score {row['score']:+.3f} | kl {row['kl']:.2f} (k3 {row['kl_k3']:.2f}) | "
                    f"|ratio-1| {stats['ratio_dev']:.1e} | gap {ro.sampler_gap:.0e} | ent {row['entropy']:.2f} | len {row['length']:.1f} | "
                    f"ended {row['ended']:.2f} | d2 {row['distinct_2']:.2f} | real nll {stats['real_nll_rise']:+.3f}")
            if opts.algo == "ppo":
                line += f" | clip {stats['clip_frac']:.2f} | akl {stats['approx_kl']:.3f} | vf {stats['value_loss']:.3f} | " \
                        f"ev {stats['explained_variance']:+.2f}"
            line += f" | {t1 - t0:.0f}+{t2 - t1:.0f} s"
        if step % opts.eval_every == 0 or step == opts.steps:
            rows = evaluate_heldout(row)
            line += f" | held-out {row['heldout_score']:+.3f} (real nll {row['heldout_real_nll_rise']:+.3f})"
        record(row)
        tqdm.write(line)
        if step % opts.eval_every == 0 or step == opts.steps:
            for r in rows[:2]:
                tqdm.write(f"    {r['speaker']} {r['reply']!r} ({r['score']:+.2f})")
        bar.update(1)
        if row.get("kl", 0.0) > opts.max_kl:
            save()
            raise sft.TrainingDiverged(f"the KL to stage 1 reached {row['kl']:.2f} nats per reply at step {step}, past "
                                       f"--max-kl {opts.max_kl}; saved in {out}. Try a larger --kl-coef or a lower --lr")
        if step % opts.save_every == 0 or step == opts.steps or stop:
            save()
        if stop:
            sft.quit_stopped(step, stop[0], bar)
    bar.close()
    first = next(r for r in log if "heldout_score" in r)
    final = next(r for r in reversed(log) if "heldout_score" in r)
    rolled = [r for r in log[-10:] if "kl" in r]
    summary = {"steps": step, "heldout_before": first["heldout_score"], "heldout_after": final["heldout_score"],
               "heldout_ended": final["heldout_ended"], "heldout_kl": final["heldout_kl"],
               "heldout_real_nll_rise": final["heldout_real_nll_rise"],
               # over the last 10 steps' rollouts (none with --ptx-only)
               "mean_kl_last_10": sum(r["kl"] for r in rolled) / len(rolled) if rolled else None,
               "ended_last_10": sum(r["ended"] for r in rolled) / len(rolled) if rolled else None}
    if opts.check_rm and models is None:
        with fast():
            summary["check_rm"] = check_with(opts, policy, tok, prompt_pool(tuned, opts, opts.check_prompts)[1], rm)
    cli.write_atomically(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


@torch.no_grad()
def check_with(opts: Options, policy, tok, heldout, rm) -> dict:
    """A second reward model (trained on other prompts with another seed) compares the trained policy's
    held-out replies with stage 1's (the same prompts and seed): does it prefer them too? And the
    reward model trained against, on the same pairs: its mean gain per prompt with a 95% interval, a
    steadier measure than the 32 prompts scored during training."""
    rm2, _, info = rlaif.load_rm(opts.check_rm, opts.allow_other_base)
    settings = sample.Options(temperature=opts.temperature, top_p=1.0, repetition_penalty=1.0,
                              max_new_tokens=opts.max_new_tokens, seed=2 * 10**6 + opts.seed)
    ids = [p["prompt_ids"] for p in heldout]
    ends = sample.turn_ends(tok)
    trained = sample.generate_in_batches(policy, ids, settings, ends, 32, "sampling (trained)")
    with lora.disabled(policy):
        stage1 = sample.generate_in_batches(policy, ids, settings, ends, 32, "sampling (stage 1)")
    score = lambda model, replies: torch.cat([model([p + r.ids for p, r in zip(ids[j : j + 8], replies[j : j + 8])])
                                              for j in range(0, len(ids), 8)])
    gain = score(rm, trained) - score(rm, stage1)  # (P,) on the first reward model's scale (std 1)
    half = 1.96 * gain.std().item() / len(gain) ** 0.5
    a, b = score(rm2, trained), score(rm2, stage1)
    differ = torch.tensor([x.ids != y.ids for x, y in zip(trained, stage1)], device=a.device)
    wins = ((a > b).float() + 0.5 * (a == b).float())[differ]
    k = wins.sum().item()
    return {"rm": opts.check_rm, "pairs": int(differ.sum()), "prefers_trained": k / max(1, len(wins)),
            "interval": rlaif.wilson(k, len(wins)), "mean_score_trained": a.mean().item(), "mean_score_stage1": b.mean().item(),
            "rm_gain": gain.mean().item(), "rm_gain_interval": [gain.mean().item() - half, gain.mean().item() + half],
            "prompts": len(ids)}


def main():
    opts = parse_options(Options, GPU_DEFAULTS)
    try:
        summary = train(opts)
    except sft.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"\nheld-out score (reward model; stage 1 = mean 0, std 1): {summary['heldout_before']:+.3f} -> "
          f"{summary['heldout_after']:+.3f}; KL {summary['heldout_kl']:.2f} nats/reply; ended {summary['heldout_ended']:.0%}; the real held-out replies' NLL "
          f"{summary['heldout_real_nll_rise']:+.3f} nats/token over stage 1's")
    if "check_rm" in summary:
        c = summary["check_rm"]
        print(f"second reward model {c['rm']}: prefers the trained replies in {c['prefers_trained']:.1%} of {c['pairs']} "
              f"held-out pairs that differ, 95% interval [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}]; the reward "
              f"model trained against scores the trained replies {c['rm_gain']:+.3f} std above stage 1's on those "
              f"{c['prompts']} prompts, 95% interval [{c['rm_gain_interval'][0]:+.3f}, {c['rm_gain_interval'][1]:+.3f}]")
    print(f"adapter (stage 1 + this LoRA) in {Path(opts.out) / 'adapter'}")


if __name__ == "__main__":
    exit_on_bad_input(main)
