"""The typed config of every job, and of the sections they share. Each field's default is the
reference value (spec section cited); ``tlvr presets show NAME`` prints them with their help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import option
from .data.reflection import DEFAULT_REFLECTION_PHRASES
from .data.template import GRPO_QUESTION_TEMPLATE
from .errors import TlvrError

R1_MODEL = "Zhang199/TinyLLaVA-Video-R1"
COLDSTART_MODEL = "Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16"
BASE_MODEL = "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512"


# ----------------------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    """Which checkpoint to load and how."""

    path: str = option(R1_MODEL, "Checkpoint directory, hub id (local HF cache only) or 'tiny' for the embedded "
                       "tiny model.")
    dtype: str = option("auto", "float32 | bfloat16 | float16 | auto (bf16 on GPU, fp32 on CPU).")
    device: str = option("auto", "cuda | cpu | cuda:N | auto (cuda when available).")
    attn_implementation: str = option("sdpa", "LLM attention kernel: sdpa | flash_attention_2 | eager.")


@dataclass
class SamplingConfig:
    """Decoding parameters; temperature 0 means greedy."""

    temperature: float = option(1.0, "Sampling temperature; 0 decodes greedily.", ge=0)
    top_k: int = option(50, "Keep the k most likely tokens (0 disables); 50 is the transformers default the reference "
                        "ran with.", ge=0)
    top_p: float = option(1.0, "Nucleus sampling mass (1.0 disables).", gt=0, le=1)
    max_new_tokens: int = option(512, "Most tokens generated per completion.", ge=1)


@dataclass
class VideoConfig:
    """How frames are taken from a video."""

    num_frames: int = option(16, "Frames sampled per video (16 everywhere in the reference); used while fps is 0.",
                             ge=1)
    fps: float = option(0.0, "Frame-rate mode when > 0: sample fps frames per second of video instead of num_frames, "
                        "at most max_frames (the reference's '1 fps' option, num_frame -1 with max_frame, is fps 1.0; "
                        "spec §2.A). Frame paths A and B only: MVBench's midpoint and frame-folder readers and a "
                        "bounded span keep num_frames. 0: num_frames.", ge=0)
    max_frames: int = option(0, "Cap on the frame-rate mode's frames (the reference's max_frame: 16 in its eval "
                             "scripts; 0: no cap, as its cold-start data set).", ge=0)
    backend: str = option("auto", "Decoder: auto (decord, PyAV fallback) | decord | pyav.")

    def frame_args(self, spec=None) -> dict:
        """The frame-count keywords of ``read_frames`` / ``read_video``: ``{"num_frames": n}``, or in the
        frame-rate mode ``{"fps": f, "max_frames": cap}``; a frame ``spec`` whose path samples a fixed
        count (midpoints, frame folders, a bounded uniform span) keeps ``num_frames``."""
        if self.max_frames and not self.fps:
            raise TlvrError(f"video.max_frames={self.max_frames} caps the frame-rate mode: set video.fps > 0, "
                            "or leave max_frames at 0")
        rate_path = spec is None or spec.kind == "pts_seek" or (spec.kind == "uniform" and spec.bound is None)
        if self.fps > 0 and rate_path:
            return {"fps": self.fps, "max_frames": self.max_frames or None}
        return {"num_frames": self.num_frames}


@dataclass
class EngineConfig:
    """The generation engine (shared by GRPO rollouts, evaluation and inference)."""

    max_batch: int = option(64, "Rows the engine decodes at once; 0 sizes it from the free GPU memory and the KV cache "
                            "of a row (at most 256; 8 on CPU).", ge=0)
    cuda_graphs: bool = option(True, "Capture the engine's decode step in CUDA graphs (GPU only).")
    compile: bool = option(True, "GPU only: torch.compile the engine's decoder layer (fused norms, rotary, cache "
                           "writes); the first run spends ~20-40 s compiling, later runs load the kernels from "
                           "$TLVR_COMPILE_CACHE.")
    fused_weights: bool = option(True, "GPU only: decode from concatenated q|k|v and gate|up weights (the model's "
                                 "own parameters moved into one buffer per part: no extra memory); off: three "
                                 "GEMMs more per layer and step.")
    split_kv_attention: bool = option(True, "GPU only, with cuda_graphs: decode attention in tlvr's split-KV Triton "
                                      "kernels (each row's keys in ranges across the SMs, merged exactly); off: "
                                      "PyTorch's SDPA.")
    triton_gemm: bool = option(True, "GPU only, with compile and cuda_graphs, steps of at most 64 rows: the "
                               "GEMMs but the LM head's in tlvr's Triton kernels (q|k|v, o_proj and down_proj "
                               "split along the reduced dim, their float32 partials summed in the compiled "
                               "kernels that read them; gate|up and its SiLU in one kernel; on an H200 3.59 -> "
                               "3.25 ms per rollout step at 64 rows); off: cuBLAS.")
    cascade: bool = option(True, "GRPO rollouts: a prompt's G completions decode in one block of slots that holds "
                           "its keys/values once (cascade attention: the prompt read once per group per step, not "
                           "once per row; on an H200 3.60 against 3.77 ms per step at 8 prompts x G 8); off: each "
                           "row decodes with its own copy of the prompt. Evaluation and inference decode one row "
                           "per prompt either way.")

    def engine_kwargs(self) -> dict:
        """These keys as ``Engine``'s keyword arguments (one mapping for every job that builds an engine)."""
        return dict(max_batch=self.max_batch, cuda_graphs=self.cuda_graphs, compile=self.compile,
                    fuse_weights=self.fused_weights, split_kv=self.split_kv_attention, triton_gemm=self.triton_gemm,
                    cascade=self.cascade)


