"""AdamW with a smaller state, for full fine-tuning on one 48 GB GPU (``optim.kind`` / ``optim.master_weights``).

Per trained parameter the reference's bf16 recipe keeps 16 bytes besides the bf16 weight and gradient: an
fp32 master (4) and two fp32 moments (8). Here:

* moments (``kind``): fp32 (8 bytes), or 8-bit (2 bytes + one fp32 scale per 256 values): each block of 256
  values is divided by its absolute maximum and stored as the index of the nearest of 256 values of a
  dynamic map, dense near 1 and spread over six decades below (Dettmers et al. 2022, "8-bit Optimizers
  via Block-wise Quantization"); the first moment uses a signed map, the second an unsigned one where a
  nonzero value never becomes 0 (its square root divides the update);
* weights (``master_weights``, bf16/fp16 parameters): fp32 masters (4 bytes, updates exact to fp32); Kahan
  summation into the bf16 weight with a bf16 buffer holding each step's rounding error, added back at the
  next step (2 bytes; updates far below the weight's precision still accumulate); or stochastic rounding of
  the updated weight to bf16, up or down with the probability that makes it exact on average (0 bytes;
  a small update lands as an occasional whole bf16 step). fp32 parameters are updated in place.

The arithmetic is torch's single-tensor AdamW, in fp32, in chunks of ``CHUNK`` values (so the fp32
temporaries of a 311 M-value embedding never exist at once): with fp32 moments and fp32 parameters the
result equals ``torch.optim.AdamW`` bit for bit. Stochastic rounding draws from a generator seeded by the
step and the parameter's index, so a resumed run rounds as an uninterrupted one. The state dict holds
plain tensors (uint8 codes, fp32 scales and masters, bf16 compensation) in their own dtypes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..errors import TlvrError

BLOCK = 256  # values per quantisation block (one fp32 scale each)
CHUNK = BLOCK * 65536  # values updated at once: 16.8 M, ~0.5 GB of fp32 temporaries
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The sorted code values in [-1, 1] (signed) or [0, 1]: 0, 1 and, per decade 10^-e (e = 0..d), 2^(b-e)
    evenly spaced values (b = 6 signed, 7 unsigned; d = b - 1): fine steps near the block maximum, coarse
    ones, but still present, down to ~1e-6 of it. 255 values signed, 256 unsigned."""
    bits = 6 if signed else 7
    mags = [torch.tensor([1.0], dtype=torch.float64)]
    for e in range(bits):
        n = 2 ** (bits - e)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mags.append(10.0 ** -e * (edges[:-1] + edges[1:]) / 2)
    mag = torch.cat(mags)
    zero = torch.zeros(1, dtype=torch.float64)
    values = torch.cat([-mag, mag, zero]) if signed else torch.cat([mag, zero])
    return values.sort().values.float()


