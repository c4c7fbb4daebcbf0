"""Mistral-7B, written out by hand: the one forward pass every stage of this project runs through.

Read top to bottom: config -> RMSNorm -> rotary embeddings -> attention (grouped-query, sliding window,
KV cache) -> SwiGLU MLP -> decoder block -> the model with residual-stream hooks -> scoring chosen
tokens -> tokenizers -> loading (a local directory, the Hugging Face Hub, or the embedded SmolLM2-135M).

    python model.py --prompt "The capital of France is"                 # embedded model, CPU
    python model.py --model mistralai/Mistral-7B-v0.1 --prompt "Hi"     # needs the Hub and a GPU

Mistral-7B: https://arxiv.org/abs/2310.06825. Llama-family checkpoints (SmolLM2) are the same network
without a sliding window and, optionally, with the output matrix tied to the embedding.

Shapes: B batch, T new tokens, S keys (cached + new), D model dim, H query heads, K kv heads,
Hd head dim, F MLP hidden dim, V vocab, N scored tokens.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import sentencepiece
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open

from cli import BadInput, read_json, Range, exit_on_bad_input, parse_options


@dataclass(frozen=True)
class Config:
    vocab_size: int  # V
    dim: int  # D
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # K
    head_dim: int  # Hd
    hidden_dim: int  # F
    norm_eps: float
    rope_theta: float
    sliding_window: int | None  # a token sees at most this many keys, itself included; None = all
    tie_embeddings: bool  # lm_head reuses the embedding matrix (SmolLM2), or has its own (Mistral)
    max_seq_len: int  # positions the model was trained on; callers trim their context to it


def config_from_hf(hf: dict, source="config.json") -> Config:
    """A Hugging Face config.json (Mistral or Llama) -> Config. Rejects what this forward doesn't do,
    and numbers that are missing or of the wrong kind, naming the key."""
    if not isinstance(hf, dict):
        raise BadInput(f"{source}: expected a JSON object of model settings")

    def number(key, kind=int, optional=False):
        value = hf.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
            raise BadInput(f"{source}: {key!r} must be a positive {'number' if kind is float else 'integer'}, "
                           f"got {value!r}")
        return value

    rope = hf.get("rope_parameters") or {}  # transformers 5 nests rope_theta here; Hub configs don't
    if not isinstance(rope, dict):
        raise BadInput(f"{source}: 'rope_parameters' must be a JSON object, got {rope!r}")
    unsupported = {k: hf[k] for k in ("rope_scaling", "attention_bias", "mlp_bias") if hf.get(k)}
    if rope.get("rope_type", "default") != "default":
        unsupported["rope_parameters"] = rope
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    if unsupported:
        raise BadInput(f"{source} asks for {unsupported}, which this Mistral forward does not implement")
    n_heads, dim = number("num_attention_heads"), number("hidden_size")
    n_kv_heads = number("num_key_value_heads", optional=True) or n_heads
    if n_heads % n_kv_heads:
        raise BadInput(f"{source}: {n_heads} attention heads can't share {n_kv_heads} key/value heads evenly")
    theta = hf["rope_theta"] if "rope_theta" in hf else rope.get("rope_theta")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise BadInput(f"{source}: 'rope_theta' must be a positive number, got {theta!r}")
    return Config(
        vocab_size=number("vocab_size"),
        dim=dim,
        n_layers=number("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=number("head_dim", optional=True) or dim // n_heads,
        hidden_dim=number("intermediate_size"),
        norm_eps=number("rms_norm_eps", float),
        rope_theta=float(theta),
        sliding_window=number("sliding_window", optional=True),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=number("max_position_embeddings"),
    )


class RMSNorm(nn.Module):
    # x / rms(x) * weight (https://arxiv.org/abs/1910.07467). Statistics in fp32 even for bf16 models,
    # then cast back before the weight, exactly as the checkpoints' reference does it.
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# Rotary position embeddings (https://arxiv.org/abs/2104.09864): rotate each query and key by an angle
# proportional to its position, so q.k depends only on the distance between them. The paper (and
# Mistral's own reference code) rotates adjacent pairs (x0, x1), (x2, x3), ...; Hugging Face
# checkpoints instead pair dimension j with j + Hd/2 ("rotate half"). The conversion to HF format
# permuted the rows of q_proj and k_proj so that both layouts compute the same attention, so by
# rotating halves here we load Hub weights unchanged. (llama.cpp uses the paired layout, which is why
# smollm2.py permutes the rows of its GGUF back.)
def rope_cos_sin(positions, cfg: Config, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, Hd), broadcasting over heads."""
    inv_freq = 1.0 / cfg.rope_theta ** (
        torch.arange(0, cfg.head_dim, 2, device=positions.device).float() / cfg.head_dim
    )  # (Hd/2,)
    angles = positions[..., None].float() * inv_freq  # (B, T, Hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, Hd): dims j and j + Hd/2 share an angle
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x (B, heads, T, Hd)
    return x * cos + rotate_half(x) * sin


