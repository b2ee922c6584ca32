"""Training-aware pruning: PDP soft masks, complexity-aware gates, component-aware soft coefficients.

Each method wraps a copy of the model (``method.model``; build the optimiser on its parameters):
add ``penalty()`` to the loss, call ``step()`` after the optimiser step, and ``finalize()`` at the
end for a ``PrunePlan``. Training moves every weight, so apply the plan to the trained copy:
``secateurs.apply(method.model, plan)`` (``mode="mask"`` for PDP's weight sparsity). Every
budget given is met exactly by ``finalize``: PDP's densities and N:M patterns by construction,
FLOPs/params budgets of the structured methods through an exact ``Allocation`` over per-group
keep counts under the graph's polynomials. Calling ``finalize`` before any ``step`` is a ``ValidationError``.

``ComplexityAware`` also slices units whose gates died out of ``method.model`` while it trains
(training gets cheaper): the parameters stay the same objects, so the optimiser needs no change
(its per-parameter state is cut by a ``torch.optim`` step pre-hook before its next step); a dead
layer gate (a residual branch, found by ``ComplexityAware.from_graph`` / ``residual_branches``)
removes the branch, and its plan lists the emptied groups in ``allow_empty``. ``finalize`` widens
the model back to its original shapes first, so the protocol above is unchanged. Build a new
optimiser for the pruned model.
"""

from secateurs.training.complexity import ComplexityAware
from secateurs.training.fit import fit
from secateurs.training.layers import residual_branches
from secateurs.training.pdp import PDP, DensitySchedule
from secateurs.training.pdp_channels import ChannelPDP
from secateurs.training.soft import SoftCoefficients

__all__ = ["PDP", "ChannelPDP", "ComplexityAware", "DensitySchedule", "SoftCoefficients", "fit", "residual_branches"]
