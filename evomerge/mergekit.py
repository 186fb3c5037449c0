"""mergekit merge configs ⇄ Recipes, so a config a user already trusts means the same thing here, and back.

mergekit sets a parameter per tensor: a scalar, a gradient (a list interpolated over the layers at
``t = layer / (layers - 1)``; 0 for the embeddings, 1 for the final norm and head) or a list of ``{filter, value}``
conditions matched as substrings of tensor names.  A Recipe sets it per merge group (``embed``, ``layers.<i>``,
``head``), so import evaluates each setting for every tensor of a group and refuses settings that would split a group
(e.g. different ``self_attn`` and ``mlp`` values within one layer).  Export writes the exact per-group values as a
gradient over the layers plus one filter per embedding/head tensor.

Slices whose sources keep every layer in place (each output layer i comes from layer i of its sources) are per-layer
parameter settings and import into a Recipe; slices that stack or reorder layers (frankenmerges) change the data flow
and are refused here.
"""
from __future__ import annotations

import math
from typing import Any

from .io import ModelInfo, tensor_group
from .merge.methods import METHODS, InvalidRecipe
from .recipe import Recipe

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source"}
OUT_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def check_sections(data: dict[str, Any]) -> None:
    """Each section of a mergekit config has the type mergekit gives it, before anything reads it: a mapping where
    mergekit has a mapping (parameters), names as strings, models and slices as lists of mappings."""
    def need(value: Any, types: tuple[type, ...], field: str, want: str) -> None:
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise InvalidRecipe(field, f"expected {want}, got {_kind(value)}")

    need(data.get("merge_method"), (str,), "merge_method", "a method name")
    for k in ("base_model", "dtype", "out_dtype", "tokenizer_source"):
        need(data.get(k), (str,), k, "a string")
    need(data.get("parameters"), (dict,), "parameters", "a mapping of parameter: value")
    need(data.get("models"), (list,), "models", "a list of {model, parameters}")
    for i, e in enumerate(data.get("models") or []):
        need(e, (dict,), f"models.{i}", "a mapping {model: ..., parameters: {...}}")
        need(e.get("model"), (str,), f"models.{i}.model", "a model directory")
        need(e.get("parameters"), (dict,), f"models.{i}.parameters", "a mapping of parameter: value")
    need(data.get("slices"), (list,), "slices", "a list of {sources: [...]}")
    for i, sl in enumerate(data.get("slices") or []):
        need(sl, (dict,), f"slices.{i}", "a mapping {sources: [...]}")
        need(sl.get("parameters"), (dict,), f"slices.{i}.parameters", "a mapping of parameter: value")
        need(sl.get("sources"), (list,), f"slices.{i}.sources", "a list of {model, layer_range}")
        for j, src in enumerate(sl.get("sources") or []):
            where = f"slices.{i}.sources.{j}"
            need(src, (dict,), where, "a mapping {model: ..., layer_range: [start, end]}")
            if "model" not in src:
                raise InvalidRecipe(f"{where}.model", "required field is missing")
            need(src.get("model"), (str,), f"{where}.model", "a model directory")
            need(src.get("parameters"), (dict,), f"{where}.parameters", "a mapping of parameter: value")
            lr = src.get("layer_range")
            if lr is not None and not (isinstance(lr, list) and len(lr) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 100_000 for x in lr)):
                raise InvalidRecipe(f"{where}.layer_range", "expected [start, end], two layer numbers")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit's rule for one tensor: scalar, gradient interpolated at `t`, or the first matching filter."""
    if isinstance(setting, (int, float, bool, str)) or setting is None:
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, (int, float)) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if isinstance(setting, list):
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise ValueError(f"expected a number, a list of numbers or {{filter, value}} conditions, got "
                                 f"{_kind(cond)}")
            f = cond.get("filter")
            if f is not None and not isinstance(f, str):
                raise ValueError(f"a filter is a substring of tensor names, got {_kind(f)}")
            if f is None or f == "*" or f in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise ValueError(f"expected a number, a list of numbers or {{filter, value}} conditions, got {_kind(setting)}")


def _t(group: str, num_layers: int) -> float:
    if group == "embed":
        return 0.0
    if group == "head":
        return 1.0
    i = int(group.split(".")[1])
    return i / (num_layers - 1) if num_layers > 1 else 0.0


def _group_value(sources: list[Any], tensors: list[str], group: str, num_layers: int,
                 field: str) -> float | None:
    """A parameter's one value for a group: the first source that sets it wins; all tensors must agree."""
    values = set()
    for name in tensors:
        value = None
        for setting in sources:
            try:
                value = evaluate_setting(setting, name, _t(group, num_layers))
            except ValueError as e:
                raise InvalidRecipe(field, str(e)) from None
            if value is not None:
                break
        values.add(value)
    if len(values) > 1:
        raise InvalidRecipe(field, f"gives different values within merge group {group!r} ({sorted(map(str, values))}); "
                                   "evomerge sets parameters per layer, not per module inside a layer")
    return values.pop()


