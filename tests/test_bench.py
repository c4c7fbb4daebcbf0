"""bench.py end to end on the embedded model: both sides run, decode the same tokens, and bad input."""
import json
from conftest import script




def test_a_short_run_prints_the_table_and_both_sides_decode_the_same_tokens(smol, tmp_path):
    out = script("bench.py", "--only", "decode8,sample8", "--repeats", "2", "--rounds", "1", "--new-tokens", "12",
              "--out", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| smollm2-135m | decode, batch 8 (12 tokens each) |" in out.stdout
    decode, sampled = json.loads((tmp_path / "bench.json").read_text())["rows"]
    tokens = decode["ours"]["tokens"]
    assert tokens == decode["theirs"]["tokens"] and [len(row) for row in tokens] == [12] * 8  # all rows, all tokens
    assert decode["ratio"] == decode["ours"]["tokens_per_s"] / decode["theirs"]["tokens_per_s"] > 0
    assert "decode8: every decoded token of every row is the same on both sides" in out.stdout
    # Sampling: the same settings give the same distribution on both sides, up to rounding (which can move
    # a token at the nucleus's edge in or out: ~1e-4 here). A wrong temperature or top-p moves it by far more.
    assert sampled["first_step_tv"] < 1e-3 and sampled["of_greedy8"] > 0
    assert "sample8: the first step's sampling distributions differ by total variation" in out.stdout
    for impl in ("ours", "theirs"):
        assert decode[impl]["best_tokens_per_s"] >= decode[impl]["tokens_per_s"]
    assert not list(tmp_path.glob(".*.safetensors"))  # the distributions' files are cleaned up


def test_a_run_whose_times_spread_is_flagged():
    import bench

    row = {"model": "m", "task": "decode1", "ratio": 1.0,
           **{impl: {"tokens_per_s": 1, "best_tokens_per_s": 1, "peak_mib": 0, "spread": spread}
              for impl, spread in (("ours", 0.1), ("theirs", 0.4))}}
    options = {"rounds": 1, "repeats": 2, "warmup": 1, "prefill_len": 1, "new_tokens": 1, "sft_batch": 1}
    text = bench.markdown({"device": "cpu", "torch": "x", "options": options, "rows": [row]})
    assert "m decode1: theirs runs spread by 40%" in text and "ours runs spread" not in text


def test_an_unknown_measurement_is_one_line_and_exit_status_2():
    out = script("bench.py", "--only", "decode3")
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
    assert len(set(results["decode1", "ours"]["tokens"][0])) > 1  # not one token repeated: the weights are random
    assert abs(results["sft", "ours"]["first_loss"] - results["sft", "theirs"]["first_loss"]) < 1e-4
    assert results["sft", "ours"]["n_tokens"] == results["sft", "theirs"]["n_tokens"] > 0
