"""Adaptive entropy control: a coefficient adjusted after every optimizer step to hold the policy's entropy at a
target, as a knob of every loss (``loss.entropy_control={target: 0.3}``). ``target: null`` holds the entropy of the
run's first update (the model's own, set once and kept in the state): no target to tune per model.

Two controllers, by ``method``:

- ``entropic`` (default): EntroPIC (Yang et al. 2025, arXiv 2511.15248; official code yk7333/EntroPIC,
  ``dp_actor.py::EntroPICDataParallelPPOActor.update_policy`` and ``core_algos.py::compute_policy_loss_entropic``).
  A PI controller on the entropy error sets alpha, which weighs an extra term on the high-probability tokens
  (pi(y_t) > 0.95) of every response, positive and negative alike:

      e_n      = H_n - target                                   (H_n: mean token entropy measured at update n)
      alpha    = clip(kp * e_n + ki * sum_{j<n} e_j, -max_alpha, max_alpha)
      term_t   = alpha * (-r_t * |A|) * 1[pi(y_t) > high_prob],   r_t = exp(clamp(log pi - log pi_old, -20, 20))

  Entropy above the target (alpha > 0) pushes those tokens' probability up, which lowers the entropy; below it
  (alpha < 0) pushes them down, which raises it. Defaults are the official ``config/entropic.yaml``: kp = 1,
  ki = 0.01, |alpha| <= 1, threshold 0.95.
- ``adaptive_coef``: the entropy-bonus coefficient of Skywork-OR1 (arXiv 2505.22312) as TRL's
  ``GRPOConfig(use_adaptive_entropy=True)`` (``trl/trainer/grpo_trainer.py::_compute_loss``): after each update the
  coefficient c moves by ``delta`` towards more bonus when H <= target and less otherwise, within [min_coef,
  max_coef]; the bonus -c * aggregate(H) applies only while the last measured H <= target. Defaults are TRL's:
  c0 = 0, delta = 0.005, [0, 1].

How this differs from the official code, deliberately:

- Measured once per optimizer step, over every token the loss is over in that mini-batch, on every rank: the token
  sums are all-reduced (as :func:`simko.diagnostics.concentration_over_ranks`), so the coefficient is the same on all
  ranks and does not depend on how a mini-batch is split into micro-batches. The official EntroPIC measures each
  micro-batch on each rank by itself (its alpha differs between ranks) and adds the micro-batch's share of the
  error to the integral; TRL measures as here.
- The coefficient of an update comes from the measurements of the updates before it (as TRL), so the first update
  of a run has alpha = 0 (c = c0, no bonus); the official EntroPIC's proportional term uses the micro-batch's own
  entropy, measured in the same forward as its loss. The integral has the same terms, one step later.
- The EntroPIC term is added to each high-probability token's loss and aggregated with the policy term over all the
  loss's tokens (so micro-batching stays exact); the official code takes its own mean over the high-probability
  tokens of the micro-batch, which is larger by the inverse share of those tokens (a constant factor of the gains
  that the integral absorbs). The Skywork bonus is aggregated like the loss (TRL: always a token mean).

The controller's state (coefficient, integral, last measurement) is in :meth:`state_dict`, which the training module
writes into every checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

from simko.losses.stats import TokenStats

LOG_RATIO_CLAMP = 20.0  # the official EntroPIC loss clamps log r to [-20, 20] before the exp
METHODS = ("entropic", "adaptive_coef")

# all-reduce (sum) of a float64 tensor over the ranks; None: one process
SumOverRanks = Callable[[Tensor], Tensor]


class EntropyController:
    """The measurement both controllers share: token sums of the entropy seen by the loss since the last update."""

    method = "base"

    def __init__(self, target: float | None):
        if target is not None and not target >= 0:
            raise ValueError(f"entropy_control target must be an entropy >= 0 (nats) or null, got {target}")
        self.target = None if target is None else float(target)  # None: set by the first measurement
        self._fixed_target = target is not None
        self.coef = 0.0  # the coefficient the loss applies now
        self.measured: float | None = None  # the last measured entropy (over all ranks)
        self._sums: Tensor | None = None  # [sum of H, number of tokens] since the last update, on the loss's device

    def observe(self, entropy: Tensor, mask: Tensor) -> None:
        """Add the entropies of the valid tokens of one micro-batch (detached; float64 sums, kept on their device)."""
        mask = mask.bool()
        entropy = torch.where(mask, entropy.detach().double(), 0.0)  # no boolean indexing: no device sync
        total = torch.stack([entropy.sum(), mask.sum().double()])
        self._sums = total if self._sums is None else self._sums + total

    def update(self, sum_over_ranks: SumOverRanks | None = None) -> None:
        """After an optimizer step: the mean entropy of the tokens observed since the last one, over all ranks, sets
        the coefficient of the next update. Nothing observed anywhere (no token): the state stays as it was.

        ``sum_over_ranks`` all-reduces a float64 tensor (a sum; the training module's goes through the Lightning
        strategy): every rank must call :meth:`update` at every optimizer step, as every rank steps."""
        sums = torch.zeros(2, dtype=torch.float64) if self._sums is None else self._sums
        self._sums = None
        if sum_over_ranks is not None:
            sums = sum_over_ranks(sums)
        sums = sums.double().cpu()
        if sums[1] > 0:
            self.measured = float(sums[0] / sums[1])
            if self.target is None:  # target: null holds the first measurement
                self.target = self.measured
            self._step(self.measured)

    def _step(self, entropy: float) -> None:
        raise NotImplementedError

    def token_term(self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor) -> Tensor | None:
        """A ``[B, T]`` term added to the per-token loss (None: none)."""
        return None

    def bonus_coef(self) -> float:
        """The coefficient of an entropy bonus -c * aggregate(H) to add (0: none)."""
        return 0.0

    def metrics(self) -> dict[str, float]:
        """The state after the last update: the entropy it measured (over all ranks) and the target. (The coefficient
        an update applies is in the loss's metrics, ``entropy_control/coef``.)"""
        out = {} if self.target is None else {"entropy_control/target": self.target}
        if self.measured is not None:
            out["entropy_control/entropy"] = self.measured
        return out

    def state_dict(self) -> dict:
        return {"method": self.method, "coef": self.coef, "measured": self.measured, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise ValueError(
                f"the checkpoint's entropy controller is {state.get('method')!r}, this run's loss has {self.method!r} "
                "(loss.entropy_control.method): resume with the same controller"
            )
        self.coef = float(state["coef"])
        self.measured = None if state["measured"] is None else float(state["measured"])
        if not self._fixed_target:  # target: null: the one the run measured at its start (a number: the config's)
            self.target = None if state.get("target") is None else float(state["target"])
        self._sums = None


class EntroPIC(EntropyController):
    """EntroPIC's PI controller (see the module docstring); ``coef`` is alpha."""

    method = "entropic"

    def __init__(
        self,
        target: float | None,
        kp: float = 1.0,
        ki: float = 0.01,
        max_alpha: float = 1.0,
        high_prob: float = 0.95,
    ):
        super().__init__(target)
        if kp < 0 or ki < 0:
            raise ValueError(f"entropy_control kp and ki must be >= 0, got kp={kp}, ki={ki}")
        if not max_alpha > 0:
            raise ValueError(f"entropy_control max_alpha must be > 0, got {max_alpha}")
        if not 0 < high_prob < 1:
            raise ValueError(f"entropy_control high_prob must be in (0, 1), got {high_prob}")
        self.kp, self.ki, self.max_alpha = float(kp), float(ki), float(max_alpha)
        self.log_high_prob = math.log(high_prob)
        self.integral = 0.0  # sum of the errors of the updates before the last one

    def _step(self, entropy: float) -> None:
        error = entropy - self.target
        alpha = self.kp * error + self.ki * self.integral
        self.coef = min(max(alpha, -self.max_alpha), self.max_alpha)
        self.integral += error

    def token_term(self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor) -> Tensor | None:
        if self.coef == 0.0:
            return None
        log_ratio = (stats.logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        high = stats.logprobs.detach() > self.log_high_prob
        return torch.where(high, -self.coef * torch.exp(log_ratio) * adv_tok.abs(), torch.zeros_like(log_ratio))

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "entropy_control/integral": self.integral}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "integral": self.integral}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.integral = float(state["integral"])


class AdaptiveEntropyCoef(EntropyController):
    """Skywork-OR1's / TRL's adaptive entropy-bonus coefficient (see the module docstring); ``coef`` is c."""

    method = "adaptive_coef"

    def __init__(
        self,
        target: float | None,
        init_coef: float = 0.0,
        delta: float = 0.005,
        min_coef: float = 0.0,
        max_coef: float = 1.0,
    ):
        super().__init__(target)
        if not 0 <= min_coef <= init_coef <= max_coef:
            raise ValueError(
                f"entropy_control needs 0 <= min_coef <= init_coef <= max_coef, got {min_coef}, {init_coef}, {max_coef}"
            )
        if not delta > 0:
            raise ValueError(f"entropy_control delta must be > 0, got {delta}")
        self.delta, self.min_coef, self.max_coef = float(delta), float(min_coef), float(max_coef)
        self.coef = float(init_coef)

    def _step(self, entropy: float) -> None:
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.max_coef)
        else:
            self.coef = max(self.coef - self.delta, self.min_coef)

    def bonus_coef(self) -> float:
        # the bonus acts only while the entropy is at or below the target (nothing measured yet: no bonus, as TRL)
        measured = self.measured
        return self.coef if measured is not None and self.target is not None and measured <= self.target else 0.0


CONTROLLERS: dict[str, type[EntropyController]] = {"entropic": EntroPIC, "adaptive_coef": AdaptiveEntropyCoef}


def build_entropy_control(knobs: dict | None) -> EntropyController | None:
    """The controller of ``loss.entropy_control`` (a mapping with ``target`` and the method's knobs; None: off)."""
    if knobs is None:
        return None
    knobs = dict(knobs)  # Hydra: a DictConfig
    method = knobs.pop("method", "entropic")
    if method not in CONTROLLERS:
        raise ValueError(f"unknown entropy_control method {method!r}; choose one of {', '.join(METHODS)}")
    cls = CONTROLLERS[method]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown or "target" not in knobs:
        what = f"has no knob {unknown}" if unknown else "needs a target entropy (target: nats, or null: the first)"
        raise TypeError(f"entropy_control method {method!r} {what}; its knobs: method, {', '.join(allowed)}")
    return cls(**knobs)