# ----------------------------------------------------------------------------- training sections


@dataclass
class OutputConfig:
    """Where a training run writes and how often."""

    run_dir: str = option("runs/run", "Run directory: resolved config, metrics JSONL, checkpoints, plots.")
    log_every: int = option(1, "Log metrics every N optimizer steps.", ge=1)
    save_every: int = option(0, "Save a checkpoint every N optimizer steps (0: only at the end).", ge=0)
    keep_last: int = option(2, "Keep the last K step checkpoints (the final one is always kept).", ge=0)
    trackers: list[Literal["tensorboard", "wandb", "trackio"]] = option(
        [], "Experiment trackers that also get the metrics, the config, sample tables and the curves: any of "
        "tensorboard, wandb, trackio (each an extra: pip install 'tlvr[wandb]'); offline without credentials.")
    tracker_project: str = option("tlvr", "Project of the wandb / trackio runs.")
    tracker_run_name: str = option("", "Run name in wandb / trackio ('' = the run directory's name).")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = option(1e-5, "Peak learning rate.", gt=0)
    scheduler: Literal["constant", "cosine", "linear"] = option("constant", "Schedule after warmup.")
    warmup_ratio: float = option(0.0, "Fraction of steps with linear warmup (ceil, as HF).", ge=0, le=1)
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to norms and biases).", ge=0)
    betas: list[float] = option([0.9, 0.999], "AdamW betas.", ge=0, lt=1)
    eps: float = option(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0 disables).", ge=0)
    epochs: int = option(1, "Passes over the data.", ge=1)
    max_steps: int = option(0, "Stop after this many optimizer steps (0: the full epochs).", ge=0)
    gradient_checkpointing: bool = option(True, "Recompute LLM activations in backward to save memory.")
    uncheckpointed_layers: int = option(
        0, "With gradient_checkpointing: the last N decoder layers keep their activations instead (no recompute): "
        "a faster backward for N layers' activations of a micro-batch more memory.", ge=0)
    uncheckpointed_tokens: int = option(
        0, "With gradient_checkpointing, in the flat log-prob layout (perf.shared_prompt / perf.packing): a "
        "micro-batch of T tokens keeps the activations of its last max(uncheckpointed_layers, N // T) decoder "
        "layers, N this value: the memory of N layer-tokens of activations whatever the completions' lengths, "
        "so a micro-batch of short completions recomputes fewer layers (0: uncheckpointed_layers alone).", ge=0)
    kind: Literal["adamw", "adamw8bit"] = option(
        "adamw", "adamw: fp32 moments (torch's AdamW, as the reference); adamw8bit: both moments stored in 8 bits, "
        "block-wise quantised (2 instead of 8 bytes per trained parameter; each step dequantises, updates, "
        "requantises).")
    master_weights: Literal["fp32", "kahan", "stochastic"] = option(
        "fp32", "bf16/fp16 parameters only: fp32 keeps fp32 master copies (4 bytes per trained parameter, as the "
        "reference's DeepSpeed bf16); kahan updates the bf16 weights in place with a bf16 compensation buffer holding "
        "each rounding error (2 bytes); stochastic rounds each updated weight up or down at random, unbiased "
        "(0 bytes).")


