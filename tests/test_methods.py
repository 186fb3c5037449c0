"""Merge methods against small hand-computed cases and their defining invariants."""
import math

import pytest
import torch

from evomerge.merge.methods import (
    METHODS,
    SPECS,
    InvalidRecipe,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della_linear,
    drop_magprune,
    drop_random,
    linear,
    magnitude_keep,
    magnitude_ranks,
    magprune,
    merge_method,
    model_stock,
    outlier_window,
    passthrough,
    random_bits,
    random_drop,
    rank_fractions,
    slerp,
    sort_row_ranks,
    task_arithmetic,
    tensor_seeds,
    ties,
    topk_window,
    validate,
)

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
DELTAS = torch.tensor([[0.5, -0.2, 0.0, 0.1],
                       [-0.1, -0.4, 0.3, 0.1]])
RANKS = magnitude_ranks(DELTAS)
ONES = torch.tensor([1.0, 1.0])


def bits(m, seed=0, n=1):
    return random_bits(tensor_seeds(seed, "t", n), m)


def test_linear_is_the_weighted_average_of_parents():
    params = BASE + DELTAS
    assert torch.allclose(linear(params, torch.tensor([3.0, 1.0])), (3 * params[0] + params[1]) / 4)


def test_task_arithmetic_adds_weighted_task_vectors_to_base():
    out = task_arithmetic(BASE, DELTAS, torch.tensor([1.0, 0.5]))
    assert torch.allclose(out, torch.tensor([1.45, 0.6, 1.15, 1.15]))


def test_task_arithmetic_lambda_scales_the_merged_task_vector():
    out = task_arithmetic(BASE, DELTAS, torch.tensor([1.0, 0.5]), lambda_=2.0)
    assert torch.allclose(out, torch.tensor([1.9, 0.2, 1.3, 1.3]))


def test_magnitude_ranks_order_entries_by_magnitude_ties_by_position():
    assert RANKS.tolist() == [[3, 2, 0, 1], [0, 3, 2, 1]]


def test_trim_keeps_the_top_density_fraction_by_magnitude():
    kept = DELTAS * magnitude_keep(DELTAS, *topk_window(4, torch.tensor([0.5, 0.25])))
    assert torch.equal(kept, torch.tensor([[0.5, -0.2, 0.0, 0.0], [0.0, -0.4, 0.0, 0.0]]))


def test_ties_with_density_one_is_sign_elected_task_arithmetic():
    out = ties(BASE, DELTAS, ONES, keep=magnitude_keep(DELTAS, *topk_window(4, ONES)), normalize=False)
    # entry 0: sum 0.4 > 0 elects +, keeps 0.5; entry 1: both negative; entry 2: only +0.3; entry 3: both +
    assert torch.allclose(out, torch.tensor([1.5, 0.4, 1.3, 1.2]))


def test_ties_normalize_divides_by_the_weights_that_agree():
    out = ties(BASE, DELTAS, torch.tensor([1.0, 3.0]), keep=magnitude_keep(DELTAS, *topk_window(4, ONES)),
               normalize=True)
    # entry 1: both agree: (-0.2 - 1.2) / 4; entry 2: parent 0 has 0 (no sign) so only parent 1 counts: 0.9 / 3
    assert torch.allclose(out[1:3], torch.tensor([1 - 1.4 / 4, 1.3]))


def test_breadcrumbs_drops_the_largest_outliers_and_the_smallest():
    # parent 0 by magnitude: 0.0 < 0.1 < 0.2 < 0.5; keep 2 of 4, drop the top 1 (gamma 0.25) and the bottom 1
    kept = DELTAS[:1] * magnitude_keep(DELTAS[:1], *outlier_window(4, torch.tensor([0.5]), torch.tensor([0.25])))
    assert torch.equal(kept, torch.tensor([[0.0, -0.2, 0.0, 0.1]]))


def test_breadcrumbs_ties_with_nothing_dropped_is_sign_elected_task_arithmetic():
    out = breadcrumbs_ties(BASE, DELTAS, ONES, keep=magnitude_keep(DELTAS, *outlier_window(4, ONES, ONES * 0)))
    assert torch.allclose(out, torch.tensor([1.5, 0.4, 1.3, 1.2]))


