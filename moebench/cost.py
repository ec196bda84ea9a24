"""Measured cost of a model: FLOPs per image, inference speed, training throughput, memory.

Memory of the model (``train_peak_mb``, ``infer_peak_mb``): the peak of the bytes
held by live tensor storages while the model runs one step, counting its
parameters, buffers, the input batch, and every tensor the step creates
(activations, temporaries, gradients, optimizer state); for training the step is
forward, cross-entropy, backward and an AdamW step, taken in the steady state (the
second step, when gradients and optimizer state exist), on a copy of the model.
It leaves out what is not the model's: the dataset, the Python heap, freed memory
the allocator keeps. So it is the same for the same model and batch, whatever ran
before, and differs between routers where their tensors differ. On CUDA it is
``max_memory_allocated`` around the same step; on CPU a TorchDispatchMode sees every
tensor an operator returns and a weak reference tells when its storage is freed.
Always measured eagerly (no torch.compile), in the run's precision.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import resource
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from . import arguments
from .allocator import release_free_memory
from .moe import track_routing
from .moe.dropless import grouped_mm_flops

_aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which it
# would count as 0; give it the same formula (QK^T and AV matmuls). Nor does it know
# the grouped matmul of the dropless routers (moe/dropless.py): 2 per multiply-add too.
CUSTOM_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
if hasattr(_aten, "_grouped_mm"):
    CUSTOM_FLOPS[_aten._grouped_mm] = grouped_mm_flops


def flops_per_image(model: torch.nn.Module, example: torch.Tensor) -> float:
    """Forward FLOPs per image at inference, as ``FlopCounterMode`` counts them:
    matmuls, convolutions and attention at 2 FLOPs per multiply-add; element-wise
    ops (softmax, GELU, norms, gathers) count 0."""
    return flops_by_module(model, example)[""]


def flops_by_module(model: torch.nn.Module, example: torch.Tensor) -> dict[str, float]:
    """``flops_per_image`` of the model ("") and of each submodule that counts any, by its name in
    ``model.named_modules()``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            model(example)
    finally:
        model.train(was_training)
    per_image = {"": counter.get_total_flops() / example.shape[0]}
    for path, ops in counter.get_flop_counts().items():  # "Global", then "ClassName.sub.name"
        if path != "Global":
            per_image[path.partition(".")[2]] = sum(ops.values()) / example.shape[0]
    return per_image


# Training compute: a training step costs about three forwards (the backward computes two
# matmuls, the input's and the weight's gradient, for each of the forward's).
TRAIN_FLOPS_PER_FORWARD = 3.0


def train_gflops_total(gflops_per_image: float, images: int, model: torch.nn.Module | None = None,
                       module_flops: dict[str, float] | None = None) -> float:
    """GFLOPs of training on ``images`` images: 3 x the inference forward FLOPs per image x images
    (evaluation passes and routing differences between training and inference left out). Layers whose
    cost moves during training (ReMoE's sparsity: ``trained_forward_flops``) count what their training
    forwards did in place of ``images`` x their FLOPs per image now (``module_flops``, from
    ``flops_by_module``)."""
    forward = gflops_per_image * 1e9 * images
    for name, layer in (model.named_modules() if model is not None else ()):
        if hasattr(layer, "trained_forward_flops"):
            forward += layer.trained_forward_flops() - (module_flops or {}).get(name, 0.0) * images
    return TRAIN_FLOPS_PER_FORWARD * forward / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing

# Warm-up before timing: lazy kernel selection, allocator growth and (compiled models) compilation
# make the first calls slow, most of all in the first job of a sweep. Calls go on until the median
# of the last WARMUP_WINDOW calls agrees with that of the WARMUP_WINDOW before within
# WARMUP_TOLERANCE and WARMUP_MIN_S has passed, or for WARMUP_MAX_S (a busy machine never settles).
WARMUP_MIN_S = arguments.WARMUP_MIN_S  # (`moebench measure --warmup-s`'s default, set before torch is imported)
WARMUP_TOLERANCE = 0.1
WARMUP_WINDOW = 3
WARMUP_MAX_S = 2.0


def autocast_for(precision: str, device: torch.device):
    """The autocast context a run with ``precision`` (fp32, bf16) trains and is timed in."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def warm_up(fn: Callable[[], object], device: torch.device, *, min_calls: int = 1, min_seconds: float | None = None,
            tolerance: float | None = None, max_seconds: float | None = None, time_call=timed) -> int:
    """Call ``fn`` until its time has settled; returns the number of calls. The first call
    (compilation, lazy initialisation) is left out of the windows and the times."""
    min_seconds = WARMUP_MIN_S if min_seconds is None else min_seconds
    tolerance = WARMUP_TOLERANCE if tolerance is None else tolerance
    max_seconds = max(min_seconds, WARMUP_MAX_S if max_seconds is None else max_seconds)
    w, times = WARMUP_WINDOW, []
    while True:
        times.append(time_call(fn, device))
        elapsed = sum(times[1:])
        settled = False
        if len(times) > 2 * w:
            recent, before = statistics.median(times[-w:]), statistics.median(times[-2 * w:-w])
            settled = abs(recent - before) <= tolerance * max(recent, before)
        if len(times) >= min_calls and ((settled and elapsed >= min_seconds) or elapsed >= max_seconds):
            return len(times)


def inference_call(model: torch.nn.Module, example: torch.Tensor, precision: str = "fp32") -> Callable[[], object]:
    """One forward of ``model`` on ``example`` as it is served: no autograd, in the run's precision."""
    device = example.device

    def call():
        with torch.inference_mode(), autocast_for(precision, device):
            return model(example)

    return call


