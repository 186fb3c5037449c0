"""mergekit configs: import means what mergekit means, export round-trips, data-flow configs are refused clearly."""
import re

import numpy as np
import pytest
import torch
import yaml

from evomerge.config import ConfigError
from evomerge.io import inspect_model, load_state_dict
from evomerge.merge import write_model
from evomerge.mergekit import evaluate_setting, to_mergekit
from evomerge.recipe import Recipe
from evomerge.recipefile import load_recipe
from tests.conftest import evomerge

GROUPS = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]


def write(tmp_path, data, name="mk.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_gradients_interpolate_over_the_layers_like_mergekit():
    assert evaluate_setting([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 1 / 3) == pytest.approx(1 / 3)
    assert evaluate_setting([{"filter": "mlp", "value": 0.2}, {"value": 0.9}], "x.mlp.w", 0.5) == 0.2
    assert evaluate_setting([{"filter": "mlp", "value": 0.2}, {"value": 0.9}], "x.attn.w", 0.5) == 0.9


def test_a_ties_config_imports_with_per_layer_gradients_and_options(tmp_path, tiny):
    cfg = {"merge_method": "ties", "base_model": str(tiny / "base"),
           "models": [{"model": str(tiny / "base")},
                      {"model": str(tiny / "up"), "parameters": {"weight": [0.0, 0.3], "density": 0.5}},
                      {"model": str(tiny / "rot"), "parameters": {"weight": 0.7}}],
           "parameters": {"density": 0.9, "normalize": False, "int8_mask": True}, "dtype": "bfloat16"}
    r = load_recipe(write(tmp_path, cfg))
    assert r.method == "ties" and r.base == str(tiny / "base") and r.parents == [str(tiny / "up"), str(tiny / "rot")]
    assert r.options == {"normalize": False} and r.dtype == "bfloat16"
    assert r.groups["embed"] == {"weight": [0.0, 0.7], "density": [0.5, 0.9]}
    assert r.groups["layers.2"]["weight"] == pytest.approx([0.2, 0.7])
    assert r.groups["head"]["weight"] == pytest.approx([0.3, 0.7])


def test_a_slerp_config_with_a_t_gradient_imports_as_base_plus_one_parent(tmp_path, tiny):
    cfg = {"merge_method": "slerp", "base_model": str(tiny / "up"),
           "slices": [{"sources": [{"model": str(tiny / "up"), "layer_range": [0, 4]},
                                   {"model": str(tiny / "rot"), "layer_range": [0, 4]}]}],
           "parameters": {"t": [0.0, 0.6]}}
    r = load_recipe(write(tmp_path, cfg))
    assert r.base == str(tiny / "up") and r.parents == [str(tiny / "rot")]
    assert r.groups["layers.3"]["t"] == pytest.approx([0.6]) and r.groups["embed"]["t"] == [0.0]


def test_dare_configs_keep_mergekits_l1_rescale(tmp_path, tiny):
    cfg = {"merge_method": "dare_ties", "base_model": str(tiny / "base"),
           "models": [{"model": str(tiny / "up"), "parameters": {"weight": 0.5, "density": 0.5}}]}
    assert load_recipe(write(tmp_path, cfg)).options["rescale_mode"] == "l1"


def test_export_then_import_gives_back_the_recipe(tmp_path, tiny):
    groups = {g: {"weight": [0.1 * i, 1 - 0.1 * i], "density": [0.5 + 0.05 * i, 0.9]} for i, g in enumerate(GROUPS)}
    recipe = Recipe("ties", [str(tiny / "up"), str(tiny / "rot")], groups, str(tiny / "base"),
                    options={"normalize": False, "lambda": 0.8}, dtype="float16")
    back = load_recipe(write(tmp_path, to_mergekit(recipe, inspect_model(tiny / "base"))))
    assert (back.method, back.base, back.parents, back.options, back.dtype) == (
        recipe.method, recipe.base, recipe.parents, recipe.options, recipe.dtype)
    for g in GROUPS:
        for p in ("weight", "density"):
            assert back.groups[g][p] == pytest.approx(groups[g][p]), (g, p)


def test_layer_aligned_passthrough_slices_import_as_a_per_layer_choice(tmp_path, tiny):
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny / "up"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tiny / "rot"), "layer_range": [2, 4]}]}]}
    r = load_recipe(write(tmp_path, cfg))
    assert r.groups["layers.1"]["weight"] == [1.0, 0.0] and r.groups["layers.2"]["weight"] == [0.0, 1.0]
    assert r.groups["embed"]["weight"] == [1.0, 0.0]


