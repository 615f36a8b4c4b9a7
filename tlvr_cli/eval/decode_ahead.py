"""Videos of an evaluation, decoded ahead of the engine in worker processes.

The questions are grouped into one job per (video, frame spec): Video-MME asks 3 questions per
video and MVBench and MLVU reuse clips across tasks, so with sharing each video is decoded (and its
tower features computed, by the runner) once for all its questions. Workers hand the preprocessed
frames back through shared memory (torch's tensor pickling), so the main process copies nothing per
video. On Linux they are forked, as torch's DataLoader workers are (they never touch CUDA, and run
torch single-threaded): spawning would re-run a calling script that has no ``__main__`` guard.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from ..jobs import VideoConfig
from ..video.decode import FrameSpec, read_video
from ..video.preprocess import resize_frames
from .items import EvalItem

AHEAD_PER_WORKER = 4  # decodes in flight per worker: enough to hide a slow video, few frames held in memory

Decoded = tuple[torch.Tensor, list[int]] | str  # (resized frames (T, S, S, 3) uint8, frame indices), or why it failed


@dataclass
class VideoJob:
    """One decode: a video under one frame spec, and the questions asked about it (benchmark order)."""

    video: Path
    frame_spec: FrameSpec
    items: list[EvalItem] = field(default_factory=list)


def video_jobs(items: list[EvalItem], share: bool) -> list[VideoJob]:
    """One job per distinct (video, frame spec) in order of first appearance, holding all its
    questions; without ``share``, one job per question (each decodes its video again)."""
    if not share:
        return [VideoJob(it.video, it.frame_spec, [it]) for it in items]
    jobs: dict[tuple, VideoJob] = {}
    for it in items:
        spec = it.frame_spec
        key = (str(it.video), spec.kind, spec.bound, spec.folder_fps)
        jobs.setdefault(key, VideoJob(it.video, spec)).items.append(it)
    return list(jobs.values())


def decode_video(path: Path, spec: FrameSpec, video: VideoConfig, image_size: int) -> Decoded:
    """Frames of one video (``video``: how many, which decoder) resized for the tower (uint8, not yet
    normalised); a video that fails to decode gives its reason (the runner records its questions as
    skipped instead of stopping)."""
    try:
        frames = read_video(path, spec, backend=video.backend, **video.frame_args(spec))
        return resize_frames(frames.frames, size=image_size), list(frames.indices)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-video skip, reported with its reason
        return f"{type(e).__name__}: {e}"


def usable_workers(requested: int) -> int:
    """``requested`` worker processes, at most one fewer than this process may use CPUs (the main process
    drives the engine; more decoders than cores only slow it down)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(requested, cpus - 1))


def _started() -> None:
    """A no-op task: submitting one makes the pool start its processes now."""


def _init_worker() -> None:
    torch.set_num_threads(1)  # the decoders bring their own threads; a forked OpenMP pool must not be reused


def _start_method() -> str:
    return "fork" if sys.platform == "linux" else "spawn"


class DecodePool:
    """Worker processes that decode videos ahead of the consumer, started at construction (before the
    model loads: small to fork, and a spawned worker's imports overlap the load); ``workers=0``
    decodes in this process."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = None
        if workers:
            self._pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                             mp_context=multiprocessing.get_context(_start_method()))
            for _ in range(workers):  # a spawning pool starts one process per task it cannot place
                self._pool.submit(_started)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def decode(self, jobs: list[VideoJob], decode: Callable[[Path, FrameSpec], Decoded]
               ) -> Iterator[tuple[VideoJob, Decoded]]:
        """``(job, decode(job.video, job.frame_spec))`` in job order, up to ``AHEAD_PER_WORKER`` decodes per
        worker running ahead of the consumer; with workers the first of them start now, before the first
        result is asked for (e.g. while the model loads). ``decode`` must be picklable (a module-level
        function or a ``functools.partial`` of one) when there are workers."""
        if self._pool is None:
            return ((job, decode(job.video, job.frame_spec)) for job in jobs)
        rest = iter(jobs)
        pending = deque((job, self._pool.submit(decode, job.video, job.frame_spec))
                        for job in islice(rest, self.workers * AHEAD_PER_WORKER))
        return self._results(pending, rest, decode)

    def _results(self, pending: deque, rest: Iterator[VideoJob], decode: Callable[[Path, FrameSpec], Decoded]
                 ) -> Iterator[tuple[VideoJob, Decoded]]:
        while pending:
            job, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                # the workers could not start (spawn re-imports the main module, which a script read
                # from stdin does not have) or one died: decode what is left here instead of failing
                warnings.warn("video decode workers stopped; decoding in the main process", RuntimeWarning,
                              stacklevel=2)
                self.close()
                for left in (job, *(j for j, _ in pending), *rest):
                    yield left, decode(left.video, left.frame_spec)
                return
            nxt = next(rest, None)
            if nxt is not None:
                pending.append((nxt, self._pool.submit(decode, nxt.video, nxt.frame_spec)))
            yield job, result
