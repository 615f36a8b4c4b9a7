"""The benchmark registry: each module reads one benchmark's on-disk layout into ``EvalItem``s and
says how its headline number aggregates (``micro``: item mean; ``macro``: mean of task means)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import TlvrError
from ...files import resolve_root
from ...jobs import EvalConfig
from ..items import EvalItem
from . import mlvu, mmvu, mvbench, synthetic, videomme


@dataclass(frozen=True)
class Benchmark:
    """A benchmark reader and its scoring rule."""

    name: str
    load_items: Callable  # (data_dir: Path, cfg: EvalConfig) -> list[EvalItem]
    aggregate: str  # "micro" | "macro": how the headline combines items (spec §6)
    headline_label: str  # what the headline number is, for the report


BENCHMARKS: dict[str, Benchmark] = {
    "videomme": Benchmark("videomme", videomme.load_items, videomme.AGGREGATE, "Video-MME (wo sub), item mean"),
    "mvbench": Benchmark("mvbench", mvbench.load_items, mvbench.AGGREGATE, "MVBench Avg, item mean over 20 tasks"),
    "mlvu": Benchmark("mlvu", mlvu.load_items, mlvu.AGGREGATE, "MLVU M-Avg, mean of the 7 task accuracies"),
    "mmvu": Benchmark("mmvu", mmvu.load_items, mmvu.AGGREGATE, "MMVU (mc), item mean"),
    "synthetic": Benchmark("synthetic", synthetic.load_items, synthetic.AGGREGATE, "synthetic split, item mean"),
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise TlvrError(f"unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})") from None


def load_eval_items(cfg: EvalConfig) -> list[EvalItem]:
    """The benchmark's items in its order (the first ``cfg.limit`` when set); a one-line error when its data
    is missing or holds none. Imports nothing heavy: ``tlvr eval`` checks its data with it before torch."""
    data_dir = resolve_root(cfg.data_dir, cfg.benchmark)
    items = get_benchmark(cfg.benchmark).load_items(data_dir, cfg)
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise TlvrError(f"{cfg.benchmark}: no items found under {data_dir}")
    return items


__all__ = ["BENCHMARKS", "Benchmark", "get_benchmark", "load_eval_items"]
