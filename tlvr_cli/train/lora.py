"""LoRA on the LLM through peft (``tune.lora``; `pip install 'tlvr[lora]'`).

peft injects its layers into ``model.language_model`` in place: a targeted projection ``q_proj`` becomes a
peft ``Linear`` holding the frozen ``q_proj.base_layer`` and the trained ``q_proj.lora_A`` / ``lora_B``, so
the module tree (and the state dict) gains ``base_layer`` and ``lora_*`` names. Everything a run writes
stays in the released layout all the same:

* checkpoints and the final model hold the merged weights ``W + alpha/r * B A`` under the released
  keys (``released_state``), so `tlvr eval`, `tlvr infer` and the reference code load them as any
  checkpoint; the adapters sit beside them in peft's own format, ``<dir>/adapter/`` (a subfolder: an
  ``adapter_config.json`` next to ``config.json`` makes transformers load the base model instead);
* the rollout engine decodes from its own bf16 copy of the merged weights (``MergedWeights``), written
  after every optimizer step without touching the base weights (no in-place merge and unmerge, whose
  roundings would accumulate in bf16);
* the KL reference is the policy itself with its adapters switched off plus a frozen copy of the start
  connector (``BaseReference``): no second copy of the LLM.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..engine.weights import Slice
from ..errors import TlvrError, first_line
from ..jobs import LoraTuneConfig

ADAPTER = "default"  # peft's adapter name; peft drops it from the keys it saves
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # how peft's saved keys name the adapted model (here the LLM)
LLM = "language_model."


def require_peft():
    try:
        import peft
    except ImportError:
        raise TlvrError("tune.lora needs the peft package: pip install 'tlvr[lora]'") from None
    return peft


def add_adapters(model: nn.Module, lora: LoraTuneConfig) -> None:
    """Inject fresh LoRA adapters (A random, B zero: the model is unchanged) into the LLM's targeted
    projections, in the LLM's dtype; peft freezes every other LLM weight."""
    peft = require_peft()
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none")
    try:
        peft.inject_adapter_in_model(config, model.language_model, adapter_name=ADAPTER)
    except ValueError as e:  # e.g. no module matches target_modules
        raise TlvrError(f"tune.lora.target_modules={list(lora.target_modules)}: {first_line(e)}") from None


def has_adapters(model: nn.Module) -> bool:
    return bool(getattr(model.language_model, "peft_config", None))


def is_adapter(name: str) -> bool:
    """Whether a parameter name (peft's naming) is an adapter weight."""
    return ".lora_" in name