QWEN2_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraTuneConfig:
    """LoRA adapters on the LLM (peft; `pip install 'tlvr[lora]'`): the LLM's weights stay frozen, each targeted
    projection W is trained as W + alpha/rank * B A."""

    enabled: bool = option(False, "Train LoRA adapters instead of the whole LLM (tune.llm is then ignored).")
    rank: int = option(16, "Adapter rank r (RL needs little capacity: ranks 1-32 match full fine-tuning, Schulman et "
                       "al. 2025, 'LoRA Without Regret').", ge=1)
    alpha: float = option(32.0, "Scale numerator: adapters add alpha/rank * B A (alpha fixed, so the best learning "
                          "rate barely moves with the rank).", gt=0)
    dropout: float = option(0.0, "Dropout on the adapters' input (peft's lora_dropout).", ge=0, lt=1)
    target_modules: list[str] = option(QWEN2_LINEAR, "Projection names adapted in every decoder layer (default: all "
                                       "attention and MLP projections of Qwen2.5).")
    connector_lr: float = option(0.0, "Peak learning rate of the parts trained fully beside the adapters (the "
                                 "connector); 0: optim.lr.", ge=0)


@dataclass
class TuneConfig:
    """Which parts are trained (spec §4: vision tower frozen, connector and LLM trained)."""

    llm: bool = option(True, "Train the whole LLM (embeddings and tied lm_head included).")
    connector: bool = option(True, "Train the group-resampler connector.")
    vision_tower: bool = option(False, "Train the SigLIP tower (frozen in every reference stage).")
    lora: LoraTuneConfig = option(LoraTuneConfig(), "LoRA adapters on the LLM instead of training all its weights.")


@dataclass
class DistConfig:
    """Multi-process training (torchrun / accelerate launch)."""

    strategy: Literal["auto", "ddp", "fsdp2", "none"] = option(
        "auto", "auto/ddp: DistributedDataParallel replicas when launched with several processes; fsdp2: fully_shard "
        "(FSDP2) parameters, gradients and optimizer state over the processes (fp32 shards, compute in model.dtype; "
        "also with one process); none: no gradient sync (debugging). Resume with the strategy a run was started with, "
        "at any number of processes.")
    backend: str = option("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo.")
    timeout_minutes: float = option(30.0, "How long a collective waits for the slowest process (a long video, a "
                                    "checkpoint being written) before the run fails instead of hanging.", gt=0)


