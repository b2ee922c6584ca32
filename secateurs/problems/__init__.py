"""secateurs.problems."""

from secateurs.problems.projection import Projection  # noqa: E402
