"""Turning a Recipe into weights: in place into one resident model during search, or into a model directory.

Parents are fixed for a whole study, so a worker loads them once, keeps the base and the stacked task vectors resident
on its device, and materializes each candidate by overwriting one preallocated model's parameters.  Disk is touched
only at export.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..io import check_compatible, inspect_model, load_state_dict, tensor_group
from ..recipe import Recipe
from .methods import get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RecipeMismatch(ValueError):
    """A recipe that does not fit the resident parents (other models, missing groups)."""


class Materializer:
    """Holds the parents of one study resident and writes any of its recipes into one model, in place.

    Task vectors are precomputed in fp32 (merge arithmetic accumulates there whatever the parents' dtype); the model
    keeps the parents' dtype unless `dtype` says otherwise.
    """

    def __init__(self, base: str | None, parents: list[str], device: torch.device | str = "cpu",
                 dtype: str = "float32"):
        self.base_path = base
        self.parent_paths = list(parents)
        self.device = torch.device(device)
        infos = [inspect_model(p) for p in ([base] if base else []) + self.parent_paths]
        check_compatible(infos)
        self.groups = sorted({tensor_group(n) for n in infos[0].shapes}, key=_group_order)
        parent_sds = [load_state_dict(p, self.device) for p in self.parent_paths]
        base_sd = load_state_dict(base, self.device) if base else None
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        for name in infos[0].shapes:
            b = base_sd[name].float() if base_sd else torch.zeros_like(parent_sds[0][name], dtype=torch.float32)
            self.base[name] = b
            self.deltas[name] = torch.stack([sd[name].float() - b for sd in parent_sds])
        del parent_sds, base_sd
        self.model = AutoModelForCausalLM.from_pretrained(
            base or self.parent_paths[0], dtype=DTYPES[dtype], trust_remote_code=False
        ).to(self.device).eval()
        self._targets = self.model.state_dict()

    def check(self, recipe: Recipe) -> None:
        """Refuse a recipe that names other models or leaves a group of this architecture without values."""
        if list(recipe.parents) != self.parent_paths or recipe.base != self.base_path:
            raise RecipeMismatch("recipe parents/base differ from the models resident in this worker")
        method = get_method(recipe.method)
        if method.uses_base and self.base_path is None:
            raise RecipeMismatch(f"method {recipe.method} needs a base model")
        for g in self.groups:
            values = recipe.groups.get(g)
            if values is None:
                raise RecipeMismatch(f"recipe has no values for group {g!r}; groups of this model: {self.groups}")
            if "weight" not in values:
                raise RecipeMismatch(f"group {g!r} has no 'weight'")
            for p, vs in values.items():
                if len(vs) != len(self.parent_paths):
                    raise RecipeMismatch(f"group {g!r}: {len(vs)} {p} values for {len(self.parent_paths)} parents")

    @torch.no_grad()
    def materialize(self, recipe: Recipe) -> PreTrainedModel:
        """Overwrite the resident model's weights with the recipe's merge and return the model."""
        self.check(recipe)
        method = get_method(recipe.method)
        options = {**method.options, **recipe.options}
        n = len(self.parent_paths)
        for i, (name, base) in enumerate(self.base.items()):
            values = recipe.groups[tensor_group(name)]
            weight = torch.tensor(values["weight"], dtype=torch.float32, device=self.device)
            kwargs = dict(options)
            if "density" in method.tensor_params:
                density = values.get("density", [1.0] * n)
                kwargs["density"] = torch.tensor(density, dtype=torch.float32, device=self.device)
            if method.random:
                kwargs["generator"] = torch.Generator(self.device).manual_seed(recipe.seed * 100_003 + i)
            if method.uses_base:
                merged = method.fn(base, self.deltas[name], weight, **kwargs)
            else:
                merged = method.fn(self.deltas[name] + base, weight, **kwargs)
            self._targets[name].copy_(merged)
        return self.model


def _group_order(g: str) -> tuple[int, int]:
    if g == "embed":
        return (0, 0)
    if g.startswith("layers."):
        return (1, int(g.split(".")[1]))
    return (2, 0)


def write_model(recipe: Recipe, out_dir: str | Path, device: torch.device | str = "cpu") -> Path:
    """Materialize `recipe` and save it as a Hugging Face model directory (safetensors, config, tokenizer)."""
    out = Path(out_dir)
    mat = Materializer(recipe.base, recipe.parents, device=device, dtype=recipe.dtype)
    model = mat.materialize(recipe)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(recipe.base or recipe.parents[0], trust_remote_code=False).save_pretrained(out)
    return out
