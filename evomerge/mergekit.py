"""mergekit merge configs ⇄ Recipes, so a config a user already trusts means the same thing here, and back.

mergekit sets a parameter per tensor: a scalar, a gradient (a list interpolated at ``t = i / (n - 1)`` over the n
layers of each output slice, ``t = 1`` for a one-layer slice; 0 for the embeddings, 1 for the final norm and head) or
a list of ``{filter, value}`` conditions matched as substrings of tensor names, the first match winning.  A source's
own setting wins over its slice's, which wins over the global ``parameters`` (for the ``models`` form, a model's
``parameters`` play the source's part).  A Recipe sets parameters per merge group: ``embed``, ``layers.<i>``,
``head``, and module groups ``layers.<i>.self_attn`` / ``layers.<i>.mlp`` when a layer's attention and MLP differ
(the layer group then holds the rest: its norms).  Import evaluates each setting for every tensor and refuses only
settings that split a group finer than that, naming the field the user wrote (``models.1.parameters.weight``).
Export writes the exact per-group values as a gradient over the layers, one condition per module filter, and one
filter per embedding/head tensor.

Slices whose sources keep every layer in place (each output layer i comes from layer i of its sources) are per-layer
parameter settings and import into a Recipe; slices that stack or reorder layers (frankenmerges) change the data flow
and are refused here.
"""
from __future__ import annotations

import math
from typing import Any

from .io import MODULES, ModelInfo, tensor_group
from .methodspec import SPECS, InvalidRecipe
from .recipe import DTYPES, Recipe

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source"}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
TOKENIZER_SOURCES = ("base", "union")
# mergekit switches that change memory or speed, never the merged weights, so evomerge can ignore them with a note
NO_EFFECT = {"int8_mask": "a memory-saving mask type in mergekit; no effect on the merged weights"}

Sources = list[tuple[str, Any]]  # (the field the user wrote, its setting), highest precedence first


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


