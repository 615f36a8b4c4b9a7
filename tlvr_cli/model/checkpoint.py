"""Load and save TinyLLaVA-Video checkpoints in the released layout (spec §1.7).

A checkpoint directory holds ``config.json`` (``model_type`` tinyllava), the full-model weights as
``model.safetensors`` or shards with ``model.safetensors.index.json`` (keys ``language_model.*``,
``vision_tower._vision_tower.vision_model.*``, ``connector._connector.*``; ``lm_head`` absent when
tied), the tokenizer files (``tokenizer.json`` and the slow ``vocab.json``/``merges.txt``, see
``tokenizer_files``) and ``generation_config.json`` (bos/eos as released, plus any recorded sampling
settings). ``config.json`` is written in the transformers 4.x names the reference reads (``config``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.template import EOS
from ..errors import TlvrError
from ..files import data_root
from ..runtime import resolve_device, resolve_dtype
from .tokenizer_files import save_tokenizer
from .upload import upload

# transformers (with the model config, ``.config``) is imported where it is used: a caller can start
# reading a checkpoint's weights (``read_weights_ahead``) before paying for that import

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"
SHARD_BYTES = 5 * 1024**3
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
GENERATION = "generation_config.json"
# sampling settings generation_config.json may record, in transformers' GenerationConfig names
GENERATION_KEYS = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int}


def resolve_checkpoint(path: str) -> Path:
    """A local directory, a fetched model under the data root, or a hub id found in the local HF cache."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise TlvrError(f"{p}: not a checkpoint directory (no config.json)")
        return p
    if HUB_ID.fullmatch(path) and not p.exists():
        fetched = data_root() / "models" / path.split("/")[-1]
        if (fetched / "config.json").exists():
            return fetched
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception:
            from ..data.sources import fetch_target_of_repo

            target = fetch_target_of_repo(path)
            fix = f"`tlvr data fetch {target}`" if target else f"`hf download {path}`"
            raise TlvrError(f"checkpoint {path!r} is neither a directory nor downloaded: run {fix} "
                            f"(or pass the path of a local copy)") from None
    hint = f" (it appears when the run in {p.parent} finishes)" if p.name == "final" else ""
    raise TlvrError(f"{path}: checkpoint directory not found{hint}")


