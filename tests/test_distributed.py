"""Several processes on 2 CPU cores (gloo): expert-parallel layers, DDP gradients, torchrun end to end."""

from __future__ import annotations

import copy
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import WORLD, assert_group_gone, case, run_on_two_ranks
from test_cli import ENV, metric_lines, moebench, result

import moebench as moebench_package
from moebench.moe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, expert_parallel_parameters, shard_experts
from moebench.moe.remoe import ReMoE

DIM, HIDDEN, TOKENS, BATCH = 8, 16, 6, 8
# (name, layer factory, examples per rank): uneven splits exercise the row-count exchange.
CASES = [
    ("soft", lambda: SoftMoE(DIM, HIDDEN, 4, slots_per_expert=2, identical_init=False), (4, 4)),
    ("soft uneven", lambda: SoftMoE(DIM, HIDDEN, 4, slots_per_expert=3, identical_init=False), (3, 5)),
    ("tokens_choice k2 bpr", lambda: TokensChoiceMoE(DIM, HIDDEN, 4, k=2, group_size=2, noise_std=0.0), (4, 4)),
    ("tokens_choice uneven", lambda: TokensChoiceMoE(DIM, HIDDEN, 8, k=1, group_size=1, capacity_factor=0.5,
                                                     noise_std=0.0, bpr=False), (3, 5)),
    ("experts_choice", lambda: ExpertsChoiceMoE(DIM, HIDDEN, 4, capacity_factor=1.0, group_size=2), (4, 4)),
    # dropless: each rank pads its experts to its own largest load, so the exchanged row counts differ
    ("tokens_choice dropless", lambda: TokensChoiceMoE(DIM, HIDDEN, 4, k=2, group_size=1, noise_std=0.0,
                                                       dropless=True), (3, 5)),
    # ReMoE's penalty is a rank's own (the authors' code), not a mean over groups: lambda 0 here leaves the outputs
    ("remoe", lambda: without_penalty(ReMoE(DIM, HIDDEN, 4, k=1)), (3, 5)),
]


def without_penalty(layer: ReMoE) -> ReMoE:
    layer.l1_coeff.zero_()
    return layer


def check_case(rank: int, make, split) -> None:
    torch.manual_seed(0)
    full = make().double()
    x = torch.randn(BATCH, TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    g = torch.randn(BATCH, TOKENS, DIM, dtype=torch.float64)

    # Reference: one process, the whole global batch.
    sharded = shard_experts(copy.deepcopy(full))
    y_ref = full(x)
    ((y_ref * g).sum() + full.aux_loss).backward()

    lo = sum(split[:rank])
    mine = slice(lo, lo + split[rank])
    x_local = x.detach()[mine].clone().requires_grad_(True)
    y = sharded(x_local)
    # Each rank's aux loss is the mean over its groups (all groups have the same
    # size in these cases): weigh it by the rank's share of the global batch.
    ((y * g[mine]).sum() + sharded.aux_loss * split[rank] / BATCH).backward()

    torch.testing.assert_close(y, y_ref[mine], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_local.grad, x.grad[mine], rtol=1e-10, atol=1e-10)
    local = sharded.experts.num_experts
    own = slice(rank * local, (rank + 1) * local)
    shard_params = {id(p) for p in expert_parallel_parameters(sharded)}
    for (name, p_ref), p in zip(full.named_parameters(), sharded.parameters()):
        grad = p.grad.clone()
        if id(p) in shard_params:  # already the gradient of the global sum
            torch.testing.assert_close(grad, p_ref.grad[own], rtol=1e-10, atol=1e-10, msg=name)
        else:  # replicated: sum over ranks
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)

    # Checkpoints: the sharded state dict is the full one, and loads both ways.
    state = sharded.state_dict()
    for key, value in full.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    fresh = make().double()
    fresh.load_state_dict(state)
    resharded = shard_experts(make().double())
    resharded.load_state_dict(full.state_dict())
    torch.testing.assert_close(resharded(x_local.detach()), y.detach(), rtol=1e-10, atol=1e-10)


def expert_parallel_on_rank(rank: int) -> None:
    for name, make, split in CASES:
        with case(name):
            check_case(rank, make, split)
    with case("3 experts on 2 ranks"), pytest.raises(ValueError, match="divisible"):
        shard_experts(SoftMoE(DIM, HIDDEN, 3))


def test_expert_parallel_layers_match_the_local_layers(tmp_path):
    run_on_two_ranks(expert_parallel_on_rank, tmp_path)


def moebench_group_on_rank(rank: int) -> None:
    from moebench import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    distributed.setup()
    importlib.import_module("torch._dynamo")  # as torch.compile and the dropless expert call do, group in hand
    distributed.teardown(ok=True)
    assert_group_gone()


def test_moebench_leaves_no_group_behind_after_torch_dynamo_is_imported(tmp_path, monkeypatch):
    # A group that outlives teardown aborts a finished rank at exit now and then (SIGABRT): check the cause.
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("MOEBENCH_COLLECTIVE_TIMEOUT_S", "60")  # a rank that fails leaves the other one waiting
    run_on_two_ranks(moebench_group_on_rank, tmp_path, join_group=False)


