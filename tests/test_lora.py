"""lora.py against peft on the tiny random Mistral: both directions of the adapter format, merging,
disabling, dropout, the merged export read by transformers, and the KV cache."""
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from conftest import TINY, random_tokens
from lora import (TARGETS, add_lora, disabled, export_merged, fold, load_adapter, lora_modules,
                  lora_parameters, merge, read_training, save_adapter, save_stacked, unmerge)
from model import BadInput, KVCache, load_checkpoint

TOL = dict(atol=1e-5, rtol=1e-5)
L = TINY["num_hidden_layers"]



@torch.no_grad()
def randomize_lora_B(model, seed=0):
    # A fresh adapter has B = 0 and changes nothing, so a parity test on it could not fail.
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # ours: ...q_proj.lora_B.weight; peft: ...q_proj.lora_B.default.weight
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def adapted(tiny_dir, seed=0, **lora_kw):
    """Our tiny model with a random (non-zero) adapter."""
    model = load_checkpoint(tiny_dir)
    add_lora(model, **{"r": 4, "alpha": 8, "dropout": 0.0, **lora_kw})
    randomize_lora_B(model, seed)
    return model


def peft_model(tiny_dir, **lora_kw):
    from peft import LoraConfig, get_peft_model

    hf = MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)  # get_peft_model edits it
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0, **lora_kw)
    model = get_peft_model(hf, config).eval()
    randomize_lora_B(model)
    return model


@torch.no_grad()
def test_a_fresh_adapter_changes_nothing(tiny_dir, tiny):
    model = load_checkpoint(tiny_dir)
    names = add_lora(model)
    assert len(names) == 7 * L and "layers.2.mlp.down_proj" in names
    A = model.layers[0].mlp.down_proj.lora_A.weight  # Kaiming-uniform, a=sqrt(5): U(±1/sqrt(in))
    bound = 1 / math.sqrt(TINY["intermediate_size"])
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    tokens = random_tokens(2, 9)
    assert torch.equal(model(tokens), tiny(tokens))


def test_only_adapter_parameters_train(tiny_dir):
    model = adapted(tiny_dir)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{name}.{ab}.weight" for name in lora_modules(model) for ab in ("lora_A", "lora_B")}
    assert len(lora_parameters(model)) == 2 * 7 * L
    model(random_tokens(2, 6)).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("rslora", [False, True])
@torch.no_grad()
def test_a_peft_adapter_loads_with_peft_logits(tiny_dir, tiny, tmp_path, rslora):
    theirs = peft_model(tiny_dir, use_rslora=rslora)
    theirs.save_pretrained(tmp_path)
    ours = load_checkpoint(tiny_dir)
    config = load_adapter(ours, tmp_path)
    assert config["use_rslora"] == rslora
    tokens = random_tokens(2, 10, seed=1)
    expected = theirs(tokens).logits
    torch.testing.assert_close(ours(tokens), expected, **TOL)
    assert not torch.allclose(tiny(tokens), expected, atol=1e-3)  # the adapter did something


@pytest.mark.parametrize("rslora", [False, True])
@torch.no_grad()
def test_our_adapter_loads_in_peft_with_our_logits(tiny_dir, tiny, tmp_path, rslora):
    from peft import PeftModel

    ours = adapted(tiny_dir, rslora=rslora)
    save_adapter(ours, tmp_path, base_model=str(tiny_dir))
    hf = MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(hf, tmp_path).eval()
    tokens = random_tokens(2, 10, seed=2)
    expected = ours(tokens)
    torch.testing.assert_close(theirs(tokens).logits, expected, **TOL)
    assert not torch.allclose(tiny(tokens), expected, atol=1e-3)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


