"""Tensor-parallel decoding over two CPU processes (gloo) against the one-process engine on a tiny
random Qwen2 in fp32: the same greedy and sampled tokens, refreshed weights, loud failures."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_qwen import tiny_config
from transformers import Qwen2ForCausalLM

from tlvr_cli.engine.generate import Engine
from tlvr_cli.engine.sampling import SamplingParams
from tlvr_cli.engine.tensor_parallel import TensorParallel
from tlvr_cli.engine.weights import ModelWeights, WeightCopy

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=50)
LENGTHS = (5, 11, 3, 17, 8)
EOS = 7  # the tiny model emits it early on some rows, so rows finish at different steps and slots refill


def perturb(lm: torch.nn.Module) -> None:
    """What an optimizer step does to the weights, in place, plus one parameter replaced by a new
    tensor (as FSDP2's gathers do)."""
    layer = lm.model.layers[1]
    with torch.no_grad():
        layer.mlp.up_proj.weight.mul_(-1.0)
        layer.self_attn.k_proj.bias.add_(0.5)
        lm.model.layers[0].self_attn.o_proj.weight.mul_(1.5)
    layer.self_attn.q_proj.weight = torch.nn.Parameter(layer.self_attn.q_proj.weight.detach() * 0.5)


def _ranks_main(rank: int, world: int, store: str, out: str, fn, args) -> None:
    torch.set_num_threads(1)
    # a collective left waiting (ranks out of step) fails the test after the timeout instead of hanging it
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        torch.save(fn(dist.group.WORLD, *args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, args: tuple, tmp: Path, world: int = 2) -> list:
    """``fn(group, *args)`` in ``world`` forked CPU processes over gloo; returns each rank's result.
    Forked, not spawned: a fresh process spends most of ten seconds importing transformers."""
    out = tmp / "result"
    try:
        mp.start_processes(_ranks_main, (world, str(tmp / "store"), str(out), fn, args), nprocs=world,
                           start_method="fork")
    except mp.ProcessRaisedException as e:
        raise AssertionError(str(e)) from None
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def tokens(outs) -> list[tuple[list[int], bool]]:
    return [(o.tokens, o.finished) for o in outs]


def _scenarios(group, lm, prompts) -> dict:
    """Everything the tests below check, run once by each rank."""
    res = {}
    tp = Engine(lm, max_batch=4, max_seq_len=64, tp_group=group)
    res["greedy"] = tokens(tp.generate(prompts, GREEDY, 12, EOS, num_samples=2))
    res["cache_shape"] = tuple(tp._k[0].shape)
    res["fused"] = tp._fused is not None
    res["sampled"] = tokens(tp.generate(prompts, SAMPLED, 10, 299, num_samples=3, seed=5))
    unfused = Engine(lm, max_batch=3, max_seq_len=64, tp_group=group, fuse_weights=False)
    res["unfused"] = tokens(unfused.generate(prompts, GREEDY, 12, EOS, num_samples=2))
    copy_ptrs = [p.data_ptr() for p in tp._copy.parameters()]
    perturb(lm)  # same change on every rank, as a replicated optimizer step makes
    res["refreshed"] = tokens(tp.generate(prompts, GREEDY, 12, EOS, num_samples=2))
    res["same_copy"] = [p.data_ptr() for p in tp._copy.parameters()] == copy_ptrs
    # one rank handed a different prompt: every rank raises instead of decoding apart
    odd = [p.clone() for p in prompts]
    if group.rank() == 1:
        odd[2][0, 0] += 1.0
    try:
        tp.generate(odd, GREEDY, 4, 299)
        res["disagree"] = None
    except RuntimeError as e:
        res["disagree"] = str(e)
    res["errors"] = []
    for over in (dict(num_key_value_heads=1), dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1),
                 dict(intermediate_size=129)):
        try:
            Engine(Qwen2ForCausalLM(tiny_config(**over)), tp_group=group)
            res["errors"].append(None)
        except ValueError as e:
            res["errors"].append(str(e))
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory, lm, prompts):
    ranks = run_ranks(_scenarios, (lm, prompts), tmp_path_factory.mktemp("tp"))
    return lm, prompts, ranks