@dataclass
class GRPODistConfig(DistConfig):
    """Multi-process GRPO: how the model is spread for training, and how the rollouts are."""

    rollout_parallel: Literal["data", "tensor"] = option(
        "data", "data: each process decodes its own prompts with the whole model; tensor: the N processes of a "
        "group (dist.rollout_tensor_size) each decode all of the group's prompts with 1/N of the weights (heads and "
        "MLP columns), reading 1/N of the weights per token where decoding is memory-bound; the engine decodes up "
        "to engine.max_batch x N rows at once (each process caches 1/N of a row). data stays the default until "
        "tensor is measured faster on GPUs. Training is data-parallel (dist.strategy) either way.")
    rollout_tensor_size: int = option(
        0, "With rollout_parallel=tensor: processes per tensor-parallel group, consecutive ranks of one host (0: all "
        "of a host's). The attention heads, KV heads and MLP width must divide by it: at most 2 for Qwen2.5-3B, "
        "whose 2 KV heads do not split further.", ge=0)


# ----------------------------------------------------------------------------- cold start


@dataclass
class ColdstartDataConfig:
    root: str = option("", "Data root holding the annotations and videos ('' = $TLVR_DATA/train).")
    annotations: str = option("nextqa-coldstart-16.json", "LLaVA-style JSON list, relative to root (spec §4).")
    max_length: int = option(3072, "Truncate spliced sequences to this many tokens (with a warning).", ge=2)
    num_workers: int = option(2, "DataLoader worker processes decoding videos.", ge=0)
    skip_report: str = option("", "A `tlvr data check` report; its bad videos are skipped up front.")


@dataclass
class ColdstartConfig:
    """Supervised cold start (spec §3.2, §4)."""

    JOB = "coldstart"
    model: ModelConfig = option(ModelConfig(path=BASE_MODEL, dtype="bfloat16"), "Start checkpoint.")
    data: ColdstartDataConfig = option(ColdstartDataConfig(), "Training data.")
    video: VideoConfig = option(VideoConfig(), "Frame sampling.")
    optim: OptimConfig = option(OptimConfig(), "Optimizer (spec §4: AdamW 1e-5 constant, clip 1.0).")
    tune: TuneConfig = option(TuneConfig(), "Trainable parts.")
    batch_size: int = option(1, "Samples per micro-batch, per process.", ge=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step, per process (leave at 1 with global_batch_size).",
                             ge=1)
    global_batch_size: int = option(0, "Samples per optimizer step over all processes: grad_accum becomes "
                                    "global_batch_size / (batch_size x processes), which must divide; 0: batch_size "
                                    "x grad_accum x processes (spec §4: 4 GPUs x 1 = 4).", ge=0)
    seed: int = option(42, "Seed for data order, init and dropout (HF default 42).", ge=0)
    output: OutputConfig = option(OutputConfig(run_dir="runs/coldstart"), "Outputs.")
    dist: DistConfig = option(DistConfig(), "Distributed settings.")


# ----------------------------------------------------------------------------- GRPO


@dataclass
class RewardSpec:
    """One reward function and its weight (used by reward_combination 'weighted')."""

    function: str = option("tlvr_cli.train.rewards:accuracy_reward",
                           "'module:function' returning one float per completion.")
    weight: float = option(1.0, "Weight (scale) of this reward in the weighted sum, e.g. 0.5 to halve a format bonus.")