def attention_mask(key_valid, start: int, window: int | None):
    """Which keys each new query may see. key_valid (B, S): real tokens (not padding) among all keys,
    the last T of which are the new tokens. Returns (B, 1, T, S) bool, True = attend."""
    B, S = key_valid.shape
    q = torch.arange(start, S, device=key_valid.device)[:, None]  # (T, 1) cache slot of each query
    k = torch.arange(S, device=key_valid.device)[None, :]  # (1, S) cache slot of each key
    seen = k <= q  # causal
    if window is not None:
        # transformers' MistralForCausalLM: a token sees at most `window` keys counting itself.
        # (Mistral's original one-file reference masked with triu(diagonal=-window): one key more.)
        # We match transformers because it is the reference the Hub checkpoints are tested against.
        seen = seen & (q - k < window)
    # A padding query that saw no key would softmax over nothing and give NaN, and that NaN would
    # reach real tokens through 0 * NaN in the attention product. So padding queries see every
    # earlier key; their outputs are never used.
    query_is_pad = ~key_valid[:, start:, None]  # (B, T, 1)
    return (seen & (key_valid[:, None, :] | query_is_pad))[:, None]  # (B, 1, T, S)


class KVCache:
    """Keys and values of every layer for max_len positions, allocated once by the caller and written by
    index as tokens arrive, so decoding never reallocates. Pass it to every forward of one generation.
    One tensor per layer, not one for all: a write into layer i+1 must not count as a change to what
    layer i saved for its backward, so gradients can flow through a prefix's cache (prefill_once)."""

    def __init__(self, cfg: Config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # real, not pad
        self.length = 0  # slots filled so far

    def rows(self, index: list[int]) -> "KVCache":
        """A cache of these batch rows (repeats allowed), copied: one prefill serves several samples of
        the same prompt."""
        new = object.__new__(KVCache)
        new.k, new.v = [k[index] for k in self.k], [v[index] for v in self.v]  # indexing by a list copies
        new.valid, new.length = self.valid[index], self.length
        return new


# Every weight multiplication goes through linear(), so that decoding on a CPU can take a faster route.
# Up to FEW_ROWS rows it does; measured, that route stops paying between 32 and 64 rows.
FEW_ROWS = 16


def linear(x, w):
    """x (..., in) @ w.T for w (out, in): F.linear, except for decoding's few rows on a CPU.

    Why: decoding a token multiplies each weight by one row (or a batch's few rows), so its speed is
    how fast the weights stream from memory. Given one row, MKL runs a matrix-vector product that reads
    fp32 weights at ~11 GB/s on our 2-core machine; the same product written as w @ x.T, (out, rows),
    with at least two rows runs a blocked kernel that reads them at 20-30 GB/s, near the memory's
    35 GB/s. So a single row is doubled; the copy costs only arithmetic, which sits idle anyway. The
    usual form wins again from ~32 rows (prefill, training), where the arithmetic is the limit."""
    rows = x.shape[:-1].numel()
    if x.device.type != "cpu" or x.dtype != torch.float32 or rows > FEW_ROWS:
        return F.linear(x, w)
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:
        x2 = torch.cat((x2, x2))  # a real copy: a stride-0 expand would send MKL down a slow path
    return (w @ x2.T).T[:rows].contiguous().view(*x.shape[:-1], w.shape[0])  # (out, rows) -> (..., out)


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameter, same state-dict key, wrapped by LoRA alike) computed by linear()."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        return linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Separate q, k, v projections (no fused qkv) so LoRA can wrap each as a plain linear layer.
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)

    def forward(self, x, cos, sin, mask, kv=None, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write the new keys/values into the cache, then attend over all of it
            k_cache, v_cache = kv  # (B, K, max_len, Hd) each, this layer's
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]  # (B, K, S, Hd)
        # Grouped-query attention (https://arxiv.org/abs/2305.13245): Mistral-7B has 8 kv heads for 32
        # query heads, so each kv head serves a group of 4 query heads and the cache is 4x smaller.
        # enable_gqa lets SDPA broadcast the kv heads instead of copying them 4 times (repeat_kv).
        # mask None means plain causal attention over exactly these T tokens (a training forward).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, Hd) -> (B, T, D)


