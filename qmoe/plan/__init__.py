"""``qmoe plan``: will a recipe fit a GPU? Peak training memory from the model's config alone (built on the
meta device; no weight is read), part by part, with the activations measured from a meta-tensor forward.

- :mod:`qmoe.plan.shapes`: the meta model, the bytes of frozen weights, adapter and optimizer;
- :mod:`qmoe.plan.activations`: what autograd keeps for backward, per checkpointing mode;
- :mod:`qmoe.plan.report`: the parts, the transient peak and allowances, verdicts, table and JSON.
"""

from .report import DEFAULT_VRAM, GIB, Plan, Planner, plan_recipe, render

__all__ = ["DEFAULT_VRAM", "GIB", "Plan", "Planner", "plan_recipe", "render"]
