"""ppo.py on tiny random models: the pure functions against hand computations, the sampler against the
scoring forward, KL exactly 0 and ratios exactly 1 at step 0, the reference is stage 1, one score per
reply at its last token, a toy reward learned by RLOO and PPO, a one-token bandit's closed-form optimum,
bitwise resume, a NaN reward, and refused sampling settings."""
import copy
import json
import math
import random
from dataclasses import replace

import pytest
import torch

import lora
import ppo
import rlaif
import sample
import sft
from cli import BadInput
from model import cpu_bf16, load_checkpoint, native_bf16

TARGET = 20  # the toy reward's token: about 3% of what the tiny model samples


class Digits:
    """A stand-in tokenizer for the 101-token tiny model: no token ends a turn, ids print as numbers."""
    vocab_size, eos_id, bos_id = 101, None, None

    def decode(self, ids):
        return " ".join(map(str, ids))

    def encode(self, text, start=True):
        return [int(x) for x in text.split()]


def test_masked_mean_and_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(2.0)
    w = ppo.masked_whiten(x, mask)
    real = w[mask.bool()]
    assert real.tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4) and w[~mask.bool()].abs().sum() == 0


def test_gae_equals_a_for_loop_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    # Row 0 by hand: delta_2 = 1 - 0.6; delta_1 = -0.1 + 0.9 * 0.6 - 0.4; delta_0 = 0 + 0.9 * 0.4 - 0.2.
    d2, d1, d0 = 1 - 0.6, -0.1 + 0.54 - 0.4, 0.36 - 0.2
    a2, a1 = d2, d1 + 0.72 * d2
    assert adv[0].tolist() == pytest.approx([d0 + 0.72 * a1, a1, a2])
    # Row 1 ends after 2 tokens: its last delta sees no next value.
    e1, e0 = 2.0 - 0.5, 0.5 + 0.9 * 0.5 - 1.0
    assert adv[1].tolist() == pytest.approx([e0 + 0.72 * e1, e1, 0.0])
    assert torch.allclose(ret, (adv + values) * mask)


def test_rloo_baselines_are_the_mean_of_the_others():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    assert ppo.rloo_advantages(r, 3).tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0])


def test_the_clipped_losses_equal_a_for_loop():
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 4, generator=g) * 0.3, torch.randn(3, 4, generator=g) * 0.3
    adv, mask = torch.randn(3, 4, generator=g), (torch.rand(3, 4, generator=g) > 0.3).float()
    loss, frac = ppo.policy_loss(logp, old, adv, mask, 0.2)
    terms, clipped = [], []
    for i in range(3):
        for j in range(4):
            if mask[i, j]:
                r = math.exp(logp[i, j] - old[i, j])
                a, b = -adv[i, j].item() * r, -adv[i, j].item() * min(max(r, 0.8), 1.2)
                terms.append(max(a, b))
                clipped.append(b > a)
    assert loss.item() == pytest.approx(sum(terms) / len(terms)) and frac.item() == pytest.approx(sum(clipped) / len(terms))
    v, v_old, ret = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    by_hand = [0.5 * max((v[i, j] - ret[i, j]) ** 2, (v_old[i, j] + (v[i, j] - v_old[i, j]).clamp(-0.2, 0.2) - ret[i, j]) ** 2).item()
               for i in range(3) for j in range(4) if mask[i, j]]
    assert ppo.value_loss(v, v_old, ret, mask, 0.2).item() == pytest.approx(sum(by_hand) / len(by_hand))


def test_the_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert ppo.kl_k1(logp, ref).tolist() == pytest.approx([0.5, -1.0])
    assert ppo.kl_k3(logp, ref).tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])


# ---------------------------------------------------------------------------------------------------
# The loop on the 101-token tiny model: a stage-1 adapter folded in, a fresh LoRA on top.

def stage1(tiny_dir, seed=1):
    """The tiny model with a random 'stage-1' adapter, as a stage-1 model (for reference checks)."""
    model = load_checkpoint(tiny_dir)
    torch.manual_seed(seed)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.3)
    return model.eval()


def policy_of(tiny_dir, seed=0, critic=False):
    model = lora.fold(stage1(tiny_dir))
    torch.manual_seed(seed)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    value = None
    if critic:
        head_model = lora.fold(stage1(tiny_dir))
        lora.add_lora(head_model, r=4, alpha=8, dropout=0.0)
        value = rlaif.RewardModel(head_model)
    return model, value


