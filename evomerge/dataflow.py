"""Data-flow merging: running a layer path across resident parent models, and folding it into a standard model.

A path is a list of steps ``(model, layer, scale)``: the hidden state entering that layer is multiplied by ``scale``.
During search nothing is materialized: a shell CausalLM (built on the meta device, so it owns no weights) holds
*references* to the parents' decoder layers, and each path position runs through a small wrapper that applies the
scale and points the attention at the position's own KV-cache slot, so a layer used twice keeps two caches.

Export folds the scales into a standard model of the same architecture.  In a pre-norm decoder every sublayer reads
the stream through a scale-invariant norm, so with ``c_k = s_1 * ... * s_k`` the scaled stream is ``h = c_k * g``,
where ``g`` is the stream of a model whose position-k residual-writing projections (attention ``o_proj`` and MLP
``down_proj``, with their biases) are multiplied by ``1 / c_k``; the final norm removes the last ``c``.  The match is
exact up to the norms' epsilon.  Architectures with norms after the sublayers (Gemma 2/3 ``post_*_layernorm``) would
need the output-norm weights scaled instead, and are refused rather than exported wrong.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .merge.materialize import TORCH_DTYPES, Materializer
from .recipe import LayerPath, PathError, Recipe, Step

# pre-norm decoders whose layers write to the residual stream only through these two projections
FOLDABLE = {"llama", "mistral", "qwen2", "qwen3"}
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def steps_of(path: dict) -> list[Step]:
    """The steps of a recipe's ``path`` mapping (``layers: [[model, layer], ...]``, ``scales: [...]``)."""
    return LayerPath.of(path).steps


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return getattr(model, model.base_model_prefix).layers


def check_path_compatible(configs: list[dict], names: list[str]) -> None:
    """Models whose layers can share one stream: one architecture, one hidden size, one attention geometry."""
    keys = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    ref = configs[0]
    for name, cfg in zip(names[1:], configs[1:]):
        for k in keys:
            if cfg.get(k) != ref.get(k):
                raise PathError(f"{name}: {k} is {cfg.get(k)!r} but {ref.get(k)!r} in {names[0]}; "
                                "a layer path needs models of one architecture and hidden size")


class _Position(nn.Module):
    """One path position: a reference to a parent's decoder layer, the scale of the stream entering it, and the
    KV-cache slot of this position (not of the source layer, which may appear at several positions)."""

    def __init__(self, layer: nn.Module, index: int, scale: float):
        super().__init__()
        self.layer = layer
        self.index = index
        self.scale = scale
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.layer.self_attn.layer_idx = self.index
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


class PathModel:
    """A standard-architecture CausalLM shell that runs any path over resident models, zero-copy.

    The shell object stays the same across candidates (lm-eval's wrapper keeps a reference to it); `set_path` only
    swaps module references and the layer count in its config.
    """

    def __init__(self, template: PreTrainedModel):
        config = copy.deepcopy(template.config)
        config.num_hidden_layers = 0
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = []
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=template.dtype)
        self.model.generation_config = copy.deepcopy(template.generation_config)
        self.model.eval()
        self.set_path([template], [Step(0, i) for i in range(len(decoder_layers(template)))])

    def set_path(self, models: list[PreTrainedModel], steps: list[Step]) -> PreTrainedModel:
        """Point the shell at `models[0]`'s embeddings, final norm and head, and at the path's layers."""
        if not steps:
            raise PathError("the layer path is empty: at least one decoder layer is needed")
        a = models[0]
        inner, a_inner = getattr(self.model, self.model.base_model_prefix), getattr(a, a.base_model_prefix)
        for name, child in a.named_children():
            if name != a.base_model_prefix:
                setattr(self.model, name, child)
        for name, child in a_inner.named_children():
            if name != "layers":
                setattr(inner, name, child)
        positions = []
        types = []
        for k, st in enumerate(steps):
            if not 0 <= st.model < len(models):
                raise PathError(f"path position {k}: model {st.model} does not exist ({len(models)} models)")
            layers = decoder_layers(models[st.model])
            if not 0 <= st.layer < len(layers):
                raise PathError(f"path position {k}: model {st.model} has no layer {st.layer} ({len(layers)} layers)")
            positions.append(_Position(layers[st.layer], k, st.scale))
            model_types = getattr(models[st.model].config, "layer_types", None)
            if model_types is not None:
                types.append(model_types[st.layer])
        inner.layers = nn.ModuleList(positions)
        self.model.config.num_hidden_layers = len(steps)
        if types:
            self.model.config.layer_types = types
        return self.model


