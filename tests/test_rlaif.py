"""rlaif.py on a tiny random model: the Bradley-Terry loss by hand, the score at the last real token,
a planted preference learned, order averaging against a position-biased judge, clamped chains of
thought, the API judge against a local fake server, the constitution's checks, and the CLI."""
import json
import math
import re

import numpy as np
import pytest
import torch

import lora
import rlaif
import sft
from cli import BadInput
from conftest import FakeServer, script
from model import load_tokenizer, native_bf16

KEY = "sk-rlaif-test-never-print-me"


def test_the_soft_label_loss_is_the_bradley_terry_likelihood_by_hand():
    r_a, r_b = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    y = torch.tensor([1.0, 0.25, 0.5])
    s = lambda x: 1 / (1 + math.exp(-x))
    by_hand = -sum(t * math.log(s(a - b)) + (1 - t) * math.log(s(b - a)) for a, b, t in zip(r_a.tolist(), r_b.tolist(), y.tolist())) / 3
    assert rlaif.bradley_terry(r_a, r_b, y).item() == pytest.approx(by_hand)


@pytest.fixture
def rm(tiny_chat_dir, tiny_adapter):
    """A reward model on the tiny model with a random LoRA and head: its scores are not constant. In fp32:
    these tests check exact invariances; test_bf16_... the fast default's."""
    tuned = sft.load_tuned(str(tiny_adapter))
    model = rlaif.reward_model(tuned, rlaif.Options(lora_r=4, lora_alpha=8, fp32=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in rlaif.rm_parameters(model).values():
            p.normal_(0, 0.3)
    return model.eval(), tuned


def test_the_score_is_read_at_the_last_real_token_whatever_the_padding(rm):
    model, _ = rm
    rows = [[5, 9, 33, 10, 7], [5, 9, 2], [8, 1, 4, 4, 4, 4, 4, 9, 198]]
    with torch.no_grad():
        alone = torch.cat([model([r]) for r in rows])
        right, left = model(rows), model(rows, left=True)
        h = model.model(torch.tensor([rows[0]]), unembed=False)[0, -1]  # by hand: the head on the last position
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    assert alone[0].item() == pytest.approx(model.head(h).item(), abs=1e-5)
    assert len(set(alone.tolist())) == 3  # not a constant: the check could fail
    # A naive read of the padded row's final position would read a pad and differ.
    with torch.no_grad():
        tokens = torch.tensor([rows[1] + [0, 0]])
        naive = model.head(model.model(tokens, unembed=False)[0, -1]).item()
    assert abs(naive - alone[1].item()) > 1e-3


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no bf16 in hardware: the default is fp32 here")
def test_bf16_scores_round_near_fp32_and_stay_at_the_last_real_token(rm):
    model, _ = rm
    rows = [[5, 9, 33, 10, 7], [5, 9, 2], [8, 1, 4, 4, 4, 4, 4, 9, 198]]
    with torch.no_grad():
        exact = model(rows)
        model.bf16 = True
        alone = torch.cat([model([r]) for r in rows])
        right, left = model(rows), model(rows, left=True)
        model.bf16 = False
    spread = exact.max() - exact.min()
    assert 0 < (alone - exact).abs().max() < 0.05 * spread  # rounded, so not fp32's numbers, but near them
    torch.testing.assert_close(right, alone, atol=0.02 * spread.item(), rtol=0)  # padding moves a score by rounding only
    torch.testing.assert_close(left, alone, atol=0.02 * spread.item(), rtol=0)


def planted_pairs(tok, n, seed):
    """Pairs whose better reply says "yes" and worse says "no", on a random side, after short prompts."""
    rng = __import__("random").Random(seed)
    rows = []
    for j in range(n):
        prompt = tok.encode(f"[RIYA] question {rng.randint(0, 999)} about {rng.choice(['food', 'school', 'plans'])}\n[FRIEND]")
        good = tok.encode(f" yes {rng.choice(['sure', 'ok', 'great', 'fine'])}\n", start=False)
        bad = tok.encode(f" no {rng.choice(['sure', 'ok', 'great', 'fine'])}\n", start=False)
        good_first = rng.random() < 0.5
        a, b = (good, bad) if good_first else (bad, good)
        rows.append({"kind": "sampled", "speaker": "[FRIEND]", "context": [], "prompt_ids": prompt, "a_ids": a,
                     "b_ids": b, "a": "", "b": "", "label": 1.0 if good_first else 0.0, "session": 0, "index": j})
    return rows


def test_the_reward_model_learns_a_planted_preference(tiny_chat_dir, tiny_adapter, tmp_path):
    tok = load_tokenizer(tiny_chat_dir)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted_pairs(tok, 96, 0)))
    opts = rlaif.Options(adapter=str(tiny_adapter), out=str(tmp_path), max_steps=40, rm_batch=8, lr=3e-3,
                         warmup_steps=2, lora_r=4, lora_alpha=8, eval_every=20, save_every=20, batch_size=8)
    result = rlaif.train_rm(opts)
    rm, _, info = rlaif.load_rm(tmp_path / "rm")
    assert info["stage1_adapter"] == str(tiny_adapter) and info["std"] > 0
    held_out = planted_pairs(tok, 64, 1)  # new prompts
    with torch.no_grad():
        r_a, r_b = rlaif.pair_batch(rm, held_out)
    accuracy = ((r_a > r_b) == torch.tensor([r["label"] == 1.0 for r in held_out])).float().mean().item()
    assert accuracy >= 0.9, accuracy
    assert result["final"]["val_loss"] < math.log(2)
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "rm.json", "loss.png",
                 "metrics.jsonl", "checkpoint.safetensors"):
        assert (tmp_path / "rm" / name).exists(), name


