"""Turning a Recipe into weights: in place into one resident model during search, or streamed into a model directory.

Parents are fixed for a whole study, so a worker loads them once and keeps, per tensor, the base and the stacked task
vectors (fp32, flattened) plus whatever the method's selection needs (magnitude ranks, DELLA's row ranks), computed
once.  A candidate is then a few memory passes per tensor: one fused kernel (``torch.compile``'d on models large
enough to repay the compile) writes straight into the preallocated model.  Export streams the same per-tensor
function over the parents' shards, so an exported recipe is exactly the candidate the search scored.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .. import __version__
from ..io import (TensorReader, check_compatible, group_order, inspect_model, load_state_dict, model_license,
                  model_name, recipe_groups, tensor_group, write_sharded)
from ..recipe import Recipe
from ..vocab import align_state_dicts, check_vocab_compatible, is_vocab_tensor, plan_vocab
from .methods import (InvalidRecipe, MergeMethod, apply, magnitude_ranks, random_bits, row_rank_fractions,
                      tensor_seeds, validate)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MIN_PARAMS = 50_000_000


class RecipeMismatch(ValueError):
    """A recipe that does not fit the resident parents (other models, missing groups) or breaks its method's rules."""


def check_recipe(recipe: Recipe, groups: list[str]) -> MergeMethod:
    """Validate `recipe` for a model whose merge groups are `groups`; no tensor is read."""
    try:
        method = validate(recipe.method, recipe.base, recipe.parents, recipe.groups, recipe.options)
    except InvalidRecipe as e:
        raise RecipeMismatch(f"recipe {e}") from None
    for g in groups:
        if g not in recipe.groups:
            raise RecipeMismatch(f"recipe has no values for group {g!r}; groups of this model: {groups}")
    for g in recipe.groups:
        if g not in groups and ".".join(g.split(".")[:2]) not in groups:
            raise RecipeMismatch(f"recipe group {g!r} is not a group of this model ({groups}) nor a module "
                                 "group layers.<i>.<filter> of one of its layers")
    return method


