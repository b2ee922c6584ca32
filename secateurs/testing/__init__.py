"""secateurs.testing."""
