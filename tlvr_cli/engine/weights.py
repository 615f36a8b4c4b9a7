"""The engine's own copy of the decoded model: the whole model, or one rank's tensor-parallel shard of
it (``tensor_parallel.py``), and the sources that say what it holds.

A ``WeightSource`` names, by the plain model's parameter names, the parameters the copy reads in
place (``static``: their storage and values stay put between generate calls) and writes the others
at every call. ``ModelWeights`` copies every parameter from the model (FSDP2's gathered parameters
move between calls); LoRA training writes its projections merged (``train/lora.py``), so the model's
weights stay untouched. Under tensor parallelism a source writes only this rank's slice, and only
replicated parameters can be read in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .tensor_parallel import TensorParallel, shard_config, shard_dim


@dataclass(frozen=True)
class Slice:
    """This rank's part of a split parameter: ``length`` entries from ``start`` along ``dim``."""

    dim: int
    start: int
    length: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.dim, self.start, self.length)


class WeightSource(Protocol):
    """What the engine's own weight copy holds, by the plain model's parameter names (tied weights once)."""

    def static(self) -> dict[str, torch.Tensor]:
        """Parameters whose storage and values stay put between generate calls: the copy reads them in place."""
        ...

    def write(self, name: str, out: torch.Tensor, part: Slice | None) -> None:
        """Write the current value of parameter ``name`` (its ``part`` when split) into the copy's tensor ``out``."""
        ...


class ModelWeights:
    """The default source: every parameter copied from ``lm``."""

    def __init__(self, lm: torch.nn.Module) -> None:
        self.lm = lm

    def static(self) -> dict[str, torch.Tensor]:
        return {}

    def write(self, name: str, out: torch.Tensor, part: Slice | None) -> None:
        src = self.lm.get_parameter(name)
        out.copy_(src if part is None else part.of(src))


def fused_parts(layer: torch.nn.Module) -> list[tuple[list[torch.nn.Module], str]]:
    """What the fused weights concatenate, in the order ``layers.decode_layer`` reads them:
    q|k|v weights, q|k|v biases (None when the projections have none), gate|up weights."""
    a, m = layer.self_attn, layer.mlp
    qkv = [a.q_proj, a.k_proj, a.v_proj]
    return [(qkv, "weight"), (qkv, "bias"), ([m.gate_proj, m.up_proj], "weight")]


def fuse_layer(layer: torch.nn.Module, into: tuple | None = None) -> tuple:
    """Make ``layer``'s q/k/v and gate/up parameters views into one concatenated buffer per part and
    return the buffers as ``fused_parts`` lists them (None for absent biases).

    The same ``Parameter`` objects are re-pointed (values, ``requires_grad``, optimizer references
    and hooks kept; their old storage is freed), so the fused weights cost no memory of their own
    and every in-place update (an optimizer step) is seen without a copy. Parameters already back to
    back in memory are left as they are. ``into``: the buffers of an earlier call (CUDA graphs read
    them): a parameter replaced since is copied into its slot and re-pointed there."""
    out = []
    with torch.inference_mode(False), torch.no_grad():  # in this order: inference_mode(False) enables grad
        for j, (mods, attr) in enumerate(fused_parts(layer)):
            params = [getattr(mod, attr) for mod in mods]
            first = params[0]
            if first is None:
                out.append(None)
                continue
            shape = (sum(p.shape[0] for p in params), *first.shape[1:])
            buf = None if into is None else into[j]
            if buf is None or (buf.shape, buf.dtype, buf.device) != (shape, first.dtype, first.device):
                buf = contiguous_join(params)
            if buf is None:
                buf = torch.empty(shape, dtype=first.dtype, device=first.device)
            start = 0
            for p in params:
                slot = buf[start:start + p.shape[0]]
                if p.data_ptr() != slot.data_ptr():
                    slot.copy_(p)
                    p.data = slot
                start += p.shape[0]
            out.append(buf)
    return tuple(out)


def contiguous_join(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``tensors`` concatenated along dim 0 as a view, when they already lie back to back in one
    storage (as ``fuse_layer`` leaves them); None otherwise."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (t.dtype, t.device, t.shape[1:]) != (first.dtype, first.device, first.shape[1:]) or not t.is_contiguous() \
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


class WeightCopy:
    """The engine's copy of ``lm`` (or this rank's shard) in ``dtype`` on ``device``, filled from ``weights``."""

    @torch.no_grad()
    def __init__(self, lm: torch.nn.Module, weights: WeightSource, device: torch.device, dtype: torch.dtype,
                 tp: TensorParallel | None, fused: bool) -> None:
        self.weights, self.tp = weights, tp
        cfg = lm.config if tp is None else shard_config(lm.config, tp.world)
        with torch.device("meta"):  # a parameter-free skeleton: no transient random model
            self.model = type(lm)(cfg).eval()
        # a split parameter cannot be shared with the whole model: only replicated ones are read in place
        static = {n: t for n, t in weights.static().items() if tp is None or shard_dim(n) is None}
        names = {id(p): n for n, p in self.model.named_parameters()}
        made: dict[int, torch.nn.Parameter] = {}
        for module in self.model.modules():
            for attr, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in made:  # tied parameters stay tied
                    name = names[id(p)]
                    data = static[name].detach() if name in static else torch.empty(p.shape, device=device, dtype=dtype)
                    made[id(p)] = torch.nn.Parameter(data, requires_grad=False)
                module._parameters[attr] = made[id(p)]
        for name, buf in lm.named_buffers():  # e.g. the rotary table, in the dtype the model keeps it
            module, _, attr = name.rpartition(".")
            self.model.get_submodule(module)._buffers[attr] = buf.detach().clone()
        self.static = frozenset(n for n in names.values() if n in static)
        self.refresh()
        # the fused buffers start as the concatenation of what the copy holds (static parts included)
        self.fused = [fuse_layer(layer) for layer in self.model.model.layers] if fused else None

    @torch.no_grad()
    def refresh(self) -> None:
        """Write the source's current weights into the copy (this rank's slice of each split one)."""
        for name, p in self.model.named_parameters():
            if name in self.static:
                continue
            dim = None if self.tp is None else shard_dim(name)
            part = None if dim is None else Slice(dim, self.tp.rank * p.shape[dim], p.shape[dim])
            self.weights.write(name, p, part)
