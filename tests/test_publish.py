"""`tlvr push`: a checkpoint and its model card to a hub laid out on disk (the client interface the
fetch tests use) and, through the real client, to a hub served over HTTP; the card's header, recipe,
eval table and curves, the dry run, and one-line errors for an offline, unreachable or unauthorized hub."""

from __future__ import annotations

import json
import re

import fixtures_runs as fr
import pytest
import yaml
from fake_hub_server import COMMIT, hub_server

from tlvr_cli.data.hub import HfHubClient, LocalHubClient
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import COLDSTART_MODEL
from tlvr_cli.model.checkpoint import load_model
from tlvr_cli.publish import plan_lines, plan_push, push_checkpoint
from tlvr_cli.train.run_dir import STATE_FILE, TENSORS_FILE


def card_header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    run = fr.make_run(tmp_path / "runs", "grpo-lr2e-6", overrides=("optim.lr=2e-6", "algo.beta=0.02",
                                                                     "engine.max_batch=32", "data.num_workers=8"))
    fr.add_eval(run, "eval-videomme", "videomme", [True] * 5 + [False] * 7, model=run / "final",
                extra={"reflection_rate": 12.5})
    fr.add_eval(run, "eval-base", "mvbench", [True, False], model=tmp_path / "elsewhere", protocol="paper")
    return run


def test_push_uploads_the_released_layout_with_card_config_and_curves(run, tmp_path):
    hub = LocalHubClient(tmp_path / "hub")
    before = sorted(p.name for p in run.iterdir())
    result = push_checkpoint(run / "final", "me/tiny-r1", private=True, client=hub)

    repo = tmp_path / "hub" / "models" / "me" / "tiny-r1"
    assert result.url == repo.as_uri() and hub.private == {"me/tiny-r1": True}
    ckpt_files = sorted(p.name for p in (run / "final").iterdir())
    added = ["README.md", "curves.png", "tlvr_config.yaml"]
    assert sorted(p.name for p in repo.iterdir()) == sorted([*ckpt_files, *added])
    for name in ckpt_files:
        assert (repo / name).read_bytes() == (run / "final" / name).read_bytes()
    assert (repo / "curves.png").read_bytes() == (run / "curves.png").read_bytes()
    assert (repo / "tlvr_config.yaml").read_text() == (run / "config.yaml").read_text()
    assert (repo / "README.md").read_text() == result.plan.card
    # nothing was written into the run directory, and what the hub holds loads as a model
    assert sorted(p.name for p in run.iterdir()) == before and not (run / "final" / "README.md").exists()
    load_model(str(repo), device="cpu")


def test_the_real_client_pushes_to_a_hub_server_what_lands_on_disk(run, tmp_path, hub_online):
    on_disk = push_checkpoint(run / "final", "me/tiny-r1", private=True, client=LocalHubClient(tmp_path / "disk"))
    with hub_server(tmp_path / "served") as server:
        client = HfHubClient(token="hf_test", timeout=5.0, endpoint=server.url)
        result = push_checkpoint(run / "final", "me/tiny-r1", private=True, client=client)
        assert server.private == {"me/tiny-r1": True}
        assert result.url == f"{server.url}/me/tiny-r1" and result.commit_url.endswith(f"/commit/{COMMIT}")
        # one commit for the whole folder
        assert [path for method, path in server.requests if method == "POST" and "/commit/" in path] == [
            "/api/models/me/tiny-r1/commit/main"]

    def files(repo):
        return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}

    served = tmp_path / "served" / "models" / "me" / "tiny-r1"
    assert files(served) == files(tmp_path / "disk" / "models" / "me" / "tiny-r1")
    assert result.plan.card == on_disk.plan.card
    load_model(str(served), device="cpu")


def test_card_header_recipe_evals_and_curves(run):
    card = plan_push(run / "final", "me/tiny-r1").card
    header = card_header(card)
    assert header == {"license": "apache-2.0", "base_model": COLDSTART_MODEL,
                      "datasets": ["Zhang199/TinyLLaVA-Video-R1-training-data"], "pipeline_tag": "video-text-to-text",
                      "library_name": "tlvr",
                      "tags": ["tlvr", "tinyllava", "tinyllava-video-r1", "video-reasoning", "grpo"]}
    assert "- **Job**: GRPO (`tlvr grpo`), 12 optimizer steps" in card
    # the two recipe keys that changed; where and how fast it ran (engine, workers, run_dir) are not recipe
    assert "differs from the reference recipe (preset `nextqa`) in 2 keys:" in card
    assert "| `optim.lr` | `2e-06` | `1e-06` |" in card and "| `algo.beta` | `0.02` | `0.01` |" in card
    assert "engine.max_batch" not in card and "num_workers" not in card
    assert "Last logged values (step 12): reward 0.2, accuracy 0.6, format 1, length 188, kl 0.012." in card
    # 5 of 12 correct = 41.7 %, with the CI the report holds; the other eval is labelled by its model
    results = json.loads((run / "eval-videomme" / "results.json").read_text())
    lo, hi = results["ci95"]
    assert f"| videomme (short) | greedy | reason | 41.7 ({lo:.1f}–{hi:.1f}) | 12 | 12.5 | this model |" in card
    assert "| mvbench | paper | reason | 50.0 " in card and "elsewhere` |" in card
    assert "![training curves](curves.png)" in card
    assert "do_sample true, max_new_tokens 512, temperature 1.0, top_k 50, top_p 1.0" in card