def read_state_dict(ckpt: Path, *, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights of checkpoint directory ``ckpt`` (one file or shards). Without ``device`` and
    ``dtype``, as stored, mapped from the file; with them, copied onto ``device`` with the floating-point
    values in ``dtype``: onto a GPU by ``upload``'s threads through small pinned buffers, elsewhere one
    tensor at a time (host memory never holds a second copy of the model)."""
    index = ckpt / INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (ckpt / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        raise TlvrError(f"{ckpt}: no {WEIGHTS} or {INDEX}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors = load_file(str(ckpt / name))  # mapped: nothing is read until a tensor is copied
        except (SafetensorError, OSError) as e:
            raise TlvrError(f"{ckpt / name}: unreadable weights ({e})") from None
        if device is not None and device.type == "cuda":
            tensors = upload(tensors, device, dtype)
        elif device is not None or dtype is not None:
            tensors = {k: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None,
                               copy=True) for k, t in tensors.items()}
        sd.update(tensors)
    return sd


class ModelSpec(Protocol):
    """What to load and how (``jobs.ModelConfig`` is one)."""

    path: str
    dtype: str
    device: str
    attn_implementation: str


class PendingWeights:
    """A checkpoint's weights being read onto ``device`` in ``dtype`` on a background thread, from the
    moment this is built (``read_weights_ahead``); ``load_model(..., weights=)`` takes them."""

    def __init__(self, ckpt: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.ckpt, self.device, self.dtype = ckpt, device, dtype
        pool = ThreadPoolExecutor(1, thread_name_prefix="tlvr-weights")
        self._future: Future | None = pool.submit(read_state_dict, ckpt, device=device, dtype=dtype)
        pool.shutdown(wait=False)  # the thread ends with the read; the process waits for it at exit

    def take(self) -> dict[str, torch.Tensor]:
        """The state dict, once read (an error of the read is raised here). Taken once: this object then
        holds no reference to the weights, which live as long as the model that took them keeps them."""
        if self._future is None:
            raise RuntimeError(f"the weights of {self.ckpt} were taken already")
        future, self._future = self._future, None
        return future.result()


def _target(path: str | ModelSpec, dtype: str, device: str) -> tuple[str, torch.device, torch.dtype]:
    if not isinstance(path, str):
        path, dtype, device = path.path, path.dtype, path.device
    dev = resolve_device(device)
    return path, dev, resolve_dtype(dtype, dev)


def read_weights_ahead(path: str | ModelSpec, *, dtype: str = "auto", device: str = "auto") -> PendingWeights | None:
    """Start reading the weights ``load_model`` with the same arguments will use, on a background
    thread, and return at once (None for 'tiny', which has no file). The copies run outside the GIL,
    so the caller can meanwhile import transformers and build the model: ``tlvr infer`` hides most
    of a load behind that import this way."""
    path, dev, dt = _target(path, dtype, device)
    if path == "tiny":
        return None
    return PendingWeights(resolve_checkpoint(path), dev, dt)


@contextmanager
def parameters_on_meta():
    """Inside, every parameter a module registers lands on the meta device: no memory, and the
    random initialization of the weights is skipped. Buffers (rotary tables, position ids) are built
    as usual. For models whose weights are all assigned afterwards (``load_model``)."""
    def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None):
        if param is not None and param.device.type != "meta":
            return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def checked_state(model, sd: dict[str, torch.Tensor], where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``sd`` checked key for key and shape for shape against ``model`` (sharded models too: a
    DTensor reports its whole shape), ``lm_head`` dropped when tied (it is the embedding) and
    filled from the embedding when untied and missing; a one-line error naming ``where`` otherwise."""
    sd = dict(sd)
    tied = model.config.text_config.tie_word_embeddings
    if tied:
        sd.pop(LM_HEAD, None)
    elif LM_HEAD not in sd and EMBED in sd:
        sd[LM_HEAD] = sd[EMBED].clone()  # its own parameter: loading may assign tensors instead of copying
    expected = set(model.state_dict())
    if tied:
        expected.discard(LM_HEAD)
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise TlvrError(f"{where}: weights do not match the architecture in config.json: "
                        f"{len(missing)} missing (e.g. {missing[:3]}), "
                        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    own = model.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise TlvrError(f"{where}: {k} has shape {tuple(v.shape)}, the config expects {tuple(own[k].shape)}")
    return sd


def load_weights(model, sd: dict[str, torch.Tensor], where: str | os.PathLike, *, assign: bool = False) -> None:
    """Copy the state dict ``sd`` into ``model`` after ``checked_state``'s key and shape check (ties ``lm_head``);
    ``assign``: the model's parameters become ``sd``'s tensors instead (for a model built on meta)."""
    model.load_state_dict(checked_state(model, sd, where), strict=False, assign=assign)
    if model.config.text_config.tie_word_embeddings:
        model.language_model.tie_weights()


def load_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that config.json's model_type is not a tokenizer's
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:
        raise TlvrError(f"{ckpt}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(level)
    if tok.pad_token is None:
        tok.pad_token = EOS
    tok.unk_token = tok.pad_token  # as the reference
    tok.padding_side = "right"
    return tok


def load_model(path: str | ModelSpec, *, dtype: str = "auto", device: str = "auto", attn_implementation: str = "sdpa",
               weights: PendingWeights | None = None):
    """A TinyLLaVA model with its tokenizer, from a checkpoint path or a model config (``cfg.model``,
    whose dtype/device/attention then apply); ``path`` 'tiny' gives the embedded random-init tiny model.
    ``weights``: what ``read_weights_ahead`` started for the same arguments; without it the read starts
    here, on a thread, while the tokenizer loads and the model is built (its parameters on the meta
    device, then the weights read assigned: no random initialization, no second copy)."""
    from transformers.initialization import no_init_weights

    from .config import TinyLlavaConfig
    from .tinyllava import TinyLlava

    if not isinstance(path, str):
        attn_implementation = path.attn_implementation
    path, dev, dt = _target(path, dtype, device)
    attn = _check_attn(attn_implementation, dev)
    if path == "tiny":
        from .tiny import build_tiny_model

        return build_tiny_model().to(device=dev, dtype=dt)
    ckpt = resolve_checkpoint(path)
    if weights is None:
        weights = PendingWeights(ckpt, dev, dt)
    elif (weights.ckpt, weights.device, weights.dtype) != (ckpt, dev, dt):
        raise ValueError(f"weights were read for {weights.ckpt} on {weights.device} in {weights.dtype}, "
                         f"not for {ckpt} on {dev} in {dt}")
    config = TinyLlavaConfig.from_json_file(ckpt / "config.json")
    tok = load_tokenizer(ckpt)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # buffers built in the target dtype, as the weights are read
    try:
        # no initialization at all: on meta tensors it still runs torch's Python reference kernels, 0.3 s
        # of the 3.6 B model's construction on CPU and 0.9 s on the H200 host
        with torch.device(dev), parameters_on_meta(), no_init_weights():
            model = TinyLlava(config, tok, attn_implementation=attn)
    finally:
        torch.set_default_dtype(default)
    load_weights(model, weights.take(), ckpt, assign=True)
    model.generation_settings = read_generation_settings(ckpt)
    return model.to(dtype=dt)  # buffers too (e.g. the rotary table), as before


def frame_size(path: str) -> int:
    """The side, in pixels, of the frames the vision tower of checkpoint ``path`` ('tiny': the embedded
    model) takes, read from its config alone: frames can be decoded while the weights load."""
    if path == "tiny":
        from .tiny import tiny_config

        return tiny_config(1).vision_config.image_size
    config = resolve_checkpoint(path) / "config.json"
    try:  # the saved field itself, without importing transformers' config classes
        size = json.loads(config.read_text()).get("vision_config", {}).get("image_size")
    except (OSError, ValueError, AttributeError):
        size = None
    if isinstance(size, int):
        return size
    from .config import TinyLlavaConfig

    return TinyLlavaConfig.from_json_file(config).vision_config.image_size


def _check_attn(name: str, device: torch.device) -> str:
    if name not in ("sdpa", "eager", "flash_attention_2"):
        raise TlvrError(f"model.attn_implementation={name!r}: expected sdpa, eager or flash_attention_2")
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise TlvrError("model.attn_implementation=flash_attention_2 needs `pip install 'tlvr[flash]'` "
                            "(or use sdpa)") from None
        if device.type != "cuda":
            raise TlvrError("flash_attention_2 needs a CUDA device (use sdpa on CPU)")
    return name


def model_state(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict (``model``'s, or ``state``) as released: contiguous tensors, ``lm_head`` dropped when tied."""
    sd = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.text_config.tie_word_embeddings:
        sd.pop(LM_HEAD, None)
    return sd


def generation_from_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> dict[str, Any]:
    """Sampling settings (tlvr's convention: temperature 0 decodes greedily) in GenerationConfig names."""
    if temperature == 0:
        return {"do_sample": False, "max_new_tokens": max_new_tokens}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "max_new_tokens": max_new_tokens}


def read_generation_settings(ckpt: Path) -> dict[str, Any]:
    """The sampling settings recorded in ``ckpt``'s generation_config.json (none in the released ones)."""
    path = ckpt / GENERATION
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TlvrError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
    return {k: v for k, v in data.items() if k in GENERATION_KEYS}


def generation_config(model, generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """generation_config.json: bos/eos/use_cache as released, plus the sampling settings of
    ``generation`` (or those ``model`` was loaded with)."""
    settings = dict(model.generation_settings if generation is None else generation)
    for k, v in settings.items():
        kind = GENERATION_KEYS.get(k)
        if kind is None:
            raise TlvrError(f"generation setting {k!r} is not recorded; expected some of {sorted(GENERATION_KEYS)}")
        numbers = (int, float) if kind is float else (kind,)
        if not isinstance(v, numbers) or isinstance(v, bool) != (kind is bool):
            raise TlvrError(f"generation setting {k}={v!r}: expected a {kind.__name__}")
    eos = model.config.text_config.eos_token_id
    # as the reference's files: bos is eos (Qwen2.5-base has no bos), use_cache false
    return dict(sorted({"bos_token_id": eos, "eos_token_id": eos, "use_cache": False, **settings}.items()))


def save_model(model, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
               state: dict[str, torch.Tensor] | None = None, generation: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in the released layout, atomically (a ``.tmp`` sibling renamed into place);
    ``state`` replaces the model's own state dict (e.g. one gathered from sharded parameters);
    ``generation`` records sampling settings in generation_config.json (see ``generation_config``)."""
    gen = generation_config(model, generation)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sd = model_state(model, state)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: v.cpu() for k, v in sd.items()}
    _write_weights(sd, tmp)
    saved_dtype = str(next(iter(sd.values())).dtype).replace("torch.", "")
    # use_cache as the reference's save
    config = dataclasses.replace(model.config, use_cache=True, torch_dtype=saved_dtype)
    (tmp / "config.json").write_text(config.to_json_string())
    (tmp / GENERATION).write_text(json.dumps(gen, indent=2) + "\n")
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, tmp)
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def _write_weights(sd: dict[str, torch.Tensor], out: Path) -> None:
    total = sum(v.numel() * v.element_size() for v in sd.values())
    if total <= SHARD_BYTES:
        save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
