"""What each merge method takes, as plain data: its per-parent parameters with their defaults, its options, how
many parents, whether it needs a base.  Torch-free, so a study or recipe file is checked without loading torch;
`merge/methods.py` attaches a function to each spec.

`check_recipe` checks a recipe against its method before any tensor is read, naming the offending field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import EvomergeError


@dataclass(frozen=True)
class MethodSpec:
    """A method's contract.

    ``tensor_params``: per-parent values a recipe gives per merge group, with their defaults (None = required).
    ``options``: global options with defaults.  ``aux``: what the function needs besides the tensors (``keep`` from
    a magnitude window, ``row_ranks`` from the parents, ``bits`` from the recipe seed).  ``models``: allowed number of
    parents (min, max).  ``uses_base``: the function works on task vectors and needs a base model.  ``whole_tensor``:
    the function reduces over the whole tensor (norms), so it cannot run chunk by chunk.
    """

    name: str
    tensor_params: dict[str, float | None]
    options: dict[str, Any] = field(default_factory=dict)
    uses_base: bool = True
    aux: tuple[str, ...] = ()
    models: tuple[int, int | None] = (1, None)
    whole_tensor: bool = False

    @property
    def random(self) -> bool:
        return "bits" in self.aux

    def spec_fields(self) -> dict[str, Any]:
        """This spec's fields, for building a method from it (see `merge.methods.METHODS`)."""
        return {f.name: getattr(self, f.name) for f in fields(MethodSpec)}


_GTA = {"normalize": False, "lambda": 1.0}
_RANDOM = {"rescale": True, "rescale_mode": "density"}
RESCALE_MODES = ("density", "l1")

SPECS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("linear", {"weight": None}, {"normalize": True}, uses_base=False),
        MethodSpec("task_arithmetic", {"weight": None}, dict(_GTA)),
        MethodSpec("ties", {"weight": None, "density": 1.0}, {**_GTA, "normalize": True}, aux=("keep",)),
        MethodSpec("dare_ties", {"weight": None, "density": 1.0}, {**_GTA, **_RANDOM}, aux=("bits",)),
        MethodSpec("dare_linear", {"weight": None, "density": 1.0}, {**_GTA, **_RANDOM}, aux=("bits",)),
        MethodSpec("breadcrumbs", {"weight": None, "density": 1.0, "gamma": 0.01}, dict(_GTA), aux=("keep",)),
        MethodSpec("breadcrumbs_ties", {"weight": None, "density": 1.0, "gamma": 0.01}, dict(_GTA), aux=("keep",)),
        MethodSpec("della", {"weight": None, "density": 1.0, "epsilon": 0.0}, {**_GTA, **_RANDOM, "normalize": True},
                   aux=("row_ranks", "bits")),
        MethodSpec("della_linear", {"weight": None, "density": 1.0, "epsilon": 0.0}, {**_GTA, **_RANDOM},
                   aux=("row_ranks", "bits")),
        MethodSpec("slerp", {"t": None}, models=(1, 1), whole_tensor=True),
        MethodSpec("model_stock", {}, models=(2, None), whole_tensor=True),
        MethodSpec("passthrough", {"weight": None}, uses_base=False),
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
    full = {p: values.get(p, [d] * n) for p, d in m.tensor_params.items()}
    bounds = {"density": (0.0, 1.0, "(0, 1]"), "t": (0.0, 1.0, "[0, 1]"), "gamma": (0.0, 1.0, "[0, 1)"),
              "epsilon": (0.0, 1.0, "[0, 1)")}
    for p, (lo, hi, text) in bounds.items():
        for v in full.get(p, []):
            bad = (v <= lo if p == "density" else v < lo) or (v >= hi if p in ("gamma", "epsilon") else v > hi)
            if bad:
                raise InvalidRecipe(f"{where}.{p}", f"{v} is outside {text}")
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
