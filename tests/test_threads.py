"""How moebench's processes share a CPU with other work: idle OpenMP threads sleep, not spin."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = """
import os, sys
from moebench import cli
assert "torch" not in sys.modules, "cli imports torch before it can set the OpenMP wait policy"
cli.sleep_idle_openmp_threads()
print(os.environ["OMP_WAIT_POLICY"])
"""


def policy_in_a_fresh_process(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env={**base, **env},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_the_cli_sets_a_passive_wait_before_torch_loads_and_keeps_the_users_choice():
    assert policy_in_a_fresh_process() == "PASSIVE"
    assert policy_in_a_fresh_process(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