class MLP(nn.Module):
    # SwiGLU (https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x)).
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x):  # (B, T, D) -> (B, T, F) -> (B, T, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def run_hook(hooks, name, x):
    """Call hooks[name] on the stream x (B, T, D) if there is one; it returns None or a replacement."""
    fn = hooks.get(name)
    out = fn(x) if fn is not None else None
    return x if out is None else out


class Block(nn.Module):
    # Pre-norm residual block: the stream x is only ever added to, which is what makes reading
    # (logit lens, attribution) and writing (steering) it between blocks meaningful.
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv, start, hooks, i):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start)
        if hooks:
            x = run_hook(hooks, f"resid_mid.{i}", x)
        return x + self.mlp(self.post_attention_layernorm(x))


class Mistral(nn.Module):
    # Module names follow Hugging Face's (embed_tokens, layers.i.self_attn.q_proj, ...), so a checkpoint
    # loads with a strict load_state_dict once the "model." prefix is stripped.
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size)

    def forward(self, tokens, mask=None, cache: KVCache | None = None, hooks: dict | None = None,
                checkpoint=False, unembed=True):
        """tokens (B, T) -> logits (B, T, V) for every position; unembed=False: the final normed stream
        (B, T, D) instead, for the caller to unembed only the positions it needs.

        mask (B, T): 1 for real tokens, 0 for left padding. cache: a KVCache to extend (None = a plain,
        trainable forward over the whole sequence). hooks: {site: fn}, sites "resid.{i}" entering block
        i (i = n_layers: before the final norm) and "resid_mid.{i}" between its attention and MLP; fn
        gets the stream (B, T, D) and returns None to observe or a tensor to replace it.
        checkpoint: recompute each block's activations in the backward pass instead of storing them
        (less memory, ~1/3 more compute), for fine-tuning long sequences."""
        B, T = tokens.shape
        cfg = self.cfg
        real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()  # (B, T)
        if cache is None:
            start, key_valid, kv = 0, real, [None] * cfg.n_layers
        else:
            start = cache.length
            if start + T > cache.valid.shape[1]:
                raise ValueError(f"KV cache holds {cache.valid.shape[1]} positions; {start + T} needed")
            cache.valid[:, start : start + T] = real
            key_valid = cache.valid[:, : start + T]  # (B, S)
            kv = list(zip(cache.k, cache.v))
        # Positions count real tokens only, so a left-padded sequence gets the same positions (and
        # logits) as unpadded. A padding token's position is never used.
        positions = key_valid[:, :start].sum(-1, keepdim=True) + real.cumsum(-1) - 1  # (B, T)
        cos, sin = rope_cos_sin(positions.clamp(min=0), cfg, self.embed_tokens.weight.dtype)
        window = cfg.sliding_window
        plain_causal = cache is None and mask is None and (window is None or T <= window)
        attn_mask = None if plain_causal else attention_mask(key_valid, start, window)

        x = self.embed_tokens(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            if hooks:
                x = run_hook(hooks, f"resid.{i}", x)
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, kv[i], start, hooks, i,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, kv[i], start, hooks, i)
        if hooks:
            x = run_hook(hooks, f"resid.{cfg.n_layers}", x)
        x = self.norm(x)
        if cache is not None:
            cache.length = start + T
        return self.unembed(x) if unembed else x

    def unembed(self, x):
        """The final normed stream (..., D) -> logits (..., V). For a small model with a large vocabulary
        this is much of the work (a fifth of SmolLM2's forward) and the largest tensor, so callers that
        need few positions (the last one when sampling, the scored ones in eval) unembed only those."""
        return linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX; Linux reports it in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_bf16(device, enabled=True):
    """A context that runs the weight multiplications in bf16 (autocast) on a CPU that does bf16 in
    hardware, and changes nothing elsewhere (a GPU loads bf16 weights instead; a CPU without it would
    emulate bf16, slower than fp32). Why: on such a CPU a bf16 product runs at ~2.3x the fp32 rate,
    which made a SmolLM2 training step or prefill ~1.8x faster on our 2 Zen 4 cores (8.7 -> 4.8 s for
    16 sequences of ~110 tokens, forward and backward). The residual stream, the norms' statistics and
    the weights themselves (LoRA's too) stay fp32; each product and its output are rounded to bf16 (~3
    significant digits; a LoRA update smaller than that in a layer's output is lost in the forward,
    though its gradient is not), so use it where rounding noise does not matter (reward models, RL),
    never where parity with a reference is the point. enabled=False is fp32 inside, even within an enabled one (a reward model trained in fp32
    scores in fp32 inside a bf16 RL step)."""
    on = enabled and torch.device(device).type == "cpu" and native_bf16()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


