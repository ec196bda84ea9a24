"""A config value's type and range (``Spec``), and the constructors the schemas are written with.

It imports nothing of moebench: schema.py (the train config's keys) and router_options.py (the built-in routers'
options) both declare their keys with these, and the routers' modules and plugins too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NUMBER = (int, float)


@dataclass(frozen=True)
class Spec:
    kind: str  # int, float, bool, str, list
    low: float | None = None  # value >= low (or > low when ``open_low``)
    open_low: bool = False
    high: float | None = None  # value < high
    choices: tuple = ()  # allowed strings (for kind str: the only ones; else: besides the kind)
    nullable: bool = False
    item: str | None = None  # kind list: the kind of each item
    infinite: bool = False  # kind float: inf is a meaningful value (NaN never is)

    def allowed(self) -> str:
        parts = []
        if self.kind in ("int", "float"):
            what = "an int" if self.kind == "int" else ("a number" if self.infinite else "a finite number")
            if self.low is not None:
                what += f" {'>' if self.open_low else '>='} {self.low:g}"
            if self.high is not None:
                what += f" and < {self.high:g}"
            parts.append(what)
        elif self.kind == "bool":
            parts.append("true or false")
        elif self.kind == "list":
            parts.append(f"a list{f' of {self.item}s' if self.item else ''}, e.g. [1,2]")
        elif not self.choices:
            parts.append("a string")
        parts += list(self.choices)
        if self.nullable:
            parts.append("null")
        return ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1]

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str) and value in self.choices:
            return True
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if self.kind == "list":
            return isinstance(value, list) and all(Spec(self.item).accepts(v) for v in value) if self.item \
                else isinstance(value, list)
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else NUMBER):
            return False
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not self.infinite)):
            return False  # NaN passes every comparison below; inf only where the key gives it a meaning
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value < self.high


def Int(low=None, **kw) -> Spec:
    return Spec("int", low, **kw)


def Float(low=None, **kw) -> Spec:
    return Spec("float", low, **kw)


def Positive(**kw) -> Spec:
    return Spec("float", 0, open_low=True, **kw)


BOOL, STR = Spec("bool"), Spec("str")


def Choice(*choices: str, **kw) -> Spec:
    return Spec("str", choices=choices, **kw)


ROUNDING = Int(1, choices=("ceil", "round"))
