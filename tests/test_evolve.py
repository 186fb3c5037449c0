"""mergekit-evolve configs: run as the study they mean, convert into a study file, bad fields named."""
import sqlite3

import pytest
import yaml

from evomerge.config import ConfigError
from evomerge.studyfile import load_study
from tests.conftest import FITNESS, TINY, evomerge

EXAMPLE = TINY / "evolve.yaml"


def evolve_file(tmp_path, **changes):
    """The shipped example (mergekit-evolve's documented config on the tiny zoo) in `tmp_path`, models absolute."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["genome"]["models"] = [str(TINY / m) for m in data["genome"]["models"]]
    data["genome"]["base_model"] = str(TINY / "base")
    for k, v in changes.items():
        if k.startswith("genome."):
            data["genome"][k.removeprefix("genome.")] = v
        else:
            data[k] = v
    path = tmp_path / "my-evolve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_documented_example_runs_as_a_study_named_and_stored_after_its_file(tmp_path):
    path = evolve_file(tmp_path, limit=20)
    r = evomerge("run", path, "--budget", 4, "--task-search-path", FITNESS)
    assert r.returncode == 0, r.stderr
    assert "study my-evolve" in r.stdout and "search space ps (dare_ties, layer groups): dimension 16" in r.stdout
    assert "note:" in r.stderr and "embeddings and head" in r.stderr
    with sqlite3.connect(tmp_path / "my-evolve.db") as c:
        assert c.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0] >= 4


def test_convert_writes_a_study_that_run_check_accepts(tmp_path):
    out = tmp_path / "studies" / "converted.yaml"
    r = evomerge("convert", EXAMPLE, "-o", out, "--task-search-path", FITNESS, "--budget", 30,
            "--random-seed", 7)
    assert r.returncode == 0, r.stderr
    study = yaml.safe_load(out.read_text())
    assert study["budget"] == 30 and study["seed"] == 7 and study["merge"]["options"] == {"normalize": True, "rescale_mode": "l1"}
    assert study["search_space"]["x0"] == {"weight": 0.5, "density": 1.0}
    assert study["search_space"]["weight"] == {"low": -1.0, "high": 1.0}
    assert study["fitness"]["tasks"][1] == {"task": "tiny_rot", "metric": "exact_match,none", "weight": 0.5,
                                            "limit": 40}
    assert "# note: fitness.tasks" in out.read_text()
    r = evomerge("run", out, "--check")
    assert r.returncode == 0, r.stderr


def test_filters_and_smooth_map_to_module_groups_and_a_note(tmp_path):
    path = evolve_file(tmp_path, **{"genome.filters": ["self_attn", "mlp"], "genome.smooth": True,
                                    "genome.layer_granularity": 0, "shuffle": True})
    r = evomerge("convert", path, "-o", tmp_path / "s.yaml", "--task-search-path", FITNESS)
    assert r.returncode == 0, r.stderr
    assert "genome.smooth: no equivalent" in r.stderr and "shuffle: no equivalent" in r.stderr
    space = yaml.safe_load((tmp_path / "s.yaml").read_text())["search_space"]
    assert space["granularity"] == ["self_attn", "mlp"] and space["layer_granularity"] == 0


@pytest.mark.parametrize("field, value", [
    ("genome.merge_method", "della"),
    ("genome.layer_granularity", -2),
    ("genome.filters", "mlp"),
    ("genome.smooth", "yes"),
    ("genome.models", []),
    ("genome.int8_mask", True),
    ("tasks", [{"name": "tiny_up", "weight": -1}]),
    ("limit", 0),
    ("population", 8),
])
def test_a_bad_evolve_field_is_refused_naming_file_and_field(tmp_path, field, value):
    path = evolve_file(tmp_path, **{field: value})
    with pytest.raises(ConfigError) as e:
        load_study(path, task_search_path=[str(FITNESS)])
    assert f"{path}: {'tasks.0.weight' if field == 'tasks' else field}" in str(e.value)


def test_a_bad_evolve_file_exits_2_before_the_db_is_touched(tmp_path):
    path = evolve_file(tmp_path, **{"genome.merge_method": "della"})
    r = evomerge("run", path, "--task-search-path", FITNESS)
    assert r.returncode == 2 and f"{path}: genome.merge_method" in r.stderr.replace("\n", ""), r.stderr
    assert not (tmp_path / "my-evolve.db").exists()
