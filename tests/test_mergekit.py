"""mergekit configs: import means what mergekit means, export round-trips, data-flow configs are refused clearly."""
import subprocess

import pytest
import yaml

from evomerge.config import ConfigError, load_recipe
from evomerge.io import inspect_model
from evomerge.mergekit import evaluate_setting, to_mergekit
from evomerge.recipe import Recipe

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


def test_per_module_filters_that_split_a_layer_are_refused(tmp_path, tiny):
    cfg = {"merge_method": "slerp", "base_model": str(tiny / "up"),
           "models": [{"model": str(tiny / "up")}, {"model": str(tiny / "rot")}],
           "parameters": {"t": [{"filter": "self_attn", "value": 0.2}, {"value": 0.7}]}}
    with pytest.raises(ConfigError, match=r"parameters\.t.*per layer"):
        load_recipe(write(tmp_path, cfg))


def test_merge_cli_accepts_a_mergekit_config(tmp_path, tiny, evomerge_cmd):
    cfg = {"merge_method": "linear", "models": [{"model": str(tiny / "up"), "parameters": {"weight": 1.0}},
                                                {"model": str(tiny / "rot"), "parameters": {"weight": 1.0}}]}
    proc = subprocess.run([*evomerge_cmd, "merge", str(write(tmp_path, cfg)), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_merge_cli_names_the_mergekit_field_it_refuses(tmp_path, tiny, evomerge_cmd):
    cfg = {"merge_method": "slerp", "base_model": str(tiny / "base"),
           "models": [{"model": str(tiny / "up")}, {"model": str(tiny / "rot")}], "parameters": {"t": 0.5}}
    proc = subprocess.run([*evomerge_cmd, "merge", str(write(tmp_path, cfg)), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "mk.yaml" in proc.stderr and "parents" in proc.stderr
    assert "slerp" in proc.stderr and not (tmp_path / "out").exists()