def test_a_frankenmerge_that_stacks_layers_is_refused_as_data_flow(tmp_path, tiny):
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny / "up"), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(tiny / "rot"), "layer_range": [1, 4]}]}]}
    with pytest.raises(ConfigError, match=r"slices\.1.*data-flow"):
        load_recipe(write(tmp_path, cfg))


def _t(name: str) -> float:
    """mergekit's t for one tensor of a 4-layer model merged as one slice: 0 embeddings, i/3 layer i, 1 the rest."""
    if "embed_tokens" in name:
        return 0.0
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) / 3 if m else 1.0


def slerp_ref(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp, written out: normalised directions, lerp when nearly parallel."""
    a, b = v0.double().flatten(), v1.double().flatten()
    dot = float((a / a.norm()) @ (b / b.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = np.arccos(dot)
    return ((np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)).reshape(v0.shape)


def ties_ref(base: torch.Tensor, parents: list[torch.Tensor], weights: list[float], densities: list[float]):
    """mergekit's TIES with normalize, written out: top-k by magnitude, sign election by sum, weighted mean.
    Task vectors are taken in the parents' float32, as mergekit does (a float64 difference can reorder near-ties);
    among exactly equal magnitudes at the cut, mergekit's torch.topk keeps any, this keeps the later ones."""
    b = base.double().flatten()
    tvs = []
    for p, w, d in zip(parents, weights, densities):
        delta = (p - base).flatten().double()
        keep = torch.zeros_like(delta, dtype=torch.bool)
        k = int(d * delta.numel())
        keep[torch.argsort(delta.abs(), stable=True)[delta.numel() - k:]] = True
        tvs.append(w * delta * keep)
    tv = torch.stack(tvs)
    agree = tv.sign() == tv.sum(0).sign()
    divisor = (torch.tensor(weights, dtype=torch.float64)[:, None] * agree).sum(0)
    divisor[divisor.abs() < 1e-8] = 1
    return (b + (tv * agree).sum(0) / divisor).reshape(base.shape)


README_SLERP = {"slices": [{"sources": [{"model": "up", "layer_range": [0, 4]}, {"model": "rot", "layer_range": [0, 4]}]}],
                "merge_method": "slerp", "base_model": "up",
                "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                     {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
                "dtype": "float32"}  # the README says bfloat16; float32 here so the comparison is exact


def at_zoo(cfg: dict, tiny) -> dict:
    """A config's model names pointed at the tiny zoo."""
    text = yaml.safe_dump(cfg)
    for name in ("base", "up", "rot"):
        text = re.sub(rf"(model: |base_model: ){name}\b", rf"\g<1>{tiny / name}", text)
    return yaml.safe_load(text)


def test_mergekits_readme_slerp_with_module_gradients_gives_mergekits_weights(tmp_path, tiny):
    recipe = load_recipe(write(tmp_path, at_zoo(README_SLERP, tiny)))
    assert recipe.groups["layers.1"]["t"] == [0.5] and recipe.groups["layers.1.self_attn"]["t"] == pytest.approx([0.5 - 0.2 / 3])
    write_model(recipe, tmp_path / "out")
    out, up, rot = (load_state_dict(p) for p in (tmp_path / "out", tiny / "up", tiny / "rot"))
    for name, w in out.items():
        t = _t(name)
        grad = [0, 0.5, 0.3, 0.7, 1] if "self_attn" in name else [1, 0.5, 0.7, 0.3, 0] if "mlp" in name else None
        t = float(np.interp(t, np.linspace(0, 1, 5), grad)) if grad else 0.5
        assert torch.allclose(w.double(), slerp_ref(up[name], rot[name], t), atol=1e-5), name


TIES_MODULES = {"merge_method": "ties", "base_model": "base",
                "models": [{"model": "up", "parameters": {"density": [1.0, 0.7, 0.1],
                                                          "weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.3}]}},
                           {"model": "rot", "parameters": {"density": 0.5, "weight": [
                               {"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.6}]}}],
                "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"}


def test_a_ties_config_with_module_filters_gives_mergekits_weights_and_round_trips(tmp_path, tiny):
    notes = []
    recipe = load_recipe(write(tmp_path, at_zoo(TIES_MODULES, tiny)), notes)
    assert notes and "int8_mask" in notes[0]
    write_model(recipe, tmp_path / "out")
    out, base, up, rot = (load_state_dict(p) for p in (tmp_path / "out", tiny / "base", tiny / "up", tiny / "rot"))
    for name, w in out.items():
        t = _t(name)
        weights = [0.8 if "mlp" in name else 0.3, float(np.interp(t, [0, 1], [0.2, 0.9])) if "self_attn" in name else 0.6]
        densities = [float(np.interp(t, [0, 0.5, 1], [1.0, 0.7, 0.1])), 0.5]
        assert torch.allclose(w.double(), ties_ref(base[name], [up[name], rot[name]], weights, densities),
                              atol=1e-5), name
    back = load_recipe(write(tmp_path, to_mergekit(recipe, inspect_model(tiny / "base")), "back.yaml"))
    assert back.groups.keys() == recipe.groups.keys()
    for g, values in recipe.groups.items():
        for p, v in values.items():
            assert back.groups[g][p] == pytest.approx(v), (g, p)


def test_a_filter_finer_than_a_module_is_refused_naming_the_users_field(tmp_path, tiny):
    cfg = {"merge_method": "linear", "models": [
        {"model": str(tiny / "up"), "parameters": {"weight": 1.0}},
        {"model": str(tiny / "rot"), "parameters": {"weight": [{"filter": "q_proj", "value": 0.2}, {"value": 0.7}]}}]}
    with pytest.raises(ConfigError, match=r"mk\.yaml: models\.1\.parameters\.weight: .*self_attn"):
        load_recipe(write(tmp_path, cfg))


def test_gradients_restart_in_each_slice_like_mergekit(tmp_path, tiny):
    cfg = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(tiny / "up"), "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                     {"model": str(tiny / "rot"), "layer_range": [0, 2], "parameters": {"weight": 1.0}}]},
        {"sources": [{"model": str(tiny / "up"), "layer_range": [2, 3], "parameters": {"weight": [0.0, 1.0]}},
                     {"model": str(tiny / "rot"), "layer_range": [2, 3]}], "parameters": {"weight": 0.4}},
        {"sources": [{"model": str(tiny / "up"), "layer_range": [3, 4], "parameters": {"weight": 0.2}},
                     {"model": str(tiny / "rot"), "layer_range": [3, 4], "parameters": {"weight": 0.3}}]}]}
    r = load_recipe(write(tmp_path, cfg))
    assert [r.groups[f"layers.{i}"]["weight"][0] for i in range(4)] == [0.0, 1.0, 1.0, 0.2]
    assert r.groups["layers.2"]["weight"][1] == 0.4 and r.groups["embed"]["weight"] == [0.0, 1.0]
    assert r.groups["head"]["weight"] == [0.2, 0.3]  # the last slice's, at t = 1


def test_merge_cli_accepts_a_mergekit_config(tmp_path, tiny):
    cfg = {"merge_method": "linear", "models": [{"model": str(tiny / "up"), "parameters": {"weight": 1.0}},
                                                {"model": str(tiny / "rot"), "parameters": {"weight": 1.0}}]}
    proc = evomerge("merge", write(tmp_path, cfg), tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_merge_cli_names_the_mergekit_field_it_refuses(tmp_path, tiny):
    cfg = {"merge_method": "slerp", "base_model": str(tiny / "base"),
           "models": [{"model": str(tiny / "up")}, {"model": str(tiny / "rot")}], "parameters": {"t": 0.5}}
    proc = evomerge("merge", write(tmp_path, cfg), tmp_path / "out")
    assert proc.returncode == 2 and "mk.yaml" in proc.stderr and "parents" in proc.stderr
    assert "slerp" in proc.stderr and not (tmp_path / "out").exists()


def test_a_tokenizer_source_that_is_no_model_of_the_config_is_refused_naming_it(tmp_path, tiny):
    cfg = {"merge_method": "linear", "tokenizer_source": "elsewhere",
           "models": [{"model": str(tiny / "up"), "parameters": {"weight": 1.0}},
                      {"model": str(tiny / "rot"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=r"mk\.yaml: tokenizer_source: 'elsewhere'"):
        load_recipe(write(tmp_path, cfg))
    recipe = Recipe("linear", [str(tiny / "up"), str(tiny / "rot")], {g: {"weight": [1.0, 1.0]} for g in GROUPS},
                    tokenizer_source=str(tiny / "base"))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: tokenizer_source: "):
        load_recipe(recipe.save(tmp_path / "recipe.yaml"))
