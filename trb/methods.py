"""One object per run that answers, for optimiser step k, what the method does (docs/method.md section 5):
which sampler draws the rollouts, which target the loss matches (Veto's B), whether the step is a
supervised step on teacher samples (sft_warmup). Built once from the method, blend and rollout
configs; the training loop and `trb rollout` only ask it."""

from __future__ import annotations

from trb.rollout import Sampler
from trb.schedules import Schedule


class Method:
    """The method of a run, step by step.

    eps(k): the trust-region budget (the blend schedule; 0 for student-only methods);
    sampler(k): the behaviour policy of step k's rollouts; veto_b(k): Veto's exponent B (0: the
    plain teacher target); sft(k): step k is an SFT update (sft_warmup's first sft_updates steps)."""

    def __init__(self, method, blend, temperature: float = 1.0, draft_k: int = 0):
        self.name = method.name
        self.cfg = method
        self.temperature = temperature  # the rollout temperature (paper: 1.0)
        self.draft_k = draft_k
        self._eps = blend.schedule()
        self._veto = Schedule("linear", method.veto_b_start, method.veto_horizon) if self.name == "veto" else None
        self._tau = Schedule("linear", 1.0 - method.temp_start, method.temp_horizon) \
            if self.name == "temp_warmup" else None

    def eps(self, step: int) -> float:
        return self._eps(step)

    def sampler(self, step: int) -> Sampler:
        m = self.cfg
        if self.name == "skd":
            return Sampler("skd", skd_top_k=m.skd_top_k, skd_temperature=m.skd_temperature)
        if self.name in ("trb", "fixed"):
            return Sampler("trb", eps=self.eps(step), temperature=self.temperature, draft_k=self.draft_k)
        warm = 1.0 - self._tau(step) if self._tau is not None else 1.0  # temp_warmup: tau_0 -> 1 linearly
        return Sampler("student", temperature=self.temperature * warm)

    def veto_b(self, step: int) -> float:
        return self._veto(step) if self._veto is not None else 0.0

    def sft(self, step: int) -> bool:
        return self.name == "sft_warmup" and step < self.cfg.sft_updates