# ----------------------------------------------------------------------------- DDP on moebench's model

GRAD_ROUTERS = {  # the smoke model with each router in its MoE block (no routing noise: ranks agree)
    "soft": ["router=soft"],
    "tokens_choice": ["router=tokens_choice", "router.group_size=2", "router.noise_std=0"],
    "experts_choice": ["router=experts_choice", "router.group_size=2", "router.noise_std=0"],
}


def smoke_model(router: str, dtype: torch.dtype) -> torch.nn.Module:
    from hydra import compose, initialize_config_dir

    from moebench.train import build_model, conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke", *GRAD_ROUTERS[router]])
    torch.manual_seed(0)
    return build_model(cfg, in_chans=3, num_classes=10).to(dtype)


def loss_of(model, images, labels) -> torch.Tensor:
    """The training loss as moebench's step computes it: cross-entropy plus the routers' aux losses."""
    from moebench.moe.base import collect_aux_loss

    logits = model(images)
    return torch.nn.functional.cross_entropy(logits, labels) + collect_aux_loss(model).to(logits.dtype)


def gradients(model, images, labels) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, images, labels).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def ddp_on_rank(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # the same kernels and blocking in both processes and the reference
    for router in GRAD_ROUTERS:
        for dtype in (torch.float64, torch.float32):
            with case(f"{router} {dtype}"):
                check_ddp(rank, router, dtype, DistributedDataParallel)


def check_ddp(rank: int, router: str, dtype: torch.dtype, ddp_class) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2 * BATCH, 3, 8, 8, generator=gen, dtype=dtype)
    labels = torch.randint(0, 10, (2 * BATCH,), generator=gen)
    halves = [slice(0, BATCH), slice(BATCH, 2 * BATCH)]
    mine = halves[rank]
    model = smoke_model(router, dtype)
    ddp = ddp_class(copy.deepcopy(model), find_unused_parameters=True)

    # Strict: DDP's gradient is the ranks' gradients averaged; two addends sum alike in either order
    # and halving is exact, so with the same kernels the result is bit-identical to averaging the
    # halves' gradients in one process, on any CPU.
    ddp.zero_grad(set_to_none=True)
    loss_of(ddp, images[mine], labels[mine]).backward()
    got = {name: p.grad for name, p in ddp.module.named_parameters() if p.grad is not None}
    per_half = [gradients(model, images[h], labels[h]) for h in halves]
    assert got.keys() == per_half[0].keys()
    for name in got:
        torch.testing.assert_close(got[name], (per_half[0][name] + per_half[1][name]) / 2, rtol=0, atol=0,
                                   msg=name)

    # With a tolerance: the same gradients as one process on the whole batch (one loss over both
    # halves), which sums its terms in another order. The error of a reordered float sum is a few
    # units of rounding of the summands' size, so each tensor is compared relative to its largest
    # entry: 1e-4 (float32) is ~800 units of rounding; float64 is held to 1e-10.
    full = gradients(model, images, labels)
    scale_tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name in got:
        scale = max(float(full[name].abs().max()), 1e-6)
        torch.testing.assert_close(got[name], full[name], rtol=0, atol=scale_tol * scale, msg=name)

    # SGD is linear in the gradients: three DDP steps land where three whole-batch steps do, up to
    # the gradient tolerance above times the steps' learning rate (float64: no room for a bug).
    if dtype == torch.float64:
        opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
        opt_one = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt_ddp.zero_grad(set_to_none=True)
            loss_of(ddp, images[mine], labels[mine]).backward()
            opt_ddp.step()
            opt_one.zero_grad(set_to_none=True)
            loss_of(model, images, labels).backward()
            opt_one.step()
        for (name, a), b in zip(model.named_parameters(), ddp.module.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)


def test_ddp_gradients_equal_the_averaged_halves_exactly_and_the_whole_batch_within_rounding(tmp_path):
    run_on_two_ranks(ddp_on_rank, tmp_path)


# ----------------------------------------------------------------------------- torchrun end to end

TC = ["experiment=smoke", "router=tokens_choice", "router.group_size=2", "router.noise_std=0",
      "deterministic=true", "train.epochs=2"]


def torchrun(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "moebench", *args], capture_output=True, text=True, cwd=cwd, env=env or ENV, timeout=600,
    )


def moebench_frames(stderr: str) -> list[str]:
    """Traceback lines inside moebench's own package (whatever the clone's directory is called)."""
    package = str(Path(moebench_package.__file__).resolve().parent) + os.sep
    return [line for line in stderr.splitlines() if line.lstrip().startswith(f'File "{package}')]