def test_dare_keeps_the_expectation_of_the_task_vector():
    base = torch.zeros(200_000)
    deltas = torch.full((1, 200_000), 0.2)
    out = dare_linear(base, deltas, torch.tensor([1.0]), **random_drop(torch.tensor([0.3])), bits=bits(200_000))
    assert abs(out.mean().item() - 0.2) < 0.005
    assert abs((out != 0).float().mean().item() - 0.3) < 0.005


def test_dare_l1_rescale_keeps_each_task_vectors_l1_norm():
    deltas = torch.randn(2, 10_000, generator=torch.Generator().manual_seed(0))
    out = dare_linear(torch.zeros(10_000), deltas, torch.tensor([1.0, 0.0]), **random_drop(torch.tensor([0.3, 0.3])),
                      bits=bits(10_000, n=2), rescale_mode="l1")
    assert out.abs().sum().item() == pytest.approx(deltas[0].abs().sum().item(), rel=1e-4)


def test_dare_is_reproducible_for_a_seed_and_differs_across_seeds():
    args = (BASE.repeat(1000), DELTAS.repeat(1, 1000), ONES)
    constants = random_drop(torch.tensor([0.5, 0.5]))
    a = dare_ties(*args, **constants, bits=random_bits(tensor_seeds(7, "x", 2), 4000))
    assert torch.equal(a, dare_ties(*args, **constants, bits=random_bits(tensor_seeds(7, "x", 2), 4000)))
    assert not torch.equal(a, dare_ties(*args, **constants, bits=random_bits(tensor_seeds(8, "x", 2), 4000)))