def from_mergekit(data: dict[str, Any], info: ModelInfo, resolve=lambda p: p) -> Recipe:
    """A Recipe from a mergekit config; `info` describes the architecture (tensor names, layer count).

    `resolve` maps a model reference in the file to the path the Recipe should hold.  Raises `InvalidRecipe` naming
    the offending field.
    """
    unknown = sorted(map(str, set(data) - TOP_KEYS))
    check_sections(data)
    if unknown:
        raise InvalidRecipe(unknown[0], f"not a mergekit field evomerge understands; known: {', '.join(sorted(TOP_KEYS))}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise InvalidRecipe("merge_method", f"unknown merge method {method!r}; allowed: {', '.join(METHODS)}")
    if data.get("tokenizer_source") not in (None, "base"):
        raise InvalidRecipe("tokenizer_source", "only the base model's tokenizer is supported")
    m = METHODS[method]
    top = dict(data.get("parameters") or {})
    base = data.get("base_model")
    num_layers = info.num_layers
    groups_tensors: dict[str, list[str]] = {}
    for name in info.shapes:
        groups_tensors.setdefault(tensor_group(name), []).append(name)

    per_model: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # model -> [(group, params)] overrides by layer
    if "slices" in data:
        if "models" in data:
            raise InvalidRecipe("slices", "give either `models` or `slices`, not both")
        models, layer_params = _read_slices(data["slices"], num_layers, method, base)
    else:
        entries = data.get("models") or []
        if not isinstance(entries, list) or not entries:
            raise InvalidRecipe("models", "a non-empty list of {model, parameters} entries is required")
        models, layer_params = [], {}
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "model" not in e:
                raise InvalidRecipe(f"models.{i}", "expected {model: ..., parameters: {...}}")
            models.append(str(e["model"]))
            per_model[str(e["model"])] = [("*", dict(e.get("parameters") or {}))]
    if method == "passthrough":
        parents = list(dict.fromkeys(([base] if base else []) + models))
        base_path = None
    else:
        parents = [p for p in dict.fromkeys(models) if p != base]
        base_path = base
    options = {k: top.pop(k) for k in list(top) if k in m.options or k == "int8_mask"}
    options.pop("int8_mask", None)  # a memory-saving switch in mergekit, no effect on the result
    if m.random and "rescale_mode" not in options:
        options["rescale_mode"] = "l1"  # what mergekit itself does
    groups: dict[str, dict[str, list[float]]] = {}
    for g, tensors in groups_tensors.items():
        values: dict[str, list[float]] = {}
        for p in m.tensor_params if method != "passthrough" else ():
            row = []
            for parent in parents:
                sources = list(layer_params.get((parent, g), {}).get(p, []))
                sources += [prm[p] for _, prm in per_model.get(parent, []) if p in prm]
                sources += [top[p]] if p in top else []
                v = _group_value(sources, tensors, g, num_layers, f"parameters.{p}")
                row.append(v)
            if all(v is None for v in row):
                continue
            if any(v is None for v in row):
                raise InvalidRecipe(f"parameters.{p}", f"set for some parents but not all in group {g!r}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
                bad = next(v for v in row if not isinstance(v, (int, float)) or isinstance(v, bool))
                raise InvalidRecipe(f"parameters.{p}", f"expected a number, got {_kind(bad)}")
            if not all(math.isfinite(v) for v in row):
                raise InvalidRecipe(f"parameters.{p}", "must be finite (not NaN or infinity)")
            values[p] = [float(v) for v in row]
        if method == "passthrough":
            values["weight"] = _passthrough_weights(layer_params, parents, g, base)
        groups[g] = values
    extra = sorted(k for k in top if k not in m.tensor_params)
    if extra:
        raise InvalidRecipe(f"parameters.{extra[0]}", f"not a parameter or option of {method}; allowed: "
                                                      f"{', '.join([*m.tensor_params, *m.options]) or 'none'}")
    dtype = data.get("out_dtype") or data.get("dtype") or "float32"
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in OUT_DTYPES:
        raise InvalidRecipe("dtype", f"{dtype!r} is not one of {', '.join(OUT_DTYPES)}")
    return Recipe(method=method, parents=[resolve(p) for p in parents],
                  base=resolve(base_path) if base_path else None, groups=groups, options=options, dtype=dtype)


def _read_slices(slices: Any, num_layers: int, method: str, base: str | None):
    """Models and per-(model, group) parameter settings of layer-aligned slices; refuse slices that move layers."""
    if not isinstance(slices, list) or not slices:
        raise InvalidRecipe("slices", "a non-empty list of {sources: [...]} is required")
    models: list[str] = []
    layer_params: dict[tuple[str, str], dict[str, list[Any]]] = {}
    out_layer = 0
    for i, sl in enumerate(slices):
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list) or not sources:
            raise InvalidRecipe(f"slices.{i}.sources", "a non-empty list of {model, layer_range} is required")
        ranges = {tuple(s.get("layer_range") or ()) for s in sources}
        if len(ranges) != 1 or len(next(iter(ranges))) != 2:
            raise InvalidRecipe(f"slices.{i}.sources", "all sources of a slice need the same layer_range [start, end]")
        start, end = next(iter(ranges))
        if start != out_layer:
            raise InvalidRecipe(
                f"slices.{i}", f"output layers {out_layer}..{out_layer + end - start - 1} would come from source layers "
                f"{start}..{end - 1}: this slice stacks or reorders layers (a data-flow merge, e.g. a frankenmerge). "
                "A parameter-space recipe keeps every layer in place; such configs need a layer-path recipe")
        if method == "passthrough" and len(sources) != 1:
            raise InvalidRecipe(f"slices.{i}.sources", "passthrough takes each slice from exactly one model")
        for s in sources:
            model = str(s["model"])
            models.append(model)
            for layer in range(start, end):
                entry = layer_params.setdefault((model, f"layers.{layer}"), {})
                for k, v in (s.get("parameters") or {}).items():
                    entry.setdefault(k, []).append(v)
                for k, v in (sl.get("parameters") or {}).items():
                    entry.setdefault(k, []).append(v)
        out_layer = end
    if out_layer != num_layers:
        raise InvalidRecipe("slices", f"the slices cover {out_layer} layers, the model has {num_layers}: a merge that "
                                      "changes the layer count is a data-flow merge (layer-path recipe)")
    return models, layer_params


def _passthrough_weights(layer_params: dict, parents: list[str], group: str, base: str | None) -> list[float]:
    """One-hot weights: the slice's model for a layer; the base (else the first model) for embeddings and head."""
    if group.startswith("layers."):
        owner = next(p for p in parents if (p, group) in layer_params)
        scale = layer_params[(owner, group)].get("scale", [1.0])[0]
    else:
        owner, scale = (base or parents[0]), 1.0
    return [float(scale) if p == owner else 0.0 for p in parents]


def to_mergekit(recipe: Recipe, info: ModelInfo) -> dict[str, Any]:
    """A mergekit config that sets every tensor exactly as `recipe` does (per-group values as gradient + filters)."""
    m = METHODS[recipe.method]
    if recipe.method == "passthrough":
        raise InvalidRecipe("method", "passthrough recipes export as mergekit slices only from a layer-path recipe; "
                                      "export this recipe in evomerge format")
    num_layers = info.num_layers
    fixed = {g: sorted(n for n in info.shapes if tensor_group(n) == g) for g in ("embed", "head")}
    for g, names in fixed.items():
        for f in names:
            clash = [n for n in info.shapes if f in n and n != f]
            if clash:
                raise InvalidRecipe("groups", f"tensor {f} is a substring of {clash[0]}: no mergekit filter can address "
                                              "it alone")

    def setting(param: str, j: int) -> Any:
        default = m.tensor_params[param]
        value = {g: v.get(param, [default] * len(recipe.parents))[j] for g, v in recipe.groups.items()}
        layers = [value[f"layers.{i}"] for i in range(num_layers)]
        if len(set(value.values())) == 1:
            return layers[0]
        conds = [{"filter": name, "value": value[g]} for g, names in fixed.items() for name in names]
        conds.append({"value": layers[0] if len(set(layers)) == 1 else layers})
        return conds

    out: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base:
        out["base_model"] = recipe.base
    params = dict(recipe.options)
    if recipe.method == "slerp":
        out["models"] = [{"model": recipe.base}, {"model": recipe.parents[0]}]
        params["t"] = setting("t", 0)
    else:
        out["models"] = [{"model": p, "parameters": {q: setting(q, j) for q in m.tensor_params}}
                         for j, p in enumerate(recipe.parents)]
    if params:
        out["parameters"] = params
    out["dtype"] = recipe.dtype
    return out


def is_mergekit(data: dict[str, Any]) -> bool:
    return "merge_method" in data


def model_for(data: dict[str, Any]) -> str | None:
    """The model reference whose architecture import needs: the base, else the first model named."""
    if data.get("base_model"):
        return str(data["base_model"])
    for e in data.get("models") or []:
        if isinstance(e, dict) and e.get("model"):
            return str(e["model"])
    for sl in data.get("slices") or []:
        for s in (sl.get("sources") if isinstance(sl, dict) else None) or []:
            if isinstance(s, dict) and s.get("model"):
                return str(s["model"])
    return None

