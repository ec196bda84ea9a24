"""Importing moebench changes nothing global: the allocator tuning and the OmegaConf resolvers
are set up by the command (cli.main, train.main), or by a library user's explicit call. Nor does it
import torch._dynamo (as long to import as torch): only torch.compile and the optimizers need it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Runs in a fresh interpreter: a spy on the C library records every mallopt looked up.
PROBE = r"""
import ctypes, importlib, json, pkgutil, sys

looked_up = []

class SpyCDLL(ctypes.CDLL):
    def __getattr__(self, name):
        looked_up.append(name)
        return super().__getattr__(name)

ctypes.CDLL = SpyCDLL
from omegaconf import OmegaConf
import moebench
modules = sorted(m.name for m in pkgutil.walk_packages(moebench.__path__, "moebench.") if m.name != "moebench.__main__")
for name in modules:
    importlib.import_module(name)
names = ("moebench_label", "moebench_now", "moebench_help")
print(json.dumps({"modules": modules, "mallopt": "mallopt" in looked_up, "dynamo": "torch._dynamo" in sys.modules,
                  "resolvers": [n for n in names if OmegaConf.has_resolver(n)]}), flush=True)

import moebench.moe, moebench.resolvers
tuned = moebench.moe.tune_cpu_allocator()  # the documented calls do what the imports must not
moebench.resolvers.register()
print(json.dumps({"mallopt": "mallopt" in looked_up, "resolvers": [n for n in names if OmegaConf.has_resolver(n)]}))
"""


def test_importing_every_moebench_module_tunes_no_allocator_registers_no_resolver_and_skips_dynamo():
    env = {k: v for k, v in os.environ.items() if k != "MOEBENCH_MALLOC_TUNING"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 1, proc.stderr[-3000:]
    after_import = json.loads(lines[0])
    assert {"moebench.moe", "moebench.train", "moebench.cli", "moebench.progress"} <= set(after_import["modules"])
    assert (after_import["mallopt"], after_import["resolvers"], after_import["dynamo"]) == (False, [], False)
    # The explicit calls are seen, so the check above can fail.
    assert proc.returncode == 0, proc.stderr[-3000:]
    after_calls = json.loads(lines[1])
    assert after_calls["resolvers"] == ["moebench_label", "moebench_now", "moebench_help"]
    if sys.platform.startswith("linux"):
        assert after_calls["mallopt"]