@dataclass
class GRPOAlgoConfig:
    """The GRPO objective (spec §5.2); every reference quirk is a key with the reference default."""

    num_generations: int = option(8, "Completions per prompt, G (hard-coded 8 in the reference).", ge=2)
    beta: float = option(0.01, "KL coefficient; 0 skips the reference model entirely.", ge=0)
    kl_estimator: Literal["k3", "k1", "k2"] = option("k3", "KL estimator (k3 = exp(d) - d - 1, as TRL 0.14).")
    kl_clamp: float = option(100.0, "Clamp the per-token KL to [-c, c] (reference: 100; 0 disables).", ge=0)
    reward_combination: Literal["r1", "weighted"] = option("r1", "r1: acc + (2acc-1)*fmt; weighted: sum of "
                                                           "weight*reward over `rewards`.")
    zero_reward_value: float | None = option(-2.0, "Replace a combined reward of exactly 0 by this (null disables).")
    rewards: list[RewardSpec] = option(
        [RewardSpec("tlvr_cli.train.rewards:accuracy_reward", 1.0),
         RewardSpec("tlvr_cli.train.rewards:format_reward", 1.0)],
        "Reward functions: r1 uses the first as accuracy and the second as format; weighted sums them all.",
    )
    scale_rewards: bool = option(True, "Divide advantages by the group's unbiased std (+ std_eps).")
    std_eps: float = option(1e-4, "Added to the std before dividing.", gt=0)
    advantage_noise_std: float = option(0.02, "Std of the Gaussian noise added to each advantage (0 disables).", ge=0)
    loss_aggregation: Literal["sequence_mean", "token_mean", "dr_grpo"] = option(
        "sequence_mean", "sequence_mean: token mean per sequence, then mean; token_mean: over all tokens; dr_grpo: "
        "sum / (G * max_new_tokens)."
    )
    num_iterations: int = option(1, "Optimizer passes per rollout batch (>1 makes the updates off-policy: the clipped "
                                 "ratio applies).", ge=1)
    mini_batches: int = option(1, "Optimizer steps per pass: the step's groups split into this many mini-batches, one "
                               "update each (GSPO: 4); >1 also makes the updates off-policy.", ge=1)
    clip_eps_low: float = option(0.2, "Lower clip range of the ratio, 1 - eps (PPO/TRL 0.2; binds only off-policy).",
                                 gt=0, lt=1)
    clip_eps_high: float = option(0.2, "Upper clip range of the ratio, 1 + eps (DAPO clip-higher: 0.28).", gt=0)
    importance_level: Literal["token", "sequence"] = option(
        "token", "token: a ratio per token (PPO/GRPO); sequence: GSPO's length-normalised sequence ratio, clipped per "
        "sequence.")
    mask_truncated: bool = option(False, "Completions cut at rollout.max_new_tokens (no eos) get no loss (DAPO's "
                                  "overlong filtering); their rewards still count in the group statistics.")
    overlong_buffer: int = option(0, "DAPO soft overlong penalty: the last N tokens before rollout.max_new_tokens, "
                                  "over which a penalty falls linearly from 0 to -overlong_penalty, added to the "
                                  "reward and logged as rewards/overlong_penalty (0: off).", ge=0)
    overlong_penalty: float = option(1.0, "The soft overlong penalty at max_new_tokens (DAPO: 1.0).", ge=0)
    dynamic_sampling: bool = option(False, "DAPO dynamic sampling: drop groups whose dynamic_sampling_metric is the "
                                    "same for every completion (zero advantage) and draw further prompts until the "
                                    "step has data.prompts_per_step informative groups or data.max_draws is reached.")
    dynamic_sampling_metric: str = option("reward", "What dynamic sampling compares: 'reward' (the combined reward) or "
                                          "a reward function's name, e.g. accuracy_reward (DAPO's 'acc').")


@dataclass
class GRPODataConfig:
    root: str = option("", "Data root ('' = $TLVR_DATA/train).")
    annotations: str = option("nextqa_0-30s.jsonl", "GRPO rows (problem, solution, video_filename), relative to root "
                              "(spec §5.1).")
    question_template: str = option(GRPO_QUESTION_TEMPLATE, "Prompt text; {Question} is the row's problem (spec §3.3).")
    prompts_per_step: int = option(8, "Prompts per optimizer step, global (reference: 8 GPUs x 1).", ge=1)
    max_draws: int = option(10, "Most prompt draws per step (the first included): further draws replace prompts "
                            "whose video failed and, with algo.dynamic_sampling, filtered groups (verl's "
                            "max_num_gen_batches 10). A step short of groups at the cap trains on those it has.", ge=1)
    max_skip_fraction: float = option(0.1, "Stop the run when the prompts whose video failed pass this fraction of "
                                      "the data set (of the prompts drawn, once more were drawn).", ge=0, le=1)
    num_workers: int = option(2, "Worker threads decoding the next step's videos.", ge=0)
    feature_cache_gb: float = option(0.0, "Keep the frozen tower's features of up to this many GB of videos in CPU "
                                     "memory, reused when a video comes again (0: off, the reference's cost model).",
                                     ge=0)
    skip_report: str = option("", "A `tlvr data check` report; its bad videos are skipped up front.")