# Hook helpers: one-line call sites for reading and writing the residual stream.
def capture(store: dict, *names):
    """Hooks that save the stream at each named site: model(t, hooks=capture(acts, "resid.12"))."""

    def saver(name):
        def fn(x):
            store[name] = x.detach()

        return fn

    return {name: saver(name) for name in names}


def add(vector, alpha=1.0):
    """A hook that adds alpha * vector (D,) at every position: activation steering."""
    return lambda x: x + alpha * vector.to(x.dtype)


def token_logprobs(logits, targets):
    """log p(targets) under logits: (..., V), (...) -> (...), in fp32."""
    return torch.gather(logits.float().log_softmax(-1), -1, targets[..., None]).squeeze(-1)


# Batches of token lists, and scoring chosen tokens: shared by SFT's loss, evaluation, attribution,
# steering, the reward model and PPO.
def pad(rows: list[list[int]], left=False, device=None):
    """Token lists -> tokens (B, T) and mask (B, T) bool (True = a real token), padded with 0, on device.
    Right padding (the default) needs no attention mask: causal attention never looks ahead, so pads
    after a sequence are invisible to it. Left padding ends every row at the last position, as
    decoding wants; pass the mask to forward, which then gives each row its unpadded positions."""
    T = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        span = slice(T - len(row), T) if left else slice(0, len(row))
        tokens[b, span], mask[b, span] = torch.tensor(row, dtype=torch.long), True
    return tokens.to(device), mask.to(device)


def scored_logprobs(model, tokens, scored, mask=None, hooks=None, checkpoint=False, temperature=1.0):
    """log p(token | the tokens before it), in fp32, for every token marked in scored (B, T) bool:
    (N,), in the row-major order of scored's True entries (scored[:, 1:].nonzero() tells each one's
    row and place). One forward with unembed=False over tokens[:, :-1]; only the N positions that
    predict a scored token are unembedded, never the (B, T, V) logits, which for a small model with a
    large vocabulary are most of the memory and a fifth of the work. temperature divides the logits,
    as sampling at that temperature does (PPO must score under the distribution it sampled from)."""
    h = model(tokens[:, :-1], mask=None if mask is None else mask[:, :-1], hooks=hooks, checkpoint=checkpoint,
              unembed=False)  # (B, T-1, D): the stream at t predicts token t + 1
    pick = scored[:, 1:]
    unembed = getattr(model, "module", model).unembed  # DistributedDataParallel wraps our model as .module
    return token_logprobs(unembed(h[pick]) / temperature, tokens[:, 1:][pick])  # (N,)


def prefill_once(model, prompt_ids: list[list[int]], room: int, hooks=None):
    """Each distinct prompt (token ids) run once, left-padded so all end at one position, into a KV cache
    with room for `room` more tokens; then that cache and the prompts' last final normed stream copied
    to one row per entry of prompt_ids. -> (cache, last (B, D)). Rows that repeat a prompt (several
    samples of one reply, several replies scored after one context) share its single prefill, which is
    most of the work when short replies follow long prompts. Gradients flow through it when enabled:
    a shared prompt's keys and values feed every row copied from it, and autograd sums their gradients."""
    device = model.embed_tokens.weight.device
    distinct = {p: u for u, p in enumerate(dict.fromkeys(map(tuple, prompt_ids)))}  # prompt -> its prefill row
    tokens, mask = pad([list(p) for p in distinct], left=True, device=device)  # (U, T)
    cache = KVCache(model.cfg, len(distinct), tokens.shape[1] + room, device, model.embed_tokens.weight.dtype)
    last = model(tokens, mask=mask, cache=cache, hooks=hooks, unembed=False)[:, -1]  # (U, D)
    which = [distinct[tuple(p)] for p in prompt_ids]
    # Copied whenever a gradient may flow: writing later tokens into the very tensors this prefill's
    # attention saved for its backward would invalidate them.
    if torch.is_grad_enabled() or which != list(range(len(distinct))):
        cache, last = cache.rows(which), last[which]
    return cache, last