def single(lm, prompts, params, n, eos, **kw):
    return tokens(Engine(lm, max_batch=4, max_seq_len=64).generate(prompts, params, n, eos, **kw))


def test_greedy_matches_one_process(setup):
    lm, prompts, ranks = setup
    want = single(lm, prompts, GREEDY, 12, EOS, num_samples=2)
    assert 0 < sum(done for _, done in want) < len(want)  # some rows stop early, so slots refill mid-run
    assert len({tuple(t) for t, _ in want}) == len(prompts)
    for r in ranks:
        assert r["greedy"] == want and r["unfused"] == want
        assert r["fused"]  # each rank's q|k|v and gate|up shards are fused
        assert r["cache_shape"] == (4, 1, 64, 16)  # one of the two KV heads per rank


def test_sampled_matches_one_process(setup):
    lm, prompts, ranks = setup
    want = single(lm, prompts, SAMPLED, 10, 299, num_samples=3, seed=5)
    assert len({tuple(t) for t, _ in want[:3]}) > 1  # samples of one prompt differ
    assert [r["sampled"] for r in ranks] == [want, want]


def test_next_call_decodes_the_changed_weights(setup):
    lm, prompts, ranks = setup
    before = single(lm, prompts, GREEDY, 12, EOS, num_samples=2)
    changed = Qwen2ForCausalLM(lm.config).eval()
    changed.load_state_dict(lm.state_dict())
    perturb(changed)
    want = single(changed, prompts, GREEDY, 12, EOS, num_samples=2)
    assert want != before
    for r in ranks:
        assert r["refreshed"] == want and r["same_copy"]


def test_ranks_that_disagree_fail_loudly(setup):
    for r in setup[2]:
        assert "tensor-parallel ranks disagree on the prompts" in r["disagree"] and "ranks [1]" in r["disagree"]


def test_indivisible_shapes_are_refused(setup):
    for r in setup[2]:
        assert r["errors"] == ["tensor parallelism over 2 ranks needs key/value heads divisible by 2, got 1",
                               "tensor parallelism over 2 ranks needs attention heads divisible by 2, got 3",
                               "tensor parallelism over 2 ranks needs intermediate size divisible by 2, got 129"]


def _compiled_scenario(group, lm, prompts) -> tuple:
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    import tlvr_cli.engine.generate as generate

    generate.COMPILE_DEVICES = ("cuda", "cpu")  # this process only: the GPU path compiled on CPU
    inductor_config.compile_threads = 1  # compile in-process: a parent's compile workers do not survive the fork
    engine = Engine(lm, max_batch=4, max_seq_len=64, tp_group=group, compile=True)
    greedy = tokens(engine.generate(prompts, GREEDY, 12, EOS, num_samples=2))
    sampled = tokens(engine.generate(prompts, SAMPLED, 10, 299, num_samples=3, seed=5))
    return greedy, sampled, engine._layer is not generate.decode_layer, dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_compiled_layer_with_all_reduce_matches_one_process(setup, tmp_path):
    lm, prompts, _ = setup
    want = (single(lm, prompts, GREEDY, 12, EOS, num_samples=2),
            single(lm, prompts, SAMPLED, 10, 299, num_samples=3, seed=5))
    for greedy, sampled, compiled, breaks in run_ranks(_compiled_scenario, (lm, prompts), tmp_path):
        assert compiled and (greedy, sampled) == want
        assert breaks == {}  # the all-reduces are traced into the compiled layer, not split around


def _bench_rank(group) -> tuple[dict, str]:
    import contextlib
    import importlib.util
    import io

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):  # the benchmark decodes over the group it finds started
        rates = bench.main(["--tensor-parallel", "--config", "tiny", "--device", "cpu", "--dtype", "fp32",
                            "--prompt-len", "12", "--new-tokens", "6", "--batch", "2", "--samples", "2"])
    return rates, text.getvalue()