@dataclass
class ReflectionConfig:
    """Reflection ("aha moment") markers counted in the <think> text of every completion."""

    phrases: list[str] = option(list(DEFAULT_REFLECTION_PHRASES), "Marker phrases, matched case-insensitively and "
                                "word-bounded (a phrase ending in '-' matches any continuation).")


@dataclass
class GRPOPerfConfig:
    """Memory/speed knobs of the training forward that do not change the maths."""

    micro_batch_size: int = option(16, "Sequences per forward/backward chunk of the loss.", ge=1)
    frozen_micro_batch_size: int = option(
        0, "Sequences per forward of the log-prob passes without gradients (reference, and the rollout policy's "
        "for off-policy updates), which keep no activations, so larger ones cost little memory and fewer, "
        "fuller passes (0: micro_batch_size).", ge=0)
    logprob_chunk_size: int = option(4096, "Vocabulary rows per chunk when computing log-probs (never full logits).",
                                     ge=1)
    force_max_new_tokens: bool = option(False, "Benchmarking only: ignore eos so every completion is max_new_tokens "
                                        "long.")
    shared_prompt: bool = option(
        True, "Compute each group's prompt (text + visual tokens) once per micro-batch; its completions attend to "
        "its keys/values and their gradients sum into it: the loss and gradients of one prompt copy per completion "
        "up to fp rounding, without G-1 of the G copies' work. false: the reference's one padded row per completion "
        "(micro-batches then sort all completions by length instead of keeping groups whole). Off under fsdp2.")
    packing: bool = option(
        True, "Run the completions without padding (a varlen flash kernel on CUDA, see varlen_attention; else SDPA "
        "with padding inside attention only; the LM head sees real tokens only): numerics-neutral up to fp rounding. "
        "Off under dist.strategy=fsdp2, whose sharded layers only run through their own forward.")
    varlen_attention: bool = option(
        True, "With shared_prompt or packing, on CUDA in fp16/bf16: attention through a varlen flash kernel "
        "(flash-attn's when installed, else PyTorch's own). false: SDPA over the sequences padded inside attention.")
    compile_layers: bool = option(
        True, "GPU only, with shared_prompt or packing: torch.compile the decoder layers' work around attention "
        "(norms, rotary, SwiGLU, residual adds fused, forward and backward); the first run compiles, later runs "
        "load the kernels from $TLVR_COMPILE_CACHE. Numerics-neutral up to bf16 rounding.")


@dataclass
class GRPOConfig:
    """GRPO on NextQA (spec §5)."""

    JOB = "grpo"
    model: ModelConfig = option(ModelConfig(path=COLDSTART_MODEL, dtype="bfloat16"), "Policy start checkpoint.")
    ref_model: str = option("", "Reference model checkpoint ('' = the policy's start checkpoint).")
    data: GRPODataConfig = option(GRPODataConfig(), "Prompts and videos.")
    video: VideoConfig = option(VideoConfig(), "Frame sampling.")
    rollout: SamplingConfig = option(SamplingConfig(), "Rollout sampling (spec §5.2: T 1.0, top-k 50, top-p 1.0, "
                                     "512 tokens).")
    algo: GRPOAlgoConfig = option(GRPOAlgoConfig(), "Objective.")
    optim: OptimConfig = option(OptimConfig(lr=1e-6, scheduler="cosine", warmup_ratio=0.03), "Optimizer (spec §5.4).")
    tune: TuneConfig = option(TuneConfig(), "Trainable parts.")
    engine: EngineConfig = option(EngineConfig(max_batch=64), "Rollout engine.")
    perf: GRPOPerfConfig = option(GRPOPerfConfig(), "Speed and memory of the training forward.")
    seed: int = option(42, "Seed for data order, sampling and advantage noise.", ge=0)
    sample_every: int = option(10, "Write a sample of completions to samples.jsonl every N steps (0 disables).", ge=0)
    reflection: ReflectionConfig = option(ReflectionConfig(), "Reflection metrics (reflection/* in metrics.jsonl).")
    output: OutputConfig = option(OutputConfig(run_dir="runs/grpo"), "Outputs.")
    dist: GRPODistConfig = option(GRPODistConfig(), "Distributed settings.")