def prompts(n=6, length=5, seed=0):
    rng = random.Random(seed)
    return [{"prompt_ids": [rng.randrange(101) for _ in range(length)], "speaker": "[FRIEND]", "context": [],
             "real_ids": [rng.randrange(101) for _ in range(rng.randrange(1, 5))]} for _ in range(n)]


def options(tmp_path, **kw):
    # fp32: these tests pin the algorithm down exactly; the bf16 default (model.cpu_bf16) has its own.
    return ppo.Options(**{**dict(out=str(tmp_path), steps=20, prompts=4, k=4, max_new_tokens=6, heldout=4, eval_every=5,
                                 save_every=5, lr=1e-2, warmup_steps=0, micro_batch=8, lora_r=4, lora_alpha=8,
                                 temperature=1.0, kl_coef=0.01, ptx_coef=0.0, epochs=2, minibatches=2, unended_penalty=0.0,
                                 fp32=True), **kw})


def toy_reward(prompt, reply):
    return float(sum(t == TARGET for t in reply))


def run(tmp_path, reward=toy_reward, **kw):
    opts = options(tmp_path, **kw)
    policy, critic = policy_of(TINY_DIR[0], critic=opts.algo == "ppo")
    return ppo.train(opts, reward=reward, models=(policy, Digits(), None, None, critic),
                     pools=(prompts(16), prompts(16, seed=9))), policy


TINY_DIR = [None]


@pytest.fixture(autouse=True)
def _tiny(tiny_dir):
    TINY_DIR[0] = tiny_dir


def test_the_sampler_and_the_scoring_forward_agree_and_step_0_has_kl_0_and_ratio_1(tiny_dir, tmp_path):
    opts = options(tmp_path)
    policy, _ = policy_of(tiny_dir)
    ps = prompts(4)
    ids = [p["prompt_ids"] for p in ps for _ in range(opts.k)]
    replies = sample.generate_ids(policy, ids, sample.Options(temperature=1.0, top_p=1.0, repetition_penalty=1.0,
                                                               max_new_tokens=6, seed=0))
    ro = ppo.collect(policy, Digits(), None, ps, opts, seed=0, reward=toy_reward)
    torch.testing.assert_close(ro.logp[ro.reply], torch.tensor([lp for r in replies for lp in r.logprobs]), atol=1e-5, rtol=1e-5)
    assert ro.sampler_gap < 1e-5
    assert torch.equal(ro.logp, ro.ref)  # a fresh LoRA on the folded stage 1: the policy is the reference
    assert ppo.kl_k1(ro.logp, ro.ref).abs().sum() == 0
    optimizer = torch.optim.AdamW(lora.lora_parameters(policy), lr=1e-3)
    stats = ppo.rloo_update(policy, optimizer, lora.lora_parameters(policy), ro, opts)
    assert stats["ratio_dev"] == 0.0  # exactly: the same weights, ops and batch as the scoring forward


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no bf16 in hardware: the default is fp32 here")
def test_in_bf16_step_0_still_has_kl_0_and_ratio_1_and_the_sampler_gap_is_rounding(tiny_dir, tmp_path):
    # The fast default (model.cpu_bf16): scoring and training forwards round alike, so the exact step-0
    # checks hold; the sampler (fp32 decoding after a bf16 prefill) differs from them by rounding only.
    opts = options(tmp_path)
    policy, _ = policy_of(tiny_dir)
    with cpu_bf16("cpu"):
        ro = ppo.collect(policy, Digits(), None, prompts(4), opts, seed=0, reward=toy_reward)
        assert torch.equal(ro.logp, ro.ref) and ppo.kl_k1(ro.logp, ro.ref).abs().sum() == 0
        optimizer = torch.optim.AdamW(lora.lora_parameters(policy), lr=1e-3)
        assert ppo.rloo_update(policy, optimizer, lora.lora_parameters(policy), ro, opts)["ratio_dev"] == 0.0
    assert 1e-6 < ro.sampler_gap < 0.05


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_the_real_replies_nll_joins_the_loss_with_weight_gamma(tiny_dir, tmp_path, algo):
    # Every reward 0 and no KL: the RL term's gradient is 0 (RLOO's advantages are 0; PPO's critic starts
    # at 0, so its advantages are too), so one SGD step of lr 1 must move the LoRA by exactly -gamma * the gradient of the mean NLL
    # of the prompts' real replies, computed here by a plain forward over prompt + real reply.
    gamma = 0.7
    opts = options(tmp_path, algo=algo, k=2, ptx_coef=gamma, kl_coef=0.0, grad_clip=1e9, epochs=1, minibatches=1)
    policy, critic = policy_of(tiny_dir, critic=algo == "ppo")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a policy that has moved: its real-reply NLL differs from stage 1's
    ps = prompts(3)
    expected = copy.deepcopy(policy)
    nll = 0.0
    for p in ps:
        logits = expected(torch.tensor([p["prompt_ids"] + p["real_ids"]]))[0].float().log_softmax(-1)
        n = len(p["prompt_ids"])
        nll = nll - sum(logits[n - 1 + t, tok] for t, tok in enumerate(p["real_ids"])) / len(ps)
    (gamma * nll).backward()
    ro = ppo.collect(policy, Digits(), None, ps, opts, seed=0, reward=lambda prompt, reply: 0.0)
    params = lora.lora_parameters(policy)
    before = [q.detach().clone() for q in params]
    if algo == "rloo":
        stats = ppo.rloo_update(policy, torch.optim.SGD(params, lr=1.0), params, ro, opts)
    else:
        all_params = params + list(rlaif.rm_parameters(critic).values())
        stats = ppo.ppo_update(policy, critic, torch.optim.SGD(all_params, lr=1.0), all_params, ro,
                               replace(opts, vf_coef=0.0), seed=0)
    for q, q0, e in zip(params, before, lora.lora_parameters(expected)):
        # fp32 through two paths (a KV cache, one plain forward): rounding to ~5e-5 of gradients up to ~1;
        # a wrong weight or a missing term is off by tenths
        torch.testing.assert_close(q.detach() - q0, -e.grad, atol=2e-4, rtol=1e-3)
    assert stats["real_nll_rise"] > 0  # the moved policy finds the real replies less likely than stage 1