def test_pairs_run_in_pieces_get_the_gradient_of_the_whole_batch(tiny_chat_dir, tiny_adapter):
    import sft

    tok = load_tokenizer(tiny_chat_dir)
    rm = rlaif.reward_model(sft.load_tuned(str(tiny_adapter)), rlaif.Options(lora_r=4, lora_alpha=8, fp32=True))
    params = rlaif.rm_parameters(rm)
    with torch.no_grad():
        for name, p in params.items():  # LoRA's B starts at zero, which would leave A's gradient zero
            p.normal_(0, 0.05)
    batch = planted_pairs(tok, 6, 0)

    def gradients(per_piece):
        loss, r_a, r_b = rlaif.pairs_backward(rm, batch, per_piece)
        grads = {name: p.grad.clone() for name, p in params.items()}
        rm.model.zero_grad(set_to_none=True)
        rm.head.zero_grad(set_to_none=True)
        return loss, torch.cat([r_a, r_b]), grads

    whole, split = gradients(6), gradients(4)  # pieces of 4 and 2 pairs
    assert math.isclose(whole[0], split[0], rel_tol=1e-6) and torch.allclose(whole[1], split[1], atol=1e-5)
    assert all(torch.allclose(whole[2][k], split[2][k], rtol=1e-4, atol=1e-7) for k in params)
    assert max(g.abs().max() for g in whole[2].values()) > 1e-3  # and the gradient is not trivially zero


def test_a_reward_model_on_a_changed_stage_1_is_refused(tiny_chat_dir, tiny_adapter, tmp_path):
    import shutil

    stage1 = tmp_path / "stage1"
    shutil.copytree(tiny_adapter, stage1)
    tok = load_tokenizer(tiny_chat_dir)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted_pairs(tok, 16, 0)))
    rlaif.train_rm(rlaif.Options(adapter=str(stage1), out=str(tmp_path), max_steps=1, rm_batch=4, lora_r=4,
                                 lora_alpha=8, batch_size=8))
    with open(stage1 / "adapter_model.safetensors", "ab") as f:
        f.write(b" ")  # another stage 1 now sits where the reward model's was
    with pytest.raises(BadInput, match="has changed since; retrain it"):
        rlaif.load_rm(tmp_path / "rm")


def row(a, b):
    return {"speaker": "[FRIEND]", "context": ["[RIYA] hi"], "a": a, "b": b}