def continuation_states(model, prefixes: list[list[int]], continuations: list[list[int]], hooks=None):
    """The final normed stream at every position that predicts a continuation token, (N, D) for the N
    tokens of all continuations, row after row: token 0 of a continuation is predicted by its prefix's
    last position, token t by its token t - 1. The same numbers as one forward over prefix +
    continuation (to rounding), with each distinct prefix run once (prefill_once). Continuations are
    right-padded after the prefix; pads come after every real token, so no real token sees them."""
    device = model.embed_tokens.weight.device
    R = max(len(c) for c in continuations)
    cache, last = prefill_once(model, prefixes, R, hooks)
    cont, real = pad(continuations, device=device)  # (B, R)
    if R > 1:  # the last token predicts nothing we score
        h = model(cont[:, :-1], mask=real[:, :-1], cache=cache, hooks=hooks, unembed=False)  # (B, R-1, D)
        h = torch.cat([last[:, None], h], dim=1)  # (B, R, D): position t predicts token t
    else:
        h = last[:, None]
    return h[real]  # (N, D)


def continuation_logprobs(model, prefixes, continuations, temperature=1.0, hooks=None):
    """log p of each continuation token after its prefix and the tokens before it, in fp32: (N,), row
    after row (see continuation_states). temperature as in scored_logprobs."""
    targets = torch.tensor([t for c in continuations for t in c], device=model.embed_tokens.weight.device)
    return token_logprobs(model.unembed(continuation_states(model, prefixes, continuations, hooks)) / temperature,
                          targets)


# Tokenizers: one small interface (encode, decode, bos_id, eos_id) over two libraries.
#   encode(text, start=True): text that begins a document, with BOS where the model expects one.
#   encode(text, start=False): text continuing a document, so pieces can be concatenated.
class SentencePieceTokenizer:
    # Mistral-7B's tokenizer.model. SentencePiece prepends a space to every text it encodes (its
    # "dummy prefix"), which is right at the start of a document and wrong in the middle: naively
    # encode("[A] hi") + encode("\n[B] yo") gets a stray "▁" token at the join that
    # encode("[A] hi\n[B] yo") does not have. For a continuation we encode "\n" + text and drop the
    # two tokens "▁", "\n": the newline is a byte token that never merges with its neighbours, so the
    # text is cut exactly as it would be after a line break.
    def __init__(self, path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()
        self._newline = self.sp.encode("\n")
        assert len(self._newline) == 2, "expected the newline to encode as '▁', '<0x0A>'"

    def encode(self, text: str, start: bool = True) -> list[int]:
        if start:
            return [self.bos_id] + self.sp.encode(text)
        return self.sp.encode("\n" + text)[len(self._newline) :]

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


class HFTokenizer:
    # A Hugging Face tokenizer.json (SmolLM2: byte-level BPE with no dummy prefix, so pieces
    # concatenate as they are). Whether a document starts with BOS is the file's post-processor's call.
    def __init__(self, path, bos_id, eos_id):
        self.tk = tokenizers.Tokenizer.from_file(str(path))
        self.bos_id, self.eos_id = bos_id, eos_id
        self.vocab_size = self.tk.get_vocab_size()

    def encode(self, text: str, start: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=start).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)  # like SentencePiece drops <s>


def load_tokenizer(path):
    path = Path(path)
    try:
        if (path / "tokenizer.model").exists():
            return SentencePieceTokenizer(path / "tokenizer.model")
        if (path / "tokenizer.json").exists():
            hf = read_json(path / "config.json")
            return HFTokenizer(path / "tokenizer.json", hf.get("bos_token_id"), hf.get("eos_token_id"))
    except BadInput:
        raise
    except Exception as e:  # the two tokenizer libraries raise kinds of their own on a corrupt file
        raise BadInput(f"{path}: its tokenizer file can't be read ({type(e).__name__})") from None
    raise BadInput(f"{path} has no tokenizer.model or tokenizer.json")


