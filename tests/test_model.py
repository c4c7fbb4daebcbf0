"""model.py against transformers' MistralForCausalLM on a tiny random model, plus cache and hook invariants."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, random_tokens, script
from model import BadInput, KVCache, add, capture, config_from_hf, cpu_bf16, load_checkpoint, load_model, native_bf16

TOL = dict(atol=1e-5, rtol=1e-5)
L = TINY["num_hidden_layers"]



def left_pad(seqs, pad_id=0):
    """Token lists -> (tokens, mask), right-aligned."""
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, T - len(s) :] = torch.as_tensor(s)
        mask[b, T - len(s) :] = 1
    return tokens, mask


@torch.no_grad()
def test_logits_match_transformers(tiny, tiny_hf):
    tokens = random_tokens(2, 12)  # 12 tokens: three times the sliding window
    ours, theirs = tiny(tokens), tiny_hf(tokens).logits
    torch.testing.assert_close(ours, theirs, **TOL)


@torch.no_grad()
def test_left_padded_batch_matches_sequences_run_one_by_one(tiny, tiny_hf):
    seqs = [random_tokens(11, seed=1).tolist(), random_tokens(4, seed=2).tolist(), random_tokens(7, seed=3).tolist()]
    tokens, mask = left_pad(seqs, pad_id=5)
    batched = tiny(tokens, mask=mask)
    for b, s in enumerate(seqs):
        alone = tiny_hf(torch.tensor([s])).logits[0]
        torch.testing.assert_close(batched[b, -len(s) :], alone, **TOL)


@torch.no_grad()
def test_cached_decoding_matches_full_forward_past_the_window(tiny):
    # Left-padded prompts of different lengths, then one token at a time well past the window (4).
    prompts = [random_tokens(6, seed=4).tolist(), random_tokens(2, seed=5).tolist()]
    continuation = random_tokens(2, 10, seed=6)
    tokens, mask = left_pad(prompts)
    cache = KVCache(tiny.cfg, batch_size=2, max_len=tokens.shape[1] + 10)
    steps = [tiny(tokens, mask=mask, cache=cache)[:, -1]]
    for t in range(9):
        steps.append(tiny(continuation[:, t : t + 1], cache=cache)[:, -1])
    for b, p in enumerate(prompts):
        full = tiny(torch.tensor([p + continuation[b, :9].tolist()]))[0, len(p) - 1 :]
        torch.testing.assert_close(torch.stack([s[b] for s in steps]), full, **TOL)


@torch.no_grad()
def test_chunked_prefill_into_the_cache_matches_full_forward(tiny):
    tokens = random_tokens(1, 13, seed=7)
    cache = KVCache(tiny.cfg, 1, 13)
    chunks = [tiny(tokens[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 13)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), tiny(tokens), **TOL)


@torch.no_grad()
def greedy_uncached(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids


@torch.no_grad()
def test_greedy_tokens_identical_cached_uncached_and_transformers(tiny, tiny_hf):
    from model import greedy

    prompt = random_tokens(5, seed=8).tolist()
    ours_cached = prompt + greedy(tiny, torch.tensor([prompt]), 15)[0].tolist()
    ours_uncached = greedy_uncached(tiny, prompt, 15)
    theirs = tiny_hf.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False,
                              attention_mask=torch.ones(1, 5, dtype=torch.long))[0].tolist()
    assert ours_cached == ours_uncached == theirs


def test_greedy_on_a_batch_equals_each_prompt_alone(tiny):
    from model import greedy

    prompts = torch.stack([random_tokens(6, seed=s) for s in (1, 2, 3)])  # (3, 6)
    batch = greedy(tiny, prompts, 12)
    assert batch.shape == (3, 12)
    for row, prompt in zip(batch, prompts):
        assert row.tolist() == greedy(tiny, prompt[None], 12)[0].tolist()


@torch.no_grad()
def test_captured_resid_equals_transformers_hidden_states(tiny, tiny_hf):
    tokens = random_tokens(2, 9, seed=9)
    acts = {}
    tiny(tokens, hooks=capture(acts, *[f"resid.{i}" for i in range(L + 1)]))
    hidden = tiny_hf(tokens, output_hidden_states=True).hidden_states  # L + 1 of them
    for i in range(L):
        torch.testing.assert_close(acts[f"resid.{i}"], hidden[i], **TOL)
    # transformers' last hidden state is after the final norm; resid.{L} is the stream before it.
    torch.testing.assert_close(tiny.norm(acts[f"resid.{L}"]), hidden[L], **TOL)


@torch.no_grad()
def test_identity_hooks_change_nothing(tiny):
    tokens = random_tokens(2, 9, seed=10)
    sites = [f"resid.{i}" for i in range(L + 1)] + [f"resid_mid.{i}" for i in range(L)]
    plain = tiny(tokens)
    assert torch.equal(tiny(tokens, hooks={s: (lambda x: None) for s in sites}), plain)
    assert torch.equal(tiny(tokens, hooks={s: (lambda x: x.clone()) for s in sites}), plain)
    assert torch.equal(tiny(tokens, hooks={s: add(torch.zeros(TINY["hidden_size"]), 3.0) for s in sites}), plain)


@torch.no_grad()
def test_a_hook_that_returns_a_tensor_replaces_the_stream(tiny):
    # Transplant: run A, then run B with every position's stream at a site replaced by A's. From that
    # site on, B computes exactly what A did, so its logits must equal A's.
    a, b = random_tokens(1, 8, seed=11), random_tokens(1, 8, seed=12)
    for site in ["resid.0", "resid_mid.1", f"resid.{L}"]:
        acts = {}
        logits_a = tiny(a, hooks=capture(acts, site))
        logits_b = tiny(b, hooks={site: lambda x: acts[site]})
        torch.testing.assert_close(logits_b, logits_a, **TOL)
        assert not torch.allclose(tiny(b), logits_a)


@torch.no_grad()
def test_hooks_in_cached_decoding_match_a_full_forward(tiny):
    tokens = random_tokens(1, 10, seed=13)
    v = torch.randn(TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    full_acts = {}
    full = tiny(tokens, hooks={"resid_mid.1": add(v, 2.0), **capture(full_acts, "resid.2")})
    cache, acts, logits, captured = KVCache(tiny.cfg, 1, 10), {}, [], []
    hooks = {"resid_mid.1": add(v, 2.0), **capture(acts, "resid.2")}
    logits.append(tiny(tokens[:, :4], cache=cache, hooks=hooks))
    captured.append(acts["resid.2"])
    for t in range(4, 10):
        logits.append(tiny(tokens[:, t : t + 1], cache=cache, hooks=hooks))
        captured.append(acts["resid.2"])
    torch.testing.assert_close(torch.cat(logits, 1), full, **TOL)
    torch.testing.assert_close(torch.cat(captured, 1), full_acts["resid.2"], **TOL)
    assert not torch.allclose(full, tiny(tokens))  # the steering vector did something


@pytest.mark.parametrize("rows", [(1, 1), (1, 2), (2, 1), (4, 4), (1, 17)])  # 17 > FEW_ROWS: F.linear itself
def test_linear_matches_f_linear_for_any_number_of_rows(rows):
    # linear() computes decoding's few rows as w @ x.T (one row doubled): the same product, summed in
    # another order, so equal to rounding; and differentiable like F.linear.
    from model import FEW_ROWS, linear

    gen = torch.Generator().manual_seed(16)
    w = torch.randn(48, 40, generator=gen, requires_grad=True)
    x = torch.randn(*rows, 40, generator=gen, requires_grad=True)
    ours, ref = linear(x, w), torch.nn.functional.linear(x, w)
    assert ours.shape == ref.shape == (*rows, 48) and ours.is_contiguous()
    torch.testing.assert_close(ours, ref, **TOL)
    grads = torch.autograd.grad(ours.square().sum(), (x, w))
    torch.testing.assert_close(grads, torch.autograd.grad(ref.square().sum(), (x, w)), **TOL)
    assert FEW_ROWS < 17  # so the last case does take the F.linear route


def test_training_forward_is_differentiable(tiny_dir):
    model = load_checkpoint(tiny_dir)
    logits = model(random_tokens(2, 6, seed=14))
    logits.logsumexp(-1).mean().backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_sharded_checkpoint_loads(tiny_dir, tiny_hf, tmp_path):
    tiny_hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    tokens = random_tokens(1, 7, seed=15)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path)(tokens), load_checkpoint(tiny_dir)(tokens))


def test_a_missing_tensor_fails_with_its_name(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    state = load_file(tiny_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(BadInput, match=r"missing tensors \['layers.1.mlp.up_proj.weight'\]"):
        load_checkpoint(tmp_path)


def test_pickled_checkpoints_are_refused(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BadInput, match="no .safetensors weights"):
        load_checkpoint(tmp_path)


def test_config_accepts_both_rope_theta_spellings_and_no_window(tiny_dir):
    hf = json.loads((tiny_dir / "config.json").read_text())
    hf.pop("rope_theta", None)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    assert config_from_hf(hf).rope_theta == 12345.0
    hf.pop("rope_parameters")
    hf.update(rope_theta=1e6, sliding_window=None)
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None and cfg.n_kv_heads == 2


def test_unsupported_config_is_rejected_not_ignored(tiny_dir):
    hf = json.loads((tiny_dir / "config.json").read_text())
    with pytest.raises(BadInput, match="rope_scaling"):
        config_from_hf({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_hub_ids_download_only_config_safetensors_and_tokenizer(tiny_dir, monkeypatch, tmp_path):
    # Tests never touch the network: the Hub call is replaced by a local directory.
    import huggingface_hub

    shutil.copytree(tiny_dir, tmp_path / "repo")
    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    from model import download

    assert download("mistralai/Mistral-7B-v0.1") == tmp_path / "repo"
    assert asked["repo_id"] == "mistralai/Mistral-7B-v0.1"
    assert "model*.safetensors" in asked["patterns"] and not any(".bin" in p for p in asked["patterns"])


def test_a_bad_model_name_is_one_line_and_exit_status_2():
    run = script("model.py", "--model", "no/such/dir")
    assert run.returncode == 2
    assert run.stderr.strip() == "error: --model no/such/dir: no such directory, and not a Hub repo id (owner/name)"


def test_a_directory_without_a_tokenizer_says_so(tiny_dir):
    with pytest.raises(BadInput, match="no tokenizer.model or tokenizer.json"):
        load_model(str(tiny_dir))


@torch.no_grad()
def test_padding_does_not_shift_positions_in_prefill_or_decoding(tiny, monkeypatch):
    # RoPE sees only distances, so a constant shift would not show in the logits; check the positions.
    import model

    seen, rope = [], model.rope_cos_sin
    monkeypatch.setattr(model, "rope_cos_sin", lambda pos, *a: (seen.append(pos.clone()), rope(pos, *a))[1])
    tokens, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    cache = KVCache(tiny.cfg, 2, 6)
    tiny(tokens, mask=mask, cache=cache)
    tiny(torch.tensor([[7], [8]]), cache=cache)
    assert seen[0][mask.bool()].tolist() == [0, 1, 2, 3, 0, 1]
    assert seen[1].tolist() == [[4], [2]]


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_dir):
    model = load_checkpoint(tiny_dir)
    tokens = random_tokens(2, 9, seed=16)
    grads = []
    for checkpoint in (False, True):
        model.zero_grad()
        loss = model(tokens, checkpoint=checkpoint).logsumexp(-1).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_pad_puts_rows_left_or_right_with_a_mask_of_the_real_tokens():
    from model import pad

    tokens, mask = pad([[5, 6, 7], [8]])
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    tokens, mask = pad([[5, 6, 7], [8]], left=True)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]


def test_scored_logprobs_equal_full_logits_at_the_scored_tokens_padded_either_way(tiny):
    from model import pad, scored_logprobs, token_logprobs

    rows = [[3, 14, 15, 92, 65, 35], [89, 79, 32], [38, 46, 26, 43]]
    marks = [[0, 0, 1, 1, 0, 1], [0, 1, 1], [0, 0, 0, 1]]  # the tokens whose log-probs are wanted
    expected = []
    for row, m in zip(rows, marks):  # oracle: each row alone, full logits
        lp = token_logprobs(tiny(torch.tensor([row]))[0, :-1], torch.tensor(row[1:]))
        expected += [lp[j - 1].item() for j in range(1, len(row)) if m[j]]
    for left in (False, True):
        tokens, mask = pad(rows, left=left)
        scored = pad(marks, left=left)[0].bool()
        with torch.no_grad():
            ours = scored_logprobs(tiny, tokens, scored, mask=mask if left else None)
        torch.testing.assert_close(ours, torch.tensor(expected), atol=1e-5, rtol=0)


def test_continuations_after_a_shared_prefix_equal_one_forward_each_in_value_and_gradient(tiny_dir):
    # Three prefixes (one repeated three times, past the window of 4) and continuations of different
    # lengths: log-probs and LoRA gradients must equal a plain forward over each prefix + continuation.
    import lora
    from model import continuation_logprobs, load_checkpoint, token_logprobs

    model = load_checkpoint(tiny_dir, dtype=torch.float64)  # float64: any difference left is a bug, not rounding
    lora.add_lora(model, r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    a, b = random_tokens(9, seed=11).tolist(), random_tokens(3, seed=12).tolist()
    prefixes = [a, a, b, a]
    conts = [random_tokens(n, seed=20 + n).tolist() for n in (5, 1, 7, 2)]
    params = lora.lora_parameters(model)

    def grads(loss):
        return torch.autograd.grad(loss, params)

    ours = continuation_logprobs(model, prefixes, conts, temperature=0.7)
    expected = torch.cat([token_logprobs(model(torch.tensor([p + c]))[0, len(p) - 1 : -1] / 0.7, torch.tensor(c))
                          for p, c in zip(prefixes, conts)])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # log-probs are taken in fp32
    weights = torch.linspace(-1, 1, len(expected))  # any loss that weighs every token differently
    for g_ours, g_expected in zip(grads((ours * weights).sum()), grads((expected * weights).sum())):
        torch.testing.assert_close(g_ours, g_expected, atol=1e-4, rtol=1e-4)


def test_cpu_bf16_multiplies_in_bf16_only_where_the_cpu_does_it_in_hardware():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with cpu_bf16("cpu"):
        y = torch.nn.functional.linear(x, w)
    if native_bf16():
        assert y.dtype == torch.bfloat16 and torch.equal(y, torch.nn.functional.linear(x.bfloat16(), w.bfloat16()))
    else:
        assert torch.equal(y, torch.nn.functional.linear(x, w))
    with cpu_bf16("cpu", enabled=False):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
    with cpu_bf16("cpu"), cpu_bf16("cpu", enabled=False):  # off inside on: fp32
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
