"""The parameter search space: dimensions, decoding and the published defaults."""
import pytest

from evomerge.spaces import ParameterSpace, Range

RANGES = {"weight": Range(0.0, 1.0), "density": Range(0.1, 1.0), "t": Range(0.0, 1.0)}


def space(method="ties", layers=4, groups=("embed", "layers", "head"), granularity=1, parents=("a", "b")):
    return ParameterSpace(method=method, parents=list(parents), base="base", num_layers=layers, ranges=RANGES,
                          fixed={"weight": 0.5, "density": 1.0}, searched_groups=groups, layer_granularity=granularity)


def test_two_parent_32_layer_weight_only_preset_is_64_dimensional():
    assert space("task_arithmetic", layers=32, groups=("layers",)).dimension == 64


def test_ties_space_has_weight_and_density_per_group_and_parent():
    assert space().dimension == (4 + 2) * 2 * 2


def test_slerp_space_searches_t_per_group():
    s = space("slerp", parents=("a",))
    assert s.dimension == 4 + 2
    assert s.decode([0.25] * s.dimension).groups["layers.2"] == {"t": [0.25]}


def test_parameters_a_space_does_not_search_take_the_methods_defaults():
    recipe = space("della").decode([0.5] * space("della").dimension)
    assert set(recipe.groups["layers.0"]) == {"weight", "density", "epsilon"}


def test_layer_granularity_groups_layers():
    s = space(layers=8, granularity=4)
    assert s.dimension == (2 + 2) * 2 * 2
    recipe = s.decode([0.5] * s.dimension)
    assert recipe.groups["layers.0"] == recipe.groups["layers.3"]


def test_decode_maps_the_unit_cube_onto_the_ranges_and_clips():
    s = space()
    genome = [0.0, 1.0] + [2.0, -1.0] + [0.5] * (s.dimension - 4)
    r = s.decode(genome)
    assert r.groups["embed"]["weight"] == [0.0, 1.0]
    assert r.groups["embed"]["density"] == [1.0, 0.1]


def test_unsearched_groups_take_the_fixed_values():
    s = space("task_arithmetic", groups=("layers",))
    assert s.decode([0.3] * s.dimension).groups["head"] == {"weight": [0.5, 0.5]}


def test_x0_is_the_centre_of_the_cube():
    assert set(space().x0()) == {0.5}


def test_decode_rejects_a_genome_of_the_wrong_length():
    with pytest.raises(ValueError, match="coordinates"):
        space().decode([0.5])
