"""secateurs.testing."""

from secateurs.testing.allocation import (  # noqa: E402,F401
    allocations,
    brute_force_allocation,
    check_allocation_solver,
)
