"""Every Triton kernel of the engine compiles to a GPU binary at the launches the engine makes, on any
machine: Triton's front end and its bundled ptxas need no GPU. The interpreter tests check the kernels'
maths on CPU but never compile them, and compilation refuses some programs the interpreter runs (a
variable given tiles of two shapes in the two branches of an ``if``, for one). Target: Hopper (sm_90),
the dependent-launch branch compiled in (about 17 s of ptxas on a 2-core machine; other targets would
double it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tiny_qwen import needs_triton

pytestmark = needs_triton

# Qwen2.5-3B's decode shapes: 64 rows (8 prompts x 8), prompt 650, 512 new tokens
ROWS, KV_HEADS, REP, HEAD_DIM, HIDDEN, INTER, VOCAB = 64, 2, 8, 128, 2048, 11008, 151936
SEQ, PROMPT, NEW = 1162, 650, 512


@dataclass
class Launch:
    kernel: object
    args: tuple
    kwargs: dict


@dataclass
class Recorder:
    """Stands in for a kernels module: ``kernels.name[grid](*args, **kwargs)`` records the launch."""

    module: object
    launches: list[Launch] = field(default_factory=list)

    def __getattr__(self, name: str) -> _Grid:
        return _Grid(getattr(self.module, name), self.launches)


@dataclass
class _Grid:
    kernel: object
    launches: list[Launch]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


def record_launches(monkeypatch, pdl: bool) -> list[Launch]:
    """The engine's kernel modules replaced by recorders, on a pretended 132-SM GPU whose launches are
    dependent launches with ``pdl``; returns the list the launches go to."""
    from tlvr_cli.engine import split_k, split_kv, top_k

    launches: list[Launch] = []
    keywords = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
    for module in (split_kv, split_k, top_k):
        recorder = Recorder(module._kernels(), launches)
        monkeypatch.setattr(module, "_kernels", lambda recorder=recorder: recorder)
        monkeypatch.setattr(module, "launch_keywords", lambda device: keywords)
    monkeypatch.setattr(split_kv, "_sm_count", lambda index: 132)
    monkeypatch.setattr(split_k, "_sm_count", lambda index: 132)
    return launches


def decode_step_launches() -> None:
    """Launch (into the recorders) what one decode step does: plain and cascade attention (one and two
    query tiles per block), the split-K projections, gate|up with its SiLU, the sampler's top-k."""
    from tlvr_cli.engine.split_k import launch_partials, launch_swiglu, split_count
    from tlvr_cli.engine.split_kv import cascade_attention, split_kv_attention
    from tlvr_cli.engine.top_k import launch

    bf16 = torch.bfloat16
    q = torch.empty(ROWS, KV_HEADS, REP, HEAD_DIM, dtype=bf16)
    k, v = (torch.empty(ROWS, KV_HEADS, SEQ, HEAD_DIM, dtype=bf16) for _ in range(2))
    split_kv_attention(q, k, v, torch.full((ROWS,), PROMPT + NEW), SEQ, HEAD_DIM ** -0.5)
    for width in (8, 16):  # 64 and 128 queries per block: one query tile, two
        cascade_attention(q, k, v, torch.full((ROWS // width,), PROMPT), PROMPT, torch.full((ROWS,), SEQ - NEW), NEW,
                          HEAD_DIM ** -0.5)
    h = torch.empty(ROWS, HIDDEN, dtype=bf16)
    # q|k|v, o_proj, down_proj
    for n, reduced in (((REP + 2) * KV_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, INTER)):
        splits = split_count(n, reduced, 132)
        launch_partials(torch.empty(ROWS, reduced, dtype=bf16), torch.empty(n, reduced, dtype=bf16),
                        torch.empty(splits, ROWS, n))
    launch_swiglu(h, torch.empty(2 * INTER, HIDDEN, dtype=bf16), torch.empty(ROWS, INTER, dtype=bf16))
    launch(torch.empty(ROWS, VOCAB, dtype=bf16), 66, torch.empty(ROWS, 66, dtype=bf16),
           torch.empty(ROWS, 66, dtype=torch.long))


def compile_launch(launch: Launch, arch: int):
    """``triton.compile`` of a recorded launch for compute capability ``arch``: its signature from the
    arguments' types, its constexprs and warps/stages from the keywords."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    kwargs.pop("launch_pdl", None)
    values = dict(zip([p.name for p in kernel.params], launch.args)) | kwargs
    signature, constexprs = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = values[p.name]
        else:
            signature[p.name] = mangle_type(values[p.name])
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def test_every_decode_kernel_compiles_for_hopper(monkeypatch):
    from tlvr_cli.engine import split_kv_kernels

    launches = record_launches(monkeypatch, pdl=split_kv_kernels.HAS_PDL)
    decode_step_launches()
    names = [launch.kernel.__name__ for launch in launches]
    # plain attention and its merge, two cascade launches and their merges, three projections, gate|up, top-k
    assert names == ["partial_kernel", "merge_kernel"] + ["cascade_kernel", "merge_kernel"] * 2 + [
        "partials_kernel"] * 3 + ["swiglu_kernel", "maxima_kernel", "threshold_kernel", "collect_kernel",
                                  "finish_kernel"]
    for launch in launches:
        compiled = compile_launch(launch, 90)
        assert compiled.asm["cubin"], launch.kernel.__name__
