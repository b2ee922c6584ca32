"""secateurs.problems."""
