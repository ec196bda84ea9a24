"""`moebench bench` end to end on tiny shapes (the figures are benchmarks, never asserted as timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--dim", "8", "--hidden", "16", "--tokens", "8", "--batch", "16", "--experts", "2", "8",
        "--repeats", "1", "--warmup", "0"]

FAKE_SOFT_PEER = '''
import torch
from torch import nn

class SoftMoE(nn.Module):  # stands in for soft-moe-pytorch: same constructor keywords
    def __init__(self, dim, *, num_experts, num_slots, expert_mult, offload_unused_experts_to_cpu):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.seen = (num_experts, num_slots, expert_mult)

    def forward(self, x):
        return self.proj(x)
'''


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moebench", "bench", *args], capture_output=True, text=True,
                          env=ENV, timeout=900)


def test_bench_reports_every_ratio_and_imports_peers_from_a_directory(tmp_path):
    package = tmp_path / "peers" / "soft-moe-pytorch" / "soft_moe_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_SOFT_PEER)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = bench(*TINY, "--peers", str(tmp_path / "peers"), "--out", str(out), "--markdown", str(md))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["layer"]: row for row in result["training"]["rows"]}
    assert {"dense", "soft64/E=8", "soft256/E=2", "tokens_choice/E=8", "experts_choice/E=2",
            "tokens_choice_top2/E=8", "peer_soft_moe_pytorch/E=8", "tokens_choice_deepseek/E=8"} <= set(rows)
    # DeepSeek's pieces at matched expert FLOPs: 1 shared + top-3 of 32 experts of width 4 against top-1 of 8 of
    # width 16 (8 tokens x 16 images in groups of 8: the capacities divide); the 4x wider gate adds 2 d 8 (4 - 1) per token
    deepseek, plain = rows["tokens_choice_deepseek/E=8"], rows["tokens_choice/E=8"]
    assert deepseek["fwd_bwd_gflop"] - plain["fwd_bwd_gflop"] == pytest.approx(3 * 16 * 8 * 2 * 8 * 8 * 3 / 1e9)
    # dropless at k=1 against capacity at C=1 (the capacities divide): the grouped matmul does the same matmul work,
    # padding to the largest load adds its padded rows; ReMoE times its layer at the target sparsity
    dropless = rows["tokens_choice_dropless_grouped/E=8"]
    assert dropless["fwd_bwd_gflop"] == pytest.approx(plain["fwd_bwd_gflop"])
    assert rows["tokens_choice_dropless_padded/E=8"]["fwd_bwd_gflop"] >= dropless["fwd_bwd_gflop"]
    assert {"remoe_grouped/E=8", "remoe_padded/E=8"} <= set(rows)
    assert "peer_st_moe_pytorch/E=8" not in rows  # absent from the directory: skipped with a note
    assert any("st-moe-pytorch" in note for note in result["notes"])
    assert rows["dense"]["time_ratio_to_dense"] == 1.0 and rows["dense"]["flop_ratio_to_dense"] == 1.0
    # 8 tokens, 8 experts at one slot each: experts 4*B*S*d*h vs dense 4*B*T*d*h, plus routing 6*B*T*S*d.
    assert rows["soft64/E=8"]["flop_ratio_to_dense"] == 1 + 6 * 8 * 8 / (4 * 8 * 16)
    assert result["training"]["matmul_peak_gflops"] > 0
    # The bare stacked-expert call does dense's matmul work exactly, split over E buffers; a reference, no target.
    assert rows["experts_bmm/E=8"]["flop_ratio_to_dense"] == 1.0
    assert rows["experts_bmm/E=8"]["fwd_bwd_gflop"] == rows["dense"]["fwd_bwd_gflop"]
    assert not any("experts_bmm" in t["target"] for t in result["targets"])
    # The opt-in statistics: the same routing and FLOPs as the layer as imported, timed beside it, no target.
    for router in ("tokens_choice", "experts_choice"):
        assert rows[f"{router}_tracked/E=8"]["fwd_bwd_gflop"] == rows[f"{router}/E=8"]["fwd_bwd_gflop"]
    assert not any("_tracked" in t["target"] for t in result["targets"])
    assert all(0 < row["fraction_of_peak"] for row in rows.values())
    targets = [t["target"] for t in result["targets"]]
    assert any("vs soft-moe-pytorch" in t for t in targets)
    assert any(t.startswith("tokens_choice: time(E=8) / time(E=2)") for t in targets)
    assert any("fraction of fp32 matmul peak" in t for t in targets)
    inference = {row["model"]: row for row in result["inference"]["rows"]}
    assert inference["layer dense"]["latency_ratio_to_dense"] == 1.0
    assert {"vit-cifar10 soft", "vit-cifar10 tokens_choice", "vit-cifar10 experts_choice"} <= set(inference)
    assert "| soft64/E=8 |" in md.read_text()


def test_bench_refuses_bad_arguments_in_one_line(tmp_path, cli_in_process):
    # refusals: in this process (a fresh one spends seconds importing torch first; the test above is the fresh one)
    for args, word in ((["--experts", "0"], "--experts"), (["--peers", str(tmp_path / "missing")], "--peers")):
        code, _, err = cli_in_process("bench", *args, cwd=tmp_path)
        assert code == 2
        assert "Traceback" not in err and word in err and len(err.strip().splitlines()) == 1


PLANTED = '''
import pathlib
pathlib.Path(__file__).parents[2].joinpath("planted-code-ran").write_text("yes")
'''


def test_bench_refuses_peers_others_can_write_or_own_and_make_keeps_them_out_of_tmp(tmp_path, cli_in_process):
    peers = tmp_path / "peers"
    package = peers / "soft-moe-pytorch" / "soft_moe_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PLANTED)
    cases = [(peers, 0o777, None, "is writable by other users (mode 777)"),  # e.g. a dir made in /tmp
             (package / "__init__.py", 0o666, None, "is writable by other users (mode 666)")]
    if os.getuid() == 0:  # only root can give a file away
        cases.append((package, 0o755, 65534, "is owned by another user (uid 65534)"))
    for path, mode, owner, reason in cases:
        before = path.stat()
        path.chmod(mode)
        if owner is not None:
            os.chown(path, owner, -1)
        # in this process: the check comes before any import of the peers (the planted file says if one ran)
        code, _, err = cli_in_process("bench", *TINY, "--only", "dense", "--no-inference", "--peers", str(peers),
                                      cwd=tmp_path)
        assert code == 2, err[-2000:]
        assert err.splitlines() == [f"moebench: error: refusing to import peers from --peers {peers}: "
                                    f"{path} {reason}" + ("; chmod go-w it" if owner is None else "")]
        assert not (peers / "planted-code-ran").exists()
        path.chmod(before.st_mode & 0o777)
        if owner is not None:
            os.chown(path, before.st_uid, -1)

    home = tmp_path / "home"
    (home / ".cache" / "moebench" / "peers").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    make = subprocess.run(["make", "-n", "bench", f"HOME={home}"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, timeout=600)
    assert f"--peers {home}/.cache/moebench/peers " in make.stdout, make.stdout + make.stderr
