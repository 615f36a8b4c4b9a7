"""tlvr: TinyLLaVA-Video-R1 re-implemented — cold start, GRPO, evaluation and inference."""

__version__ = "0.1.0"
