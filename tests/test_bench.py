"""bench.py end to end on the embedded model: both sides run, decode the same tokens, and bad input."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_short_run_prints_the_table_and_both_sides_decode_the_same_tokens(smol, tmp_path):
    out = run("--only", "decode1", "--repeats", "1", "--rounds", "1", "--new-tokens", "16",
              "--out", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| smollm2-135m | decode, batch 1 (16 tokens) |" in out.stdout
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["ours"]["tokens"] == row["theirs"]["tokens"] and len(row["ours"]["tokens"]) == 16
    assert row["ratio"] == row["ours"]["tokens_per_s"] / row["theirs"]["tokens_per_s"] > 0
    assert "the first 16 decoded tokens are the same on both sides" in out.stdout


def test_an_unknown_measurement_is_one_line_and_exit_status_2():
    out = run("--only", "decode3")
    assert out.returncode == 2 and out.stderr.startswith("error: --only decode3: no measurement decode3")
    assert out.stderr.count("\n") == 1


def test_the_7b_shaped_branch_gives_both_sides_the_same_random_model(smol, monkeypatch):
    # The GPU run builds a Mistral-7B-shaped model with seeded random weights on each side; shrunk to a
    # tiny shape, that branch runs here on CPU, and both sides must compute the same function: the same
    # greedy tokens and the same first LoRA loss (the adapters start as no-ops).
    import bench

    monkeypatch.setattr(bench, "MISTRAL_7B", {**bench.MISTRAL_7B, "vocab_size": 512, "hidden_size": 64,
                                              "intermediate_size": 96, "num_hidden_layers": 2,
                                              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    options = dict(repeats=1, warmup=1, prompt_len=4, new_tokens=8, sft_batch=2)
    results = {}
    for task in ("decode1", "sft"):
        for impl in ("ours", "theirs"):
            spec = {"model": "mistral-7b-shaped", "device": "cpu", "task": task, "impl": impl, "options": options}
            results[task, impl] = bench.measure(spec)
    assert results["decode1", "ours"]["tokens"] == results["decode1", "theirs"]["tokens"]
    assert len(set(results["decode1", "ours"]["tokens"])) > 1  # not one token repeated: the weights are random
    assert abs(results["sft", "ours"]["first_loss"] - results["sft", "theirs"]["first_loss"]) < 1e-4
    assert results["sft", "ours"]["n_tokens"] == results["sft", "theirs"]["n_tokens"] > 0