# ----------------------------------------------------------------------------- synthetic set and demo


@dataclass
class SynthConfig:
    """The embedded synthetic video-QA set (NextQA GRPO and cold-start formats)."""

    JOB = "synth"
    root: str = option("", "Output root ('' = $TLVR_DATA/synthetic).")
    train: int = option(256, "Training questions (GRPO rows).", ge=0)
    eval: int = option(128, "Held-out eval questions.", ge=0)
    coldstart: int = option(64, "Cold-start records with written-out <think> reasoning.", ge=0)
    frames: int = option(16, "Frames per video.", ge=1)
    size: int = option(64, "Video width and height in pixels.", ge=16)
    fps: int = option(8, "Frames per second of the written videos.", ge=1)
    seed: int = option(0, "Seed: the same seed writes identical files.", ge=0)
    kinds: list[str] = option(["background", "square", "direction"],
                              "Question kinds of the training and eval rows (background, square, direction).")
    coldstart_kinds: list[str] = option(["background", "square", "direction"],
                                        "Question kinds of the cold-start records (a subset leaves the rest for GRPO "
                                        "to learn).")
    option_order: Literal["shuffled", "fixed"] = option(
        "shuffled", "Options A-E of the training and eval rows in random order (gold letters balanced), or 'fixed' "
        "pool order, where the letter follows from the answer alone.")
    coldstart_option_order: Literal["shuffled", "fixed"] = option("shuffled", "The same for the cold-start records.")
    lanes: int = option(1, "Parallel paths the square can take (1: through the middle); each multiplies the distinct "
                        "videos (5 backgrounds x 4 squares x 5 directions x lanes), so larger sets keep more videos "
                        "apart.", ge=1)
    reasoning: Literal["scene", "asked"] = option(
        "scene", "Cold-start <think> text: 'scene' describes the whole scene (both colours, the motion), then the "
        "asked part; 'asked' names the asked attribute and reads only that from the video.")


@dataclass
class DemoPrepareConfig:
    """What the demo creates first when it is missing, and how it evaluates."""

    coldstart_preset: str = option("demo-coldstart", "Cold-start preset run when model.path does not exist yet.")
    synth: SynthConfig = option(SynthConfig(), "Synthetic set written when the data root lacks it.")
    evaluate: bool = option(True, "Evaluate the cold-start and the GRPO model on the synthetic eval split "
                            "(before/after table).")
    eval_limit: int = option(0, "Evaluate only the first N eval items (0: all).", ge=0)
    eval_batch_size: int = option(32, "Eval items the engine decodes at once.", ge=1)
    eval_sampled: bool = option(True, "Besides greedy, evaluate by sampling as the rollouts do (the paper protocol "
                                "with the rollout.* temperature/top-k/top-p, seeded): the policy GRPO optimises.")


@dataclass
class DemoConfig(GRPOConfig):
    """The embedded demo: synthetic set → tiny cold start → GRPO → before/after evaluation."""

    JOB = "demo"
    prepare: DemoPrepareConfig = option(DemoPrepareConfig(), "Create missing inputs first, evaluate after.")


