"""`moebench train` end to end, in a subprocess, on tiny configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ENV, REPO, SPARSE, TINY, metric_lines, moebench, result, train  # noqa: F401 (re-exported)


@pytest.mark.parametrize("router", ["soft", "tokens_choice", "experts_choice", "remoe", "dense"])
def test_each_router_trains_and_records_cost_and_quality(router_runs, router):
    run_dir = router_runs[router]  # conftest: trained in a fresh process once a session (test_inspect.py reads it too)
    res = result(run_dir)
    assert res["status"] == "completed"
    assert res["config"]["router"]["name"] == router
    cost = res["cost"]
    for key in ("params_total", "params_active", "gflops_per_image", "train_images_per_s",
                "infer_images_per_s", "infer_ms_per_image", "peak_memory_mb"):
        assert cost[key] > 0, key
    assert cost["params_active"] <= cost["params_total"]
    if router in ("tokens_choice", "experts_choice", "remoe"):
        assert cost["params_active"] < cost["params_total"]  # a token sees 1 of 4 experts (ReMoE: in expectation)
    assert 0.0 <= res["quality"]["top1"] <= 1.0 and "top5" in res["quality"]
    lines = metric_lines(run_dir)
    assert any("test/top1" in line for line in lines)
    routing = {key for line in lines for key in line if key.startswith("routing/")}
    expected = {"soft": "combine_entropy", "tokens_choice": "dropped", "experts_choice": "tokens_0_experts",
                "remoe": "l1_coeff"}
    if router == "dense":
        assert not routing
    else:
        assert any(key.endswith(expected[router]) for key in routing), routing
    assert (run_dir / "last.pt").is_file() and not (run_dir / "best.pt").exists()  # best.pt only on request
    q = res["quality"]  # model selection on the validation split, scored on test
    assert q["best_val_epoch"] == 1 and 0.0 <= q["val_top1_best"] <= 1.0 and q["top1_at_best_val"] == q["top1"]
    assert any("val/top1" in line for line in lines)
    assert (run_dir / "train.log").is_file()


@pytest.mark.slow  # two runs; RandAugment and MixUp/CutMix are unit-tested in test_data.py
def test_strong_augmentation_trains_with_mixed_labels(tmp_path):
    """RandAugment + MixUp/CutMix end to end: soft targets reach the loss, and the run completes.
    The same run without MixUp/CutMix starts from the same weights and batches (before mixing); the
    first loss is ln(10) for both (the head starts at zero: uniform predictions, whatever the targets),
    so the losses after it differ only if mixed targets reached the steps."""
    common = ["router=soft", "data.augment.randaugment=9", "train.log_every=1"]
    proc, run_dir = train(tmp_path, *common, "data.augment.mixup=0.8", "data.augment.cutmix=1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result(run_dir)
    assert res["status"] == "completed" and res["config"]["data"]["augment"]["mixup"] == 0.8
    losses = [line["train/loss"] for line in metric_lines(run_dir) if "train/loss" in line]
    assert losses and all(loss == loss and loss > 0 for loss in losses)
    proc, plain_dir = train(tmp_path, *common, name="unmixed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = [line["train/loss"] for line in metric_lines(plain_dir) if "train/loss" in line]
    assert len(losses) == len(plain) >= 2
    assert max(abs(a - b) for a, b in zip(losses[1:], plain[1:])) > 1e-4, (losses, plain)


def test_gflops_per_image_is_the_analytic_count(tiny_run):
    """Soft MoE ViT of 2 blocks (the second is MoE): 4 tokens of width 16, 4 experts x 1 slot."""
    run_dir = tiny_run  # conftest's session run: the same model (the seed changes no FLOPs), trained once
    t, d, h, s, classes, patch_pixels = 4, 16, 32, 4, 10, 3 * 4 * 4
    attention = 2 * t * d * 3 * d + 2 * t * d * d + 4 * t * t * d  # qkv, proj, scores and mix
    expected = (
        2 * t * d * patch_pixels  # patch embedding (a strided conv)
        + 2 * attention
        + 4 * t * d * h  # block 0: dense MLP
        + 6 * t * s * d + 4 * s * d * h  # block 1: Soft MoE routing + experts
        + 2 * d * classes  # head
    )
    assert result(run_dir)["cost"]["gflops_per_image"] * 1e9 == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow  # a second sweep: test_pareto.py's sweep with a failing job is the default suite's
def test_multirun_sweep_runs_every_job_in_readable_dirs(tmp_path):
    proc = moebench("train", "-m", *TINY, "router=soft,dense", cwd=tmp_path)  # the default, dated sweep dir
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list(tmp_path.glob("multirun/*/*"))
    assert len(sweeps) == 1 and (sweeps[0] / "pareto.json").is_file()
    sweep = sweeps[0]
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "result.json").exists())
    assert jobs == ["0_experiment=smoke,router=soft", "1_experiment=smoke,router=dense"]
    assert {result(sweep / j)["status"] for j in jobs} == {"completed"}


@pytest.mark.slow  # test_pareto.py's sweep with a failing job (k=9) covers it in the default suite
def test_one_failed_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = moebench("train", "-m", *TINY, "router=tokens_choice", "router.group_size=2", "k=1,9",
                    f"hydra.sweep.dir={sweep}")
    assert proc.returncode != 0  # the sweep reports the failure...
    failed, done = sweep / "1_experiment=smoke,k=9,router.group_size=2,router=tokens_choice", sweep / "0_experiment=smoke,k=1,router.group_size=2,router=tokens_choice"
    assert result(failed)["status"] == "failed"  # ...records it...
    assert "k (router.k)" in result(failed)["error"]
    assert result(done)["status"] == "completed"  # ...and the other job ran
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cfg_job_shows_shortcuts_reaching_the_router(tmp_path, cli_in_process):
    # in this process: --cfg prints the config and trains nothing (a fresh process spent seconds importing torch)
    code, out, err = cli_in_process("train", "router=tokens_choice", "experts=128", "k=2", "capacity_factor=1.25",
                                    "--cfg", "job", "--resolve", cwd=tmp_path)
    assert code == 0, err
    assert "num_experts: 128" in out and "k: 2" in out and "capacity_factor: 1.25" in out


def test_help_and_unknown_command():
    assert moebench("--help").returncode == 0
    proc = moebench("frobnicate")
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr


BAD_INPUTS = [
    (["router=nope"], "router"),
    (["model=nope"], "model"),
    (["data=nope"], "data"),
    (["experts=0"], "experts"),
    (["slots=0"], "slots"),
    (["router=tokens_choice", "k=0"], "k (router.k)"),
    (["router=tokens_choice", "k=5"], "k (router.k)"),
    (["router=tokens_choice", "capacity_factor=0"], "capacity_factor"),
    (["router=experts_choice", "capacity_factor=-1"], "capacity_factor"),
    (["data.image_size=10"], "patch_size"),
    (["model.moe.placement=list", "model.moe.layers=[7]"], "model.moe.layers"),
    (["trian.epochs=3"], "trian"),
    (["data=imagefolder", "data.root=/nonexistent/moebench"], "/nonexistent/moebench"),
    (["resume=/nonexistent/run"], "/nonexistent/run"),
    (["data.augment.randaugment=31"], "data.augment.randaugment"),
    (["data.augment.mixup=0"], "data.augment.mixup"),
]


@pytest.mark.parametrize("overrides,needle", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line_without_traceback(tmp_path, overrides, needle, cli_in_process):
    # In this process (a refusal ends before any run): test_a_refusal_in_a_fresh_process is the subprocess case
    code, out, err = cli_in_process("train", *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code == 2
    assert needle in out + err, (out + err)[-2000:]
    assert err.splitlines() == [err.strip()] and err.startswith("moebench: error: "), err[-2000:]


REFUSED_BEFORE_ANY_WORK = [  # (overrides, the one line on stderr)
    (["experts=abc"], "experts (router.num_experts) must be an int >= 1, got 'abc'"),
    (["experts=many"], "experts (router.num_experts) must be an int >= 1, got 'many'"),
    (["train.epochs=two"], "train.epochs must be an int >= 1, got 'two'"),
    (["experts=4.5"], "experts (router.num_experts) must be an int >= 1, got 4.5"),
    (["train.lr=0"], "train.lr must be a finite number > 0, got 0"),
    (["train.lr=nan"], "train.lr must be a finite number > 0, got nan"),
    (["train.weight_decay=inf"], "train.weight_decay must be a finite number >= 0, got inf"),
    (["router=tokens_choice", "router.capacity_factor=nan"],
     "capacity_factor (router.capacity_factor) must be a finite number > 0, got nan"),
    (["router=tokens_choice", "capacity_factor=-inf"],
     "capacity_factor (router.capacity_factor) must be a finite number > 0, got -inf"),
    (["-m", "train.lr=0.003,nan,0.001"], "train.lr must be a finite number > 0, got nan"),
    (["deterministic=maybe"], "deterministic must be true or false, got 'maybe'"),
    (["data.val_fraction=1"], "data.val_fraction must be a finite number >= 0 and < 1, got 1"),
    (["expert=8"], "unknown config key 'expert' (did you mean experts?)"),
    (["+expert=8"], "unknown config key 'expert' (did you mean experts?)"),
    (["router=tokens_choice", "+router.topk=2"], "unknown config key 'router.topk' (did you mean router.k?)"),
    (["model=nope"], "model=nope is unknown; allowed: b, s, ti, timm, tiny"),
    (["experts=[1"], "cannot parse the overrides: no viable alternative at input '[1'"),
    (["router=soft,dense"], "router=soft,dense: a sweep (several values) needs -m/--multirun"),
    (["-m", "router=soft,dense", "experts=4,abc"], "experts (router.num_experts) must be an int >= 1, got 'abc'"),
    (["data=imagefolder", "data.root=/nonexistent/moebench"], "data.root=/nonexistent/moebench: no such directory "
     "(/nonexistent/moebench); expected ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (or val/)"),
    (["-m", "data=cifar10", "data.root=/nonexistent/moebench"], "cifar10 not found in /nonexistent/moebench (no "
     "cifar-10-batches-py/ there); set data.download=true when online, or point data.root at torchvision's files "
     "or at an ImageFolder tree (ROOT/train/<class>/, ROOT/test/<class>/)"),
    (["router=tokens_choice", "router.granularity=3"], "router.granularity=3 must divide the expert width "
     "(model.mlp_dim=32)"),
    (["router=tokens_choice", "router.shared_experts=1"], "router.shared_experts=1 must be in [0, k * granularity = "
     "1): the shared experts (width hidden/granularity each) take that many of a token's 1 expert choices, and at "
     "least one must stay routed"),
    (["router=tokens_choice", "router.bias_rate=-0.001"], "router.bias_rate must be a finite number >= 0 or null, got -0.001"),
    (["router=tokens_choice", "router.gate=sigmoid", "router.assignment=sinkhorn"], "router.gate=sigmoid and "
     "router.assignment=sinkhorn do not combine: Sinkhorn Tokens Choice weights its pairs by the softmax (Liu et al. "
     "2024)"),
    (["experiment=/abs/dir/x.yaml"], "experiment=/abs/dir/x.yaml: experiment= takes a preset name, not a path; "
     "allowed: cifar10, smoke, tinyimagenet. For a preset file of your own, put it at DIR/experiment/NAME.yaml and "
     "run `moebench train --config-dir DIR experiment=NAME` (Hydra's --config-dir adds DIR to the search path; "
     "--config-dir DIR --config-name NAME would make DIR/NAME.yaml the whole config)"),
]


@pytest.mark.parametrize("overrides,line", REFUSED_BEFORE_ANY_WORK, ids=[" ".join(o) for o, _ in REFUSED_BEFORE_ANY_WORK])
def test_wrong_types_unknown_keys_and_bad_overrides_are_refused_before_any_work(tmp_path, overrides, line,
                                                                              cli_in_process):
    code, _, err = cli_in_process("train", *overrides, *TINY, cwd=tmp_path)
    assert code == 2
    assert err.splitlines() == [f"moebench: error: {line}"], err[-2000:]
    assert list(tmp_path.iterdir()) == []  # no run dir, no sweep dir


HEAVY = ("torch", "torchvision", "wandb")  # what a refusal must not wait for


def test_a_refusal_in_a_fresh_process_is_one_line_without_traceback(tmp_path):
    # The cases above run in the test's process; one of them as a user meets it: exit code and
    # stderr of a real `moebench` process.
    # Python lists every module it imports on stderr: the refusal (a router option's range) comes
    # before torch, torchvision or W&B is imported (importing torch alone took 9-32 s on a loaded machine).
    overrides, line = REFUSED_BEFORE_ANY_WORK[0]
    proc = moebench("train", *overrides, *TINY, cwd=tmp_path, env={**ENV, "PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 2
    timed = [row for row in proc.stderr.splitlines() if row.startswith("import time:")]
    imported = {row.rsplit("|", 1)[-1].strip().split(".")[0] for row in timed}
    assert "hydra" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert [row for row in proc.stderr.splitlines() if row not in timed] == [f"moebench: error: {line}"], \
        proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


REFUSED_WITHOUT_TORCH = [
    ["router=foo"],
    ["experts=-1"],
    ["data=cifar10", "data.root=/nonexistent/moebench"],
    ["router=tokens_choice", "k=9", "experts=8"],
]
# Runs the refusals in one fresh interpreter and reports, after each, which heavy modules it holds.
NO_TORCH_HARNESS = r"""
import contextlib, io, json, sys
from moebench import cli
cases, heavy = json.loads(sys.argv[1]), sys.argv[2:]  # (train rewrites sys.argv)
for args in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", *args])
    print(json.dumps({"code": code, "stderr": err.getvalue(), "heavy": [m for m in heavy if m in sys.modules]}))
