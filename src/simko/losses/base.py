"""The PPO-clip policy loss that every loss in this package shares, and the loss registry.

The base loss has the knobs every loss shares: the clip range (and verl's dual clip), the aggregation, which
responses the loss is over (``subset``), a KL term to a frozen reference, the advantage estimator (``advantage``:
GRPO's group normalisation, PSR/NSR/W-REINFORCE's fixed signs, pass@k, ...; :mod:`simko.advantages`) and an
entropy bonus (``entropy_coef``). Losses that are only settings of these knobs are YAML presets
(``configs/loss/dapo.yaml``, ``nsr.yaml``, ...). ``entropy_control`` adds an adaptive entropy controller to any loss
(:mod:`simko.losses.entropy_control`). A loss that changes the objective is a small registered class
with four hooks a subclass may override:

- :meth:`PolicyLoss.surrogate` returns the per-token ratio and advantage that enter the objective (GRPO: the
  plain ratio r and the broadcast advantage; SimKO: its smoothed ratio and lambda-scaled advantage; GSPO: the
  sequence-level ratio).
- :meth:`PolicyLoss.objective` turns them into the per-token loss (the base: PPO-clip, with the dual clip when
  ``dual_clip_c`` is set; CISPO: the clipped, detached IS weight times the log-prob's gradient).
- :meth:`PolicyLoss.token_penalty` returns a ``[B, T]`` term added to the per-token loss before aggregation
  (KL-Cov's |log r| penalty on its selected tokens uses it).
- :meth:`PolicyLoss.extra_loss` returns an additional scalar term (the base's: the entropy bonus; an override
  adds ``super().extra_loss(...)`` to keep it).

Everything else (clipping, the response subset, KL to a reference, aggregation, metrics) lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from simko.advantages import build_advantage
from simko.losses.aggregation import aggregate, aggregation_weight, check_aggregation, masked_mean
from simko.losses.entropy_control import SumOverRanks, build_entropy_control
from simko.losses.stats import TokenStats
from simko.registry import class_registrar

LOSSES: dict[str, type[PolicyLoss]] = {}


register_loss = class_registrar(LOSSES, "loss")  # @register_loss("name") on a PolicyLoss subclass


def build_loss(name: str, **kwargs) -> PolicyLoss:
    """Build a registered loss by name with the same keyword arguments as its ``configs/loss/<name>.yaml``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


KL_ESTIMATORS = ("k1", "k2", "k3")
SUBSETS = ("all", "nonzero_advantage")
K3_LOG_RATIO_CLAMP = 20.0  # verl's low_var_kl: |log r| clamped to 20 nats before the exp
K3_CLAMP = 10.0  # ... and the estimate to [-10, 10] (the SimKO and RLVR-Decomposed forks clamp only this)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL divergence").

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r with log r = log pi - log pi_ref.
    k3 (the "low-var" estimator of GRPO) is unbiased and always >= 0. As verl's ``low_var_kl`` (and the
    SimKO/RLVR-Decomposed forks), k3 is clamped: log r to [-20, 20], then the estimate to [-10, 10]; a token
    beyond the clamps gets no KL gradient. Unclamped, a token with log r = -28 (pi far below pi_ref) would
    contribute e^28 - 29 ~ 1.4e12, and beyond -88 nats the exp overflows float32 (inf, and a NaN gradient). The
    forks' estimate clamp alone gives the same values and gradients wherever their exp is finite. k1 and k2 are
    not clamped (nor are they in verl).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return (torch.exp(-log_ratio) - 1.0 + log_ratio).clamp(-K3_CLAMP, K3_CLAMP)
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


