"""What each merge method takes, as plain data: its per-parent parameters with their defaults and bounds, its
options with their defaults, how many parents, whether it needs a base.  Torch-free, so a study or recipe file is
checked without loading torch; in `merge/methods.py` each kernel registers against its spec with `@merge_method`,
which reads the kernel's signature and gives its options these defaults (written once, here).

`check_recipe` checks a recipe against its method before any tensor is read, naming the offending field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import EvomergeError


@dataclass(frozen=True)
class Param:
    """A per-parent parameter: its default (None: a recipe must give it) and the interval its values lie in, written
    as the documentation writes it (``(0, 1]``); None admits any finite value."""

    name: str
    default: float | None = None
    interval: str | None = None

    def admits(self, v: float) -> bool:
        if self.interval is None:
            return True
        lo, hi = (float(x) for x in self.interval[1:-1].split(","))
        return (v > lo if self.interval[0] == "(" else v >= lo) and (v < hi if self.interval[-1] == ")" else v <= hi)


WEIGHT = Param("weight")
DENSITY = Param("density", 1.0, "(0, 1]")  # the fraction of each task vector kept
GAMMA = Param("gamma", 0.01, "[0, 1)")  # breadcrumbs: the top fraction dropped as outliers
EPSILON = Param("epsilon", 0.0, "[0, 1)")  # DELLA: how far keep probabilities spread around density
T = Param("t", None, "[0, 1]")  # slerp: 0 is the base, 1 the parent


@dataclass(frozen=True)
class MethodSpec:
    """A method's contract.

    ``params``: per-parent values a recipe gives per merge group (`Param`).  ``options``: global options with
    defaults.  ``aux``: what the function needs besides the tensors (``keep`` from a magnitude window, ``row_ranks``
    from the parents, ``bits`` from the recipe seed).  ``models``: allowed number of parents (min, max).
    ``uses_base``: the function works on task vectors and needs a base model.  ``whole_tensor``: the function reduces
    over the whole tensor (norms), so it cannot run chunk by chunk.
    """

    name: str
    params: tuple[Param, ...]
    options: dict[str, Any] = field(default_factory=dict)
    uses_base: bool = True
    aux: tuple[str, ...] = ()
    models: tuple[int, int | None] = (1, None)
    whole_tensor: bool = False

    @property
    def tensor_params(self) -> dict[str, float | None]:
        """Per-parent parameter names with their defaults (None = required)."""
        return {p.name: p.default for p in self.params}

    @property
    def random(self) -> bool:
        return "bits" in self.aux

    @property
    def row_ranked(self) -> bool:
        """DELLA's MagPrune: the kernel reads each entry's magnitude rank within its row."""
        return "row_ranks" in self.aux

    def spec_fields(self) -> dict[str, Any]:
        """This spec's fields, for building a method from it (see `merge.methods.METHODS`)."""
        return {f.name: getattr(self, f.name) for f in fields(MethodSpec)}


_GTA = {"normalize": False, "lambda": 1.0}
_RANDOM = {"rescale": True, "rescale_mode": "density"}
RESCALE_MODES = ("density", "l1")

SPECS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("linear", (WEIGHT,), {"normalize": True}, uses_base=False),
        MethodSpec("task_arithmetic", (WEIGHT,), dict(_GTA)),
        MethodSpec("ties", (WEIGHT, DENSITY), {**_GTA, "normalize": True}, aux=("keep",)),
        MethodSpec("dare_ties", (WEIGHT, DENSITY), {**_GTA, **_RANDOM}, aux=("bits",)),
        MethodSpec("dare_linear", (WEIGHT, DENSITY), {**_GTA, **_RANDOM}, aux=("bits",)),
        MethodSpec("breadcrumbs", (WEIGHT, DENSITY, GAMMA), dict(_GTA), aux=("keep",)),
        MethodSpec("breadcrumbs_ties", (WEIGHT, DENSITY, GAMMA), dict(_GTA), aux=("keep",)),
        MethodSpec("della", (WEIGHT, DENSITY, EPSILON), {**_GTA, **_RANDOM, "normalize": True},
                   aux=("row_ranks", "bits")),
        MethodSpec("della_linear", (WEIGHT, DENSITY, EPSILON), {**_GTA, **_RANDOM}, aux=("row_ranks", "bits")),
        MethodSpec("slerp", (T,), models=(1, 1), whole_tensor=True),
        MethodSpec("model_stock", (), models=(2, None), whole_tensor=True),
        MethodSpec("passthrough", (WEIGHT,), uses_base=False),
    )
}