@contextlib.contextmanager
def quiet():
    """No garbage collection while timing (as timeit does): a young process, like the first
    job of a sweep, collects its many import-time objects often, a few ms each time."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def measure_inference(model: torch.nn.Module, example: torch.Tensor, *, warmup: int = 3, repeats: int = 10,
                      precision: str = "fp32", compiled: torch.nn.Module | None = None) -> dict:
    """Median time of ``repeats`` forward calls on a fixed batch, after a warm-up of at least
    ``warmup`` calls that goes on until the time has settled. ``compiled``: time this
    (a torch.compile of ``model``) instead."""
    was_training = model.training
    model.eval()
    try:
        call = inference_call(model if compiled is None else compiled, example, precision)
        with quiet():
            warm_up(call, example.device, min_calls=max(1, warmup))
            per_batch = statistics.median(timed(call, example.device) for _ in range(max(1, repeats)))
    finally:
        model.train(was_training)
    return {"infer_images_per_s": example.shape[0] / per_batch, "infer_ms_per_image": 1e3 * per_batch / example.shape[0]}


def train_step_call(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32", *,
                    aux_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
                    compile: bool = False) -> Callable[[], object]:
    """One training step (forward, cross-entropy plus ``aux_loss(model)``, backward, AdamW)
    on a copy of ``model``, so the trained weights stay as they are. The copy computes no
    routing statistics: the cost is the model's, the same whether the trainer or
    ``moebench measure`` asks."""
    clone = track_routing(copy.deepcopy(model).train(), False)
    forward = torch.compile(clone) if compile else clone
    optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-9)  # a step, not a change
    device = images.device

    def call():
        with autocast_for(precision, device):
            loss = F.cross_entropy(forward(images).float(), labels)
            if aux_loss is not None:
                loss = loss + aux_loss(clone).to(loss.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    call.model, call.optimizer = clone, optimizer
    return call


# ----------------------------------------------------------------------------- memory of the model

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive while the mode is on: those given to ``track``
    and every one an operator returns, until it is freed; ``peak`` is the most at once."""

    def __init__(self):
        super().__init__()
        self._sizes = WeakIdKeyDictionary()  # storage -> [bytes] (a box the weakref callback reads)
        self._refs = set()
        self.current = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta" or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        box = self._sizes.get(storage)
        if box is None:
            box = [size]
            self._sizes[storage] = box
            self._refs.add(weakref.ref(storage, lambda ref, box=box: self._free(ref, box)))
            self.current += size
        elif box[0] != size:  # resized in place (out= ops)
            self.current += size - box[0]
            box[0] = size
        self.peak = max(self.peak, self.current)

    def _free(self, ref, box: list[int]) -> None:
        self.current -= box[0]
        self._refs.discard(ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


def _state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """What the step holds from the start: weights, and for training their gradients and optimizer state
    (a trained model's leftover gradients are not part of serving it)."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_step_mb(call: Callable[[], object], model: torch.nn.Module, inputs: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer | None = None) -> float:
    """Peak MiB of the model's tensors (state, inputs, everything ``call`` creates) during one ``call``."""
    device = inputs[0].device
    own = _state_tensors(model, optimizer) + list(inputs)
    if device.type == "cuda":  # the allocator's peak, less what else the process holds on the device
        _sync(device)
        others = torch.cuda.memory_allocated(device) - _storage_bytes(own)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - others) / 2**20
    with LiveTensorBytes() as live:
        for tensor in own:
            live.track(tensor)
        call()
    return live.peak / 2**20


def infer_peak_mb(model: torch.nn.Module, example: torch.Tensor, precision: str = "fp32") -> float:
    was_training = model.training
    model.eval()
    try:
        return peak_step_mb(inference_call(model, example, precision), model, [example])
    finally:
        model.train(was_training)


def train_peak_mb(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32") -> float:
    step = train_step_call(model, images, labels, precision)
    step()  # the first step creates the optimizer state: the steady state is the second
    return peak_step_mb(step, step.model, [images, labels], step.optimizer)


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
    """The whole process (data included), not the model (see ``train_peak_mb``).
    CUDA: peak tensor memory allocated. CPU: the process's peak resident set since
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
