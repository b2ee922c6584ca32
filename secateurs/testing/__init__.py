"""secateurs.testing."""

from secateurs.testing.allocation import (  # noqa: E402,F401
    allocations,
    brute_force_allocation,
    check_allocation_solver,
)
from secateurs.testing.reconstruction import (  # noqa: E402,F401
    canonical_problems,
    check_solver,
    diagonal_reconstruction,
    random_reconstruction,
    reconstruction_problems,
)
from secateurs.testing.reconstruction import check_solver as check_reconstruction_solver  # noqa: E402,F401
