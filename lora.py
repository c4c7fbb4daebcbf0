"""LoRA, written out by hand: train a small low-rank update next to each frozen projection.

LoRA (https://arxiv.org/abs/2106.09685) freezes a weight W (out, in) and trains a low-rank update,
W + scale * B @ A with A (r, in) and B (out, r), r much smaller than in and out: for Mistral-7B at r=16
on all seven projections, 42M trainable numbers instead of 7.2B. add_lora swaps the chosen nn.Linear
modules of a model.py Mistral for LoRALinear in place (a module swap, not a LoRA copy of the model), so
the forward, the KV cache and the residual-stream hooks are untouched. Adapters are saved and loaded in
PEFT's format, so `peft.PeftModel.from_pretrained` reads ours and we read theirs; export_merged writes a
plain Hugging Face checkpoint with the adapter folded in.

    import torch
    from model import load_model, token_logprobs
    from lora import add_lora, disabled, lora_parameters, save_adapter

    model, tok = load_model("smollm2-135m")
    add_lora(model, r=16, alpha=32)  # q, k, v, o, gate, up and down of every block; the rest is frozen
    opt = torch.optim.AdamW(lora_parameters(model), lr=2e-4)
    tokens = torch.tensor([tok.encode("[RIYA] you coming?\\n[FRIEND] yes, 5 min")])
    model.train()
    loss = -token_logprobs(model(tokens[:, :-1]), tokens[:, 1:]).mean()
    loss.backward()
    opt.step()
    model.eval()
    with disabled(model):  # the base model, from the same weights: no second copy
        base_logits = model(tokens)
    save_adapter(model, "out/adapter", base_model="smollm2-135m")  # peft.PeftModel reads it too

Shapes: in / out the wrapped projection's input / output features, r the rank.
"""
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model import BadInput

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT wraps MistralForCausalLM as base_model.model, whose decoder is .model: our names (layers.0...) are
# theirs without "model.", and PEFT's saved keys add "base_model.model." in front of that.
PEFT_PREFIX = "base_model.model."

METADATA = {"format": "pt"}  # the safetensors header transformers and PEFT write

# adapter_config.json options that would change what the adapter computes and that we do not implement.
# Refused by name rather than ignored, so a PEFT adapter never loads into a different function.
UNSUPPORTED = ("use_dora", "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern",
               "alpha_pattern", "lora_bias", "layer_replication", "target_parameters",
               "trainable_token_indices", "exclude_modules", "use_qalora", "alora_invocation_tokens")


