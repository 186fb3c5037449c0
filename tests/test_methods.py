"""Merge methods against small hand-computed cases and their defining invariants."""
import torch

from evomerge.merge.methods import dare_linear, dare_ties, linear, task_arithmetic, ties, trim_magnitude

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
DELTAS = torch.tensor([[0.5, -0.2, 0.0, 0.1],
                       [-0.1, -0.4, 0.3, 0.1]])
ONES = torch.tensor([1.0, 1.0])


def test_linear_is_the_weighted_average_of_parents():
    params = BASE + DELTAS
    assert torch.allclose(linear(params, torch.tensor([3.0, 1.0])), (3 * params[0] + params[1]) / 4)


def test_task_arithmetic_adds_weighted_task_vectors_to_base():
    out = task_arithmetic(BASE, DELTAS, torch.tensor([1.0, 0.5]))
    assert torch.allclose(out, torch.tensor([1.45, 0.6, 1.15, 1.15]))


def test_trim_keeps_the_top_density_fraction_by_magnitude():
    kept = trim_magnitude(DELTAS, torch.tensor([0.5, 0.25]))
    assert torch.equal(kept, torch.tensor([[0.5, -0.2, 0.0, 0.0], [0.0, -0.4, 0.0, 0.0]]))


def test_ties_with_density_one_is_sign_elected_task_arithmetic():
    out = ties(BASE, DELTAS, ONES, torch.tensor([1.0, 1.0]), normalize=False)
    # entry 0: sum 0.4 > 0 elects +, keeps 0.5; entry 1: both negative; entry 2: only +0.3; entry 3: both +
    assert torch.allclose(out, torch.tensor([1.5, 0.4, 1.3, 1.2]))


def test_ties_normalize_divides_by_the_weights_that_agree():
    out = ties(BASE, DELTAS, torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), normalize=True)
    # entry 1: both agree: (-0.2 - 1.2) / 4; entry 2: parent 0 has 0 (no sign) so only parent 1 counts: 0.9 / 3
    assert torch.allclose(out[1:3], torch.tensor([1 - 1.4 / 4, 1.3]))


def test_dare_keeps_the_expectation_of_the_task_vector():
    base = torch.zeros(200_000)
    deltas = torch.full((1, 200_000), 0.2)
    g = torch.Generator().manual_seed(0)
    out = dare_linear(base, deltas, torch.tensor([1.0]), torch.tensor([0.3]), generator=g)
    assert abs(out.mean().item() - 0.2) < 0.005
    assert abs((out != 0).float().mean().item() - 0.3) < 0.005


def test_dare_ties_is_deterministic_for_a_seed():
    a = dare_ties(BASE, DELTAS, ONES, torch.tensor([0.5, 0.5]), generator=torch.Generator().manual_seed(7))
    b = dare_ties(BASE, DELTAS, ONES, torch.tensor([0.5, 0.5]), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