def test_order_averaging_undoes_a_strong_position_bias(monkeypatch):
    # A judge that always leans to (A) (0.8 or 0.6) and only slightly towards the better reply, "good".
    def biased(judge, texts, cot, batch_size):
        return [0.8 if "(A) [FRIEND] good" in t else 0.6 for t in texts]

    monkeypatch.setattr(rlaif, "local_preferences", biased)
    constitution = rlaif.read_constitution("data/rlaif/constitution.json")
    rows = [row("good", "bad"), row("bad", "good")]
    labels, first, second = rlaif.preferences(rlaif.Judge(), constitution, rows, __import__("random").Random(0), False, 4)
    assert first == [0.8, 0.6]  # one order alone says "A" both times: wrong for the second pair
    assert labels[0] > 0.5 > labels[1]  # both orders: right both times
    assert labels == [pytest.approx((0.8 + 0.4) / 2), pytest.approx((0.6 + 0.2) / 2)]
    report = rlaif.judge_report(first, second, [0.7, 0.2, 0.9])
    # It always prefers (A), so its two orders never agree on which reply is better.
    assert report["position_bias"] == pytest.approx(0.7) and report["order_agreement"] == 0.0
    assert report["sanity"]["accuracy"] == pytest.approx(2 / 3) and report["warning"]  # 3 pairs: can't tell


def test_chain_of_thought_labels_are_clamped(tiny_chat_dir, tiny_adapter):
    tuned = sft.load_tuned(str(tiny_adapter))
    judge = rlaif.Judge(model=(tuned.model, tuned.tok), use=lambda: lora.disabled(tuned.model))
    texts = [rlaif.mc_prompt(rlaif.read_constitution("data/rlaif/constitution.json"), row(f"reply {j}", "other"),
                             {"comparison": "Which is better?"}) for j in range(3)]
    plain = rlaif.local_preferences(judge, texts, cot=False, batch_size=4)
    thought = rlaif.local_preferences(judge, texts, cot=True, batch_size=4)
    assert all(0 < p < 1 for p in plain) and all(0.4 <= p <= 0.6 for p in thought)


@pytest.mark.parametrize("change, says", [
    (lambda c: c.pop("speakers"), "speakers must be an object"),
    (lambda c: c["speakers"]["[RIYA]"].pop("persona"), "speakers.[RIYA].persona must be a non-empty text"),
    (lambda c: c["speakers"]["[RIYA]"]["principles"][1].pop("comparison"),
     "speakers.[RIYA].principles[1].comparison must be a non-empty text"),
    (lambda c: c["shared"].append("be nice"), "shared[2] must be an object"),
    (lambda c: c["speakers"].update({"RIYA": c["speakers"]["[RIYA]"]}), "speakers.RIYA: a speaker is named by its tag"),
    (lambda c: c["few_shot"][0].update(chat=["no tag here"]), "few_shot[0].chat must be a list of chat lines"),
])
def test_a_malformed_constitution_names_the_file_and_the_key(tmp_path, change, says):
    c = json.loads(open("data/rlaif/constitution.json").read())
    change(c)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(c))
    with pytest.raises(BadInput, match=re.escape(f"--constitution {path}: {says}")):
        rlaif.read_constitution(path)


@pytest.mark.parametrize("revision, why", [("", "empty"), ("   ", "empty"), ("yeah\nsure", "spans lines"),
                                           ("[FRIEND] yeah sure", "speaker tag"), ("ok [RIYA] said so", "speaker tag"),
                                           ("yeah sure!!", None), ("[1 thing] lol", None)])
def test_a_revision_that_is_not_one_chat_message_is_rejected(revision, why):
    assert rlaif.rejected(revision) == why


class FakeJudge(FakeServer):
    """A chat server: answers "Answer: A", with log-probs of the letter (P(A) = 0.75) unless no_logprobs."""

    def __init__(self, no_logprobs=False):
        self.no_logprobs = no_logprobs
        super().__init__()

    def respond(self, path, body):
        self.requests.append(body)
        logprobs = None if self.no_logprobs else {"content": [
            {"token": "Answer", "logprob": -0.01, "bytes": None, "top_logprobs": []},
            {"token": ":", "logprob": -0.01, "bytes": None, "top_logprobs": []},
            {"token": " A", "logprob": math.log(0.75), "bytes": None, "top_logprobs": [
                {"token": " A", "logprob": math.log(0.75), "bytes": None},
                {"token": " B", "logprob": math.log(0.25), "bytes": None}]}]}
        return 200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                                  "message": {"role": "assistant", "content": "Answer: A"}}]}