def test_ptx_only_trains_on_the_real_replies_without_rollouts(tmp_path):
    calls = []
    summary, _ = run(tmp_path, reward=lambda p, r: calls.append(1) or 0.0, ptx_only=True, ptx_coef=1.0, steps=6,
                     eval_every=3)
    assert len(calls) == 16 * 3  # only the held-out evaluations sample (16 prompts, at steps 0, 3 and 6)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[1]["real_nll_rise"] == 0.0  # step 1 is scored before its update: the policy is stage 1
    assert log[-1]["real_nll_rise"] < 0 and summary["heldout_real_nll_rise"] != 0  # learned; held out moved
    assert summary["mean_kl_last_10"] is None and summary["ended_last_10"] is None  # no rollouts to average
    with pytest.raises(BadInput, match="--ptx-only with --ptx-coef 0"):
        run(tmp_path / "none", ptx_only=True, ptx_coef=0.0)


def test_the_reference_is_the_stage_1_model_not_the_base(tiny_dir, tiny):
    policy, _ = policy_of(tiny_dir)
    with torch.no_grad():
        for name, p in policy.named_parameters():  # as if it had trained a while
            if "lora_B" in name:
                p.normal_(0, 0.2)
        tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
        with lora.disabled(policy):
            ref = policy(tokens)
        torch.testing.assert_close(ref, stage1(tiny_dir)(tokens), atol=1e-4, rtol=1e-4)  # folded in fp32: rounding
        assert not torch.allclose(ref, tiny(tokens), atol=1e-3) and not torch.allclose(ref, policy(tokens), atol=1e-3)


def test_the_score_lands_once_per_reply_on_its_last_token(tiny_dir, tmp_path, monkeypatch):
    opts = options(tmp_path, algo="ppo")
    policy, critic = policy_of(tiny_dir, critic=True)
    ro = ppo.collect(policy, Digits(), None, prompts(2), replace(opts, k=2), seed=0, reward=lambda p, r: 10.0 + len(r))
    seen = {}
    real_gae = ppo.gae

    def spy(rewards, values, mask, gamma, lam):
        seen["rewards"], seen["mask"] = rewards.clone(), mask.clone()
        return real_gae(rewards, values, mask, gamma, lam)

    monkeypatch.setattr(ppo, "gae", spy)
    params = list(ppo.trainable(policy, critic).values())
    ppo.ppo_update(policy, critic, torch.optim.AdamW(params, lr=1e-4), params, ro, replace(opts, k=2, kl_coef=0.0), seed=0)
    r, m = seen["rewards"], seen["mask"]
    lengths = m.sum(1).long()
    for b in range(len(r)):
        assert r[b, lengths[b] - 1].item() == pytest.approx(ro.score[b].item())  # the score, at the last token
        assert r[b].abs().sum().item() == pytest.approx(abs(ro.score[b].item()))  # and nowhere else (KL off)


