"""Pure linear algebra behind the rewrites: pivot selection, basis-decomposition (BD)
factors of attention projections, pivoting-factorization (PIFA) factors of low-rank
chains, and their error bounds. No graph code lives here."""
from .bd import (
    BdFactors,
    bd_factors,
    bd_factors_with_rows,
    reference_rows,
)
from .pifa import PifaFactors, pifa_factors, pifa_reference
from .pivots import (
    FactorizationError,
    cond2,
    is_rank_deficient,
    pivot_columns,
    pivoted_qr,
    unit_roundoff,
)
from .shared_row_search import expected_growth, first_order_factors, grouped_rows, max_cond, shared_rows

__all__ = [
    "BdFactors",
    "FactorizationError",
    "PifaFactors",
    "bd_factors",
    "bd_factors_with_rows",
    "cond2",
    "is_rank_deficient",
    "pifa_factors",
    "pifa_reference",
    "pivot_columns",
    "pivoted_qr",
    "reference_rows",
    "unit_roundoff",
    "expected_growth",
    "first_order_factors",
    "grouped_rows",
    "max_cond",
    "shared_rows",
]