@torch.no_grad()
def test_merging_keeps_logits_and_unmerging_restores_base_weights(tiny_dir, tiny):
    model = adapted(tiny_dir)
    tokens = random_tokens(2, 9, seed=3)
    unmerged = model(tokens)
    merge(model)
    assert all(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(model(tokens), unmerged, **TOL)
    q = model.layers[1].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(q, tiny.layers[1].self_attn.q_proj.weight)  # the merge changed the weight
    unmerge(model)
    for name, m in lora_modules(model).items():
        torch.testing.assert_close(m.base_layer.weight, tiny.get_submodule(name).weight, **TOL)
    torch.testing.assert_close(model(tokens), unmerged, **TOL)


@torch.no_grad()
def test_disabled_gives_base_logits_and_re_enables_afterwards(tiny_dir, tiny):
    model = adapted(tiny_dir)
    tokens = random_tokens(2, 9, seed=4)
    adapted_logits = model(tokens)
    with disabled(model):
        assert torch.equal(model(tokens), tiny(tokens))
    torch.testing.assert_close(model(tokens), adapted_logits, **TOL)
    assert not torch.allclose(adapted_logits, tiny(tokens), atol=1e-3)


def test_disabling_a_merged_adapter_raises(tiny_dir):
    model = adapted(tiny_dir)
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disabled(model):
            pass
    assert all(m.enabled for m in lora_modules(model).values())


@torch.no_grad()
def test_dropout_is_on_the_adapter_path_only(tiny_dir, tiny):
    model = load_checkpoint(tiny_dir)
    add_lora(model, dropout=0.5)
    model.train()
    tokens = random_tokens(2, 9, seed=5)
    assert torch.equal(model(tokens), tiny(tokens))  # B = 0: any dropout on the base path would show
    randomize_lora_B(model)
    assert not torch.equal(model(tokens), model(tokens))  # ...and it is active on the adapter path
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_the_merged_export_loads_in_transformers_with_our_logits(tiny_dir, tmp_path, tied):
    base_dir = tmp_path / "base"
    if tied:  # SmolLM2-style: the output matrix is the embedding, so the export has no lm_head
        torch.manual_seed(1)
        MistralForCausalLM(MistralConfig(**TINY, tie_word_embeddings=True)).save_pretrained(base_dir)
    else:
        shutil.copytree(tiny_dir, base_dir)
    (base_dir / "tokenizer.json").write_text("{}")  # stands in for a real tokenizer: it is only copied
    model = adapted(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_merged(model, base_dir, tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    assert not any(m.merged for m in lora_modules(model).values())  # the model is left as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokens = random_tokens(2, 10, seed=6)
    # Folding B A into W rounds once more than adding x A B beside x W: 1.03e-5 in one logit on an Intel
    # Xeon (within 1e-5 on a Zen 4), so this one comparison allows 5e-5.
    torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=5e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_decoding_with_an_adapter_matches_full_forward(tiny_dir):
    model = adapted(tiny_dir)
    tokens = random_tokens(2, 11, seed=7)  # past the sliding window (4)
    cache = KVCache(model.cfg, 2, 11)
    steps = [model(tokens[:, :3], cache=cache)]
    steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(3, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), model(tokens), **TOL)


@torch.no_grad()
def test_a_bf16_base_keeps_fp32_adapters_and_matches_peft(tiny_dir, tmp_path):
    from peft import PeftModel

    ours = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    add_lora(ours, r=4, alpha=8, dropout=0.0)
    randomize_lora_B(ours)
    assert {p.dtype for p in lora_parameters(ours)} == {torch.float32}
    save_adapter(ours, tmp_path, base_model=str(tiny_dir))
    # PEFT also keeps the adapter in fp32 on a bf16 base, so both round the same sums the same way.
    hf = MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    theirs = PeftModel.from_pretrained(hf, tmp_path)
    tokens = random_tokens(2, 10, seed=8)
    logits = ours(tokens)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, theirs.eval()(tokens).logits)
    # Merged in fp32 and rounded once: within bf16 rounding of the exact fp32 merge.
    exact = adapted(tiny_dir)
    for p, q in zip(lora_parameters(ours), lora_parameters(exact)):
        q.copy_(p)
    merge(ours)
    merge(exact)
    q_proj = ours.layers[1].self_attn.q_proj.base_layer.weight
    assert q_proj.dtype == torch.bfloat16
    torch.testing.assert_close(q_proj.float(), exact.layers[1].self_attn.q_proj.base_layer.weight,
                               atol=1e-3, rtol=2**-7)


def test_a_missing_adapter_directory_names_the_path(tiny, tmp_path):
    with pytest.raises(BadInput, match=f"--adapter {tmp_path / 'nope'}: no adapter_config.json"):
        load_adapter(tiny, tmp_path / "nope")


def test_an_adapter_missing_a_tensor_names_it(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(adapted(tiny_dir), tmp_path, base_model="tiny")
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    del state[key]
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(BadInput, match=rf"missing tensors \['{key}'\]"):
        load_adapter(load_checkpoint(tiny_dir), tmp_path)


def test_a_dora_adapter_is_refused_by_name(tiny_dir, tmp_path):
    save_adapter(adapted(tiny_dir), tmp_path, base_model="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(BadInput, match="use_dora"):
        load_adapter(load_checkpoint(tiny_dir), tmp_path)


@torch.no_grad()
def test_a_fresh_adapter_on_a_folded_one_is_disabled_to_the_fine_tuned_model_not_the_base(tiny_dir, tiny, tmp_path):
    first = adapted(tiny_dir, seed=1, targets=("q_proj", "v_proj", "down_proj"))  # stage 1
    save_adapter(first, tmp_path / "first", base_model=str(tiny_dir), training={"max_len": 77})
    tokens = random_tokens(2, 10, seed=9)
    fine_tuned = first(tokens)
    model = load_checkpoint(tiny_dir)
    load_adapter(model, tmp_path / "first")
    fold(model)
    assert not lora_modules(model)
    torch.testing.assert_close(model(tokens), fine_tuned, **TOL)
    add_lora(model, r=2, alpha=5, dropout=0.0, rslora=True)  # stage 2, on top, another rank and scale
    with disabled(model):
        torch.testing.assert_close(model(tokens), fine_tuned, **TOL)
        assert not torch.allclose(model(tokens), tiny(tokens), atol=1e-3)
    randomize_lora_B(model, seed=2)
    both = model(tokens)
    assert not torch.allclose(both, fine_tuned, atol=1e-3)

    # Both stages as one PEFT adapter: PEFT and our loader give what the stacked model computes.
    from peft import PeftModel

    save_stacked(model, tmp_path / "first", tmp_path / "stacked")
    config = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["base_model_name_or_path"] == str(tiny_dir)
    assert read_training(tmp_path / "stacked") == {"max_len": 77}
    theirs = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                       tmp_path / "stacked").eval()
    torch.testing.assert_close(theirs(tokens).logits, both, **TOL)
    ours = load_checkpoint(tiny_dir)
    load_adapter(ours, tmp_path / "stacked")
    torch.testing.assert_close(ours(tokens), both, **TOL)