@pytest.mark.parametrize("no_logprobs", [False, True])
def test_the_api_judge_reads_log_probs_or_the_letter_caches_and_never_shows_the_key(tmp_path, monkeypatch, capsys,
                                                                                    no_logprobs):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    api = FakeJudge(no_logprobs)
    try:
        judge = rlaif.Judge(api={"model": "j", "base_url": api.url, "key_env": "JUDGE_KEY", "cache": str(tmp_path / "c.jsonl")})
        texts = [f"question {j}\n" for j in range(3)]
        p = rlaif.api_preferences(judge, texts)
        assert p == ([1.0] * 3 if no_logprobs else [pytest.approx(0.75)] * 3)  # hard label, or the soft one
        assert len(api.requests) == 3 and rlaif.api_preferences(judge, texts) == p and len(api.requests) == 3
    finally:
        api.close()
    out = capsys.readouterr()
    assert f"to {api.url} (j)" in out.err
    for text in (out.out, out.err, (tmp_path / "c.jsonl").read_text()):
        assert KEY not in text


def test_pair_metrics_by_hand():
    # 4 pairs: the model is right on 0, 1 and 3; "the shorter wins" is right on 3, wrong on 0 and 1, tied on 2
    r_a, r_b = np.array([2.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0, 3.0])
    y = np.array([1, 0, 0, 0])
    len_a, len_b = np.array([9, 1, 4, 20]), np.array([3, 8, 4, 2])
    m = rlaif.pair_metrics(r_a, r_b, y, len_a, len_b)
    assert m["accuracy"] == 0.75 and m["shorter_wins"] == (0 + 0 + 0.5 + 1) / 4 and m["length_only"] == 0.625
    assert m["real_is_shorter"] == 0.25  # the real reply against the other: 9 vs 3, 8 vs 1, 4 vs 4, 2 vs 20
    assert m["length_matched"]["pairs"] == 1 and m["length_matched"]["accuracy"] == 0.0
    p = 1 / (1 + np.exp(-(r_a - r_b)))
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([p[0], 1 - p[1], 1 - p[2], 1 - p[3]])))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_cli_label_then_train_rm_then_eval_rm_end_to_end(tiny_adapter, tmp_path):
    common = ["--adapter", str(tiny_adapter), "--out", str(tmp_path), "--batch-size", "8"]
    run = script("rlaif.py", "label", *common, "--prompts", "24")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "real-vs-sample pairs" in run.stdout and (tmp_path / "pairs.jsonl").exists()
    run = script("rlaif.py", "train-rm", *common, "--max-steps", "3", "--rm-batch", "4", "--lora-r", "4",
                 "--lora-alpha", "8", "--heldout", "12")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| all |" in run.stdout and "the shorter wins" in run.stdout
    result = json.loads((tmp_path / "rm_eval.json").read_text())
    assert result["padding"] < 1e-4 and 0 <= result["accuracy"] <= 1 and (tmp_path / "rm_calibration.png").exists()
    run = script("rlaif.py", "revise", *common, "--prompts", "2", "--revisions", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "revisions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["rounds"]) == 1 and "critique" in r["rounds"][0] for r in rows)
    run = script("rlaif.py", "label", *common, "--prompts", "6", "--pairs", "sampled", "--sanity-pairs", "4")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "judge_report.json").read_text())
    assert report["sanity"]["pairs"] + report["sanity"]["unclear"] == 4 and 0 <= report["position_bias"] <= 1


def test_sft_trains_on_revision_rows_with_loss_on_the_reply_only(tiny_chat_dir):
    tok = load_tokenizer(tiny_chat_dir)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/rows.jsonl"
        with open(path, "w") as f:
            f.write(json.dumps({"context": ["[RIYA] hey", "[FRIEND] yo"], "speaker": "[RIYA]", "reply": "wanna eat?"}) + "\n")
            f.write(json.dumps({"context": [], "speaker": "[FRIEND]", "reply": "same", "revised": False}) + "\n")
        [example] = sft.rows_as_examples(path, tok, 128)
    scored = tok.decode([t for t, m in zip(example.tokens, example.loss_mask) if m])
    assert scored == " wanna eat?\n" and example.text == "[RIYA] hey\n[FRIEND] yo\n[RIYA] wanna eat?\n"
    assert tok.decode(example.tokens[example.tag_start : example.loss_mask.index(True)]) == "[RIYA]"