def lora_layers(lm: nn.Module) -> dict[str, nn.Module]:
    """The LLM's adapted projections by module name (``model.layers.0.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in lm.named_modules() if isinstance(m, LoraLayer)}


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """``W + scale * B A`` of one adapted projection, in fp32 (rounded once by whoever stores it)."""
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    w = layer.base_layer.weight
    return torch.addmm(w.float(), b.float(), a.float(), alpha=layer.scaling[ADAPTER])


def plain_name(name: str) -> str:
    """A peft-wrapped parameter name in the plain model's naming (``q_proj.base_layer.bias`` → ``q_proj.bias``)."""
    return name.replace(".base_layer.", ".")


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block the LLM computes with its base weights only (peft's switch; no weight changes)."""
    layers = list(lora_layers(model.language_model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# ----------------------------------------------------------------------------- reference and engine


class BaseReference:
    """The KL reference of a LoRA run without a second LLM: the policy's own modules with the adapters
    switched off, and a frozen copy of the start connector (the connector trains fully). Offers what
    ``policy.sequence_logprobs`` reads of a model; call it inside ``reference_mode``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.connector = copy.deepcopy(model.connector).requires_grad_(False).eval()
        self.language_model = model.language_model
        self.embed_inputs = model.embed_inputs
        self.prompt_embeddings = model.prompt_embeddings


def reference_mode(ref) -> AbstractContextManager[None]:
    """What a reference forward runs inside: adapters off for a ``BaseReference``, nothing for a separate model."""
    return adapters_disabled(ref.model) if isinstance(ref, BaseReference) else nullcontext()


class MergedWeights:
    """The engine's ``WeightSource`` for a LoRA LLM: each adapted projection's weight is written merged
    (``merged_weight``, rounded once into the engine's copy); every other weight is frozen and read in place,
    so the copy costs the adapted projections only (2.8 of the 3.1 B LLM weights of Qwen2.5-3B)."""

    def __init__(self, lm: nn.Module) -> None:
        self.layers = {f"{name}.weight": layer for name, layer in lora_layers(lm).items()}
        self.frozen = {plain_name(n): p for n, p in lm.named_parameters() if not is_adapter(n)}
        for name in self.layers:
            self.frozen.pop(name)

    def static(self) -> dict[str, torch.Tensor]:
        return self.frozen

    def write(self, name: str, out: torch.Tensor, part: Slice | None) -> None:
        # a tensor-parallel shard cannot read a split frozen weight (a q/k/v bias, say) in place: it copies its slice
        src = merged_weight(self.layers[name]) if name in self.layers else self.frozen[name]
        out.copy_(src if part is None else part.of(src))


# ----------------------------------------------------------------------------- checkpoints


def released_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the released layout, every adapter merged into its projection's weight
    (in the model's dtype); the adapters themselves are left out."""
    out = {plain_name(k): v for k, v in model.state_dict().items() if not is_adapter(k)}
    for name, layer in lora_layers(model.language_model).items():
        w = layer.base_layer.weight
        out[f"{LLM}{name}.weight"] = merged_weight(layer).to(w.dtype)
    return out


def save_adapter(model: nn.Module, out_dir: Path) -> Path:
    """Write the adapters in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys as
    ``PeftModel.save_pretrained`` of the LLM writes them): ``PeftModel.from_pretrained(llm, out_dir)`` loads them."""
    peft = require_peft()
    lm = model.language_model
    sd = peft.get_peft_model_state_dict(lm, adapter_name=ADAPTER)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    lm.peft_config[ADAPTER].save_pretrained(str(out_dir))
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Load adapters written by ``save_adapter`` into ``model``'s (already injected) adapters; their rank
    and targets must match."""
    peft = require_peft()
    adapter_dir = Path(adapter_dir)
    try:
        saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        sd = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:
        raise TlvrError(f"{adapter_dir}: unreadable adapter ({type(e).__name__}: {e})") from None
    ours = model.language_model.peft_config[ADAPTER]
    if saved.get("r") != ours.r or sorted(saved.get("target_modules") or []) != sorted(ours.target_modules):
        theirs = sorted(saved.get("target_modules") or [])
        raise TlvrError(f"{adapter_dir}: adapters of rank {saved.get('r')} on {theirs}; this run has rank {ours.r} on "
                        f"{sorted(ours.target_modules)}: resume with the tune.lora it was saved with")
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}
    result = peft.set_peft_model_state_dict(model.language_model, sd, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if is_adapter(k)]
    if missing or result.unexpected_keys:
        raise TlvrError(f"{adapter_dir}: adapter weights do not match the model ({len(missing)} missing, "
                        f"{len(result.unexpected_keys)} unexpected)")


def checkpoint_state(model: nn.Module, ckpt: Path) -> dict[str, torch.Tensor]:
    """``model``'s own state dict (peft naming) as a LoRA checkpoint left it: the adapters from
    ``<ckpt>/adapter``, every other trained part (the connector) from the released weights, and the
    frozen base as loaded at the start of the run (the released file holds it merged)."""
    from ..model.checkpoint import read_state_dict

    if not (Path(ckpt) / ADAPTER_DIR / ADAPTER_WEIGHTS).exists():
        raise TlvrError(f"{ckpt}: no {ADAPTER_DIR}/{ADAPTER_WEIGHTS}: not written by a LoRA run (tune.lora.enabled)")
    load_adapter(model, Path(ckpt) / ADAPTER_DIR)
    released = read_state_dict(Path(ckpt))
    state = model.state_dict()
    for k in state:
        if not is_adapter(k) and ".base_layer." not in k and k in released:
            state[k] = released[k]
    return state
