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
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cli import BadInput, read_json, write_atomically

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


# Next to the adapter, sft.py writes the options it trained with (plain JSON), so that a later stage
# builds its examples, context and split exactly as training did, instead of from anyone's defaults.
TRAINING = "training.json"


def save_adapter(model, out_dir, base_model: str, training: dict | None = None):
    """adapter_config.json + adapter_model.safetensors, exactly as PEFT's save_pretrained writes them,
    and training.json if training (the options it was trained with) is given."""
    s = adapter_settings(model)
    tensors = {key: p.detach().contiguous() for key, p in peft_keys(model).items()}
    write_peft(out_dir, tensors, base_model, s["r"], s["alpha"], s["dropout"], s["targets"], s["rslora"], training)


def write_peft(out_dir, tensors, base_model, r, alpha, dropout, targets, rslora, training=None):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model, r=r,
                  lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets), use_rslora=rslora,
                  bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  modules_to_save=None, use_dora=False)
    write_atomically(out_dir / "adapter_model.safetensors", lambda p: save_file(tensors, p, METADATA))
    write_atomically(out_dir / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    if training is not None:
        write_atomically(out_dir / TRAINING, lambda p: p.write_text(json.dumps(training, indent=2)))


def read_training(adapter_dir) -> dict | None:
    """The options the adapter was trained with (training.json), or None for an adapter without one
    (from PEFT, or from before sft.py wrote it)."""
    path = Path(adapter_dir) / TRAINING
    if not path.exists():
        return None
    training = read_json(path)
    if not isinstance(training, dict):
        raise BadInput(f"{path}: expected a JSON object of training options")
    return training


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
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise BadInput(f"{config_path}: expected a JSON object of adapter settings")
    unsupported = {k: config[k] for k in UNSUPPORTED if config.get(k)}
    if config.get("peft_type") != "LORA":
        unsupported["peft_type"] = config.get("peft_type")
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if isinstance(config.get("target_modules"), str):  # PEFT matches a string as a regex on full names
        unsupported["target_modules"] = config["target_modules"]
    if unsupported:
        raise BadInput(f"{config_path} asks for {unsupported}, which this LoRA does not implement")
    checks = {"r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
              "lora_alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                             "a positive number"),
              "lora_dropout": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
              "target_modules": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                                 "a list of module names")}
    for key, (ok, what) in checks.items():
        value = config.get(key, 0.0 if key == "lora_dropout" else None)
        if not ok(value):
            raise BadInput(f"{config_path}: {key!r} must be {what}, got {value!r}")
    add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
             targets=config["target_modules"], rslora=config.get("use_rslora", False))
    params = peft_keys(model)
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            saved = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BadInput(f"{weights_path} is not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        raise BadInput(f"{weights_path} does not match its adapter_config.json: missing tensors "
                       f"{missing[:5]}, unexpected tensors {unexpected[:5]}")
    with torch.no_grad():
        for key, p in params.items():
            if saved[key].shape != p.shape:
                raise BadInput(f"{weights_path}: {key} has shape {list(saved[key].shape)}, expected {list(p.shape)}")
            p.copy_(saved[key])  # to the adapter's fp32 and device
    return config


# The fine-tuned model as a frozen base (RLAIF and PPO): fold the first adapter into the weights and
# train a fresh one on top. Then `disabled` switches off only the new adapter and gives the fine-tuned
# model, the reference a KL penalty must hold the policy to; continuing the first adapter instead would
# make "disabled" the original base. One copy of the weights either way.

def fold(model):
    """Fold every adapter into its base weight for good and unwrap it, in place: the model then
    computes what the adapted model computed, with no LoRA modules left, so add_lora can put a fresh
    adapter on top. (merge() keeps the module, to unmerge later; fold is one-way.)"""
    for name, m in lora_modules(model).items():
        if not m.enabled:
            raise RuntimeError("cannot fold a disabled adapter: the result would not be the model in use")
        with torch.no_grad():
            m.base_layer.weight.copy_(m.merged_weight())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, m.base_layer)
    return model


def save_stacked(model, first_dir, out_dir):
    """One PEFT adapter that computes base + first adapter + model's adapter, for a model whose first
    adapter (saved in first_dir) was folded in and a second one added on top. The two stack along the
    rank: A = [A1; A2] (r1 + r2, in), B = [s1 B1, s2 B2] (out, r1 + r2) and scale 1 (alpha = r1 + r2,
    no rsLoRA), so B A = s1 B1 A1 + s2 B2 A2 exactly. A module only one of them adapts gets zeros in
    the other's rows. Its training.json is the first adapter's (the data the simulation learned)."""
    first_dir = Path(first_dir)
    first_config = json.loads((first_dir / "adapter_config.json").read_text())
    r1, s1 = first_config["r"], first_config["lora_alpha"] / (
        math.sqrt(first_config["r"]) if first_config.get("use_rslora") else first_config["r"])
    with safe_open(str(first_dir / "adapter_model.safetensors"), framework="pt", device="cpu") as f:
        first = {k: f.get_tensor(k).float() for k in f.keys()}
    second = {key: p.detach().float().cpu() for key, p in peft_keys(model).items()}
    s2 = adapter_settings(model)
    r2 = s2["r"]
    scale2 = s2["alpha"] / (math.sqrt(r2) if s2["rslora"] else r2)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in first} | {k.rsplit(".lora_", 1)[0] for k in second})
    tensors = {}
    for name in modules:
        a1, b1 = first.get(f"{name}.lora_A.weight"), first.get(f"{name}.lora_B.weight")
        a2, b2 = second.get(f"{name}.lora_A.weight"), second.get(f"{name}.lora_B.weight")
        d_in = (a1 if a1 is not None else a2).shape[1]
        d_out = (b1 if b1 is not None else b2).shape[0]
        a1, b1 = (torch.zeros(r1, d_in), torch.zeros(d_out, r1)) if a1 is None else (a1, b1 * s1)
        a2, b2 = (torch.zeros(r2, d_in), torch.zeros(d_out, r2)) if a2 is None else (a2, b2 * scale2)
        tensors[f"{name}.lora_A.weight"] = torch.cat([a1, a2]).contiguous()  # (r1 + r2, in)
        tensors[f"{name}.lora_B.weight"] = torch.cat([b1, b2], dim=1).contiguous()  # (out, r1 + r2)
    targets = {name.rpartition(".")[2] for name in modules}
    write_peft(out_dir, tensors, first_config["base_model_name_or_path"], r1 + r2, r1 + r2, 0.0, targets, False,
               read_training(first_dir))


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
