"""The engine's own copy of the decoded model (``Engine(copy_weights=True)`` or ``Engine(weights=...)``) and
the sources that say what it holds: the parameters a source calls static are read in place, the others are
written by the source at every generate call."""

from __future__ import annotations

from typing import Protocol

import torch


class WeightSource(Protocol):
    """What the engine's own weight copy holds, by the plain model's parameter names (tied weights once)."""

    def static(self) -> dict[str, torch.Tensor]:
        """Parameters whose storage and values stay put between generate calls: the copy reads them in place."""
        ...

    def write(self, name: str, out: torch.Tensor) -> None:
        """Write the current value of parameter ``name`` into the copy's tensor ``out``."""
        ...


class ModelWeights:
    """The default source: every parameter copied from ``lm`` (FSDP2's gathered parameters move between calls)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        self.lm = lm

    def static(self) -> dict[str, torch.Tensor]:
        return {}

    def write(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.lm.get_parameter(name))


def build_copy(lm: torch.nn.Module, weights: WeightSource, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.nn.Module, frozenset[str]]:
    """A parameter-free skeleton of ``lm`` (meta device) filled with ``weights``' static tensors, read in
    place, and empty ``dtype`` tensors for the rest (the caller writes them); tied parameters stay tied.
    Returns the copy and the static names."""
    with torch.device("meta"):
        copy = type(lm)(lm.config).eval()
    static = weights.static()
    names = {id(p): n for n, p in copy.named_parameters()}
    made: dict[int, torch.nn.Parameter] = {}
    for module in copy.modules():
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                name = names[id(p)]
                data = static[name].detach() if name in static else torch.empty(p.shape, device=device, dtype=dtype)
                made[id(p)] = torch.nn.Parameter(data, requires_grad=False)
            module._parameters[attr] = made[id(p)]
    for name, buf in lm.named_buffers():  # e.g. the rotary table, in the dtype the model keeps it
        module, _, attr = name.rpartition(".")
        copy.get_submodule(module)._buffers[attr] = buf.detach().clone()
    return copy, frozenset(n for n in names.values() if n in static)