def assert_same_training(a: Path, b: Path) -> None:
    """Two AdamW runs of the same config, one on 2 ranks: the same per-step losses and test accuracy.

    Weights are not compared: the ranks sum gradients in another order than one process does, and
    Adam divides each update by the root of the second moment, so a rounding-level difference in a
    near-zero gradient (a bias) becomes a difference of the order of the learning rate in that
    weight, on some CPUs' kernels and not on others. What DDP must preserve exactly is pinned on
    gradients and on SGD below (``test_ddp_gradients_*``); here the runs agree on what they compute.
    """
    assert torch.load(a / "last.pt", weights_only=True)["model"].keys() == \
        torch.load(b / "last.pt", weights_only=True)["model"].keys()
    la = [m["train/loss"] for m in metric_lines(a) if "train/loss" in m]
    lb = [m["train/loss"] for m in metric_lines(b) if "train/loss" in m]
    assert len(la) == len(lb) == 6  # 2 epochs of 3 steps (51 training images)
    # Step 1 sees the same weights: float32 reduction order only. Later steps see weights that
    # differ by at most a few learning-rate-sized updates of parameters whose gradient is ~0,
    # which moves the loss by much less than 1e-3 of its value (~2.3 at chance).
    assert la[0] == pytest.approx(lb[0], rel=1e-5)
    assert la == pytest.approx(lb, rel=1e-3)
    top1_a, top1_b = result(a)["quality"]["top1"], result(b)["quality"]["top1"]
    assert abs(top1_a - top1_b) <= 1 / 32 + 1e-9  # at most one of the 32 test images flips


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    proc = moebench("train", *TC, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # torchrun: 2 processes per run; DDP and expert parallelism are checked in-process above
def test_torchrun_ddp_matches_one_process_and_only_rank_0_writes(tmp_path, single_process_run):
    proc = torchrun("train", *TC, "wandb.mode=offline", cwd=tmp_path)  # default run dir: a timestamp ranks share
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = [p.parent for p in tmp_path.glob("outputs/*/*/result.json")]
    assert len(list(tmp_path.glob("outputs/*/*"))) == len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert_same_training(single_process_run, run_dir)
    res = result(run_dir)
    assert res["processes"] == 2 and not res["expert_parallel"] and res["cost"]["gflops_per_image"] > 0
    assert (proc.stdout + proc.stderr).count("epoch 1/2: test top1") == 1  # rank 1 logs nothing
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # one W&B run, rank 0's


@pytest.mark.slow  # torchrun, four runs
def test_expert_parallel_checkpoints_resume_across_process_counts(tmp_path, single_process_run):
    # Sharded for the first epoch (stopped by the time limit), one process for the second...
    ep_first = tmp_path / "ep_first"
    proc = torchrun("train", *TC, "expert_parallel=true", "train.time_limit_min=0", f"hydra.run.dir={ep_first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(ep_first)["status"] == "stopped" and result(ep_first)["expert_parallel"]
    proc = moebench("train", *TC, f"resume={ep_first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(single_process_run, ep_first)
    # ...and the other way round.
    one_first = tmp_path / "one_first"
    proc = moebench("train", *TC, "train.time_limit_min=0", f"hydra.run.dir={one_first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun("train", *TC, "expert_parallel=true", f"resume={one_first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(one_first)["expert_parallel"]
    assert_same_training(single_process_run, one_first)


@pytest.mark.slow  # torchrun
def test_expert_parallel_needs_experts_divisible_by_processes(tmp_path):
    # Rank 0 pauses before it prints: a rank 1 that exited at once would have torchrun stop rank 0
    # before its line is out (the refusal is agreed first, so rank 1 waits).
    env = {**ENV, "MOEBENCH_FAULT": "pause:refuse:1:0"}
    proc = torchrun("train", "experiment=smoke", "experts=3", "expert_parallel=true", f"hydra.run.dir={tmp_path}",
                    env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moebench: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0's line, whichever rank exits first
    assert errors[0].startswith("moebench: error: expert_parallel=true needs experts (3) divisible by the 2")
    assert not moebench_frames(proc.stderr)  # no traceback from moebench (torchrun's agent prints its own)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused: nothing written


@pytest.mark.slow  # torchrun
def test_a_rank_that_raises_stops_every_rank_promptly_with_one_error(tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1 fails in its 3rd step while rank 0 waits in that step's collective. A collective
    # timeout longer than torchrun()'s 600 s: waiting for it would fail the test.
    env = {**ENV, "MOEBENCH_FAULT": "raise:step:3:1", "MOEBENCH_COLLECTIVE_TIMEOUT_S": "1800"}
    proc = torchrun("train", *TC, f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moebench: error:")]
    assert errors == ["moebench: error: rank 1: RuntimeError: injected fault at step #3"], proc.stderr[-3000:]
    assert not moebench_frames(proc.stderr)  # no moebench traceback
    res = result(run_dir)  # rank 0's record: failed, because another rank did
    assert res["status"] == "failed" and res["error"].startswith("another rank failed")
    assert res["position"]["step"] == 2


@pytest.mark.slow  # torchrun, a sweep
def test_torchrun_sweep_lands_in_one_sweep_dir(tmp_path):
    proc = torchrun("train", "-m", *TC, "train.epochs=1", "seed=0,1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list(tmp_path.glob("multirun/*/*"))
    assert len(sweeps) == 1 and len(list(sweeps[0].glob("*/result.json"))) == 2  # both ranks, both jobs: one dir
    assert (sweeps[0] / "pareto.json").is_file()
