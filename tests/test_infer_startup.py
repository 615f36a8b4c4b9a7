"""``tlvr infer`` checks its inputs before it loads anything, and decodes in CUDA graphs where it can
(on CPU the same answer, eager)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlvr_cli.config import load_config
from tlvr_cli.errors import TlvrError
from tlvr_cli.infer import UNUSED_PACKAGES, answer_question
from tlvr_cli.jobs import InferConfig
from tlvr_cli.video.frames import VideoError

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from tlvr_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print(json.dumps({"code": e.code, "torch": "torch" in sys.modules}))
"""


@pytest.fixture()
def no_loading(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("tlvr_cli.model.checkpoint.load_model", refuse)


def test_a_missing_video_fails_before_torch_is_imported(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = ["infer", str(tmp_path / "missing.mp4"), "q", "--model", "tiny", "--device", "cpu"]
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"code": 2, "torch": False}
    assert "missing.mp4" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_infer_does_not_import_packages_it_never_uses(tmp_path, make_video):
    # importable (empty) stand-ins: transformers imports what it finds, and would fail on these
    fake = tmp_path / "site"
    for name in UNUSED_PACKAGES:
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text("")
    probe = ("import json, sys\nfrom tlvr_cli.cli import main\nmain(sys.argv[1:])\n"
             f"print(json.dumps([m for m in {UNUSED_PACKAGES!r} if sys.modules.get(m)]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))
    argv = ["infer", str(make_video(n=8)), "q", "--model", "tiny", "--device", "cpu", "--max-new-tokens", "2", "--json"]
    out = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-2])["new_tokens"] == 2 and json.loads(lines[-1]) == []


READ_AHEAD = """
import json, sys
import tlvr_cli.model.checkpoint as checkpoint
seen = []
start = checkpoint.PendingWeights.__init__
def spy(self, *args):
    seen.append("transformers.modeling_utils" in sys.modules)
    start(self, *args)
checkpoint.PendingWeights.__init__ = spy
from tlvr_cli.cli import main
main(sys.argv[1:])
print(json.dumps(seen))
"""


def test_infer_reads_the_weights_while_transformers_is_imported(tmp_path, make_video, tiny_model):
    from tlvr_cli.model.checkpoint import save_model

    ckpt = save_model(tiny_model, tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = ["infer", str(make_video(n=8)), "q", "--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "3",
            "--greedy", "--json"]
    out = subprocess.run([sys.executable, "-c", READ_AHEAD, *argv], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == [False]  # one read, started before the model code was imported
    cfg = load_config(InferConfig, "tiny", ["sampling.max_new_tokens=3", "sampling.temperature=0"])
    same = answer_question(cfg, make_video(n=8), "q", model=tiny_model.eval())
    assert json.loads(lines[-2])["output"] == same.output


CONSOLE = """
import atexit, sys
atexit.register(lambda: print("exit handlers ran", flush=True))

class Sentinel:
    def __del__(self):
        print("torn down", flush=True)

kept = Sentinel()
from tlvr_cli.cli import console_main
console_main()
"""


def test_infer_from_the_console_ends_without_the_teardown_but_runs_the_exit_handlers(make_video):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = ["infer", str(make_video(n=8)), "q", "--model", "tiny", "--device", "cpu", "--max-new-tokens", "2", "--json"]
    out = subprocess.run([sys.executable, "-c", CONSOLE, *argv], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-2])["new_tokens"] == 2 and lines[-1] == "exit handlers ran"
    assert "torn down" not in out.stdout
    # any other command, and a failing infer, exit through the interpreter's teardown as usual
    for argv, code in ((["presets", "list"], 0), (["infer", "missing.mp4", "q", "--model", "tiny"], 2)):
        out = subprocess.run([sys.executable, "-c", CONSOLE, *argv], env=env, capture_output=True, text=True)
        assert out.returncode == code and out.stdout.strip().splitlines()[-2:] == ["exit handlers ran", "torn down"]


def test_bad_inputs_are_refused_before_the_model_loads(tmp_path, make_video, no_loading):
    cfg = load_config(InferConfig, "tiny")
    with pytest.raises(VideoError, match="missing"):
        answer_question(cfg, tmp_path / "missing.mp4", "q")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 64)
    with pytest.raises(VideoError):
        answer_question(cfg, broken, "q")
    with pytest.raises(TlvrError, match="question is empty"):
        answer_question(cfg, make_video(), "  ")
    with pytest.raises(AssertionError, match="loaded before"):  # good inputs do reach the loader
        answer_question(cfg, make_video(), "q")


def test_cuda_graphs_fall_back_to_eager_on_cpu(make_video, tiny_model):
    video = make_video(n=24)
    graphs = load_config(InferConfig, "tiny", ["sampling.max_new_tokens=10"])
    eager = load_config(InferConfig, "tiny", ["sampling.max_new_tokens=10", "cuda_graphs=false"])
    assert graphs.cuda_graphs and not eager.cuda_graphs
    a = answer_question(graphs, video, "What color is the square?", model=tiny_model)
    b = answer_question(eager, video, "What color is the square?", model=tiny_model)
    assert a.output == b.output and a.new_tokens == b.new_tokens > 0
    assert set(a.timings) >= {"decode_s", "import_s", "load_s", "preprocess_s", "encode_s", "generate_s"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_answer_as_eager_on_gpu(make_video, tiny_model):
    video = make_video(n=24)
    model = tiny_model.cuda()
    cfgs = [load_config(InferConfig, "tiny", ["model.device=cuda", "sampling.max_new_tokens=24", f"cuda_graphs={flag}"])
            for flag in ("true", "false")]
    outs = [answer_question(cfg, video, "Which colour?", model=model) for cfg in cfgs]
    assert outs[0].output == outs[1].output and outs[0].new_tokens == outs[1].new_tokens
