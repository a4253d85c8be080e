"""Pure compiler passes from DagIR to Plan (no processes, shm or sockets): DESIGN 3."""

from .fusion import fuse_chains
from .lowering import lower
from .placement import place, plan_channels
from .plan import (DRIVER, ChannelKind, ChannelSpec, Plan, PlanOptions, ProcessPlan, Step,
                   StepKind, TaskSpec)
from .scheduling import schedule
from .validation import check_options, validate

__all__ = ["DRIVER", "ChannelKind", "ChannelSpec", "Plan", "PlanOptions", "ProcessPlan", "Step",
           "StepKind", "TaskSpec", "check_options", "fuse_chains", "lower", "place",
           "plan_channels", "schedule", "validate"]
