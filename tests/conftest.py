"""Shared fixtures: a tiny random Mistral saved by transformers (the oracle), and the embedded SmolLM2."""
import importlib.util
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stage files live at the top level

# Small enough to run in milliseconds, large enough to exercise every path: grouped-query attention
# (4 query heads share 2 kv heads), a sliding window shorter than the test sequences, and weights
# big enough (std 0.2) that attention is peaked, so a wrong mask or rotation changes the logits.
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
            max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.2)


def script(name, *args, stdin=None, env=None, timeout=600):
    """Run one of the project's scripts as a user would: python NAME ARGS... in the repository root."""
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True, input=stdin,
                          timeout=timeout, env={**os.environ, **(env or {})})


def random_tokens(*shape, seed=0):
    """Seeded random token ids for the TINY model."""
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**TINY)).eval()
    with torch.no_grad():  # HF initialises norms to 1; random ones catch a norm that is skipped
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tiny_mistral")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from model import load_checkpoint

    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def smol():
    from model import load_model

    return load_model("smollm2-135m", dtype=torch.float32, device="cpu")


def package_file(package, *parts) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"{package} is not installed; see the README's test command")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """A tiny random Mistral that reads SmolLM2's tokenizer (vocab 49152), for fast end-to-end runs."""
    import shutil

    from transformers import MistralConfig, MistralForCausalLM

    from smollm2 import converted_dir

    torch.manual_seed(0)
    cfg = MistralConfig(**{**TINY, "vocab_size": 49152, "initializer_range": 0.02}, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_chat")
    MistralForCausalLM(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted_dir() / name, path)
    return path


@pytest.fixture(scope="session")
def small_chat(tmp_path_factory):
    """The first eight conversations of the shipped data: a few hundred real messages."""
    from prep import read_export, write_jsonl

    messages, _ = read_export(Path(__file__).resolve().parents[1] / "data" / "convos.jsonl")
    first = list(dict.fromkeys(m.conversation for m in messages))[:8]
    path = tmp_path_factory.mktemp("chat") / "small.jsonl"
    write_jsonl([m for m in messages if m.conversation in first], path)
    return path


@pytest.fixture(scope="session")
def tiny_adapter(tiny_chat_dir, small_chat, tmp_path_factory):
    """A random (non-zero) adapter on the tiny chat model, saved as sft.py saves one: with a training.json
    that names small_chat as its data and sft.py's defaults for the rest."""
    from dataclasses import asdict

    import lora
    import sft
    from model import fingerprint, load_checkpoint

    model = load_checkpoint(tiny_chat_dir)
    torch.manual_seed(1)
    lora.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapter")
    training = {**asdict(sft.Options(data=str(small_chat), model=str(tiny_chat_dir), lora_r=4, lora_alpha=8)),
                "base_fingerprint": fingerprint(model)}
    lora.save_adapter(model, path, base_model=str(tiny_chat_dir), training=training)
    return path


class FakeServer:
    """A local OpenAI-compatible server on 127.0.0.1 for the tests of what talks to one (eval's judge
    and big model, rlaif's judge): a subclass's respond(path, body) -> (status, JSON payload)."""

    def __init__(self):
        self.requests = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = api.respond(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