def test_card_of_the_reference_recipe_and_of_a_cold_start(tmp_path):
    grpo = fr.make_run(tmp_path, "ref", overrides=("output.save_every=50", "engine.max_batch=16"))
    card = plan_push(grpo / "final", "me/r1").card
    assert "the reference recipe (preset `nextqa`): no key that changes training differs" in card
    assert "No `tlvr eval` results were found beside this checkpoint." in card

    cs = fr.make_run(tmp_path, "cs", job="coldstart", rows=[{"step": s, "train/loss": 2.0 / s} for s in (1, 2)])
    plan = plan_push(cs / "final", "me/cs")
    assert card_header(plan.card)["tags"][-1] == "sft"
    assert "supervised cold start (`tlvr coldstart`), 2 optimizer steps" in plan.card
    assert "curves.png" in [f.path_in_repo for f in plan.files]  # the cold start's loss.png, as curves.png


def test_step_checkpoint_leaves_trainer_state_out(run, tmp_path):
    import shutil

    run = shutil.copytree(run, tmp_path / run.name)
    step = run / "checkpoints" / "step-000012"
    shutil.copytree(run / "final", step)
    for name in (STATE_FILE, TENSORS_FILE, "config.yaml"):
        (step / name).write_text("{}")
    files = [f.path_in_repo for f in plan_push(step, "me/x").files]
    assert not {STATE_FILE, TENSORS_FILE, "config.yaml"} & set(files) and "model.safetensors" in files
    assert "tlvr_config.yaml" in files  # the run's config, found two levels up


def test_dry_run_lists_files_sizes_and_card(run, capsys):
    from tlvr_cli.cli import main

    main(["push", str(run / "final"), "me/tiny-r1", "--dry-run"])
    out = capsys.readouterr().out
    size = (run / "final" / "model.safetensors").stat().st_size
    assert re.search(rf"^model.safetensors +{size / 1e6:.1f} MB  {run / 'final' / 'model.safetensors'}$", out, re.M)
    assert "README.md" in out and "(model card, written by tlvr)" in out and "pipeline_tag: video-text-to-text" in out
    assert plan_lines(plan_push(run / "final", "me/tiny-r1"))[-1] in out


def test_push_errors_are_one_line(run, tmp_path, monkeypatch, capsys):
    from tlvr_cli.cli import main

    with pytest.raises(TlvrError, match="is a run directory: push its final model"):
        plan_push(run, "me/x")
    with pytest.raises(TlvrError, match="not a checkpoint in the released layout"):
        plan_push(run / "eval-videomme", "me/x")
    with pytest.raises(TlvrError, match="is not a hub repo id"):
        plan_push(run / "final", "no-owner")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        main(["push", str(run / "final"), "me/tiny-r1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "cannot push me/tiny-r1: HF_HUB_OFFLINE is set" in err


def test_unreachable_hub(run, refused_endpoint):
    client = HfHubClient(token="hf_test", timeout=2.0, endpoint=refused_endpoint)
    with pytest.raises(TlvrError, match=r"^cannot reach the Hugging Face hub to push me/x \(offline\?\)"):
        push_checkpoint(run / "final", "me/x", client=client)


class RefusingHub(LocalHubClient):
    def __init__(self, root, exc: Exception) -> None:
        super().__init__(root)
        self.exc = exc

    def upload_folder(self, *args, **kwargs) -> str:
        raise self.exc


@pytest.mark.parametrize("status", [401, 403])
def test_unauthorized_push(run, tmp_path, status):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/x"))
    hub = RefusingHub(tmp_path / "hub", HfHubHTTPError("denied", response=response))
    with pytest.raises(TlvrError, match=rf"^the hub refused to push me/x \(HTTP {status}\): the token cannot write to "
                                        r"me; set HF_TOKEN to a token with write access"):
        push_checkpoint(run / "final", "me/x", client=hub)
    assert not list(run.glob(".push-*"))  # the staging directory is removed after a failure too
    hub = RefusingHub(tmp_path / "hub", LocalTokenNotFoundError("no token"))
    with pytest.raises(TlvrError, match="^not logged in to the Hugging Face hub, so me/x cannot be pushed"):
        push_checkpoint(run / "final", "me/x", client=hub)
