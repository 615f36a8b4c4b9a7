"""``TinyLlavaConfig``: the released ``config.json`` (spec §1.6), read and written without the hub.

The reference builds its text and vision sub-configs by downloading the named base models and
overlaying the saved dicts. Here the sub-configs come from the embedded ``text_config`` /
``vision_config`` alone; vision fields the file leaves out fall back to SigLIP-so400m-patch14-384.

Files are written in the released (transformers 4.x) form, which the reference's pin (4.49) reads:
``Qwen2Config.from_dict`` there takes ``rope_theta`` / ``rope_scaling`` and silently ignores
transformers 5's ``rope_parameters``, so a file with only the latter runs at rope base 10000.
The 5.x keys are kept alongside (4.x stores unknown keys as inert attributes). Reading accepts both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import Qwen2Config, SiglipVisionConfig

from ..data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..errors import TlvrError

# google/siglip-so400m-patch14-384 vision config (spec §1.1)
SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}

# keys of a saved sub-config that are bookkeeping, not architecture
_DROP = {"transformers_version", "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype"}


@dataclass
class TinyLlavaConfig:
    """Architecture and tokenizer settings of a TinyLLaVA-Video checkpoint (``model_type`` tinyllava)."""

    llm_model_name_or_path: str = ""
    tokenizer_name_or_path: str | None = None
    vision_model_name_or_path: str = ""
    vision_model_name_or_path2: str = ""
    connector_type: str = "groupresampler"
    hidden_size: int = 2048
    vocab_size: int = 32000
    pad_token: str | None = None
    pad_token_id: int | None = None
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int = 2048
    tokenizer_use_fast: bool = False
    vision_hidden_size: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "patch"
    image_aspect_ratio: str = "square"
    resampler_hidden_size: int | None = None
    num_queries: int = 512
    num_resampler_layers: int = 3
    group: int = 16
    # hard-coded in the reference's PerceiverResampler; named here so small models can change them
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    use_cache: bool = False
    cache_dir: str | None = None
    # the reference's training-recipe bookkeeping: no effect on the model, kept so the file is complete
    tune_type_llm: str = "frozen"
    tune_type_connector: str = "frozen"
    tune_type_vision_tower: str = "frozen"
    tune_vision_tower_from_layer: int = -1
    torch_dtype: str | None = None
    text_config: Qwen2Config = field(default_factory=Qwen2Config)
    vision_config: SiglipVisionConfig = field(default_factory=lambda: SiglipVisionConfig(**SIGLIP_SO400M))
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, written back unchanged

    # the reference ignores the values passed for these and always stores -100 / -200
    ignore_index: int = field(default=IGNORE_INDEX, init=False)
    image_token_index: int = field(default=IMAGE_TOKEN_INDEX, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.text_config, dict):
            self.text_config = text_config_from_dict(self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = vision_config_from_dict(self.vision_config)
        self.tokenizer_name_or_path = self.tokenizer_name_or_path or self.llm_model_name_or_path  # as the reference
        # as the reference: widths come from the sub-configs, not from the top-level keys
        self.hidden_size = self.text_config.hidden_size
        self.vocab_size = self.text_config.vocab_size
        self.vision_hidden_size = self.vision_config.hidden_size
        if self.vision_feature_select_strategy not in ("patch", "cls_patch"):
            raise TlvrError(f"vision_feature_select_strategy must be 'patch' or 'cls_patch', "
                            f"not {self.vision_feature_select_strategy!r}")
        if "groupresampler" not in (self.connector_type or ""):
            raise TlvrError(f"connector_type {self.connector_type!r} is not supported (only 'groupresampler', "
                            "as every released checkpoint)")
        if self.num_queries % self.group:
            raise TlvrError(f"num_queries={self.num_queries} must be a multiple of group={self.group}")

    @property
    def tokens_per_frame(self) -> int:
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return patches - 1 if self.vision_feature_select_strategy == "patch" else patches

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyLlavaConfig:
        data = dict(data)
        if data.get("model_type", "tinyllava") != "tinyllava":
            raise TlvrError(f"config model_type is {data['model_type']!r}, expected 'tinyllava'")
        known = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in data.items() if k in known and k != "extra"}
        extra = {k: v for k, v in data.items()
                 if k not in known and k not in ("model_type", "ignore_index", "image_token_index")}
        if kwargs.get("text_config") is None:
            raise TlvrError("config.json has no text_config: cannot build the language model offline")
        kwargs.setdefault("vision_config", {})
        if kwargs["vision_config"] is None:
            kwargs["vision_config"] = {}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> TinyLlavaConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TlvrError(f"{path}: not found") from None
        except json.JSONDecodeError as e:
            raise TlvrError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"]}
        for f in fields(self):
            if f.name in ("text_config", "vision_config", "extra"):
                continue
            out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        out["text_config"] = text_config_to_dict(self.text_config, self.torch_dtype)
        vision = _sub_dict(self.vision_config, "siglip_vision_model", self.torch_dtype)
        # the reference always sets these from the top-level names (``_load_vision_config``)
        vision["model_name_or_path"] = self.vision_model_name_or_path.split(":")[-1]
        vision["model_name_or_path2"] = self.vision_model_name_or_path2.split(":")[-1]
        out["vision_config"] = dict(sorted(vision.items()))
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _sub_dict(cfg, model_type: str, torch_dtype: str | None) -> dict[str, Any]:
    d = cfg.to_dict()
    d.pop("transformers_version", None)
    d["model_type"] = model_type
    d["torch_dtype"] = d["dtype"] = torch_dtype  # 4.x name and 5.x name
    return d


def text_config_to_dict(cfg: Qwen2Config, torch_dtype: str | None = None) -> dict[str, Any]:
    """The Qwen2 sub-config under the names transformers 4.49 reads, plus the 5.x ``rope_parameters``."""
    d = _sub_dict(cfg, "qwen2", torch_dtype)
    rope = dict(d.get("rope_parameters") or {})
    if "rope_theta" not in rope:
        raise TlvrError(f"text_config.rope_parameters {rope} has no rope_theta: cannot write the released form")
    d["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    d["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    # 4.49 masks attention beyond ``sliding_window`` whenever it is set, even with
    # use_sliding_window false (its default is 4096), so the unused window is written as null
    d["sliding_window"] = cfg.sliding_window if cfg.use_sliding_window else None
    return dict(sorted(d.items()))


def text_config_from_dict(d: dict[str, Any]) -> Qwen2Config:
    """A ``Qwen2Config`` from a released 4.x dict (``rope_theta``/``rope_scaling``), a 5.x one
    (``rope_parameters``) or one holding both, which must then agree."""
    d = {k: v for k, v in d.items() if k not in _DROP}
    params = d.get("rope_parameters")
    if isinstance(params, dict):
        theta, scaling = d.pop("rope_theta", None), d.pop("rope_scaling", None) or {}
        if theta is not None and "rope_theta" in params and float(theta) != float(params["rope_theta"]):
            raise TlvrError(f"config.json text_config: rope_theta {theta} disagrees with "
                            f"rope_parameters.rope_theta {params['rope_theta']}")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != params.get("rope_type", params.get("type", "default")):
            raise TlvrError(f"config.json text_config: rope_scaling type {kind!r} disagrees with "
                            f"rope_parameters {params}")
    return Qwen2Config(**d)


def vision_config_from_dict(d: dict[str, Any]) -> SiglipVisionConfig:
    d = {k: v for k, v in d.items() if k not in _DROP}
    # the reference stores the hub names on the vision config; they are not architecture
    names = {k: d.pop(k) for k in ("model_name_or_path", "model_name_or_path2") if k in d}
    cfg = SiglipVisionConfig(**{**SIGLIP_SO400M, **d})
    for k, v in names.items():
        setattr(cfg, k, v)
    return cfg
