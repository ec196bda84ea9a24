"""The ``${moebench_*:}`` interpolations of conf/train.yaml, registered when the train app starts.

OmegaConf's resolvers are process-wide, so registering them is left to the
command (``train.main``, and ``preflight.prepare``, which composes Hydra's own
keys) rather than done on import: importing a moebench module changes nothing
global.
"""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf


def dirname_label(override_dirname: str, limit: int = 120) -> str:
    """A sweep job's dir label: its overrides, one path component (no "/"), shortened
    with a hash past ``limit`` characters (file names stop at 255)."""
    override_dirname = override_dirname.replace("/", "_")
    if len(override_dirname) <= limit:
        return override_dirname or "default"
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return f"{override_dirname[:limit].rsplit(',', 1)[0]},...{digest}"


def register(stamp=None) -> None:
    """Register moebench_label (sweep job dirs), moebench_now (one start stamp for all ranks)
    and moebench_help (`moebench train --help`); idempotent. ``stamp``: strftime of the start
    time, for `--help`, which needs no ranks (distributed.run_stamp imports torch)."""
    from . import confhelp  # the help text is its

    if stamp is None:
        from . import distributed  # the stamp all ranks share

        stamp = distributed.run_stamp
    OmegaConf.register_new_resolver("moebench_label", dirname_label, replace=True)
    OmegaConf.register_new_resolver("moebench_now", stamp, replace=True)
    OmegaConf.register_new_resolver("moebench_help", confhelp.help_resolver, replace=True)
