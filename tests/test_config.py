"""Presets and --set overrides: typed parsing, close-match errors, base chains, packaged lookup."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tlvr_cli import config
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import JOBS, ColdstartConfig, DemoConfig, EvalConfig, GRPOConfig, InferConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_reference_values():
    g = GRPOConfig()
    assert ((g.algo.num_generations, g.algo.beta, g.algo.zero_reward_value, g.algo.advantage_noise_std)
            == (8, 0.01, -2.0, 0.02))
    assert (g.rollout.temperature, g.rollout.top_k, g.rollout.top_p, g.rollout.max_new_tokens) == (1.0, 50, 1.0, 512)
    assert (g.optim.lr, g.optim.scheduler, g.optim.warmup_ratio, g.data.prompts_per_step) == (1e-6, "cosine", 0.03, 8)
    c = ColdstartConfig()
    assert ((c.optim.lr, c.optim.scheduler, c.data.max_length, c.seed, c.tune.vision_tower)
            == (1e-5, "constant", 3072, 42, False))


def test_overrides_are_typed():
    cfg = config.load_config(GRPOConfig, None, ["optim.lr=2e-6", "algo.beta=0", "optim.betas=[0.8, 0.95]",
                                            "algo.zero_reward_value=null", "optim.gradient_checkpointing=false",
                                            "algo.num_generations=4"])
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.algo.beta == 0.0 and isinstance(cfg.algo.beta, float)
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.algo.zero_reward_value is None
    assert cfg.optim.gradient_checkpointing is False
    assert cfg.algo.num_generations == 4


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("algo.num_generations=2.5", "'algo.num_generations' must be an integer"),
    ("algo.loss_aggregation=token_meen", "did you mean 'token_mean'?"),
    ("optim.gradient_checkpointing=maybe", "must be true or false"),
    ("optim=3", "'optim' must be a mapping"),
    ("novalue", "expected dotted.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(TlvrError,
                       match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?").replace(".", r"\.")):
        config.load_config(GRPOConfig, None, [override])


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "job: grpo\noptim:\n  lr: 1e-6\n  betas: [0.9, 0.99\n")
    with pytest.raises(TlvrError, match=r"p\.yaml:\d+: malformed YAML"):
        config.load_config(GRPOConfig, str(p))


def test_wrong_job_and_unknown_preset(tmp_path):
    p = write(tmp_path, "job: eval\n")
    with pytest.raises(TlvrError, match="is a 'eval' preset, not a 'grpo' one"):
        config.load_config(GRPOConfig, str(p))
    with pytest.raises(TlvrError, match="unknown preset 'nextqaa'; did you mean 'nextqa'"):
        config.resolve_preset("nextqaa")


def test_base_chain_merges(tmp_path):
    write(tmp_path, "job: grpo\noptim:\n  lr: 3.0e-6\n  epochs: 2\n", "parent.yaml")
    child = write(tmp_path, f"base: {tmp_path / 'parent.yaml'}\noptim:\n  epochs: 5\n", "child.yaml")
    cfg = config.load_config(GRPOConfig, str(child))
    assert (cfg.optim.lr, cfg.optim.epochs) == (3e-6, 5)


@pytest.mark.parametrize("name, path", sorted(config.list_presets().items()))
def test_every_shipped_preset_loads(name, path):
    data = config.read_yaml(path)
    assert data.get("job") in JOBS, f"{name}: missing or unknown job"
    assert path.read_text().startswith("# tlvr "), f"{name}: the first line must give the command that runs it"
    cfg = config.load_config(JOBS[data["job"]], name)
    dumped = yaml.safe_load(config.to_yaml(cfg, with_help=True))
    assert config.load_config(JOBS[data["job"]], None, extra={k: v for k, v in dumped.items() if k != "job"}) == cfg


# keys any finite number suits: reward weights and the reward that replaces an exact 0
UNBOUNDED = {"weight", "zero_reward_value"}


def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    import dataclasses
    from typing import get_type_hints

    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = getattr(tp, "__args__", (None,))[0] if getattr(tp, "__origin__", None) is list else tp
        if dataclasses.is_dataclass(inner):
            out += _numeric_fields(inner, f"{prefix}{f.name}.")
        elif inner in (int, float) or tp in (int | None, float | None):
            out.append((f"{prefix}{f.name}", f))
    return out


def test_every_numeric_key_declares_its_range():
    for cls in JOBS.values():
        missing = [k for k, f in _numeric_fields(cls)
                   if "range" not in f.metadata and k.split(".")[-1] not in UNBOUNDED]
        assert not missing, f"{cls.__name__}: numeric keys without a range: {missing}"


@pytest.mark.parametrize("override, message", [
    ("algo.num_generations=1", "'algo.num_generations' must be >= 2, got 1"),
    ("optim.lr=-1", "'optim.lr' must be > 0, got -1.0"),
    ("optim.lr=nan", "'optim.lr' must be a finite number, got 'nan'"),
    ("rollout.temperature=-1", "'rollout.temperature' must be >= 0, got -1.0"),
    ("rollout.top_p=2", "'rollout.top_p' must be > 0 and <= 1, got 2.0"),
    ("rollout.max_new_tokens=0", "'rollout.max_new_tokens' must be >= 1, got 0"),
    ("data.prompts_per_step=-2", "'data.prompts_per_step' must be >= 1, got -2"),
    ("optim.max_steps=-3", "'optim.max_steps' must be >= 0, got -3"),
    ("optim.epochs=0", "'optim.epochs' must be >= 1, got 0"),
    ("perf.micro_batch_size=0", "'perf.micro_batch_size' must be >= 1, got 0"),
    ("optim.betas=[0.9, 1.5]", "'optim.betas' must be >= 0 and < 1, got 1.5"),
])
def test_out_of_range_values_are_one_line_errors(override, message):
    with pytest.raises(TlvrError) as e:
        config.load_config(GRPOConfig, None, [override])
    assert str(e.value).endswith(message) and "\n" not in str(e.value)


def test_ranges_show_in_presets_show():
    shown = config.to_yaml(GRPOConfig(), with_help=True)
    assert "top_p: 1.0  # Nucleus sampling mass (1.0 disables). [> 0 and <= 1]" in shown


def test_a_partial_section_keeps_the_fields_own_defaults():
    # InferConfig.sampling is greedy and EvalConfig.sampling runs 1024 tokens: a partial override keeps that
    assert config.load_config(InferConfig, None, ["sampling.top_k=5"]).sampling.temperature == 0.0
    assert config.load_config(EvalConfig, None, ["sampling.top_k=5"]).sampling.max_new_tokens == 1024
    assert config.load_config(GRPOConfig, None, extra={"optim": {"max_steps": 3}}).optim.lr == 1e-6


def test_a_demo_preset_stands_where_grpo_is_asked():
    cfg = config.load_config(GRPOConfig, "demo")
    assert isinstance(cfg, DemoConfig) and cfg.prepare.synth.train == 512
    with pytest.raises(TlvrError, match="is a 'grpo' preset, not a 'eval' one"):
        config.load_config(EvalConfig, "nextqa")


def test_every_field_has_help():
    for cls in JOBS.values():
        missing = [k for k, v in config.field_help(cls).items() if not v]
        assert not missing, f"{cls.__name__}: fields without help: {missing}"


def test_cli_presets_show_and_errors():
    def run(*a):
        env = {**os.environ, "COLUMNS": "400"}  # table cells on one line each
        return subprocess.run([sys.executable, "-m", "tlvr_cli", *a], capture_output=True, text=True, cwd=REPO, env=env)

    shown = run("presets", "show", "nextqa", "--set", "algo.beta=0.05")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["algo"]["beta"] == 0.05
    bad = run("presets", "show", "nextqa", "--set", "algo.betaa=1")
    assert bad.returncode == 2
    assert "unknown key 'algo.betaa'; did you mean 'algo.beta'?" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    listed = run("presets", "list")
    assert listed.returncode == 0 and "nextqa" in listed.stdout
    assert "needs `pip install 'tlvr[lora]'`" in listed.stdout  # printed as written, not read as markup
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("tlvr ")


@pytest.mark.slow
def test_presets_ship_in_the_wheel(tmp_path):
    pytest.importorskip("hatchling")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("tlvr-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tlvr_cli/presets/nextqa.yaml" in names
    assert any(n.startswith("tlvr_cli/model/") for n in names)
