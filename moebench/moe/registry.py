"""Routers by name: each router's module describes it once and registers it here.

A ``Router`` is everything the harness needs to know about one router: how to
build its layer from the options under ``router.*`` of a config, the type and
range of each option, the cross-key rules of its options, the words of its arm
label on a frontier, and a few facts (does it route at all, which parameters a
forward may leave unused). The layer itself describes its routing
(``layer.routing(x)``). ``moebench train``, ``pareto``, ``inspect`` and
``bench`` look routers up here, so adding one is one module that calls
``register`` (a module outside moebench too: MOEBENCH_PLUGINS, see
moebench/plugins.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..router_options import Options, no_rule, no_size_rule, unknown_router

Get = Callable[[str], Any]  # an option's value by key, None when absent


def never(options: Options) -> bool:
    return False


@dataclass(frozen=True)
class Router:
    name: str  # router.name in a config
    build: Callable[[int, int, int, Options], nn.Module]  # (dim, hidden_dim, num_tokens, options) -> layer
    options: dict = field(default_factory=dict)  # option key -> schema.Spec (type and range); built-ins': router_options.py
    label: Callable[[Get], list[str]] = lambda get: []  # arm label words after the name
    check: Callable[[Options], str | None] = no_rule  # cross-key rules: the error line, or None
    check_sizes: Callable[[Options, int, int], str | None] = no_size_rule
    # rules between the options and the layer's (dim, hidden_dim), when the config knows them: the error line, or None
    ignored: Callable[[Options], tuple[str, ...]] = lambda options: ()
    # options that change nothing at these values (e.g. capacity when dropless): jobs differing only there repeat a run
    caveat: Callable[[Options], str | None] = no_rule
    # a setting that trains, but not as one may expect (e.g. a constant gate): the warning line, or None
    routed: bool = True  # False: the dense baseline (no MoE blocks, no experts to shard or upcycle into)
    replaces_blocks: Callable[[Options], bool] = never  # unrouted only: still replaces the MoE blocks' MLPs
    unused_parameters: Callable[[Options], bool] = never  # a forward may leave parameters without gradient (DDP)
    bench: Callable[[int, int], dict[str, Callable[[int, int], nn.Module]]] | None = None
    # bench(experts, tokens) -> {case name: factory(dim, hidden)}: cases `moebench bench` times
    # (None: the bench's own cases cover the router)
    marker: str = "P"  # its marker on the frontier plots
    order: int = 9  # its place in lists and plot legends (then registration order)


_REGISTRY: dict[str, Router] = {}


def register(router: Router) -> Router:
    """Add ``router`` (or replace the one of that name); returns it."""
    _REGISTRY[router.name] = router
    return router


def get(name: str) -> Router:
    """The router named ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_router(name)) from None


def find(name: str | None) -> Router | None:
    return _REGISTRY.get(name)


def routers() -> list[Router]:
    return sorted(_REGISTRY.values(), key=lambda router: router.order)


def names() -> list[str]:
    return [router.name for router in routers()]


def default_bench(name: str, build: Callable[[int, int, int, Options], nn.Module]):
    """One bench case per expert count with the router's default options (``Router.bench``)."""
    def cases(experts: int, tokens: int) -> dict[str, Callable[[int, int], nn.Module]]:
        return {f"{name}/E={experts}": lambda d, h: build(d, h, tokens, {"num_experts": experts})}
    return cases