def test_bench_tensor_parallel_smoke(tmp_path):
    (result, text), (result1, text1) = run_ranks(_bench_rank, (), tmp_path)
    rates = result["tokens_per_s"]
    assert set(rates) == {"one GPU, 4 rows", "data parallel, 2 rows per GPU", "tensor parallel, 4 rows"}
    assert result["rows_identical"] == 1.0  # fp32: the same greedy tokens as one process
    assert result == result1 and all(v > 0 for v in rates.values())
    assert text and text1 == ""  # rank 0 alone prints the table


class _Group:
    """Just the size and rank a ``TensorParallel`` asks of a process group."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_shards_tile_the_full_layers():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(tiny_config()).eval()
    shards = []
    for rank in range(2):
        tp = TensorParallel.over(_Group(2, rank), lm)
        shards.append(WeightCopy(lm, ModelWeights(lm), torch.device("cpu"), torch.float32, tp, fused=False).model)
    a, b, full = (m.model.layers[0] for m in (*shards, lm))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        mods = [m.get_submodule(name) for m in (a, b, full)]
        assert torch.equal(torch.cat([mods[0].weight, mods[1].weight]), mods[2].weight), name
        if mods[2].bias is not None:
            assert torch.equal(torch.cat([mods[0].bias, mods[1].bias]), mods[2].bias), name
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        mods = [m.get_submodule(name) for m in (a, b, full)]
        assert torch.equal(torch.cat([mods[0].weight, mods[1].weight], dim=1), mods[2].weight), name
    assert a.self_attn.q_proj.weight.shape == (32, 64) and a.self_attn.k_proj.weight.shape == (16, 64)
    assert torch.equal(shards[1].model.embed_tokens.weight, lm.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="without bias, but model.layers.0.self_attn.o_proj has one"):
        lm.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(64))
        TensorParallel.over(_Group(2, 0), lm)


def _gpu_scenarios(group, state, cfg, prompts) -> dict:
    rank = group.rank()
    torch.cuda.set_device(rank)
    lm = Qwen2ForCausalLM(cfg).cuda().eval()
    lm.load_state_dict(state)
    prompts = [p.cuda() for p in prompts]
    out = {}
    for graphs, compile in ((False, False), (True, False), (True, True)):
        engine = Engine(lm, max_batch=4, max_seq_len=64, cuda_graphs=graphs, compile=compile, tp_group=group)
        for _ in range(2):  # the second call replays the graphs the first captured
            out[graphs, compile, "greedy"] = tokens(engine.generate(prompts, GREEDY, 12, EOS, num_samples=2))
        out[graphs, compile, "sampled"] = tokens(engine.generate(prompts, SAMPLED, 10, 299, num_samples=3, seed=5))
    return out


def _spawn_main(rank: int, store: str, out: str, state, cfg, prompts) -> None:
    dist.init_process_group("nccl", store=dist.FileStore(store, 2), rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    try:
        torch.save(_gpu_scenarios(dist.group.WORLD, state, cfg, prompts), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_graphs_and_compile_match_one_gpu(tmp_path, lm, prompts):
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    spawn_args = (str(tmp_path / "store"), str(tmp_path / "out"), state, lm.config, prompts)
    mp.start_processes(_spawn_main, spawn_args, nprocs=2,
                       start_method="spawn")
    gpu = lm.cuda()
    cuda_prompts = [p.cuda() for p in prompts]
    want = {"greedy": single(gpu, cuda_prompts, GREEDY, 12, EOS, num_samples=2),
            "sampled": single(gpu, cuda_prompts, SAMPLED, 10, 299, num_samples=3, seed=5)}
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        for (graphs, compile, what), toks in got.items():
            assert toks == want[what], (rank, graphs, compile, what)
