"""secateurs.testing: hypothesis strategies for every problem kind and solver conformance kits.

Run your own solver through ``check_solver`` (reconstruction), ``check_allocation_solver`` or
``check_projection_solver`` on problems drawn from ``reconstruction_problems()``,
``allocations()`` or ``projections()``.
"""

from secateurs.testing.allocation import allocations, brute_force_allocation, check_allocation_solver
from secateurs.testing.projection import check_projection_solver, projections
from secateurs.testing.reconstruction import (
    canonical_problems,
    check_solver,
    diagonal_reconstruction,
    random_reconstruction,
    reconstruction_problems,
)

check_reconstruction_solver = check_solver

__all__ = [
    "allocations",
    "brute_force_allocation",
    "canonical_problems",
    "check_allocation_solver",
    "check_projection_solver",
    "check_reconstruction_solver",
    "check_solver",
    "diagonal_reconstruction",
    "projections",
    "random_reconstruction",
    "reconstruction_problems",
]