def _tensor_value(sources: Sources, name: str, t: float) -> tuple[Any, str | None]:
    """The first source that sets this tensor, and its field."""
    for field, setting in sources:
        try:
            value = evaluate_setting(setting, name, t)
        except ValueError as e:
            raise InvalidRecipe(field, str(e)) from None
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidRecipe(field, f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise InvalidRecipe(field, "must be finite (not NaN or infinity)")
        return value, field
    return None, None


def _layer_ts(num_layers: int) -> dict[str, float]:
    """t per merge group for one slice over every layer (the ``models`` form)."""
    ts = {f"layers.{i}": i / (num_layers - 1) if num_layers > 1 else 1.0 for i in range(num_layers)}
    return {"embed": 0.0, **ts, "head": 1.0}


def _module_key(group: str, name: str) -> str:
    """The module group a layer tensor falls in when its layer is split: attention, MLP, or the layer (the rest)."""
    return next((f"{group}.{f}" for f in MODULES if f in name), group)


def _split(group: str, table: dict[str, dict[str, tuple[list[float], list[str | None]]]]) -> dict[str, dict]:
    """A group's tensors' values as recipe groups: one group when every tensor agrees, else per module (layers
    only); refuses what still disagrees, naming the field that set the first differing value."""
    def one(key: str, names: list[str]) -> dict[str, list[float]]:
        first = table[names[0]]
        for name in names[1:]:
            for p, (values, fields) in table[name].items():
                if values != first[p][0]:
                    j = next(k for k, (a, b) in enumerate(zip(values, first[p][0])) if a != b)
                    field = fields[j] or first[p][1][j] or f"parameters.{p}"
                    how = "per layer or per module (self_attn, mlp, the rest)" if group.startswith("layers.") \
                        else f"one value for the whole {group!r} group"
                    raise InvalidRecipe(field, f"gives {names[0]} {first[p][0][j]:g} but {name} {values[j]:g} "
                                               f"within merge group {key!r}; evomerge sets parameters {how}")
        return {p: list(v) for p, (v, _) in first.items() if any(f for n in names for f in table[n][p][1])}

    names = list(table)
    same = all(v == table[names[0]][p][0] for n in names for p, (v, _) in table[n].items())
    if same or not group.startswith("layers."):
        return {group: one(group, names)}
    parts: dict[str, list[str]] = {}
    for n in names:
        parts.setdefault(_module_key(group, n), []).append(n)
    out = {k: one(k, ns) for k, ns in parts.items()}
    if group not in out:  # a layer with no tensor outside its modules: the layer key still needs values
        out = {group: next(iter(out.values())), **out}
    return out


def from_mergekit(data: dict[str, Any], info: ModelInfo, resolve=lambda p: p,
                  notes: list[str] | None = None) -> Recipe:
    """A Recipe from a mergekit config; `info` describes the architecture (tensor names, layer count).

    `resolve` maps a model reference in the file to the path the Recipe should hold.  Settings evomerge reads but
    does not need (mergekit's memory switches) add a line to `notes`.  Raises `InvalidRecipe` naming the offending
    field.
    """
    unknown = sorted(map(str, set(data) - TOP_KEYS))
    check_sections(data)
    if unknown:
        raise InvalidRecipe(unknown[0], f"not a mergekit field evomerge understands; known: {', '.join(sorted(TOP_KEYS))}")
    method = data.get("merge_method")
    if method not in SPECS:
        raise InvalidRecipe("merge_method", f"unknown merge method {method!r}; allowed: {', '.join(SPECS)}")
    m = SPECS[method]
    if not isinstance(data.get("parameters") or {}, dict):
        raise InvalidRecipe("parameters", "expected a mapping of parameter names to settings")
    top = dict(data.get("parameters") or {})
    base = data.get("base_model")
    num_layers = info.num_layers
    groups_tensors: dict[str, list[str]] = {}
    for name in info.shapes:
        groups_tensors.setdefault(tensor_group(name), []).append(name)

    if "slices" in data:
        if "models" in data:
            raise InvalidRecipe("slices", "give either `models` or `slices`, not both")
        models, layer_params, ts = _read_slices(data["slices"], num_layers, method, base)
    else:
        models, layer_params = _read_models(data.get("models"), groups_tensors)
        ts = _layer_ts(num_layers)
    if method == "passthrough":
        parents = list(dict.fromkeys(([base] if base else []) + models))
        base_path = None
    else:
        parents = [p for p in dict.fromkeys(models) if p != base]
        base_path = base
    options = {k: top.pop(k) for k in list(top) if k in m.options or k in NO_EFFECT}
    for k in sorted(set(options) & set(NO_EFFECT)):
        options.pop(k)
        if notes is not None:
            notes.append(f"parameters.{k}: {NO_EFFECT[k]}; ignored")
    if m.random and "rescale_mode" not in options:
        options["rescale_mode"] = "l1"  # what mergekit itself does
    extra = sorted(k for k in top if k not in m.tensor_params)
    if extra:
        raise InvalidRecipe(f"parameters.{extra[0]}", f"not a parameter or option of {method}; allowed: "
                                                      f"{', '.join([*m.tensor_params, *m.options]) or 'none'}")
    groups: dict[str, dict[str, list[float]]] = {}
    for g, tensors in groups_tensors.items():
        if method == "passthrough":
            groups[g] = {"weight": _passthrough_weights(layer_params, parents, g, base)}
            continue
        table = {}
        for name in tensors:
            row: dict[str, tuple[list[float], list[str | None]]] = {}
            for p, default in m.tensor_params.items():
                found = []
                for parent in parents:
                    sources = layer_params.get((parent, g), {}).get(p, [])
                    sources = sources + ([(f"parameters.{p}", top[p])] if p in top else [])
                    found.append(_tensor_value(sources, name, ts[g]))
                if all(v is None for v, _ in found) and default is not None:
                    row[p] = ([float(default)] * len(parents), [None] * len(parents))  # not set: the default
                    continue
                missing = [parents[j] for j, (v, _) in enumerate(found) if v is None]
                if missing:
                    set_by = next((f for v, f in found if f), f"parameters.{p}")
                    raise InvalidRecipe(set_by, f"{p} is set for some models but not for {missing[0]} "
                                                f"(tensor {name}); {method} needs it for every model")
                row[p] = ([float(v) for v, _ in found], [f for _, f in found])
            table[name] = row
        groups.update(_split(g, table))
    tokenizer = data.get("tokenizer_source")
    if tokenizer is not None and tokenizer not in TOKENIZER_SOURCES and tokenizer not in models + [base]:
        raise InvalidRecipe("tokenizer_source", f"{tokenizer!r} is not base, union, nor one of the models")
    dtype = data.get("out_dtype") or data.get("dtype") or "float32"
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise InvalidRecipe("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    if tokenizer not in (None, "base", "union"):
        tokenizer = resolve(tokenizer)
    return Recipe(method=method, parents=[resolve(p) for p in parents],
                  base=resolve(base_path) if base_path else None, groups=groups, options=options, dtype=dtype,
                  tokenizer_source=tokenizer)


def _read_models(entries: Any, groups_tensors: dict[str, list[str]]):
    """Models and per-(model, group) settings of the ``models`` form: a model's parameters apply to all its tensors."""
    if not isinstance(entries, list) or not entries:
        raise InvalidRecipe("models", "a non-empty list of {model, parameters} entries is required")
    models: list[str] = []
    layer_params: dict[tuple[str, str], dict[str, Sources]] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "model" not in e:
            raise InvalidRecipe(f"models.{i}", "expected {model: ..., parameters: {...}}")
        model = str(e["model"])
        models.append(model)
        for g in groups_tensors:
            _add_settings(layer_params.setdefault((model, g), {}), e.get("parameters"), f"models.{i}.parameters")
    return models, layer_params


def _add_settings(entry: dict[str, Sources], parameters: dict | None, field: str) -> None:
    """Append a section's settings to one (model, group)'s sources, each with the field that set it; the earlier
    appended wins, so callers append in mergekit's precedence order."""
    for k, v in (parameters or {}).items():
        entry.setdefault(k, []).append((f"{field}.{k}", v))


def _read_slices(slices: Any, num_layers: int, method: str, base: str | None):
    """Models, per-(model, group) settings and per-group t of layer-aligned slices; refuse slices that move layers.

    Embeddings take their settings from the first slice, the final norm and head from the last, as mergekit does.
    """
    if not isinstance(slices, list) or not slices:
        raise InvalidRecipe("slices", "a non-empty list of {sources: [...]} is required")
    models: list[str] = []
    layer_params: dict[tuple[str, str], dict[str, Sources]] = {}
    ts = {"embed": 0.0, "head": 1.0}
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
        n = end - start
        groups = ([f"layers.{layer}" for layer in range(start, end)] + (["embed"] if i == 0 else [])
                  + (["head"] if i == len(slices) - 1 else []))
        for layer in range(start, end):
            ts[f"layers.{layer}"] = (layer - start) / (n - 1) if n > 1 else 1.0
        for j, s in enumerate(sources):
            model = str(s["model"])
            models.append(model)
            for g in groups:
                entry = layer_params.setdefault((model, g), {})
                _add_settings(entry, s.get("parameters"), f"slices.{i}.sources.{j}.parameters")
                _add_settings(entry, sl.get("parameters"), f"slices.{i}.parameters")
        out_layer = end
    if out_layer != num_layers:
        raise InvalidRecipe("slices", f"the slices cover {out_layer} layers, the model has {num_layers}: a merge that "
                                      "changes the layer count is a data-flow merge (layer-path recipe)")
    return models, layer_params, ts


def _passthrough_weights(layer_params: dict, parents: list[str], group: str, base: str | None) -> list[float]:
    """One-hot weights: the slice's model for a layer; the base (else the first model) for embeddings and head."""
    if group.startswith("layers."):
        owner = next(p for p in parents if (p, group) in layer_params)
        scale = layer_params[(owner, group)].get("scale", [(None, 1.0)])[0][1]
    else:
        owner, scale = (base or parents[0]), 1.0
    return [float(scale) if p == owner else 0.0 for p in parents]


def to_mergekit(recipe: Recipe, info: ModelInfo) -> dict[str, Any]:
    """A mergekit config that sets every tensor exactly as `recipe` does: per-layer values as a gradient, one
    condition per module filter the recipe uses, one exact-name filter per embedding/head tensor."""
    m = SPECS[recipe.method]
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
    filters = list(dict.fromkeys(g.split(".", 2)[2] for g in recipe.groups if g.count(".") >= 2))

    def setting(param: str, j: int) -> Any:
        default = m.tensor_params[param]
        value = {g: v.get(param, [default] * len(recipe.parents))[j] for g, v in recipe.groups.items()}
        layers = [value[f"layers.{i}"] for i in range(num_layers)]
        if len(set(value.values())) == 1:
            return layers[0]
        conds = [{"filter": name, "value": value[g]} for g, names in fixed.items() for name in names]
        for f in filters:
            per_layer = [value.get(f"layers.{i}.{f}", layers[i]) for i in range(num_layers)]
            conds.append({"filter": f, "value": per_layer[0] if len(set(per_layer)) == 1 else per_layer})
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
    if recipe.tokenizer_source:
        out["tokenizer_source"] = recipe.tokenizer_source
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

