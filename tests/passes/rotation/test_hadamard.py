"""The Hadamard constructions are Hadamard, the factorization is the issue's, rotations are
orthogonal and reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.passes.rotation.hadamard import (
    BASE_ORDERS,
    HadamardOrder,
    base_hadamard,
    hadamard_order,
    hadamard_rotation,
    jacobsthal,
    random_rotation,
    sylvester,
)

ORTHOGONAL_ATOL = 1e-12
"""float64 ``Q Q^T`` of a product of n ~ 1000 terms of size 1/n: within a few n u = 1e-13."""


@pytest.mark.parametrize("m", sorted(BASE_ORDERS))
def test_every_base_order_is_a_hadamard_matrix(m):
    h = base_hadamard(m)
    assert h.shape == (m, m)
    assert set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


def test_the_issue_lists_the_orders():
    assert sorted(BASE_ORDERS) == [1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172]


@pytest.mark.parametrize(
    ("n", "order"),
    [
        (576, HadamardOrder(36, 4)),
        (1536, HadamardOrder(12, 7)),
        (384, HadamardOrder(12, 5)),
        (256, HadamardOrder(1, 8)),
        (172 * 4, HadamardOrder(172, 2)),
        (704, None),
        (9, None),
    ],
)
def test_sizes_factor_as_m_times_a_power_of_two(n, order):
    assert hadamard_order(n) == order


def test_the_kronecker_product_is_hadamard():
    order = HadamardOrder(36, 4)
    h = order.matrix()
    assert np.array_equal(h @ h.T, order.n * np.eye(order.n, dtype=np.int64))
    assert np.array_equal(sylvester(3), sylvester(3).T)


def test_paley_needs_a_prime_power():
    with pytest.raises(ValueError, match="not a prime power"):
        jacobsthal(15)


@pytest.mark.parametrize(
    ("n", "kind"),
    [
        (576, "randomized hadamard 36 x 2^4"),
        (64, "randomized hadamard 1 x 2^6"),
        (704, "random orthogonal"),
    ],
)
def test_random_rotations_are_orthogonal_and_seeded(n, kind):
    first = random_rotation(n, np.random.default_rng(7))
    again = random_rotation(n, np.random.default_rng(7))
    other = random_rotation(n, np.random.default_rng(8))
    np.testing.assert_allclose(first.matrix @ first.matrix.T, np.eye(n), atol=ORTHOGONAL_ATOL)
    assert np.array_equal(first.matrix, again.matrix)
    assert not np.array_equal(first.matrix, other.matrix)
    assert first.kind == kind


def test_a_randomized_hadamard_is_signs_times_hadamard():
    rotation = random_rotation(576, np.random.default_rng(0))
    plain = hadamard_rotation(HadamardOrder(36, 4)).matrix
    signs = rotation.matrix[:, 0] / plain[:, 0]
    assert set(np.unique(np.round(signs, 12))) == {-1.0, 1.0}
    np.testing.assert_allclose(rotation.matrix, signs[:, None] * plain, atol=0)
    assert rotation.kind == "randomized hadamard 36 x 2^4" and rotation.order.n == 576
