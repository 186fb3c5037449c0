"""Module-level merge groups: the ps space at module granularity, and its winner through export and merge."""
import json

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import ConfigError
from evomerge.spaces import ParameterSpace, Range
from evomerge.studyfile import load_study
from tests.conftest import evomerge, write_study


def space(**kw):
    return ParameterSpace(method="ties", parents=["a", "b"], base="base", num_layers=4,
                          ranges={"weight": Range(0.0, 1.0), "density": Range(0.1, 1.0)}, fixed={}, **kw)


def test_module_granularity_searches_attention_mlp_and_the_rest_of_each_layer_apart():
    s = space(filters=["self_attn", "mlp"])
    assert s.dimension == (2 + 4 * 3) * 2 * 2
    genome = [i / s.dimension for i in range(s.dimension)]
    groups = s.decode(genome).groups
    assert {"layers.2", "layers.2.self_attn", "layers.2.mlp"} <= set(groups)
    assert groups["layers.2.mlp"] != groups["layers.2.self_attn"] != groups["layers.2"]


def test_all_layers_one_group_and_x0_in_parameter_units_as_mergekit_evolve():
    s = space(layer_granularity=0, filters=["mlp"], x0={"weight": 0.5, "density": 1.0})
    assert s.dimension == (2 + 2) * 2 * 2
    assert s.x0()[:4] == [0.5, 0.5, 1.0, 1.0]


def test_a_module_study_runs_and_its_mergekit_export_merges_to_the_stored_test_score(tmp_path):
    study = write_study(tmp_path, budget=4, search_space={"preset": "ps-layerwise", "granularity": "module"},
                        baselines={"weight": [1.0], "density": [1.0]})
    r = evomerge("run", study)
    assert r.returncode == 0, r.stderr
    assert "groups by self_attn/mlp and the rest): dimension 56" in r.stdout
    r = evomerge("export", study, "-o", tmp_path / "mk.yaml", "--format", "mergekit")
    assert r.returncode == 0, r.stderr
    mk = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    assert any(c.get("filter") == "self_attn" for c in mk["models"][0]["parameters"]["weight"])
    r = evomerge("merge", tmp_path / "mk.yaml", tmp_path / "merged")
    assert r.returncode == 0, r.stderr

    from evomerge.fitness import Fitness

    s = json.loads(evomerge("status", study, "--json").stdout)
    stored = {row["model"]: row for row in s["final_table"]}["evolved best"]["test"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert Fitness(load_study(study).fitness, model, tok, "cpu").score("test").value == stored


@pytest.mark.parametrize("space, where", [
    ({"granularity": "attention"}, "search_space.granularity"),
    ({"granularity": ["mlp", "mlp"]}, "search_space: granularity"),
    ({"granularity": ["self/attn"]}, "search_space: granularity"),
    ({"x0": {"weight": 3.0}}, "search_space: x0.weight"),
    ({"x0": {"gamma": 0.1}}, "search_space.x0.gamma"),
])
def test_a_bad_granularity_or_x0_names_the_file_and_field(tmp_path, space, where):
    study = write_study(tmp_path, search_space={"preset": "ps-layerwise", **space})
    with pytest.raises(ConfigError) as e:
        load_study(study)
    assert f"{study}: {where}" in str(e.value)
