"""secateurs.training."""
