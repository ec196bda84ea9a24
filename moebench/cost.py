"""Measured cost of a model: FLOPs per image, inference speed, training throughput, memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .allocator import release_free_memory

_aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which it
# would count as 0; give it the same formula (QK^T and AV matmuls).
CUSTOM_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def flops_per_image(model: torch.nn.Module, example: torch.Tensor) -> float:
    """Forward FLOPs per image at inference, as ``FlopCounterMode`` counts them:
    matmuls, convolutions and attention at 2 FLOPs per multiply-add; element-wise
    ops (softmax, GELU, norms, gathers) count 0."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            model(example)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / example.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_inference(model: torch.nn.Module, example: torch.Tensor, *, warmup: int = 3, repeats: int = 10) -> dict:
    """Median inference time of ``repeats`` forward calls on a fixed batch, after ``warmup`` calls."""
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(example.device)
                start = time.perf_counter()
                model(example)
                _sync(example.device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    per_batch = statistics.median(times)
    return {"infer_images_per_s": example.shape[0] / per_batch, "infer_ms_per_image": 1e3 * per_batch / example.shape[0]}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: a -m sweep runs all its jobs in one process, and each job
    must report its own peak, not the largest of the jobs before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_free_memory()  # the allocator tuning keeps freed memory; the last job's must not count
    try:  # Linux: "5" resets the resident-set high-water mark (VmHWM) to the current size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak tensor memory allocated. CPU: the process's peak resident set since
    ``reset_peak_memory`` (Linux), or over its lifetime (elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Throughput:
    """Training images/s over timed steps, leaving out the first ``skip`` (warm-up) steps.

    Its state survives a resume (``state_dict``), so a resumed run reports the
    throughput of all its counted steps.
    """

    def __init__(self, skip: int = 0, clock=time.perf_counter):
        self.skip, self.clock = skip, clock
        self.steps, self.images, self.seconds = 0, 0, 0.0
        self._start = None

    def start(self) -> None:
        self._start = self.clock()

    def stop(self, num_images: int) -> None:
        elapsed = self.clock() - self._start
        self.steps += 1
        if self.steps > self.skip:
            self.images += num_images
            self.seconds += elapsed

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state.get("steps", 0)
        self.images = state.get("images", 0)
        self.seconds = state.get("seconds", 0.0)
