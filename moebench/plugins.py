"""Routers from outside moebench: the modules named in MOEBENCH_PLUGINS, imported by the command.

A plugin module registers its router on import (``moebench.moe.registry.register``)
and, for ``router=NAME`` on the command line, its config (e.g. Hydra's
``ConfigStore.instance().store(group="router", name=NAME, node={...})``)::

    MOEBENCH_PLUGINS=my_routers moebench train router=hash

Several modules: comma-separated. ``moebench`` imports them before any
subcommand; a job that runs in another process (a launcher's worker) imports
them when it meets a router name it does not know (``build.router_of``).
"""

from __future__ import annotations

import importlib
import os

from .errors import ConfigError

ENV = "MOEBENCH_PLUGINS"


def names() -> list[str]:
    return [name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()]


def load() -> None:
    """Import every plugin module (again: a no-op); ConfigError (one line) when one cannot be imported."""
    for name in names():
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure of a user's module is this one line
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"{ENV}: cannot import {name!r}: {type(err).__name__}: {first}") from None
