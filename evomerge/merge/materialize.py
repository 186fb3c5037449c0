"""Turning a Recipe into weights: in place into one preallocated model during search, or streamed into a directory.

Parents are fixed for a whole study, so a worker keeps them for its life at their stored size — resident on the
device or mapped from their files and streamed (``parents.ParentStore``) — and a candidate is one pass over them,
tensor by tensor in chunks of rows: one kernel (``torch.compile``'d on models large enough to repay the compile)
forms the task vectors in fp32 from the stored dtype, applies the method, and writes into the model.  Magnitude
selections read an index built once per worker (``parents.MagnitudeIndex``) and merge again the few entries the pass
marks; random drops are hashed inside the kernel; DELLA reads its row ranks from a table built once per worker
(``parents.RowRanks``).  Export runs the same function over mapped parents, so an exported recipe is exactly the
candidate the search scored.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import shutil
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .. import __version__
from ..errors import EvomergeError
from ..io import (
    check_compatible,
    group_order,
    inspect_model,
    model_license,
    model_name,
    recipe_groups,
    stored_size,
    tensor_group,
    write_sharded,
)
from ..recipe import DTYPES, Recipe
from ..vocab import check_vocab_compatible, plan_vocab
from .methods import (
    InvalidRecipe,
    MergeMethod,
    apply,
    keep_from_keys,
    random_bits,
    rank_fractions,
    sort_row_ranks,
    tensor_seeds,
    validate,
)
from .parents import MagnitudeIndex, ParentStore, RowRanks, Selection, chunk_size, row_chunks, row_length

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
COMPILE_MIN_PARAMS = 50_000_000
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS: glibc keeps freed chunk buffers (a few MB each, above its dynamic
    mmap threshold) in its arenas, where they would count as the worker's memory between candidates."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class RecipeMismatch(EvomergeError, ValueError):
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
    """One group's per-parent parameters as fp32 vectors, method defaults filled in, and the method's constants
    computed from them (once per group, not in the kernel's loop)."""
    params = {p: torch.tensor(values.get(p, [d] * n), dtype=torch.float32, device=device)
              for p, d in method.tensor_params.items()}
    return {**params, **method.kernel_constants(params)}


def _into(out: Tensor, method: MergeMethod, base: Tensor | None, parents: list[Tensor], params: dict[str, Tensor],
          keys: tuple[Tensor, Tensor, Tensor] | None, seeds: Tensor | None, start: int | Tensor,
          shape: tuple[int, ...], options: dict[str, Any], marks: tuple[Tensor, Tensor, Tensor] | None = None,
          index: Tensor | None = None, ranks: tuple[list[tuple[Tensor, Tensor]] | None, Tensor] | None = None) -> None:
    """One chunk of one tensor: task vectors formed in fp32 from the stored dtype, the method applied, `out` written.

    Random bits are not stored (they come from the chunk's position, ``start``), and the compiled form is one fused
    pass.  `keys`: the magnitude keys (values, the floats above them, positions; see ``keep_from_keys``) of the
    entries at `index` (default: the chunk's, from ``start``).  With `marks` (lo, hi [N, T], a
    preallocated float32 mask: a float store vectorizes where a bool one does not) it also marks the entries whose
    |delta| lies strictly inside one of those brackets (see ``parents.Selection``).  `ranks` (DELLA): the chunk's row
    ranks from the worker's table (None: sorted here) and a row's largest rank as a 0-d fp32 tensor."""
    b = base.float() if base is not None else None
    xs = [p.float() - b if b is not None and method.uses_base else p.float() for p in parents]
    length = xs[0].shape[0]
    aux: dict[str, list[Tensor] | Tensor] = {}
    if keys is not None:
        magnitudes = [x.abs() for x in xs]
        at = index if index is not None else torch.arange(length, dtype=torch.int32, device=xs[0].device) + start
        aux["keep"] = keep_from_keys(magnitudes, *keys, at)
        if marks is not None:
            lo, hi, mask = marks
            mask.copy_(sum(((a > lo[i, t]) & (a < hi[i, t])).to(mask.dtype) for i, a in enumerate(magnitudes)
                           for t in range(lo.shape[1])))
    if seeds is not None:
        aux["bits"] = random_bits(seeds, length, start)
    if ranks is not None:
        table, top = ranks
        aux["row_ranks"] = rank_fractions(table if table is not None else sort_row_ranks(xs, row_length(shape)), top)
    out.copy_(apply(method, b, xs, params, aux, options))


def marked_positions(mask: Tensor, block: int = 128) -> Tensor:
    """The positions of a chunk's marks, ascending.  On CPU, torch's ``nonzero`` reads each entry in one thread
    (0.75 ms per 2^20 entries here), and a chunk holds a few hundred marks at most: the blocks with any mark are
    found first by a vectorized sum (marks are non-negative counts), then searched (0.3 ms).  On CUDA, one
    ``nonzero`` (one sync)."""
    if mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    whole = mask.numel() // block * block
    blocks = mask[:whole].view(-1, block)
    hit = blocks.sum(1).nonzero().squeeze(1)
    inside = blocks[hit].nonzero()
    return torch.cat([hit[inside[:, 0]] * block + inside[:, 1], mask[whole:].nonzero().squeeze(1) + whole])


def _compiled(name: str) -> Callable[..., None]:
    """`_into` compiled for one method.  Dynamo caches compiled graphs per code object (8 variants at most), so each
    method gets its own copy of the code: twelve methods sharing one cache would evict each other back to eager."""
    code = _into.__code__.replace(co_name=f"_into_{name}")
    return torch.compile(types.FunctionType(code, _into.__globals__, code.co_name, _into.__defaults__), dynamic=True)


def compiler_available() -> bool:
    """torch.compile needs a C++ compiler on CPU (Triton on CUDA, which CUDA builds of torch ship)."""
    return torch.cuda.is_available() or shutil.which(os.environ.get("CXX", "g++")) is not None


class Merger:
    """The per-tensor merge shared by the search and the export: parents in a `ParentStore`, any recipe of theirs.

    `compile`: fuse each method into one kernel with ``torch.compile`` (default: when the model has at least 50M
    parameters and a compiler is available; eager otherwise, and eager if compiling fails).  `tokenizer_source`:
    parents with added tokens have their embedding and head rows aligned into that vocabulary (``vocab.py``).
    `rank_table`: DELLA methods keep every entry's row rank in a table (2 bytes/param per parent, built once) instead
    of sorting each row for each candidate — what a worker wants when its memory plan has room, not a one-off export."""

    def __init__(self, base: str | None, parents: list[str], device: torch.device | str = "cpu",
                 mode: str = "resident", compile: bool | None = None, tokenizer_source: str | None = None,
                 rank_table: bool = False):
        self.base_path = base
        self.parent_paths = list(parents)
        self.device = torch.device(device)
        self.tokenizer_source = tokenizer_source
        infos = [inspect_model(p) for p in ([base] if base else []) + self.parent_paths]
        self.vocab = plan_vocab(base, self.parent_paths, tokenizer_source) if tokenizer_source else None
        (check_vocab_compatible if self.vocab else check_compatible)(infos)
        self.config = dict(infos[0].config)
        self.shapes = dict(infos[0].shapes)
        self.groups = sorted({tensor_group(n) for n in self.shapes}, key=group_order)
        self.mode = mode
        n_params = sum(math.prod(s) for s in self.shapes.values())
        self.compile = compiler_available() and n_params >= COMPILE_MIN_PARAMS if compile is None else compile
        # compiled kernels have no temporaries: larger chunks, fewer calls
        self.store = ParentStore(base, self.parent_paths, self.device, mode, chunk_size(self.device, self.compile))
        if self.vocab:  # rows permuted into the output vocabulary before any task vector is formed
            self.shapes.update(self.store.align_vocab(self.vocab, infos[0]))
            self.config["vocab_size"] = self.vocab.size
        self.index: MagnitudeIndex | None = None
        self.rank_table = rank_table
        self.ranks: RowRanks | None = None
        self._kernels: dict[str, Callable[..., None]] = {}
        self._mask: Tensor | None = None

    def prepare(self, method: MergeMethod) -> float:
        """Build, once per worker, the magnitude index a selecting method needs (or DELLA's rank table, when this
        merger keeps one); returns the seconds it took."""
        t0 = time.perf_counter()
        with torch.no_grad():
            if method.select is not None and self.index is None:
                self.index = MagnitudeIndex(self.store, self.shapes)
            if method.row_ranked and self.rank_table and self.ranks is None:
                self.ranks = RowRanks(self.store, self.shapes)
        if self.device.type == "cpu":
            release_freed_memory()  # the build's many small chunks, or the merge's workspace is allocated beside them
        return time.perf_counter() - t0

    def _kernel(self, method: MergeMethod) -> Callable[..., None]:
        if method.name not in self._kernels:
            self._kernels[method.name] = _compiled(method.name) if self.compile else _into
        return self._kernels[method.name]

    @torch.no_grad()
    def merge(self, recipe: Recipe, method: MergeMethod, write: Callable[[str], Tensor],
              names: list[str] | None = None) -> None:
        """Merge each tensor (all, or `names`) into the flat tensor `write(name)` returns, one chunk at a time."""
        self.prepare(method)
        n = len(self.parent_paths)
        params = {g: group_params(method, v, n, self.device) for g, v in recipe.groups.items()}
        # a magnitude window is counted on the host: its parameters there once per group, not copied back per tensor
        hosted = params if self.device.type == "cpu" or method.select is None else {
            g: group_params(method, v, n, torch.device("cpu")) for g, v in recipe.groups.items()}
        owner = recipe_groups(names or self.shapes, recipe.groups)
        options = recipe.options
        whole = method.whole_tensor or (method.random and {**method.options, **options}.get("rescale")
                                        and {**method.options, **options}.get("rescale_mode") == "l1")
        for name in names or self.shapes:
            shape = self.shapes[name]
            out = write(name)
            p = params[owner[name]]
            seeds = tensor_seeds(recipe.seed, name, n, self.device) if method.random else None
            table = top = None
            if method.row_ranked:  # DELLA: the worker's table of row ranks (None: sorted per chunk)
                table = self.ranks.table[name] if self.ranks is not None else None
                top = torch.tensor(float(max(row_length(shape) - 1, 1)), device=self.device)
            selection = None
            if method.select is not None:
                m = math.prod(shape)
                h = hosted[owner[name]]
                lo, hi = method.select(m, h["density"], h.get("gamma", h["density"]))
                ranks = lo[:, None] if bool((hi >= m).all()) else torch.stack([lo, hi], 1)  # TIES: up to the top
                selection = self.index.select(name, m, ranks)
            marked = []

            keys = selection.keys if selection else None
            for s, e, b, ps in self.store.chunks(name, row_chunks(shape, self.store.chunk, whole)):
                mask = self._mask_buffer(e - s) if selection and selection.marked else None
                marks = (selection.lo, selection.hi, mask) if mask is not None else None
                rows = None if top is None else (
                    [(hi[s:e], lo[s:e]) for hi, lo in table] if table is not None else None, top)
                self._run(method, (out[s:e], method, b, ps, p, keys, seeds, torch.tensor(s), shape, options, marks,
                                   None, rows))
                if mask is not None:
                    marked.append(marked_positions(mask) + s)
            if marked:
                self._remerge(name, out, torch.cat(marked), method, selection, p, shape, options)
        if self.device.type == "cpu":
            release_freed_memory()

    def _remerge(self, name: str, out: Tensor, positions: Tensor, method: MergeMethod, selection: Selection,
                 params: dict[str, Tensor], shape: tuple[int, ...], options: dict[str, Any]) -> None:
        """Merge again, with the exact keys, the few entries the pass marked inside a bracket (see parents.py)."""
        base, parents = self.store.gather(name, positions)
        magnitudes = [(q.float() - base.float()).abs() for q in parents]
        keys = self.index.resolve(selection, positions, magnitudes)
        merged = torch.empty(positions.numel(), dtype=out.dtype, device=out.device)
        _into(merged, method, base, parents, params, keys, None, 0, shape, options, index=positions)
        out[positions] = merged

    def _mask_buffer(self, length: int) -> Tensor:
        """A reused mask for the entries a chunk marks: allocating one per chunk costs page faults on CPU."""
        if self._mask is None or self._mask.numel() < length:
            self._mask = torch.empty(length, dtype=torch.float32, device=self.device)
        return self._mask[:length]

    def _run(self, method: MergeMethod, args: tuple) -> None:
        kernel = self._kernel(method)
        try:
            kernel(*args)
        except Exception as e:
            if kernel is _into:
                raise
            warnings.warn(f"torch.compile failed for {method.name} ({type(e).__name__}: {e}); merging eagerly")
            self._kernels[method.name] = _into
            _into(*args)


class Materializer(Merger):
    """Holds the parents of one study and writes any of its recipes into one preallocated model, in place.

    `dtype`: the model's (default: the parents' stored dtype).  `mode`: ``resident`` (parents copied to the device at
    their stored size) or ``streaming`` (mapped from their files, streamed chunk by chunk).  `rank_table`: see
    `Merger`; on by default, as a worker merges many candidates."""

    def __init__(self, base: str | None, parents: list[str], device: torch.device | str = "cpu",
                 dtype: str | None = None, compile: bool | None = None, mode: str = "resident",
                 tokenizer_source: str | None = None, rank_table: bool = True):
        super().__init__(base, parents, device, mode, compile, tokenizer_source, rank_table)
        self.dtype = dtype or stored_size(base or self.parent_paths[0])[2]
        self.model = AutoModelForCausalLM.from_pretrained(
            base or self.parent_paths[0], dtype=TORCH_DTYPES[self.dtype], trust_remote_code=False
        ).to(self.device).eval()
        if self.vocab and self.model.get_input_embeddings().weight.shape[0] != self.vocab.size:
            self.model.resize_token_embeddings(self.vocab.size, mean_resizing=False)
        state = self.model.state_dict()
        self._targets = {name: state[name].view(-1) for name in self.shapes}

    def check(self, recipe: Recipe) -> MergeMethod:
        """Refuse a recipe that names other models, breaks its method's rules, or leaves a group without values."""
        if list(recipe.parents) != self.parent_paths or recipe.base != self.base_path:
            raise RecipeMismatch("recipe parents/base differ from the models resident in this worker")
        if (recipe.tokenizer_source or "base") != (self.tokenizer_source or "base"):
            raise RecipeMismatch(f"recipe tokenizer_source {recipe.tokenizer_source!r} differs from this worker's "
                                 f"({self.tokenizer_source!r})")
        return check_recipe(recipe, self.groups)

    def materialize(self, recipe: Recipe) -> PreTrainedModel:
        """Overwrite the model's weights with the recipe's merge and return the model."""
        self.merge(recipe, self.check(recipe), self._targets.__getitem__)
        return self.model


def write_model(recipe: Recipe, out_dir: str | Path, device: torch.device | str = "cpu",
                max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Stream `recipe` into a Hugging Face model directory, tensor by tensor.

    Writes safetensors shards (+ index), config, tokenizer, the recipe and a model card.  The parents are mapped, not
    loaded, and merged chunk by chunk with the search's function: the result equals the scored candidate.
    """
    out = Path(out_dir)
    merger = Merger(recipe.base, recipe.parents, device, mode="streaming", compile=False,
                    tokenizer_source=recipe.tokenizer_source)
    shapes = merger.shapes
    method = check_recipe(recipe, merger.groups)
    out_dtype = TORCH_DTYPES[recipe.dtype]
    device = torch.device(device)

    def produce(name: str) -> Tensor:
        out = torch.empty(math.prod(shapes[name]), dtype=out_dtype, device=device)
        merger.merge(recipe, method, lambda _: out, [name])
        return out.reshape(shapes[name])

    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()
    write_sharded(out, ((k, shapes[k], out_dtype) for k in shapes), produce, max_shard_bytes)
    source = Path(recipe.base or recipe.parents[0])
    config = dict(merger.config)
    config["dtype"] = recipe.dtype
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", out / "generation_config.json")
    tokenizer = merger.vocab.tokenizer if merger.vocab else AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    tokenizer.save_pretrained(out)
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