class LoRALinear(nn.Module):
    # The settings (r, alpha, rslora, dropout) live here, on each wrapped module, and nowhere else:
    # the forward needs them, and save_adapter reads them back (adapter_settings), so there is no
    # second copy on the model that could drift from what the modules actually compute.
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base_layer = base_layer  # names chosen so our state_dict keys are PEFT's saved keys
        self.r, self.alpha, self.rslora = r, alpha, rslora
        # rsLoRA (https://arxiv.org/abs/2312.03732): alpha / r shrinks the update as r grows, so large
        # ranks learn no faster; alpha / sqrt(r) keeps its size stable across ranks.
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        # fp32 even on a bf16 base: AdamW's small updates to bf16 weights would round away.
        kw = dict(bias=False, device=base_layer.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base_layer.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout)  # on the adapter's input only; the base sees all of x
        # As PEFT: A as nn.Linear's default init, B zeros, so B @ A = 0 and a new adapter is a no-op.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True  # False: compute the base layer alone (see disabled)
        self.merged = False  # True: scale * B @ A has been added into base_layer.weight

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged or not self.enabled:
            return y
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scale
        return (y + delta).to(y.dtype)  # summed in fp32 and rounded once, as PEFT does

    def delta_weight(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (out, in), fp32

    def merged_weight(self):
        """The weight of one plain nn.Linear that computes what this module computes now."""
        w = self.base_layer.weight
        if self.merged or not self.enabled:
            return w.detach()
        return (w.float() + self.delta_weight()).to(w.dtype).detach()

    @torch.no_grad()
    def merge(self):
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled adapter: the result would not be the model in use")
        if not self.merged:
            self.base_layer.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        # Exact in fp32; on a bf16 base the round trip can move weights by one bf16 rounding step.
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


def lora_modules(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model, r=16, alpha=32, dropout=0.05, targets=TARGETS, rslora=False) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in targets with a LoRALinear, in place, and freeze
    every other parameter. Returns the wrapped modules' names. Cast the model's dtype before, not after."""
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters")
    targets = set(targets)
    model.requires_grad_(False)  # before the swap, so only the new A and B train
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if attr in targets and isinstance(child, nn.Linear):
                setattr(parent, attr, LoRALinear(child, r, alpha, dropout, rslora))
                swapped.append(f"{parent_name}.{attr}" if parent_name else attr)
    if not swapped:
        raise BadInput(f"LoRA targets {sorted(targets)}: the model has no nn.Linear of these names")
    return swapped


def adapter_settings(model) -> dict:
    """add_lora's keyword arguments that built this model's adapters: add_lora(other, **settings)."""
    modules = lora_modules(model)
    found = {(m.r, m.alpha, m.lora_dropout.p, m.rslora) for m in modules.values()}
    if len(found) != 1:
        raise ValueError(f"expected one set of LoRA (r, alpha, dropout, rslora), found {found or None}")
    [(r, alpha, dropout, rslora)] = found
    targets = sorted({name.rpartition(".")[2] for name in modules})
    return dict(r=r, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge(model):
    """Fold every adapter into its base weight: inference at the base model's speed."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model):
    for m in lora_modules(model).values():
        m.unmerge()


@contextmanager
def disabled(model):
    """The base model, from the same weights (PPO's KL reference, base-vs-tuned): `with disabled(m):`."""
    modules = lora_modules(model).values()
    if any(m.merged for m in modules):
        # A merged adapter lives inside the base weights; switching it "off" would silently keep it on.
        raise RuntimeError("cannot disable a merged LoRA adapter; unmerge(model) first")
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.enabled = flag


def hf_name(name: str) -> str:
    """Our parameter name -> MistralForCausalLM's: the decoder sits under .model, lm_head beside it."""
    return name if name.startswith("lm_head.") else "model." + name


def peft_keys(model) -> dict[str, nn.Parameter]:
    """PEFT's saved key -> our adapter parameter, e.g. base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.weight -> layers.0.self_attn.q_proj.lora_A.weight (PEFT drops the adapter's name, "default")."""
    return {PEFT_PREFIX + hf_name(f"{name}.{ab}.weight"): getattr(m, ab).weight
            for name, m in lora_modules(model).items() for ab in ("lora_A", "lora_B")}


def write_atomically(path: Path, write):
    # Write a temporary file and rename it over the target: a run killed mid-save (training checkpoints
    # save often) leaves the previous file intact instead of a truncated one.
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model, out_dir, base_model: str):
    """adapter_config.json + adapter_model.safetensors, exactly as PEFT's save_pretrained writes them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = adapter_settings(model)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model, r=s["r"],
                  lora_alpha=s["alpha"], lora_dropout=s["dropout"], target_modules=s["targets"],
                  use_rslora=s["rslora"], bias="none", fan_in_fan_out=False, inference_mode=True,
                  init_lora_weights=True, modules_to_save=None, use_dora=False)
    tensors = {key: p.detach().contiguous() for key, p in peft_keys(model).items()}
    write_atomically(out_dir / "adapter_model.safetensors", lambda p: save_file(tensors, p, METADATA))
    write_atomically(out_dir / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))


def load_adapter(model, adapter_dir) -> dict:
    """Add the adapter saved in adapter_dir (by save_adapter or PEFT) to model; returns its config."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.exists():
        raise BadInput(f"--adapter {adapter_dir}: no adapter_config.json (expected a directory written by "
                       f"save_adapter or PEFT's save_pretrained)")
    if not weights_path.exists():
        raise BadInput(f"--adapter {adapter_dir}: no adapter_model.safetensors (pickled .bin is not loaded)")
    config = json.loads(config_path.read_text())
    unsupported = {k: config[k] for k in UNSUPPORTED if config.get(k)}
    if config.get("peft_type") != "LORA":
        unsupported["peft_type"] = config.get("peft_type")
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if isinstance(config.get("target_modules"), str):  # PEFT matches a string as a regex on full names
        unsupported["target_modules"] = config["target_modules"]
    if unsupported:
        raise BadInput(f"{config_path} asks for {unsupported}, which this LoRA does not implement")

    add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
             targets=config["target_modules"], rslora=config.get("use_rslora", False))
    params = peft_keys(model)
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        saved = set(f.keys())
        missing, unexpected = sorted(params.keys() - saved), sorted(saved - params.keys())
        if missing or unexpected:
            raise BadInput(f"{weights_path} does not match its adapter_config.json: missing tensors "
                           f"{missing[:5]}, unexpected tensors {unexpected[:5]}")
        with torch.no_grad():
            for key, p in params.items():
                t = f.get_tensor(key)
                if t.shape != p.shape:
                    raise BadInput(f"{weights_path}: {key} has shape {list(t.shape)}, "
                                   f"expected {list(p.shape)}")
                p.copy_(t)  # to the adapter's fp32 and device
    return config


def export_merged(model, base_dir, out_dir):
    """A standalone Hugging Face checkpoint (model.safetensors, config.json, tokenizer files) of what the
    adapted model computes, which transformers loads as is. The model itself is left as it was."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(model)
    adapter_keys = {f"{name}.{key}" for name, m in modules.items() for key in m.state_dict()}
    state = {k: v for k, v in model.state_dict().items() if k not in adapter_keys}
    state.update({f"{name}.weight": m.merged_weight() for name, m in modules.items()})
    # Tied embeddings: our model has no lm_head then, so no lm_head key is written, as transformers expects.
    tensors = {hf_name(k): v.contiguous() for k, v in state.items()}
    write_atomically(out_dir / "model.safetensors", lambda p: save_file(tensors, p, METADATA))
    for name in ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out_dir / name)