# ----------------------------------------------------------------------------- evaluation and inference


@dataclass
class EvalConfig:
    """Benchmark evaluation (spec §6)."""

    JOB = "eval"
    model: ModelConfig = option(ModelConfig(path=R1_MODEL), "Checkpoint to evaluate.")
    benchmark: Literal["videomme", "mvbench", "mlvu", "mmvu", "synthetic"] = option("videomme", "Which benchmark.")
    data_dir: str = option("", "Benchmark root ('' = $TLVR_DATA/<benchmark>).")
    duration: Literal["short", "medium", "long", "all"] = option("short", "Video-MME split ('all': the three and the "
                                                                 "overall).")
    mode: Literal["reason", "option"] = option("reason", "reason: <think>/<answer> instruction (R1); option: letter "
                                               "directly (spec §3.3).")
    protocol: Literal["greedy", "paper"] = option("greedy", "greedy: deterministic, unparseable = wrong; paper: T 1.0 "
                                                  "/ top-k 50, random fallback, seeded.")
    frame_protocol: Literal["paper", "uniform"] = option("paper", "paper: the reference's per-benchmark frame paths; "
                                                         "uniform: path A everywhere (MVBench bounds honoured).")
    video: VideoConfig = option(VideoConfig(), "Frame sampling.")
    sampling: SamplingConfig = option(SamplingConfig(max_new_tokens=1024), "Decoding: temperature/top-k/top-p for "
                                      "the paper protocol (spec §6: T 1.0, top-k 50); max_new_tokens for both "
                                      "protocols (1024).")
    engine: EngineConfig = option(EngineConfig(max_batch=0), "Generation engine (max_batch: items decoded together; "
                                  "0 fills the free GPU memory). The engine stays full over the whole benchmark.")
    decode_workers: int = option(4, "Worker processes decoding videos ahead of the engine, at most the CPUs less one "
                                 "(0: in the main process).", ge=0)
    share_features: bool = option(True, "Decode each (video, frame spec) and run the tower once for all its questions "
                                  "(Video-MME asks 3 per video); false: once per question, as the reference.")
    share_prefix: bool = option(True, "Prefill the prompt part a video's questions share (system prompt and visual "
                                "tokens) once, then each question's own rest; false: each prompt whole. Same "
                                "maths, bf16 rounding aside.")
    limit: int = option(0, "Evaluate only the first N items (0: all).", ge=0)
    seed: int = option(0, "Seed for sampling and the random fallback.", ge=0)
    bootstrap: int = option(1000, "Bootstrap resamples for the 95% confidence intervals.", ge=0)
    reflection: ReflectionConfig = option(ReflectionConfig(), "Reflection metrics in the report.")
    output_dir: str = option("", "Where answers.jsonl and results.json go ('' = runs/eval/<benchmark>[-<duration>]/"
                             "<model>-<mode>-<protocol>-<settings hash>); a resume must match its model and settings.")
    overwrite_stale: bool = option(False, "When output_dir holds answers of another model or other settings: false "
                                   "refuses to run, true deletes them and starts afresh.")


@dataclass
class InferConfig:
    """One question about one video."""

    JOB = "infer"
    model: ModelConfig = option(ModelConfig(path=R1_MODEL), "Checkpoint.")
    video: VideoConfig = option(VideoConfig(), "Frame sampling.")
    sampling: SamplingConfig = option(SamplingConfig(temperature=0.0), "Decoding (default greedy).")
    reason: bool = option(True, "Append the <think>/<answer> instruction (spec §3.3).")
    seed: int = option(0, "Sampling seed.", ge=0)
    cuda_graphs: bool = option(True, "Decode in CUDA graphs (GPU only; captured in well under a second, no "
                               "torch.compile): what makes one stream fast.")


JOBS = {cls.JOB: cls for cls in (ColdstartConfig, GRPOConfig, DemoConfig, EvalConfig, InferConfig, SynthConfig)}