def lowbias32(x):
    """The hash written out on Python ints (unsigned 32-bit), the reference for the int32-lane kernel."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    return (x ^ (x >> 16)) >> 1


@pytest.mark.parametrize("compiled", [False, True])
def test_random_bits_are_an_unsigned_32_bit_hash_even_where_int32_lanes_wrap(compiled):
    seeds, start, m = torch.tensor([0x7FFFFFFE, 12345]), 2**31 - 300, 299  # index + seed wraps past 2**32
    fn = torch.compile(random_bits, dynamic=True) if compiled else random_bits
    got = fn(seeds, m, torch.tensor(start))
    assert got.tolist() == [[lowbias32(i + s) for i in range(start, start + m)] for s in seeds.tolist()]


def test_della_keeps_large_entries_more_often_and_keeps_the_expectation():
    m = 200_000
    deltas = torch.linspace(0.1, 0.3, m)[None, :]
    out = della_linear(torch.zeros(m), deltas, torch.tensor([1.0]), **magprune(torch.tensor([0.5]), torch.tensor([0.4])),
                       row_ranks=rank_fractions(sort_row_ranks(deltas, m), torch.tensor(m - 1.0)), bits=bits(m))
    kept = (out != 0).float()
    assert kept[: m // 10].mean().item() < 0.2 and kept[-m // 10:].mean().item() > 0.8
    assert out.mean().item() == pytest.approx(deltas.mean().item(), rel=0.02)


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.3, 0.5, 0.7 + 1e-7, 1 - 2**-24, 1.0])
def test_dellas_keep_with_no_epsilon_is_dares_keep_bit_for_bit(p):
    """DELLA's keep probability is one per entry, compared in fp32 lanes; DARE's is one per parent, in double: the
    same entries survive, also for bits right at the threshold floor(p * 2**31)."""
    t = math.floor(torch.tensor(p).item() * 2**31)
    bits = torch.tensor([min(max(t + d, 0), 2**31 - 1) for d in (-2, -1, 0, 1)] + [0, 2**31 - 1], dtype=torch.int32)
    deltas, density = torch.ones(1, bits.numel()), torch.tensor([p])
    ranks = [torch.linspace(0, 1, bits.numel())]
    keep, line = random_drop(density), magprune(density, torch.zeros(1))
    dare = drop_random(deltas, keep["threshold"], keep["scale"], [bits], rescale=True, mode="density")
    della = drop_magprune(deltas, line["low"], line["span"], ranks, [bits], rescale=True, mode="density")
    assert torch.equal(dare[0], della[0])
    assert torch.equal(dare[0] != 0, bits.long() < t)


def test_slerp_at_t0_is_the_base_and_at_t1_the_parent():
    base, delta = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([[0.0, -1.0, 3.0]])
    assert torch.allclose(slerp(base, delta, torch.tensor([0.0])), base)
    assert torch.allclose(slerp(base, delta, torch.tensor([1.0])), base + delta[0])


def test_slerp_moves_along_the_arc_between_orthogonal_vectors():
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([[-1.0, 1.0]]), torch.tensor([0.5]))
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_model_stock_on_identical_parents_is_that_parent():
    delta = torch.tensor([0.3, -0.1, 0.2])
    assert torch.allclose(model_stock(BASE[:3], torch.stack([delta, delta, delta])), BASE[:3] + delta)


def test_model_stock_on_orthogonal_task_vectors_is_the_base():
    out = model_stock(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(out, torch.zeros(2))


def test_passthrough_takes_the_chosen_parent_times_its_scale():
    assert torch.allclose(passthrough(BASE + DELTAS, torch.tensor([0.0, 2.0])), 2 * (BASE + DELTAS[1]))


@pytest.mark.parametrize("method, base, parents, groups, options, field", [
    ("tie", "b", ["p"], {}, {}, "method"),
    ("ties", "b", ["p"], {"embed": {"weight": [1.0], "alpha": [1.0]}}, {}, "groups.embed.alpha"),
    ("ties", "b", ["p"], {"embed": {"weight": [1.0], "density": [1.5]}}, {}, "groups.embed.density"),
    ("ties", "b", ["p"], {"embed": {"weight": [1.0], "density": [0.0]}}, {}, "groups.embed.density"),
    ("linear", None, ["p", "q"], {"embed": {"weight": [1.0, -1.0]}}, {}, "groups.embed.weight"),
    ("slerp", "b", ["p", "q"], {}, {}, "parents"),
    ("task_arithmetic", None, ["p"], {}, {}, "base"),
    ("ties", "b", ["p"], {}, {"normalise": True}, "options.normalise"),
    ("dare_ties", "b", ["p"], {}, {"rescale_mode": "l2"}, "options.rescale_mode"),
    ("breadcrumbs", "b", ["p"], {"embed": {"weight": [1.0], "gamma": [1.0]}}, {}, "groups.embed.gamma"),
    ("slerp", "b", ["p"], {"embed": {"t": [-0.1]}}, {}, "groups.embed.t"),
])
def test_bad_recipes_are_refused_naming_the_field(method, base, parents, groups, options, field):
    with pytest.raises(InvalidRecipe) as e:
        validate(method, base, parents, groups, options)
    assert e.value.field == field


def test_every_contract_has_a_kernel_and_the_kernels_options_default_to_the_contracts():
    assert set(METHODS) == set(SPECS)
    for name, m in METHODS.items():
        assert m.fn.__kwdefaults__ == {("lambda_" if k == "lambda" else k): v for k, v in SPECS[name].options.items()}


def test_a_kernel_that_takes_other_parameters_than_its_contract_is_refused():
    with pytest.raises(TypeError, match="ties: ties_without_lambda.* does not take what its contract declares"):
        @merge_method("ties", select=topk_window)
        def ties_without_lambda(base, deltas, weight, *, keep, normalize):
            return base
    assert METHODS["ties"].fn is ties


def test_a_kernel_with_per_parent_constants_takes_them_in_place_of_the_parameters_they_consume():
    with pytest.raises(TypeError, match="dare_ties: dare_with_density.* does not take what its contract declares: "
                                        "base, deltas, weight, \\*, bits, threshold, scale"):
        @merge_method("dare_ties", constants=random_drop)
        def dare_with_density(base, deltas, weight, density, *, threshold, scale, bits, normalize, rescale,
                              rescale_mode, lambda_):
            return base
    assert METHODS["dare_ties"].fn is dare_ties
    constants = METHODS["dare_ties"].kernel_constants({"weight": ONES, "density": torch.tensor([0.3, 1.0])})
    assert constants["threshold"].tolist() == [math.floor(torch.tensor(0.3).item() * 2**31) - 1, 2**31 - 1]
    assert torch.equal(constants["scale"], 1 / torch.tensor([0.3, 1.0]))
