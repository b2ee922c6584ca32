"""secateurs.models."""