def group_params(method: MergeMethod, values: dict[str, list[float]], n: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """One group's per-parent parameters as fp32 vectors, method defaults filled in."""
    return {p: torch.tensor(values.get(p, [d] * n), dtype=torch.float32, device=device)
            for p, d in method.tensor_params.items()}


def prepare_aux(kinds: tuple[str, ...], name: str, deltas: torch.Tensor, shape: tuple[int, ...],
                seed: int) -> dict[str, torch.Tensor]:
    """What a method's selection needs (`kinds` from its ``aux``) for one flattened tensor."""
    aux = {}
    if "ranks" in kinds:
        aux["ranks"] = magnitude_ranks(deltas)
    if "row_ranks" in kinds:
        aux["row_ranks"] = row_rank_fractions(deltas, shape)
    if "bits" in kinds:
        aux["bits"] = random_bits(tensor_seeds(seed, name, deltas.shape[0], deltas.device), deltas.shape[1])
    return aux


def _into(out: torch.Tensor, method: MergeMethod, base: torch.Tensor | None, stacked: torch.Tensor,
          params: dict[str, torch.Tensor], aux: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    out.copy_(apply(method, base, stacked, params, aux, options))


def _compiled(name: str) -> Callable[..., None]:
    """`_into` compiled for one method.  Dynamo caches compiled graphs per code object (8 variants at most), so each
    method gets its own copy of the code: twelve methods sharing one cache would evict each other back to eager."""
    code = _into.__code__.replace(co_name=f"_into_{name}")
    return torch.compile(types.FunctionType(code, _into.__globals__, code.co_name), dynamic=True)


def compiler_available() -> bool:
    """torch.compile needs a C++ compiler on CPU (Triton on CUDA, which CUDA builds of torch ship)."""
    return torch.cuda.is_available() or shutil.which(os.environ.get("CXX", "g++")) is not None


class Materializer:
    """Holds the parents of one study resident and writes any of its recipes into one model, in place.

    Task vectors are kept in fp32 (merge arithmetic accumulates there whatever the parents' dtype); the model has
    `dtype`.  `compile`: fuse each method into one kernel with ``torch.compile`` (default: when the model has at
    least 50M parameters and a compiler is available; eager otherwise, and eager if compiling fails).
    """

    def __init__(self, base: str | None, parents: list[str], device: torch.device | str = "cpu",
                 dtype: str = "float32", compile: bool | None = None, tokenizer_source: str | None = None):
        self.base_path = base
        self.parent_paths = list(parents)
        self.device = torch.device(device)
        self.tokenizer_source = tokenizer_source
        infos = [inspect_model(p) for p in ([base] if base else []) + self.parent_paths]
        self.vocab = plan_vocab(base, self.parent_paths, tokenizer_source) if tokenizer_source else None
        (check_vocab_compatible if self.vocab else check_compatible)(infos)
        self.shapes = dict(infos[0].shapes)
        self.groups = sorted({tensor_group(n) for n in self.shapes}, key=group_order)
        parent_sds = [load_state_dict(p, self.device) for p in self.parent_paths]
        base_sd = load_state_dict(base, self.device) if base else None
        if self.vocab:  # rows permuted into the output vocabulary before any task vector is formed
            sds = dict(zip(([base] if base else []) + self.parent_paths, ([base_sd] if base else []) + parent_sds))
            self.shapes.update(align_state_dicts(self.vocab, infos[0], sds))
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        for name in self.shapes:
            b = base_sd[name].float().reshape(-1) if base_sd else None
            ps = torch.stack([sd[name].float().reshape(-1) for sd in parent_sds])
            self.base[name] = b
            self.deltas[name] = ps - b if b is not None else ps
        del parent_sds, base_sd
        self.model = AutoModelForCausalLM.from_pretrained(
            base or self.parent_paths[0], dtype=DTYPES[dtype], trust_remote_code=False
        ).to(self.device).eval()
        if self.vocab and self.model.get_input_embeddings().weight.shape[0] != self.vocab.size:
            self.model.resize_token_embeddings(self.vocab.size, mean_resizing=False)
        state = self.model.state_dict()
        self._targets = {name: state[name].view(-1) for name in self.shapes}
        self._aux: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}
        n_params = sum(t.numel() for t in self.base.values() if t is not None) or sum(
            t[0].numel() for t in self.deltas.values())
        self.compile = compiler_available() and n_params >= COMPILE_MIN_PARAMS if compile is None else compile
        self._kernels: dict[str, Callable[..., None]] = {}

    def prepare(self, method: MergeMethod, seed: int = 0) -> float:
        """Compute, once per worker, the method's auxiliary inputs for every tensor; returns the seconds it took.

        Ranks are kept for the worker's life; random bits for the latest seed (a study uses one seed throughout).
        """
        t0 = time.perf_counter()
        with torch.no_grad():
            for kind in method.aux:
                key = (kind, seed) if kind == "bits" else (kind, None)
                if key in self._aux:
                    continue
                if kind == "bits":
                    self._aux = {k: v for k, v in self._aux.items() if k[0] != "bits"}
                self._aux[key] = {n: prepare_aux((kind,), n, d, self.shapes[n], seed)[kind]
                                  for n, d in self.deltas.items()}
        return time.perf_counter() - t0

    def check(self, recipe: Recipe) -> MergeMethod:
        """Refuse a recipe that names other models, breaks its method's rules, or leaves a group without values."""
        if list(recipe.parents) != self.parent_paths or recipe.base != self.base_path:
            raise RecipeMismatch("recipe parents/base differ from the models resident in this worker")
        if (recipe.tokenizer_source or "base") != (self.tokenizer_source or "base"):
            raise RecipeMismatch(f"recipe tokenizer_source {recipe.tokenizer_source!r} differs from this worker's "
                                 f"({self.tokenizer_source!r})")
        return check_recipe(recipe, self.groups)

    def _kernel(self, method: MergeMethod) -> Callable[..., None]:
        if method.name not in self._kernels:
            self._kernels[method.name] = _compiled(method.name) if self.compile else _into
        return self._kernels[method.name]

    @torch.no_grad()
    def materialize(self, recipe: Recipe) -> PreTrainedModel:
        """Overwrite the resident model's weights with the recipe's merge and return the model."""
        method = self.check(recipe)
        self.prepare(method, recipe.seed)
        n = len(self.parent_paths)
        params = {g: group_params(method, v, n, self.device) for g, v in recipe.groups.items()}
        kernel = self._kernel(method)
        owner = recipe_groups(self.deltas, recipe.groups)
        for name, deltas in self.deltas.items():
            aux = {kind: self._aux[(kind, recipe.seed if kind == "bits" else None)][name] for kind in method.aux}
            stacked = deltas if method.uses_base or self.base[name] is None else deltas + self.base[name]
            args = (self._targets[name], method, self.base[name], stacked, params[owner[name]], aux,
                    recipe.options)
            try:
                kernel(*args)
            except Exception as e:
                if kernel is _into:
                    raise
                warnings.warn(f"torch.compile failed for {method.name} ({type(e).__name__}: {e}); merging eagerly")
                self._kernels[method.name] = kernel = _into
                kernel(*args)
        return self.model


def write_model(recipe: Recipe, out_dir: str | Path, device: torch.device | str = "cpu",
                max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Stream `recipe` into a Hugging Face model directory, tensor by tensor.

    Writes safetensors shards (+ index), config, tokenizer, the recipe and a model card.  Only one tensor of each
    parent is in memory at a time; the arithmetic is the search's, so the result equals the scored candidate.
    """
    out = Path(out_dir)
    device = torch.device(device)
    models = ([recipe.base] if recipe.base else []) + list(recipe.parents)
    infos = [inspect_model(p) for p in models]
    vocab = plan_vocab(recipe.base, recipe.parents, recipe.tokenizer_source) if recipe.tokenizer_source else None
    (check_vocab_compatible if vocab else check_compatible)(infos)
    shapes = dict(infos[0].shapes)
    rows = {n for n in shapes if vocab and is_vocab_tensor(n, infos[0])}
    shapes.update({n: (vocab.size, *shapes[n][1:]) for n in rows})
    method = check_recipe(recipe, sorted({tensor_group(n) for n in shapes}, key=group_order))
    base_reader = TensorReader(recipe.base) if recipe.base else None
    readers = [TensorReader(p) for p in recipe.parents]
    n = len(readers)
    params = {g: group_params(method, v, n, device) for g, v in recipe.groups.items()}
    owner = recipe_groups(shapes, recipe.groups)
    out_dtype = DTYPES[recipe.dtype]

    def read(name: str) -> list[torch.Tensor]:
        """Base (if any) and parents' tensor; vocabulary matrices in the output vocabulary's rows."""
        tensors = dict(zip(models, [r.get(name) for r in ([base_reader] if base_reader else []) + readers]))
        return list((vocab.align(tensors) if name in rows else tensors).values())

    @torch.no_grad()
    def produce(name: str) -> torch.Tensor:
        tensors = [t.to(device).float().reshape(-1) for t in read(name)]
        base = tensors.pop(0) if base_reader else None
        stacked = torch.stack(tensors)
        if base is not None and method.uses_base:
            stacked -= base
        aux = prepare_aux(method.aux, name, stacked, shapes[name], recipe.seed)
        merged = apply(method, base, stacked, params[owner[name]], aux, recipe.options)
        return merged.to(out_dtype).reshape(shapes[name])

    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()
    write_sharded(out, ((k, shapes[k], out_dtype) for k in shapes), produce, max_shard_bytes)
    source = Path(recipe.base or recipe.parents[0])
    config = dict(infos[0].config)
    config["dtype"] = recipe.dtype
    config.pop("torch_dtype", None)
    if vocab:
        config["vocab_size"] = vocab.size
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", out / "generation_config.json")
    (vocab.tokenizer if vocab else AutoTokenizer.from_pretrained(source, trust_remote_code=False)).save_pretrained(out)
    recipe.save(out / "recipe.yaml")
    (out / "README.md").write_text(model_card(recipe, out))
    return out


def model_card(recipe: Recipe, out: Path) -> str:
    """A Hugging Face model card: the parents and their licenses, the recipe, the evomerge version."""
    rows = ([("base", recipe.base)] if recipe.base else []) + [("parent", p) for p in recipe.parents]
    licenses = {p: model_license(p) for _, p in rows}
    stated = {v for v in licenses.values() if v}
    front = {"library_name": "transformers", "tags": ["merge", "evomerge", recipe.method],
             "base_model": [model_name(p) for _, p in rows]}
    if len(stated) == 1 and all(licenses.values()):
        front["license"] = stated.pop()
    table = "\n".join(f"| {role} | `{model_name(p)}` | {licenses[p] or 'not stated'} |" for role, p in rows)
    recipe_yaml = yaml.safe_dump(recipe.with_paths_relative_to(out.resolve()).to_dict(), sort_keys=False,
                                 default_flow_style=None)
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {out.name}\n\n"
            f"A merge of the models below with `{recipe.method}`, made by evomerge {__version__}.  "
            f"Check each parent's license before use: the merge inherits their terms.\n\n"
            f"## Parents\n\n| role | model | license |\n|---|---|---|\n{table}\n\n"
            f"## Recipe\n\nRebuild with `evomerge merge recipe.yaml OUT_DIR` (the file is next to this card):\n\n"
            f"```yaml\n{recipe_yaml}```\n\nevomerge version: {__version__}\n")
