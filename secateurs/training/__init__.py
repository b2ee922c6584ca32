"""Training-aware pruning: PDP soft masks, complexity-aware gates, component-aware soft coefficients.

Each method wraps a model: add ``penalty()`` to the loss, call ``step()`` after the optimiser
step, and ``finalize()`` at the end.
"""

from secateurs.training.complexity import ComplexityAware
from secateurs.training.fit import fit
from secateurs.training.pdp import PDP, DensitySchedule
from secateurs.training.pdp_channels import ChannelPDP
from secateurs.training.soft import SoftCoefficients

__all__ = ["PDP", "ChannelPDP", "ComplexityAware", "DensitySchedule", "SoftCoefficients", "fit"]