def load_checkpoint(path, dtype=torch.float32, device="cpu") -> Mistral:
    """A directory with config.json and safetensors (one file, or shards named by
    model.safetensors.index.json) -> Mistral with those weights, in eval mode."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise BadInput(f"{path} has no config.json; expected a Hugging Face model directory")
    cfg = config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise BadInput(f"{index}: expected a \"weight_map\" of tensor names to files")
        files = sorted(set(map(str, weight_map.values())))
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise BadInput(f"{path} has no .safetensors weights (pickled .bin checkpoints are not loaded)")

    # Built on the meta device (shapes, no memory) and given the loaded tensors with assign=True, so a
    # 7B model never sits in memory twice.
    with torch.device("meta"):
        model = Mistral(cfg)
    expected = model.state_dict()
    state = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    state[key.removeprefix("model.")] = f.get_tensor(key).to(dtype)
        except (SafetensorError, OSError) as e:
            raise BadInput(f"{path / name} is not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise BadInput(f"{path}: checkpoint does not match config.json: missing tensors {missing[:5]}, "
                       f"unexpected tensors {unexpected[:5]}")
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise BadInput(f"{path}: tensor {wrong[0]} has shape {list(state[wrong[0]].shape)}, but config.json "
                       f"makes it {list(expected[wrong[0]].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def fingerprint(model: Mistral) -> str:
    """A short hash that tells base models apart: their architecture and a few of their weights (the
    final norm and the first embedding rows, in fp32, so bf16 and fp32 copies of one model agree). An
    adapter records its base's, so that it is not loaded onto another model by mistake."""
    import dataclasses
    import hashlib

    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True).encode())
    for w in (model.norm.weight, model.embed_tokens.weight[:4]):
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(name_or_path="smollm2-135m", dtype=None, device=None):
    """(model, tokenizer) from "smollm2-135m" (the embedded default), a local directory, or a Hub
    repo id such as "mistralai/Mistral-7B-v0.1". Defaults: the GPU in bf16 if there is one, else fp32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = model_dir(name_or_path)
    return load_checkpoint(path, dtype, device), load_tokenizer(path)


def model_dir(name_or_path: str) -> Path:
    """The local directory of "smollm2-135m", a local directory, or a Hub repo id (fetched once)."""
    if name_or_path == "smollm2-135m":
        import smollm2

        return smollm2.converted_dir()
    if Path(name_or_path).exists():
        return Path(name_or_path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return download(name_or_path)
    raise BadInput(f"--model {name_or_path}: no such directory, and not a Hub repo id (owner/name)")


def download(repo_id: str) -> Path:
    """Fetch a Hub repo's config, safetensors and tokenizer (never pickles, never duplicates)."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer.model", "tokenizer.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, gated (needs `hf auth login`), or no such repo
        raise BadInput(f"could not download {repo_id} from the Hugging Face Hub: {e}") from e


@torch.inference_mode()
def greedy(model: Mistral, tokens, max_new_tokens: int, stop=None):
    """The most likely continuations of the prompts tokens (B, T) (equal lengths, no padding), token by
    token through the KV cache (sample.py samples) -> the new tokens (B, n). Ends early once stop(new)
    is true, keeping the token that stopped it."""
    B, T = tokens.shape
    w = model.embed_tokens.weight
    cache = KVCache(model.cfg, B, T + max_new_tokens, w.device, w.dtype)
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=w.device)
    x = tokens.to(w.device)
    for n in range(max_new_tokens):
        last = model(x, cache=cache, unembed=False)[:, -1]  # (B, D): only the last position is unembedded
        x = model.unembed(last).argmax(-1, keepdim=True)  # (B, 1)
        new[:, n : n + 1] = x
        if stop is not None and stop(new[:, : n + 1]):
            return new[:, : n + 1]
    return new


@dataclass
class Options:
    model: Annotated[str, "smollm2-135m (embedded), a local HF directory, or a Hub id"] = "smollm2-135m"
    prompt: Annotated[str, "text to continue"] = "The capital of France is"
    max_new_tokens: Annotated[int, "tokens to add", Range(1)] = 30


def main():
    opts = parse_options(Options)
    model, tok = load_model(opts.model)
    ids = tok.encode(opts.prompt)
    # Decode prompt and continuation together: SentencePiece drops the space that starts a piece.
    new = greedy(model, torch.tensor([ids]), opts.max_new_tokens, stop=lambda new: new[0, -1] == tok.eos_id)
    print(tok.decode(ids + new[0].tolist()))


if __name__ == "__main__":
    exit_on_bad_input(main)
