"""Orthogonal matrices for rotation: Hadamard of order ``m * 2^k``, randomized; random otherwise.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``, so ``H / sqrt(n)``
is orthogonal, and it spreads every coordinate evenly over all ``n`` (QuaRot, arXiv
2404.00456). A Kronecker product of Hadamard matrices is Hadamard, so ``H_n = H_m (x) H_{2^k}``
with ``H_{2^k}`` from Sylvester's doubling ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` and ``H_m`` one
of ``BASE_ORDERS``, built by:

- Paley I, ``q = 3 (mod 4)`` a prime power, order ``q + 1``: ``H = I + [[0, 1^T], [-1, Q]]``
  with Jacobsthal's ``Q_ab = chi(a - b)``, ``chi`` the quadratic character of GF(q);
- Paley II, ``q = 1 (mod 4)``, order ``2 (q + 1)``: ``C = [[0, 1^T], [1, Q]]`` (a symmetric
  conference matrix) and ``H = C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]``;
- Williamson, order ``4t``: four symmetric circulant +-1 matrices ``A, B, C, D`` of order ``t``
  with ``A^2 + B^2 + C^2 + D^2 = 4t I`` in the block array below, from their first rows (orders
  156 and 172, where neither Paley construction exists; rows from M. Hall, *Combinatorial
  Theory*, and Lonz 2013, as tabled in SageMath's ``hadamard_matrix.py``).

Any Hadamard matrix of the right order gives an exact rotation; these differ from QuaRot's
tables, so results match QuaRot's in kind, not bit for bit. The randomized Hadamard rotation
(QuIP#, QuaRot) is ``diag(s) H_n / sqrt(n)``, ``s`` uniform in ``{-1, +1}^n``; for an order
with no ``m`` here, a random orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's
diagonal so that it is Haar-distributed) takes its place.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

WILLIAMSON_ROWS = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}
"""First rows of Williamson's four circulants, by ``t`` (order ``4t``)."""


