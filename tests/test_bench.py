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
