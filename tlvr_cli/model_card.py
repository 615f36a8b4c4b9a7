"""The model card (README.md) ``tlvr push`` uploads with a checkpoint: the hub's YAML header, how the
model was trained (the run's resolved config set against the reference recipe's preset), the
``tlvr eval`` results found beside it, its training curves and how to use it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config import load_config, to_dict
from .data.fetch import TARGETS
from .jobs import ColdstartConfig, GRPOConfig
from .model.checkpoint import GENERATION, HUB_ID
from .runs import EvalResult, RunSummary, metric_label

# the preset holding the reference recipe of each training job (a demo run is GRPO)
REFERENCE_PRESETS = {"grpo": ("nextqa", GRPOConfig), "demo": ("nextqa", GRPOConfig),
                     "coldstart": ("coldstart", ColdstartConfig)}
# keys that say where and how fast a run went, not what it trained: left out of the recipe comparison
NOT_RECIPE = ("job", "output.", "data.root", "data.num_workers", "data.feature_cache_gb", "data.skip_report", "engine.",
              "perf.micro_batch_size", "perf.frozen_micro_batch_size", "perf.logprob_chunk_size",
              "optim.uncheckpointed_", "dist.", "model.device", "model.attn_implementation", "video.backend",
              "prepare.")
JOB_TITLES = {"grpo": "GRPO (`tlvr grpo`)", "demo": "GRPO (`tlvr demo`)",
              "coldstart": "supervised cold start (`tlvr coldstart`)"}


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config sections as dotted keys; lists stay whole values."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_differences(config: dict) -> tuple[str, list[tuple[str, object, object]]] | None:
    """The reference preset of the run's job and each recipe key whose value differs from it, as
    ``(key, this run, reference)``; None for a job without a reference recipe."""
    job = str(config.get("job", ""))
    if job not in REFERENCE_PRESETS:
        return None
    preset, cls = REFERENCE_PRESETS[job]
    reference = flatten(to_dict(load_config(cls, preset)))
    ours = flatten(config)
    diffs = [(k, ours[k], reference[k]) for k in ours
             if k in reference and not k.startswith(NOT_RECIPE) and ours[k] != reference[k]]
    return preset, diffs


def _hub_id(path: str) -> str | None:
    """``path`` when it names a hub repo rather than a local directory."""
    return path if HUB_ID.fullmatch(path) and not Path(path).exists() else None


def _datasets(config: dict) -> list[str]:
    """The NextQA training set when the run read it where `tlvr data fetch nextqa` puts it (the default
    data root; the synthetic set uses the same file names under a root of its own)."""
    data = config.get("data") or {}
    nextqa = TARGETS["nextqa"]
    if not data.get("root") and Path(str(data.get("annotations", ""))).name in nextqa.expect:
        return [nextqa.repo_id]
    return []


def _cell(value: object, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.replace("\n", " ").replace("|", "\\|")
    return f"`{text[:width]}…`" if len(text) > width else f"`{text}`"


def card_header(config: dict, *, job: str) -> str:
    model = str((config.get("model") or {}).get("path", ""))
    header: dict[str, object] = {"license": "apache-2.0"}
    if _hub_id(model):
        header["base_model"] = model
    datasets = _datasets(config)
    if datasets:
        header["datasets"] = datasets
    header["pipeline_tag"] = "video-text-to-text"
    header["library_name"] = "tlvr"
    header["tags"] = ["tlvr", "tinyllava", "tinyllava-video-r1", "video-reasoning",
                      "grpo" if job in ("grpo", "demo") else "sft"]
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n"


def training_section(config: dict, run: RunSummary | None) -> list[str]:
    if not config:
        return ["## Training", "", "No tlvr run directory (config.yaml and metrics.jsonl) was found beside this "
                "checkpoint, so how it was trained is not recorded here.", ""]
    job = str(config.get("job", ""))
    data = config.get("data") or {}
    model = str((config.get("model") or {}).get("path", ""))
    lines = ["## Training", "", f"- **Job**: {JOB_TITLES.get(job, f'`{job}`')}" +
             (f", {run.steps} optimizer steps" if run else "")]
    start = f"`{model}`" + ("" if _hub_id(model) else " (a local checkpoint)")
    lines.append(f"- **Start checkpoint**: {start}")
    if job in ("grpo", "demo"):
        algo = config.get("algo") or {}
        ref = config.get("ref_model") or model
        lines.append(f"- **Data**: `{data.get('annotations')}`, {data.get('prompts_per_step')} prompts per step x "
                     f"{algo.get('num_generations')} completions; KL to `{ref}` with beta {algo.get('beta')}")
    elif job == "coldstart":
        lines.append(f"- **Data**: `{data.get('annotations')}`, {config.get('batch_size')} samples per micro-batch x "
                     f"{config.get('grad_accum')} micro-batches per step")
    recipe = recipe_differences(config)
    if recipe is not None:
        preset, diffs = recipe
        if not diffs:
            lines.append(f"- **Recipe**: the reference recipe (preset `{preset}`): no key that changes training "
                         f"differs")
        else:
            lines += [f"- **Recipe**: differs from the reference recipe (preset `{preset}`) in {len(diffs)} "
                      f"key{'s' if len(diffs) > 1 else ''}:", "", f"| key | this run | `{preset}` |", "|---|---|---|"]
            lines += [f"| `{k}` | {_cell(ours)} | {_cell(ref)} |" for k, ours, ref in diffs]
    if run and run.final:
        final = ", ".join(f"{metric_label(k)} {v:.4g}" for k, v in run.final.items())
        lines += ["", f"Last logged values (step {run.steps}): {final}."]
    lines += ["", "The resolved training config is `tlvr_config.yaml` in this repository.", ""]
    return lines


def evaluation_section(results: list[EvalResult], checkpoint: Path) -> list[str]:
    lines = ["## Evaluation", ""]
    if not results:
        return lines + ["No `tlvr eval` results were found beside this checkpoint.", ""]
    reflection = any(r.reflection_rate is not None for r in results)
    head = ["benchmark", "protocol", "mode", "score (95% CI)", "n", *(["reflection"] if reflection else []), "model"]
    lines += ["Accuracy in percent with a bootstrap 95% confidence interval, from the `results.json` files "
              "`tlvr eval` wrote (protocol `greedy`: deterministic decoding; `paper`: sampled as the reference).", "",
              "| " + " | ".join(head) + " |", "|---|---|---|---|---:|" + ("---:|" if reflection else "") + "---|"]
    for r in results:
        this = bool(r.model) and Path(r.model).resolve() == checkpoint.resolve()
        cells = [r.benchmark + (f" ({r.duration})" if r.benchmark == "videomme" and r.duration else ""),
                 r.protocol or "–", r.mode or "–", r.score(), str(r.n_scored)]
        if reflection:
            cells.append("–" if r.reflection_rate is None else f"{r.reflection_rate:.1f}")
        cells.append("this model" if this else f"`{r.model or r.label}`")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def usage_section(repo_id: str, checkpoint: Path) -> list[str]:
    lines = ["## Use", "", "The checkpoint is in the released TinyLLaVA-Video layout (`config.json` in the "
             "transformers 4.x form the reference code reads, `model.safetensors`, the tokenizer with its slow "
             "files), so both tlvr and the reference code load it:", "", "```bash",
             f"hf download {repo_id} --local-dir {repo_id.split('/')[-1]}",
             f"tlvr infer video.mp4 \"What happens in the video? A. ... B. ...\" --model {repo_id.split('/')[-1]}",
             "```", ""]
    gen_path = checkpoint / GENERATION
    if gen_path.is_file():
        settings = {k: v for k, v in json.loads(gen_path.read_text()).items()
                    if k in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens")}
        if settings:
            lines += [f"`{GENERATION}` records the sampling settings it was trained with: "
                      + ", ".join(f"{k} {json.dumps(v)}" for k, v in settings.items()) + ".", ""]
    return lines


def model_card(checkpoint: Path, repo_id: str, config: dict, run: RunSummary | None, results: list[EvalResult],
               curves: bool) -> str:
    """The README.md text: YAML header, training, evaluation, curves (``curves.png`` when ``curves``), use."""
    job = str(config.get("job", ""))
    what = {"grpo": "GRPO", "demo": "GRPO", "coldstart": "a supervised cold start"}.get(job, "tlvr")
    lines = [card_header(config, job=job), f"# {repo_id.split('/')[-1]}", "",
             f"A TinyLLaVA-Video model (SigLIP vision tower, group-resampler connector, Qwen2.5 language model) "
             f"trained with {what} by tlvr, a re-implementation of TinyLLaVA-Video-R1.", ""]
    lines += training_section(config, run)
    lines += evaluation_section(results, checkpoint)
    if curves:
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    lines += usage_section(repo_id, checkpoint)
    return "\n".join(lines).rstrip() + "\n"