@pytest.mark.parametrize("algo, lr, fp32", [("rloo", 1e-2, True), ("ppo", 2e-3, True),  # PPO: 4 updates a step
                                            ("rloo", 1e-2, False)])  # RLOO, the CPU default, as it runs: bf16 where native
def test_a_toy_reward_rises_by_half_within_20_steps_with_bounded_kl(tmp_path, algo, lr, fp32):
    summary, _ = run(tmp_path, algo=algo, lr=lr, fp32=fp32)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scores = [r["score"] for r in log if "score" in r]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last >= 1.5 * first and last > first + 0.3, (first, last)
    assert max(r["kl"] for r in log if "kl" in r) < 10  # bounded
    assert summary["heldout_after"] > summary["heldout_before"]


def test_a_one_token_bandit_rises_towards_and_stays_below_its_kl_regularised_optimum(tiny_dir, tmp_path, monkeypatch):
    # One new token, reward 1 for the target: the optimum of E[r] - beta KL is pi*(a) ~ pi_ref(a) exp(r(a) / beta).
    beta = 0.5
    bandit = [{"prompt_ids": [3, 14, 15, 92, 65], "speaker": "[FRIEND]", "context": [], "real_ids": [7]}]
    policy, _ = policy_of(tiny_dir)
    with torch.no_grad():
        ref = policy(torch.tensor([bandit[0]["prompt_ids"]]))[0, -1].softmax(-1)
    target = int((ref - 0.05).abs().argmin())  # a token the reference gives ~5%
    p_ref = ref[target].item()
    optimum = p_ref * math.exp(1 / beta) / (p_ref * math.exp(1 / beta) + 1 - p_ref)
    reward = lambda prompt, reply: float(reply == [target])

    def trained(flip):
        monkeypatch.setattr(ppo, "kl_k1", (lambda lp, r: r - lp) if flip else (lambda lp, r: lp - r))
        model, _ = policy_of(tiny_dir)
        opts = options(tmp_path / ("flip" if flip else "plain"), steps=60, prompts=1, k=16, max_new_tokens=1,
                       kl_coef=beta, lr=5e-3, eval_every=60, save_every=60)
        ppo.train(opts, reward=reward, models=(model, Digits(), None, None, None), pools=(bandit, bandit))
        with torch.no_grad():
            return model(torch.tensor([bandit[0]["prompt_ids"]]))[0, -1].softmax(-1)[target].item()

    p = trained(flip=False)
    assert p > p_ref + 0.5 * (optimum - p_ref) and p < optimum + 0.05, (p_ref, p, optimum)
    assert trained(flip=True) > optimum + 0.05  # with the KL's sign flipped the same test fails


def test_resume_after_2_of_4_steps_is_bitwise_equal(tiny_dir, tmp_path):
    whole, _ = run(tmp_path / "whole", steps=4, max_steps=4, save_every=1)
    first, _ = run(tmp_path / "resumed", steps=2, max_steps=4, save_every=1)
    policy, _ = policy_of(tiny_dir)
    ppo.train(options(tmp_path / "resumed", steps=4, max_steps=4, save_every=1, resume=True), reward=toy_reward,
              models=(policy, Digits(), None, None, None), pools=(prompts(16), prompts(16, seed=9)))
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "checkpoint.safetensors") for d in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng"))
    rows = lambda d: [json.loads(line)["score"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                      if '"score"' in line]
    assert rows("whole") == rows("resumed")


def test_a_nan_reward_stops_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    def nan_at_step_3(prompt, reply):
        calls.append(1)
        return float("nan") if len(calls) > 16 + 2 * 16 else toy_reward(prompt, reply)  # 16 held-out, then 16 a step

    with pytest.raises(sft.TrainingDiverged, match="a reward became nan at step 3; the last good checkpoint"):
        run(tmp_path, reward=nan_at_step_3, save_every=1)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 2


@pytest.mark.parametrize("flag, value", [("top_p", 0.9), ("top_k", 50), ("min_p", 0.1), ("repetition_penalty", 1.1)])
def test_cut_or_penalised_sampling_is_refused(tmp_path, flag, value):
    with pytest.raises(BadInput, match=f"--{flag.replace('_', '-')}: PPO samples with temperature alone"):
        ppo.check_sampling(options(tmp_path, **{flag: value}))