"""


@pytest.mark.slow  # a fresh process (the default suite's fresh-process refusal checks one case the same way)
def test_a_refusal_of_the_command_line_prints_its_line_before_torch_is_imported(tmp_path):
    # Importing torch took 9 s at load 4 and 21-32 s at load 8; a refusal waited for it.
    cases = [[*overrides, *TINY] for overrides in REFUSED_WITHOUT_TORCH]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_HARNESS, json.dumps(cases), *HEAVY], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(reports) == len(cases)
    lines = []
    for args, report in zip(cases, reports):
        assert report["code"] == 2, (args, report)
        assert report["heavy"] == [], (args, report)
        [line] = report["stderr"].splitlines()
        lines.append(line)
    assert lines == [
        "moebench: error: router=foo is unknown; allowed: dense, experts_choice, soft, tokens_choice",
        "moebench: error: experts (router.num_experts) must be an int >= 1, got -1",
        "moebench: error: cifar10 not found in /nonexistent/moebench (no cifar-10-batches-py/ there); set "
        "data.download=true when online, or point data.root at torchvision's files or at an ImageFolder tree "
        "(ROOT/train/<class>/, ROOT/test/<class>/)",
        "moebench: error: k (router.k) must be in [1, experts=8], got 9",
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a torch import in a fresh process (tens of seconds on a loaded machine)
def test_the_no_torch_harness_sees_torch_when_a_command_passes_the_checks(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_HARNESS, json.dumps([["--cfg", "job", *TINY]]), *HEAVY],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert json.loads(proc.stdout.splitlines()[-1])["heavy"][:1] == ["torch"], proc.stderr[-3000:]


def test_the_router_declarations_checked_before_torch_are_the_registrys():
    from moebench import router_options
    from moebench.moe import registry

    own = [router.name for router in registry.routers() if router.build.__module__.startswith("moebench.")]
    assert list(router_options.BUILTIN) == own  # a refusal lists them in one order either way
    for name, declared in router_options.BUILTIN.items():
        router = registry.get(name)
        assert (router.options, router.check, router.check_sizes) == \
            (declared.options, declared.check, declared.check_sizes), name


def test_a_root_for_data_that_needs_none_is_one_warning(tmp_path):
    proc, run_dir = train(tmp_path, "data=digits", "data.root=/nonexistent/moebench", "data.num_train=64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("moebench: warning: ")]
    assert warnings == ["moebench: warning: data.root=/nonexistent/moebench is ignored: data=digits is bundled "
                        "with scikit-learn"]
    assert result(run_dir)["status"] == "completed"


@pytest.mark.parametrize("multirun", [[], ["-m"]], ids=["run", "sweep"])
def test_a_run_that_cannot_fit_in_memory_is_refused_before_any_allocation(tmp_path, multirun, cli_in_process):
    experts = ["experts=4,1000000000"] if multirun else ["experts=1000000000"]
    code, _, err = cli_in_process("train", *multirun, *TINY, *experts, cwd=tmp_path)
    assert code == 2, err[-2000:]
    [line] = err.splitlines()
    assert line.startswith("moebench: error: this run cannot fit in memory: experts=1000000000, model.dim=16, ")
    assert " GB (1,088,000,021,257 parameters with gradients and AdamW state " in line and "(RAM) has " in line
    assert list(tmp_path.iterdir()) == []  # no run dir, no sweep dir


@pytest.mark.slow  # three runs; test_faults.py's corrupt-checkpoint test is the default suite's
def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    proc, _ = train(tmp_path, f"resume={bad}", name="a")
    assert proc.returncode != 0 and "cannot read checkpoint" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr

    proc, run_dir = train(tmp_path, name="b")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = (run_dir / "last.pt").read_bytes()
    proc, _ = train(tmp_path, "experts=8", f"resume={run_dir}", name="c")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "does not match" in out and "router.num_experts" in out
    assert "Traceback" not in out
    assert (run_dir / "last.pt").read_bytes() == before  # nothing lost


@pytest.mark.slow  # four runs; test_faults.py's kill -9 test resumes to the same run in the default suite
@pytest.mark.parametrize("variant", [[], ["variant=tc_deepseek_e32", "experts=4"]], ids=["tokens_choice", "deepseek"])
def test_interrupted_then_resumed_run_equals_uninterrupted_run(tmp_path, variant):
    """deepseek: the balancing bias (a buffer moved after every step) resumes exactly too."""
    common = ["router=tokens_choice", *variant, "router.group_size=2", "train.epochs=3", "deterministic=true",
              "data.num_train=96"]
    proc, straight = train(tmp_path, *common, name="straight")
    assert proc.returncode == 0, proc.stderr[-2000:]

    proc, cut = train(tmp_path, *common, "train.time_limit_min=0", name="cut")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result(cut)["status"] == "stopped" and result(cut)["epochs_completed"] == 1
    proc, _ = train(tmp_path, *common, f"resume={cut}", name="resumed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result(cut)["status"] == "completed"

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    if variant:  # the bias moved, and its trajectory is in the routing metrics
        biases = [tensor for key, tensor in a["model"].items() if key.endswith("selection_bias")]
        assert biases and all(bias.abs().sum() > 0 for bias in biases)
        assert any(key.endswith("/bias_spread") for line in metric_lines(cut) for key in line)
    evals = lambda d: [{k: v for k, v in line.items() if k.startswith("test/")} for line in metric_lines(d)
                       if "test/top1" in line]
    assert evals(straight) == evals(cut)
    steps = [line["step"] for line in metric_lines(cut)]
    assert steps == [line["step"] for line in metric_lines(straight)]  # no duplicated lines after resume
    assert result(straight)["quality"] == result(cut)["quality"]

    trained_for = result(cut)["train_time_s"]
    proc, _ = train(tmp_path, *common, f"resume={cut}", name="again")  # resuming a finished run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result(cut)["status"] == "completed" and result(cut)["epochs_completed"] == 3
    assert result(cut)["quality"] == result(straight)["quality"]
    # measured again, not trained again: its training time is the checkpoint's, with nothing added
    assert result(cut)["train_time_s_this_process"] == 0
    assert result(cut)["train_time_s"] == pytest.approx(torch.load(cut / "last.pt", weights_only=True)["train_time_s"])
    assert result(cut)["train_time_s"] <= trained_for


@pytest.mark.slow  # W&B's service start; the sweep test of test_pareto.py logs offline in the default suite
def test_wandb_offline_run_files(tmp_path):
    env = {**ENV, "WANDB_DIR": str(tmp_path / "wandb-global")}
    run_dir = tmp_path / "run"
    proc = moebench("train", *TINY, "wandb.mode=offline", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.slow  # a pip install and three runs
def test_non_editable_install_works_from_any_directory(tmp_path):
    """Build and install the project like a user (`pip install .`), then run it away from the repo."""
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO)], capture_output=True, text=True, timeout=900,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    shipped = {p.relative_to(site / "moebench" / "conf") for p in (site / "moebench" / "conf").rglob("*.yaml")}
    assert shipped == {p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")}  # every group
    modules = {p.relative_to(site / "moebench") for p in (site / "moebench").rglob("*.py") if "conf" not in p.parts}
    assert modules == {p.relative_to(REPO / "moebench") for p in (REPO / "moebench").rglob("*.py")}  # every subpackage
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**ENV, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import moebench; print(moebench.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env)
    assert where.stdout.strip().startswith(str(site))
    proc = moebench("train", *TINY, "hydra.run.dir=out", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(work / "out")["status"] == "completed"


def test_bf16_autocast_trains_with_finite_losses(bf16_run):
    losses = [line["train/loss"] for line in metric_lines(bf16_run) if "train/loss" in line]  # conftest: trained once
    assert losses and all(0 < loss < 10 for loss in losses)


@pytest.mark.slow
def test_torch_compile_keeps_the_aux_losses(tmp_path):
    proc, run_dir = train(tmp_path, "router=tokens_choice", "router.group_size=2", "compile=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    aux = [line["train/aux_loss"] for line in metric_lines(run_dir) if "train/aux_loss" in line]
    assert aux and all(a > 0 for a in aux)


@pytest.mark.slow  # four runs
def test_rerunning_into_the_same_dir_skips_completed_and_resumes_unfinished(tmp_path):
    common = ["router=soft", "train.epochs=2", "deterministic=true"]
    proc, run_dir = train(tmp_path, *common, "train.time_limit_min=0")
    assert proc.returncode == 0 and result(run_dir)["status"] == "stopped"
    # as a checkpoint written before checkpoints carried the training time: the resumed run's time is partial
    old = torch.load(run_dir / "last.pt", weights_only=True)
    assert old.pop("train_time_s") > 0 and old.pop("train_time_s_partial") is False
    from moebench.checkpoint import with_checksum
    torch.save(with_checksum(old), run_dir / "last.pt")
    proc, _ = train(tmp_path, *common)  # the same command again (no time limit): picks up at epoch 1
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout + proc.stderr
    finished = result(run_dir)
    assert finished["status"] == "completed" and finished["epochs_completed"] == 2
    assert finished["train_time_s_partial"] and finished["train_time_s"] == finished["train_time_s_this_process"]
    proc, straight = train(tmp_path, *common, name="straight")
    assert finished["quality"] == result(straight)["quality"]

    stamp = (run_dir / "result.json").stat().st_mtime_ns
    proc, _ = train(tmp_path, *common)  # once more: nothing to do
    assert proc.returncode == 0 and "skipping" in proc.stdout + proc.stderr
    assert (run_dir / "result.json").stat().st_mtime_ns == stamp