def get_spec(name: str) -> MethodSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; allowed: {', '.join(SPECS)}") from None


class InvalidRecipe(EvomergeError, ValueError):
    """A recipe that no model could satisfy; `field` is the dotted path of the offending entry."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


_OPTION_TYPES = {"normalize": bool, "rescale": bool, "lambda": (int, float), "rescale_mode": str}


def check_recipe(method_name: str, base: str | None, parents: list[str], groups: dict[str, dict[str, list[float]]],
                 options: dict[str, Any]) -> MethodSpec:
    """Check a recipe against its method's contract; raise `InvalidRecipe` naming the field, else return the spec."""
    if method_name not in SPECS:
        raise InvalidRecipe("method", f"unknown merge method {method_name!r}; allowed: {', '.join(SPECS)}")
    m = SPECS[method_name]
    if m.uses_base and not base:
        raise InvalidRecipe("base", f"method {m.name} works on task vectors (parent minus base): set the base model")
    lo, hi = m.models
    if len(parents) < lo or (hi is not None and len(parents) > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        extra = " (slerp interpolates two models: the base, at t=0, and one parent)" if m.name == "slerp" else ""
        raise InvalidRecipe("parents", f"method {m.name} takes {want} parent(s) besides the base, got {len(parents)}"
                                       f"{extra}")
    for k, v in options.items():
        if k not in m.options:
            raise InvalidRecipe(f"options.{k}", f"not an option of {m.name}; allowed: {', '.join(m.options) or 'none'}")
        if not isinstance(v, _OPTION_TYPES[k]) or (k == "lambda" and isinstance(v, bool)):
            raise InvalidRecipe(f"options.{k}", f"expected {_OPTION_TYPES[k]}, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidRecipe(f"options.{k}", "must be finite (not NaN or infinity)")
        if k == "rescale_mode" and v not in RESCALE_MODES:
            raise InvalidRecipe(f"options.{k}", f"{v!r} is not one of {', '.join(RESCALE_MODES)}")
    normalize = {**m.options, **options}.get("normalize", False)
    for g, values in groups.items():
        _check_group(m, f"groups.{g}", values, len(parents), normalize)
    return m


def _check_group(m: MethodSpec, where: str, values: dict[str, list[float]], n: int, normalize: bool) -> None:
    for p, vs in values.items():
        if p not in m.tensor_params:
            raise InvalidRecipe(f"{where}.{p}", f"not a parameter of {m.name}; allowed: "
                                                f"{', '.join(m.tensor_params) or 'none'}")
        if not isinstance(vs, list) or len(vs) != n or not all(isinstance(v, (int, float)) for v in vs):
            raise InvalidRecipe(f"{where}.{p}", f"expected a list of {n} numbers (one per parent), got "
                                                f"{str(vs)[:80]!r}")
        if not all(math.isfinite(v) for v in vs):
            raise InvalidRecipe(f"{where}.{p}", "values must be finite")
    for p, default in m.tensor_params.items():
        if default is None and p not in values:
            raise InvalidRecipe(f"{where}.{p}", f"required by {m.name} (one value per parent)")
    full = {p.name: values.get(p.name, [p.default] * n) for p in m.params}
    for p in m.params:
        for v in full[p.name]:
            if not p.admits(v):
                raise InvalidRecipe(f"{where}.{p.name}", f"{v} is outside {p.interval}")
    if "epsilon" in full:
        for d, e in zip(full["density"], full["epsilon"]):
            if d < 1 and (d - e < 0 or d + e > 1):
                raise InvalidRecipe(f"{where}.epsilon", f"density ± epsilon must lie within [0, 1] (density {d}, "
                                                        f"epsilon {e})")
    if normalize and "weight" in full and abs(sum(full["weight"])) < 1e-8:
        raise InvalidRecipe(f"{where}.weight", "weights sum to zero, which `normalize` would divide by; "
                                               "set options.normalize: false or change the weights")
    if m.name == "passthrough" and sum(w != 0 for w in full["weight"]) != 1:
        raise InvalidRecipe(f"{where}.weight", "passthrough takes each group from exactly one parent: "
                                               "give exactly one non-zero weight (its scale)")