class PolicyLoss:
    """PPO-clip policy loss with GRPO group advantages (the base every registered loss derives from).

    loss = aggregate( max(-A~ * ratio~, -A~ * clip(ratio~, 1 - eps, 1 + eps_high)) + penalty_t + beta * KL_t ) + extra
    extra = -entropy_coef * aggregate(H) (the entropy bonus, H differentiable) unless a subclass adds more
    dual clip (``dual_clip_c`` = c): on tokens with A~ < 0 the per-token PPO term is capped at -A~ * c

    Args:
        clip_eps: PPO clip epsilon (low side, and high side unless ``clip_eps_high`` is set).
        clip_eps_high: DAPO's clip-higher upper epsilon; ``None`` means symmetric.
        aggregation: ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum_norm`` (Dr.GRPO).
        norm_len: the constant L of ``seq_mean_token_sum_norm`` (required there: the padded length of a
            micro-batch changes from one to the next).
        kl_coef: beta of the KL term to the frozen reference; 0 (default) loads no reference model.
        kl_estimator: ``k1`` | ``k2`` | ``k3`` (clamped as verl's, see :func:`kl_penalty`).
        advantage: name of the advantage estimator (see :mod:`simko.advantages`): ``grpo`` | ``psr`` | ``nsr`` |
            ``w_reinforce`` | ``passk`` | ``maxrl``.
        advantage_kwargs: keyword arguments of the estimator (e.g. ``{norm_std: false}`` for Dr.GRPO, ``{k: 4}``
            for ``passk``); checked against its signature here.
        entropy_coef: beta_H of the entropy bonus ``-beta_H * aggregate(H)``, H differentiable (0: off).
        dual_clip_c: dual-clip PPO's c > 1 (Ye et al. 2020, arXiv 1912.09729; verl's ``clip_ratio_c``, 3 there
            and on by default): caps the loss of a negative-advantage token at -A * c, so a token whose ratio grew
            past c gets no gradient. ``None`` (default): off, as in the SimKO, RLVR-Decomposed and Clip-Cov/KL-Cov
            code.
        subset: which responses the loss is over. ``all`` (default): every response of the batch; one with A = 0
            adds nothing to the sum but counts in the denominator. ``nonzero_advantage``: only responses with
            A != 0, as if the others were not in the batch (denominator, KL, entropy bonus and covariances
            included): RLVR-Decomposed's PSR/NSR, which subset the batch to the correct/incorrect responses.
        entropy_control: adaptive entropy control towards a target entropy, a mapping ``{target: ..., method:
            entropic | adaptive_coef, ...}`` (:mod:`simko.losses.entropy_control`: EntroPIC's PI controller, or
            Skywork-OR1's/TRL's adaptive bonus coefficient); None (default): off. Its state is updated by
            :meth:`end_optimizer_step` and saved through :meth:`state_dict`.

    ``top_k`` (class or instance attribute): how many top-K candidates the loss needs in :class:`TokenStats`.
    """

    name = "base"
    top_k = 0

    def __init__(
        self,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        aggregation: str = "token_mean",
        norm_len: int | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        advantage: str = "grpo",
        advantage_kwargs: dict | None = None,
        entropy_coef: float = 0.0,
        dual_clip_c: float | None = None,
        subset: str = "all",
        entropy_control: dict | None = None,
    ):
        if not clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
        if clip_eps_high is not None and not clip_eps_high > 0:
            raise ValueError(f"clip_eps_high must be > 0 or None, got {clip_eps_high}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0 (a bonus), got {entropy_coef}")
        if dual_clip_c is not None and not dual_clip_c > 1:
            raise ValueError(f"dual_clip_c must be > 1 (or null: off), got {dual_clip_c}")
        if subset not in SUBSETS:
            raise ValueError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
        self.aggregation = check_aggregation(aggregation)
        if norm_len is not None and (int(norm_len) != norm_len or norm_len < 1):
            raise ValueError(f"norm_len must be an integer >= 1 (or null), got {norm_len}")
        if self.aggregation == "seq_mean_token_sum_norm" and norm_len is None:
            raise ValueError(
                "aggregation seq_mean_token_sum_norm (Dr.GRPO) divides by a constant length: set norm_len (the "
                "dr_grpo preset uses ${rollout.max_new_tokens}); the padded length of each micro-batch is not one"
            )
        self.clip_low = float(clip_eps)
        self.clip_high = float(clip_eps if clip_eps_high is None else clip_eps_high)
        self.norm_len = None if norm_len is None else int(norm_len)
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.entropy_coef = float(entropy_coef)
        self.dual_clip_c = None if dual_clip_c is None else float(dual_clip_c)
        self.subset = subset
        self._advantage_fn = build_advantage(advantage, **dict(advantage_kwargs or {}))  # Hydra: a DictConfig
        self.entropy_control = build_entropy_control(entropy_control)
        if self.entropy_control is not None and self.entropy_control.method == "adaptive_coef" and entropy_coef:
            raise ValueError(
                "entropy_control method adaptive_coef sets the entropy bonus itself: leave entropy_coef at 0 and give "
                "its starting value as entropy_control.init_coef"
            )

    # ------------------------------------------------------------------ public API
    @property
    def needs_reference(self) -> bool:
        """Whether the trainer must build a frozen reference model (only for a KL term)."""
        return self.kl_coef > 0

    def end_optimizer_step(self, sum_over_ranks: SumOverRanks | None = None) -> None:
        """Call after every optimizer step (every rank): the entropy controller, if any, measures the entropy the loss
        saw since the last step (token sums all-reduced by ``sum_over_ranks``) and sets its next coefficient."""
        if self.entropy_control is not None:
            self.entropy_control.update(sum_over_ranks)

    def state_dict(self) -> dict:
        """The loss's training state (the entropy controller's; {} without one), for checkpoints."""
        return {} if self.entropy_control is None else {"entropy_control": self.entropy_control.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. A controller without saved state (none in the checkpoint) starts afresh; a
        saved controller of another method is refused."""
        if self.entropy_control is not None and "entropy_control" in state:
            self.entropy_control.load_state_dict(state["entropy_control"])

    def compute_advantages(self, rewards: Tensor) -> Tensor:
        """rewards [P, G] -> advantages [P, G] with this loss's estimator."""
        return self._advantage_fn(rewards)

    def loss_rows(self, advantages: Tensor) -> Tensor | None:
        """[B] bool: the responses the loss is over (``subset``); None: all of them."""
        if self.subset == "nonzero_advantage":
            return advantages.detach() != 0
        return None

    def aggregation_weight(self, mask: Tensor, advantages: Tensor) -> float:
        """The weight of a micro-batch (``mask`` [B, T], ``advantages`` [B]) in its mini-batch: the denominator of
        this loss's aggregation over the responses it is over. Accumulating ``loss * weight / sum(weights)`` over
        the micro-batches gives the mini-batch's loss exactly (:mod:`simko.losses.aggregation`)."""
        rows = self.loss_rows(advantages)
        return aggregation_weight(mask if rows is None else mask[rows], self.aggregation)

    def __call__(
        self,
        stats: TokenStats,
        old_logprobs: Tensor,
        advantages: Tensor,
        rewards: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        is_weights: Tensor | None = None,
    ) -> LossOutput:
        """Loss of one (micro-)batch. ``advantages``/``rewards``: [B], one per response; ``old_logprobs`` [B, T].

        With ``subset`` other than ``all``, every per-row input is reduced to the responses of :meth:`loss_rows`
        first, and the rest of the loss never sees the others.

        ``is_weights`` [B, T] (detached): per-token importance weights from the sampler to ``old_logprobs``'s policy
        (:class:`simko.correction.RolloutCorrection`); they multiply each token's PPO term (not the penalty, the KL
        term or the extra loss), so they apply to every loss's surrogate alike. None: weight 1.
        """
        mask = stats.mask
        if advantages.dim() != 1 or advantages.shape[0] != mask.shape[0]:
            raise ValueError(f"advantages must have shape [B]={mask.shape[0]}, got {tuple(advantages.shape)}")
        if old_logprobs.shape != mask.shape:
            raise ValueError(f"old_logprobs must have shape {tuple(mask.shape)}, got {tuple(old_logprobs.shape)}")
        if self.needs_reference and ref_logprobs is None:
            raise ValueError(f"loss {self.name!r} has kl_coef={self.kl_coef} > 0 and needs ref_logprobs")
        if is_weights is not None and is_weights.shape != mask.shape:
            raise ValueError(f"is_weights must have shape {tuple(mask.shape)}, got {tuple(is_weights.shape)}")
        if rewards is None:
            rewards = (advantages > 0).float()
        rows = self.loss_rows(advantages)
        if rows is not None:
            stats, old_logprobs, advantages, rewards = (
                stats.select(rows),
                old_logprobs[rows],
                advantages[rows],
                rewards[rows],
            )
            ref_logprobs = ref_logprobs[rows] if ref_logprobs is not None else None
            is_weights = is_weights[rows] if is_weights is not None else None
            mask = stats.mask
        old_logprobs = old_logprobs.detach()
        adv_tok = advantages.detach().float()[:, None].expand_as(stats.logprobs)

        ratio, adv_used, metrics = self.surrogate(stats, old_logprobs, adv_tok, rewards.detach().float())
        per_token, clip_events = self.objective(ratio, adv_used, stats)
        if is_weights is not None:
            per_token = per_token * is_weights.detach()
        penalty = self.token_penalty(stats, old_logprobs, adv_tok, metrics)
        if penalty is not None:
            per_token = per_token + penalty
        if self.entropy_control is not None:
            self.entropy_control.observe(stats.entropy, mask)
            control = self.entropy_control.token_term(stats, old_logprobs, adv_tok)
            if control is not None:
                per_token = per_token + control
            metrics["entropy_control/coef"] = self.entropy_control.coef
        policy_loss = aggregate(per_token, mask, self.aggregation, self.norm_len)
        loss = policy_loss

        with torch.no_grad():
            log_ratio = stats.logprobs.detach() - old_logprobs
            metrics.update(
                policy_loss=float(policy_loss.detach()),
                approx_kl=float(masked_mean(0.5 * log_ratio.square(), mask)),
                entropy=float(masked_mean(stats.entropy.detach(), mask)),
                num_tokens=float(mask.sum()),
            )
            metrics.update({name: float(masked_mean(event.float(), mask)) for name, event in clip_events.items()})
            if rows is not None:
                metrics["subset_frac"] = float(rows.float().mean()) if rows.numel() else 0.0
        if self.kl_coef > 0:
            kl = kl_penalty(stats.logprobs, ref_logprobs.detach(), self.kl_estimator)
            kl_loss = aggregate(kl, mask, self.aggregation, self.norm_len)
            loss = loss + self.kl_coef * kl_loss
            metrics["kl_ref"] = float(kl_loss.detach())
        extra = self.extra_loss(stats, metrics)
        if extra is not None:
            loss = loss + extra
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss=loss, metrics=metrics)

    # ------------------------------------------------------------------ hooks
    def surrogate(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, rewards: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Per-token (ratio, advantage) of the PPO-clip objective, and any loss-specific metrics."""
        return torch.exp(stats.logprobs - old_logprobs), adv_tok, {}

    def objective(self, ratio: Tensor, adv: Tensor, stats: TokenStats) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token loss ``[B, T]`` of the surrogate's (ratio, advantage), and ``{metric name: [B, T] bool}`` of
        where each clip is active (logged as its share of the valid tokens).

        The base: PPO-clip, max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) (``clip_frac``: where the clipped branch
        is the larger); with ``dual_clip_c`` = c, tokens with A < 0 whose term exceeds -A c get the constant -A c
        (``dual_clip_frac``), as verl's ``compute_policy_loss_vanilla``.
        """
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)
        per_token = torch.maximum(unclipped, clipped)
        events = {"clip_frac": clipped > unclipped}
        if self.dual_clip_c is not None:
            cap = -self.dual_clip_c * adv.to(per_token.dtype)
            dual = (adv < 0) & (per_token > cap)
            per_token = torch.where(dual, cap, per_token)
            events["dual_clip_frac"] = dual
        return per_token, events

    def token_penalty(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, metrics: dict[str, float]
    ) -> Tensor | None:
        """Optional ``[B, T]`` term added to the per-token PPO loss before aggregation (None: nothing)."""
        return None

    def extra_loss(self, stats: TokenStats, metrics: dict[str, float]) -> Tensor | None:
        """Optional scalar added to the loss (None: nothing). The base: the entropy bonus when ``entropy_coef``.

        The classic maximum-entropy regulariser (e.g. Williams & Peng 1991; verl's ``entropy_coeff``). The entropy
        of :class:`TokenStats` is differentiable, so the bonus acts (in the official SimKO code it is detached and
        inert): per position, grad_z [-beta_H H(softmax(z))] = beta_H * p * (log p + H). It is aggregated like the
        policy term, so micro-batch weighting stays exact. Cui et al. 2025 (arXiv 2505.22617) report the
        coefficient is touchy: ~1e-3 barely moves entropy, 1e-2 can make it explode.
        """
        coef = self.entropy_coef
        if self.entropy_control is not None:
            coef += self.entropy_control.bonus_coef()  # adaptive_coef (0 for entropic): entropy_coef is 0 there
        if coef == 0:
            return None
        entropy = aggregate(stats.entropy, stats.mask, self.aggregation, self.norm_len)
        metrics["entropy_bonus"] = float(entropy.detach())
        return -coef * entropy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