def sylvester(k: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``2^k`` (symmetric)."""
    h = np.ones((1, 1), dtype=np.int64)
    for _ in range(k):
        h = np.block([[h, h], [h, -h]])
    return h


def _prime_power(q: int) -> tuple[int, int]:
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e = round(np.log(q) / np.log(p))
    if p**e != q:
        raise ValueError(f"{q} is not a prime power")
    return p, e


def _irreducible(p: int, e: int) -> tuple[int, ...]:
    """The first monic polynomial of degree ``e <= 3`` over GF(p) with no root (so irreducible);
    coefficients from the constant term up, the leading 1 left out."""
    for code in range(p**e):
        low = tuple(code // p**i % p for i in range(e))
        if low[0] and all((sum(c * x**i for i, c in enumerate(low)) + x**e) % p for x in range(p)):
            return low
    raise ValueError(f"no irreducible polynomial of degree {e} over GF({p})")


def jacobsthal(q: int) -> np.ndarray:
    """``Q_ab = chi(a - b)`` over GF(q), elements as coefficient vectors (``q = p^e``, e <= 3)."""
    p, e = _prime_power(q)
    if e > 3:
        raise ValueError(f"GF({q}) needs a polynomial of degree {e} > 3")
    elements = [tuple(code // p**i % p for i in range(e)) for code in range(q)]
    reduction = _irreducible(p, e) if e > 1 else ()

    def multiply(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        product = [0] * (2 * e - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                product[i + j] = (product[i + j] + x * y) % p
        for top in range(2 * e - 2, e - 1, -1):
            for i, c in enumerate(reduction):
                product[top - e + i] = (product[top - e + i] - product[top] * c) % p
        return tuple(product[:e])

    code = {element: i for i, element in enumerate(elements)}
    squares = {code[multiply(a, a)] for a in elements[1:]}
    difference = np.array(
        [
            [code[tuple((x - y) % p for x, y in zip(a, b, strict=False))] for b in elements]
            for a in elements
        ]
    )
    return np.where(difference == 0, 0, np.where(np.isin(difference, list(squares)), 1, -1))


def paley1(q: int) -> np.ndarray:
    """Paley's first construction, order ``q + 1`` (``q = 3 mod 4``)."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    """Paley's second construction, order ``2 (q + 1)`` (``q = 1 mod 4``)."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
    identity = np.eye(q + 1, dtype=np.int64)
    return np.kron(c, [[1, -1], [-1, -1]]) + np.kron(identity, [[1, 1], [1, -1]])


def williamson(t: int) -> np.ndarray:
    """Williamson's construction of order ``4t`` from ``WILLIAMSON_ROWS[t]``."""
    a, b, c, d = (
        np.array([np.roll([1 if s == "+" else -1 for s in row], i) for i in range(t)])
        for row in WILLIAMSON_ROWS[t]
    )
    return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


BASE_ORDERS = {
    1: lambda: np.ones((1, 1), dtype=np.int64),
    12: lambda: paley1(11),
    20: lambda: paley1(19),
    28: lambda: paley2(13),
    36: lambda: paley2(17),
    40: lambda: np.kron(sylvester(1), paley1(19)),
    52: lambda: paley2(25),
    60: lambda: paley1(59),
    108: lambda: paley1(107),
    140: lambda: paley1(139),
    156: lambda: williamson(39),
    172: lambda: williamson(43),
}
"""The orders ``m`` of ``H_m`` (those QuaRot tables), and how each is built."""


@functools.cache
def base_hadamard(m: int) -> np.ndarray:
    """``H_m`` for ``m`` in ``BASE_ORDERS`` (read-only)."""
    matrix = BASE_ORDERS[m]()
    matrix.setflags(write=False)
    return matrix


@dataclasses.dataclass(frozen=True)
class HadamardOrder:
    """``n = m * 2^k``: the order of ``H_m (x) H_{2^k}``."""

    m: int
    k: int

    @property
    def n(self) -> int:
        return self.m << self.k

    def matrix(self) -> np.ndarray:
        """``H_m (x) H_{2^k}``, entries +-1."""
        return np.kron(base_hadamard(self.m), sylvester(self.k))


def hadamard_order(n: int) -> HadamardOrder | None:
    """The factorization ``n = m * 2^k`` with the largest ``m`` of ``BASE_ORDERS``, or None."""
    for m in sorted(BASE_ORDERS, reverse=True):
        k = (n // m).bit_length() - 1
        if n % m == 0 and n // m == 1 << k:
            return HadamardOrder(m, k)
    return None


@dataclasses.dataclass(frozen=True)
class Rotation:
    """An orthogonal ``n x n`` matrix (float64) and how it was made."""

    matrix: np.ndarray
    kind: str
    """``"hadamard m x 2^k"`` or ``"random orthogonal"``."""
    order: HadamardOrder | None = None
    """For a Hadamard rotation: ``m`` and ``k`` (an online transform factors through them)."""
    randomized: bool = False
    """Whether random signs ``diag(s)`` precede the Hadamard matrix."""

    @property
    def n(self) -> int:
        return self.matrix.shape[0]


def hadamard_rotation(order: HadamardOrder) -> Rotation:
    """``H_n / sqrt(n)``, not randomized (an online transform's own structure)."""
    matrix = order.matrix() / np.sqrt(order.n)
    return Rotation(matrix, f"hadamard {order.m} x 2^{order.k}", order)


def random_rotation(n: int, rng: np.random.Generator) -> Rotation:
    """``diag(s) H_n / sqrt(n)`` where ``n = m * 2^k`` allows, a random orthogonal matrix else."""
    order = hadamard_order(n)
    if order is None:
        gaussian = rng.standard_normal((n, n))
        q, r = np.linalg.qr(gaussian)
        return Rotation(q * np.sign(np.diag(r)), "random orthogonal")
    signs = rng.choice([-1.0, 1.0], size=n)
    matrix = signs[:, None] * order.matrix() / np.sqrt(n)
    return Rotation(matrix, f"randomized hadamard {order.m} x 2^{order.k}", order, True)
