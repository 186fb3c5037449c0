"""In-place materialization of recipes into the resident model, on the real tiny zoo."""
import pytest
import torch

from evomerge.io import ModelFilesError, load_state_dict
from evomerge.merge import Materializer
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def mat(tiny):
    return Materializer(str(tiny / "base"), [str(tiny / "up"), str(tiny / "rot")])


def uniform(mat, method, weights, **extra):
    groups = {g: {"weight": list(weights), **extra} for g in mat.groups}
    return Recipe(method, mat.parent_paths, groups, mat.base_path)


def test_groups_cover_embeddings_each_layer_and_head(mat):
    assert mat.groups == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]


def test_zero_weights_give_back_the_base(mat, tiny):
    model = mat.materialize(uniform(mat, "task_arithmetic", [0.0, 0.0]))
    base = load_state_dict(tiny / "base")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def test_one_hot_linear_gives_back_a_parent(mat, tiny):
    model = mat.materialize(uniform(mat, "linear", [0.0, 1.0]))
    parent = load_state_dict(tiny / "rot")
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in parent.items())


def test_materialize_writes_into_the_same_model_object(mat):
    first = mat.materialize(uniform(mat, "ties", [0.5, 0.5], density=[0.5, 0.5]))
    ptr = first.model.embed_tokens.weight.data_ptr()
    second = mat.materialize(uniform(mat, "ties", [1.0, 1.0], density=[1.0, 1.0]))
    assert second is first and second.model.embed_tokens.weight.data_ptr() == ptr


def test_parents_with_different_shapes_are_rejected_naming_the_tensor(tmp_path, tiny):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny / "up", bad)
    sd = load_state_dict(bad)
    sd["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.2.mlp.up_proj.weight"][:-1]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ModelFilesError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        Materializer(str(tiny / "base"), [str(tiny / "up"), str(bad)])
