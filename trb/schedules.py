"""Values over optimiser steps: the trust-region budget eps_k, Veto's B, temperature warmup.

Shapes (k = optimiser step, K = horizon, all values 0 from k >= K on except `constant`):

    constant  start
    linear    start * (1 - k / K)                       (the paper's eps schedule)
    cosine    start * (1 + cos(pi * k / K)) / 2
    step      start * gamma ** (number of milestones <= k)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

SHAPES = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    """A scalar as a function of the optimiser step.

    Raises ValueError naming the parameter when `start` < 0, `horizon` < 0, `gamma` < 0, the
    shape is unknown, or milestones are not strictly increasing non-negative steps.
    """

    shape: str = "linear"
    start: float = 0.0
    horizon: int = 0
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"schedule shape must be one of {', '.join(SHAPES)}; got {self.shape!r}")
        if not math.isfinite(self.start) or self.start < 0:
            raise ValueError(f"schedule start must be a finite value >= 0; got {self.start}")
        if self.horizon < 0:
            raise ValueError(f"schedule horizon K must be >= 0; got {self.horizon}")
        if self.gamma < 0:
            raise ValueError(f"schedule gamma must be >= 0; got {self.gamma}")
        ms = tuple(int(m) for m in self.milestones)
        if any(m < 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"schedule milestones must be strictly increasing steps >= 0; got {list(ms)}")
        object.__setattr__(self, "milestones", ms)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        if self.shape == "constant":
            return float(self.start)
        if step >= self.horizon:
            return 0.0
        frac = step / self.horizon
        if self.shape == "linear":
            return self.start * (1.0 - frac)
        if self.shape == "cosine":
            return self.start * 0.5 * (1.0 + math.cos(math.pi * frac))
        # step
        return self.start * self.gamma ** bisect.bisect_right(self.milestones, step)