class Quantizer:
    """Block-wise 8-bit codes over one dynamic map (on one device)."""

    def __init__(self, signed: bool, device: torch.device) -> None:
        self.values = dynamic_map(signed).to(device)
        self.bounds = (self.values[1:] + self.values[:-1]) / 2  # a value takes the code of the nearest map entry
        self.signed = signed
        self.zero = int((self.values == 0).nonzero()[0, 0])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 values (any length) → uint8 codes (same length) and one fp32 scale per started block."""
        n = x.numel()
        blocks = F.pad(x, (0, -n % BLOCK)).view(-1, BLOCK)
        scale = blocks.abs().amax(dim=1)
        normed = blocks / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        codes = torch.bucketize(normed, self.bounds)
        if not self.signed:  # a second moment rounded to 0 would divide the update by eps alone
            codes = torch.where(normed > 0, codes.clamp(min=self.zero + 1), codes)
        return codes.view(-1)[:n].to(torch.uint8), scale

    def decode(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n = codes.numel()
        values = self.values[codes.long()]
        return (F.pad(values, (0, -n % BLOCK)).view(-1, BLOCK) * scale[:, None]).view(-1)[:n]


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 → bf16, rounding up or down in magnitude with probability proportional to the distance: a random
    16-bit integer is added below bf16's last mantissa bit of the fp32 pattern, then those 16 bits are cut."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & -65536
    return torch.where(torch.isfinite(x), bits.view(torch.float32), x).to(torch.bfloat16)


class CompactAdamW(torch.optim.Optimizer):
    """AdamW with fp32 or 8-bit moments (``moments``) and, for bf16/fp16 parameters, fp32 masters, Kahan
    compensation or stochastic rounding (``masters``); see the module docstring."""

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float, moments: str = "fp32",
                 masters: str = "fp32") -> None:
        if moments not in ("fp32", "8bit") or masters not in ("fp32", "kahan", "stochastic"):
            raise ValueError(f"unknown moments {moments!r} or masters {masters!r}")
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        if any(hasattr(p, "full_tensor") for g in self.param_groups for p in g["params"]):
            raise TlvrError("optim.kind=adamw8bit and optim.master_weights kahan/stochastic step whole tensors: use "
                            "dist.strategy ddp or none (fsdp2 shards are fp32 masters already)")
        if masters == "stochastic" and any(p.dtype == torch.float16 for g in self.param_groups for p in g["params"]):
            raise TlvrError("optim.master_weights=stochastic rounds to bfloat16: use model.dtype=bfloat16, "
                            "or master_weights kahan / fp32")
        self.moments, self.masters = moments, masters
        self._quantizers: dict[tuple[bool, torch.device], Quantizer] = {}

    def _quantizer(self, signed: bool, device: torch.device) -> Quantizer:
        key = (signed, device)
        if key not in self._quantizers:
            self._quantizers[key] = Quantizer(signed, device)
        return self._quantizers[key]

    def _init_state(self, p: torch.Tensor) -> dict:
        state: dict = {"step": 0}
        n = p.numel()
        if self.moments == "8bit":
            blocks = -(-n // BLOCK)
            m_zero = self._quantizer(True, p.device).zero
            state["exp_avg_codes"] = torch.full((n,), m_zero, dtype=torch.uint8, device=p.device)
            state["exp_avg_scale"] = torch.zeros(blocks, device=p.device)
            state["exp_avg_sq_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)  # code 0 is the value 0
            state["exp_avg_sq_scale"] = torch.zeros(blocks, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(n, device=p.device)
            state["exp_avg_sq"] = torch.zeros(n, device=p.device)
        if p.dtype in LOW_PRECISION:
            if self.masters == "fp32":
                state["master"] = p.detach().float().reshape(-1).clone()
            elif self.masters == "kahan":
                state["compensation"] = torch.zeros(n, dtype=p.dtype, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None) -> None:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p] = self._init_state(p)
                state = self.state[p]
                state["step"] += 1
                generator = None
                if self.masters == "stochastic" and p.dtype == torch.bfloat16:
                    generator = torch.Generator(device=p.device).manual_seed(state["step"] * 1_000_003 + index)
                for start in range(0, p.numel(), CHUNK):
                    self._update(p, state, group, start, min(p.numel(), start + CHUNK), generator)

    def _update(self, p: torch.Tensor, state: dict, group: dict, start: int, stop: int,
                generator: torch.Generator | None) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step = state["step"]
        flat = p.view(-1)
        grad = p.grad.reshape(-1)[start:stop].float()
        blocks = slice(start // BLOCK, -(-stop // BLOCK))
        if self.moments == "8bit":
            qm, qv = self._quantizer(True, p.device), self._quantizer(False, p.device)
            exp_avg = qm.decode(state["exp_avg_codes"][start:stop], state["exp_avg_scale"][blocks])
            exp_avg_sq = qv.decode(state["exp_avg_sq_codes"][start:stop], state["exp_avg_sq_scale"][blocks])
        else:
            exp_avg, exp_avg_sq = state["exp_avg"][start:stop], state["exp_avg_sq"][start:stop]
        master = state.get("master")
        # the weight in fp32: the master itself, or the parameter (a view when it is fp32, a copy otherwise)
        weight = master[start:stop] if master is not None else flat[start:stop].float()
        before = weight.clone() if "compensation" in state else None
        # torch's single-tensor AdamW, step by step
        weight.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        weight.addcdiv_(exp_avg, denom, value=-step_size)
        if self.moments == "8bit":
            state["exp_avg_codes"][start:stop], state["exp_avg_scale"][blocks] = qm.encode(exp_avg)
            state["exp_avg_sq_codes"][start:stop], state["exp_avg_sq_scale"][blocks] = qv.encode(exp_avg_sq)
        if p.dtype not in LOW_PRECISION:
            return  # ``weight`` was a view of the fp32 parameter
        if before is not None:
            # Kahan: the wanted change plus the error carried over, rounded into the weight; what rounding lost is kept
            comp = state["compensation"][start:stop]
            wanted = (weight - before).add_(comp.float())
            new = (before + wanted).to(p.dtype)
            comp.copy_(wanted.sub_(new.float() - before))
            flat[start:stop] = new
        elif generator is not None:
            flat[start:stop] = stochastic_round_bf16(weight, generator)
        else:
            flat[start:stop] = weight  # from the master: round to nearest

    def state_dict(self) -> dict:
        """Torch's layout (state by parameter index, groups without the tensors), tensors in their own dtypes."""
        groups, start = [], 0
        for g in self.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        params = [p for g in self.param_groups for p in g["params"]]
        state = {i: dict(self.state[p]) for i, p in enumerate(params) if self.state.get(p)}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict``; unlike torch's, floating-point state keeps its saved dtype (fp32 masters and
        scales of bf16 parameters stay fp32)."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state has a different number of parameters per group")
        params = [p for g in self.param_groups for p in g["params"]]
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = defaultdict(dict)
        for i, st in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in st.items()}