class Dataflow:
    """The resident side of data-flow search: source models loaded once per worker, one `PathModel` reused.

    Sources are model directories, or (PS+DFS) a parameter-space recipe merged once in memory and kept.
    """

    def __init__(self, template: str, device: torch.device | str = "cpu", dtype: str = "float32"):
        self.device = torch.device(device)
        self.dtype = dtype
        self._resident: dict[str, PreTrainedModel] = {}
        self.path_model = PathModel(self.source(template))
        self.model = self.path_model.model

    def source(self, spec: str | dict) -> PreTrainedModel:
        """A resident source model: loaded (or merged) on first use, then reused."""
        key = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
        if key not in self._resident:
            if isinstance(spec, str):
                model = AutoModelForCausalLM.from_pretrained(spec, dtype=TORCH_DTYPES[self.dtype], trust_remote_code=False)
            else:
                model = merged_model(Recipe.from_dict(spec), self.device)
            self._resident[key] = model.to(self.device).eval()
        return self._resident[key]

    def sources(self, recipe: Recipe) -> list[PreTrainedModel]:
        return [self.source(s) for s in path_sources(recipe)]

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> PreTrainedModel:
        """Make the shell run `recipe`'s path; no weight is copied."""
        return self.path_model.set_path(self.sources(recipe), steps_of(recipe.path))


def path_sources(recipe: Recipe) -> list[str | dict]:
    """The models a path's indices refer to: the merge of ``path.a`` (PS+DFS) if present, then the parents."""
    a = recipe.path.get("a")
    return ([a] if a else []) + list(recipe.parents)


def merged_model(recipe: Recipe, device: torch.device | str = "cpu") -> PreTrainedModel:
    """A parameter-space recipe merged in memory: model A of a PS+DFS path (merged once, so never compiled)."""
    mat = Materializer(recipe.base, recipe.parents, device, recipe.dtype, compile=False)
    return mat.materialize(recipe)


def check_foldable(config) -> None:
    if config.model_type not in FOLDABLE:
        raise PathError(
            f"cannot fold path scales into a {config.model_type} model: folding is exact only for pre-norm decoders "
            f"whose layers write to the stream through {' and '.join(RESIDUAL_WRITERS)} "
            f"({', '.join(sorted(FOLDABLE))}); post-norm sublayers (e.g. Gemma 2/3) would need their output-norm "
            "weights scaled instead"
        )


@torch.no_grad()
def fold(models: list[PreTrainedModel], steps: list[Step]) -> PreTrainedModel:
    """A standard model computing the same function as the path: layers copied in path order, scales folded."""
    a = models[0]
    check_foldable(a.config)
    config = copy.deepcopy(a.config)
    config.num_hidden_layers = len(steps)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [models[s.model].config.layer_types[s.layer] for s in steps]
    prefix = a.base_model_prefix
    state = {k: v for k, v in a.state_dict().items() if f"{prefix}.layers." not in k}
    c = 1.0
    for k, st in enumerate(steps):
        c *= st.scale
        layer_state = decoder_layers(models[st.model])[st.layer].state_dict()
        for name, t in layer_state.items():  # load_state_dict copies, so only scaled tensors need new storage
            state[f"{prefix}.layers.{k}.{name}"] = t / c if name.startswith(RESIDUAL_WRITERS) else t
    out = AutoModelForCausalLM.from_config(config, dtype=a.dtype)
    out.load_state_dict(state, strict=True)
    out.generation_config = copy.deepcopy(a.generation_config)
    return out.eval()


def write_path_model(recipe: Recipe, out_dir: str | Path, device: torch.device | str = "cpu") -> Path:
    """Export a DFS / PS+DFS recipe as a plain Hugging Face model directory (no custom code needed to load it)."""
    out = Path(out_dir)
    sources = path_sources(recipe)
    flow = Dataflow(sources[0], device, recipe.dtype)
    check_foldable(flow.model.config)
    model = fold(flow.sources(recipe), steps_of(recipe.path))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    first = sources[0] if isinstance(sources[0], str) else (sources[0].get("base") or sources[0]["parents"][0])
    AutoTokenizer.from_pretrained(first, trust_remote_code=False).save_pretrained(out)
    return out
