"""The RLVR LightningModule: one ``training_step`` is one RL step.

    prompts -> G rollouts each (the rollout engine, ``rollout.engine``) -> verifier rewards -> the trained batch
    (simko.sampling_filters: dynamic sampling, truncation masks, overlong penalty) -> group advantages
    -> ppo_epochs x mini-batches of optimizer updates (simko.update) -> sync the engine's weights

Optimization is manual: one RL step makes ``ppo_epochs * num_mini_batches`` optimizer steps, so Lightning's
``global_step`` counts optimizer updates and ``rl_step`` (logged) counts RL steps. Set ``rl_steps`` in
``configs/train.yaml`` to fix the run length in RL steps.

The loss never sees logits: it gets :class:`~simko.losses.TokenStats`, computed from the last hidden states in
sequence chunks with recomputation (:mod:`simko.forward`), so no ``[B, T, V]`` log-softmax is kept for backward.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from simko import distributed
from simko.correction import RolloutCorrection
from simko.diagnostics import concentration_over_ranks, concentration_sums
from simko.engines import RolloutEngine, Sampling, available_engines, build_engine, check_engine
from simko.forward import rollout_token_stats
from simko.losses import PolicyLoss, TokenStats
from simko.metrics import PassAtK, default_ks
from simko.metrics.diversity import SolutionDiversity, grouped_solution_keys
from simko.models import lora
from simko.rollout import Rollouts, step_seed, tokenize_prompts
from simko.sampling_filters import (
    SUMMED_METRICS,
    DynamicSampling,
    OverlongPenalty,
    check_refill_source,
    knob_group,
    module_step_batch,
)
from simko.update import update_policy


class RLVRModule(LightningModule):
    """Policy-gradient RL with verifiable rewards.

    Args:
        policy: a ``transformers`` causal LM (trainable).
        tokenizer: its tokenizer.
        loss: a :class:`~simko.losses.PolicyLoss` (``configs/loss/*.yaml``).
        optimizer: a partial ``torch.optim`` constructor taking the parameters.
        group_size: G, rollouts per prompt (>= 2: group advantages need it).
        max_new_tokens, temperature, top_p, max_prompt_tokens: rollout sampling.
        engine: the rollout engine's name (:mod:`simko.engines`, ``rollout.engine``); built in :meth:`setup`.
        correction: truncated importance sampling from the engine's sampler to the trainer's old policy
            (``rollout.correction``: ``mode``, ``cap``, ``cap_min``; :class:`simko.correction.RolloutCorrection`);
            off by default. The mismatch (``rollout/*``) is logged whenever the engine reports its log-probs.
        ppo_epochs: passes over each rollout batch.
        num_mini_batches: optimizer steps per pass (rows are split evenly, whole groups kept together).
        micro_batch_size: rows per forward/backward (gradient accumulation inside a mini-batch).
        grad_clip: max global grad norm (0 disables clipping; the norm is logged either way).
        stats_chunk_size: sequence chunk of the token statistics (memory ~ rows x chunk x vocab).
        share_prompt: run each distinct prompt once per micro-batch in the update and hand its keys/values to the
            G rows that share it (exact up to float rounding; see :func:`simko.forward.rollout_token_stats`).
            Off under FSDP/FSDP2: the backward of the shared prompt would run after FSDP has resharded the
            parameters and reduce-scattered the gradients of the rows' forward (measured: FSDP2 fails).
        verifiers: verifier instances by name (``configs/train.yaml: module.verifiers``, e.g. a MathVerifier with
            its timeout); an example's ``verifier`` name not listed here gets the registry's default instance.
        verifier: replaces the whole scorer ``f(completions, answers, verifier_names) -> list[float]``
            (default: :func:`simko.rewards.score_batch` over ``verifiers``).
        val_samples, val_temperature, val_top_p: validation sampling (n completions per held-out prompt).
        seed: base of the per-step sampling seeds.
        scheduler: optional partial ``torch.optim.lr_scheduler`` constructor (stepped per optimizer step).
        diagnostics_top_k: log mean p(rank k) for k = 1..this (0 disables the concentration diagnostics).
        diagnostics_tau: entropy quantile (per response) above which a token counts as high-entropy there.
        dynamic_sampling: DAPO's dynamic sampling (``enabled``, ``max_extra_generations``, ``tolerance``;
            :class:`simko.sampling_filters.DynamicSampling`); zero-variance groups are logged either way.
        mask_truncated: truncated completions (no EOS within max_new_tokens) get no loss (TRL's
            ``mask_truncated_completions``).
        overlong: DAPO's soft overlong punishment (``buffer``, ``penalty_factor``;
            :class:`simko.sampling_filters.OverlongPenalty`); ``buffer: null`` is off.
        **engine_knobs: the knobs of each engine by its name (``rollout.<engine>``); the chosen engine's are
            passed to its constructor.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        loss: PolicyLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_prompt_tokens: int | None = None,
        engine: str = "hf",
        correction: RolloutCorrection | dict | None = None,
        ppo_epochs: int = 1,
        num_mini_batches: int = 1,
        micro_batch_size: int = 16,
        grad_clip: float = 1.0,
        stats_chunk_size: int = 256,
        share_prompt: bool = True,
        verifiers: dict[str, Any] | None = None,
        verifier: Callable[[list[str], list[str], list[str]], list[float]] | None = None,
        val_samples: int = 1,
        val_temperature: float = 0.6,
        val_top_p: float = 0.95,
        seed: int = 0,
        scheduler: Callable[..., Any] | None = None,
        diagnostics_top_k: int = 10,
        diagnostics_tau: float = 0.8,
        dynamic_sampling: DynamicSampling | dict | None = None,
        mask_truncated: bool = False,
        overlong: OverlongPenalty | dict | None = None,
        **engine_knobs: dict,
    ):
        super().__init__()
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (group advantages compare responses), got {group_size}")
        for name, value in (
            ("ppo_epochs", ppo_epochs),
            ("num_mini_batches", num_mini_batches),
            ("micro_batch_size", micro_batch_size),
            ("max_new_tokens", max_new_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not isinstance(loss, PolicyLoss):
            raise TypeError(f"loss must be a simko.losses.PolicyLoss (build_loss), got {type(loss).__name__}")
        engines = available_engines()
        if engine not in engines:
            raise ValueError(f"unknown rollout engine {engine!r} (rollout.engine); available: {', '.join(engines)}")
        unknown = sorted(set(engine_knobs) - set(engines))
        if unknown:
            raise TypeError(f"RLVRModule got unexpected arguments {unknown} (engine knobs: {', '.join(engines)})")
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = tokenizer
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.max_prompt_tokens = max_prompt_tokens
        self.engine_name = engine
        self.engine_knobs = dict(engine_knobs.get(engine) or {})
        check_engine(engine, self.engine_knobs)  # e.g. vLLM not installed: fail now, with the install command
        if not isinstance(correction, RolloutCorrection):
            correction = RolloutCorrection(**dict(correction or {}))
        self.correction = correction
        self._engine: RolloutEngine | None = None
        self.ppo_epochs = ppo_epochs
        self.num_mini_batches = num_mini_batches
        self.micro_batch_size = micro_batch_size
        self.grad_clip = grad_clip
        self.stats_chunk_size = stats_chunk_size
        self.share_prompt = share_prompt
        self._sharded = False  # set in setup(), once the strategy is known
        self.val_sampling = dict(group_size=val_samples, temperature=val_temperature, top_p=val_top_p)
        self.seed = seed
        vocab = policy.get_output_embeddings().weight.shape[0]
        self.diagnostics_top_k = min(diagnostics_top_k, vocab)
        self.diagnostics_tau = diagnostics_tau
        self.dynamic_sampling = knob_group(DynamicSampling, dynamic_sampling)
        self.mask_truncated = bool(mask_truncated)
        self.overlong = knob_group(OverlongPenalty, overlong)
        self.overlong.check(max_new_tokens)
        self.verifiers = dict(verifiers or {})
        self._verifier = verifier
        # The frozen reference exists only when the loss needs it (a KL term) and is never registered as a
        # submodule: it is not trained, not sharded and not written into checkpoints. A LoRA policy needs no copy:
        # its reference is the policy with the adapters disabled (simko.models.lora.base_model_stats).
        self._reference: torch.nn.Module | None = None
        if lora.is_lora(policy):
            # Checkpoints hold the adapter only. FSDP2 loads them inside the strategy, before on_load_checkpoint
            # could put the base weights back; the adapter's config is checked there (lora.restore_base_weights).
            self.strict_loading = False
        if loss.needs_reference and not lora.is_lora(policy):
            ref = copy.deepcopy(policy).eval().requires_grad_(False)
            object.__setattr__(self, "_reference", ref)
        self.rl_step = 0
        # Not persistent: metric state never enters checkpoints.
        self.val_pass_at_k = PassAtK(ks=default_ks(val_samples))
        self.val_diversity = SolutionDiversity()
        self._val_diag: dict[str, float] = defaultdict(float)  # token sums of the diagnostics of val samples

    # ------------------------------------------------------------------ Lightning plumbing
    def setup(self, stage: str) -> None:
        """The strategy is known: build the rollout engine (kept from validate() into fit())."""
        self._sharded = distributed.is_sharded(self.trainer.strategy)
        if stage == "fit":
            check_refill_source(self.dynamic_sampling, self.trainer.datamodule)
        if self._engine is None:
            self._engine = self._build_engine(synced_gpus=self.trainer.world_size > 1 and self._sharded)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def engine(self) -> RolloutEngine:
        if self._engine is None:  # used outside a Trainer
            self._engine = self._build_engine(synced_gpus=False)
        return self._engine

    def _build_engine(self, synced_gpus: bool) -> RolloutEngine:
        policy = lora.engine_view(self.policy)  # LoRA: the engine reads merged weights
        return build_engine(self.engine_name, policy, self.tokenizer, synced_gpus=synced_gpus, **self.engine_knobs)

    def configure_model(self) -> None:
        """FSDP2 (ModelParallelStrategy): shard every transformer block, then the whole policy as the root."""
        if self.device_mesh is not None:
            distributed.shard_fsdp2(self.policy, self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    def on_fit_start(self) -> None:
        # Train mode, as Lightning expects at fit start (HF loaders return eval-mode models), with dropout off, so
        # that the update sees the function that sampled the rollouts (as TRL's disable_dropout). Qwen2 and Llama
        # use self.training for dropout only, so this computes what eval mode computed before.
        self.policy.train()
        for m in self.policy.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0
        if self._reference is not None:
            self._reference.to(self.device)
        self.engine.sync_weights(lora.engine_view(self.policy))  # resumed weights are loaded by now

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_step"] = self.rl_step
        checkpoint["loss_state"] = self.loss_fn.state_dict()  # e.g. the entropy controller's: resume is exact
        lora.drop_base_weights(checkpoint, self.policy)  # LoRA: the adapter only, and its config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.rl_step = checkpoint.get("rl_step", 0)
        self.loss_fn.load_state_dict(checkpoint.get("loss_state", {}))
        lora.restore_base_weights(checkpoint, self.policy)  # LoRA: the base weights back, for the strict load

    def score(self, completions: list[str], answers: list[str], names: list[str]) -> list[float]:
        if self._verifier is not None:
            return self._verifier(completions, answers, names)
        from simko.rewards import score_batch

        return score_batch(completions, answers, names, verifiers=self.verifiers)

    def verifier_failures(self) -> dict[str, float]:
        from simko.rewards import failure_counts

        return {f"verifier/{k}": float(v) for k, v in failure_counts(self.verifiers).items()}

    # ------------------------------------------------------------------ rollouts and token statistics
    def rollout(
        self,
        examples: list[dict],
        step: int,
        group_size: int,
        temperature: float,
        top_p: float,
        seed_offset: int = 0,
        seed: int | None = None,
    ) -> tuple[Rollouts, Tensor, dict[str, float]]:
        """Generate and score; returns rollouts, rewards [N] and timings. ``seed``: the sampling seed (default: the
        step's, from ``step_seed``)."""
        t0 = time.perf_counter()
        prompt_ids = tokenize_prompts(self.tokenizer, [ex["prompt"] for ex in examples], self.max_prompt_tokens)
        if seed is None:
            seed = step_seed(self.seed + seed_offset, step, self.global_rank)
        sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        rollouts = self.engine.generate(prompt_ids, group_size, sampling)
        t1 = time.perf_counter()
        answers = [ex["answer"] for ex in examples for _ in range(group_size)]
        names = [ex["verifier"] for ex in examples for _ in range(group_size)]
        rewards = torch.tensor(
            self.score(rollouts.completions, answers, names), dtype=torch.float32, device=self.device
        )
        t2 = time.perf_counter()
        return rollouts, rewards, {"time/generate": t1 - t0, "time/score": t2 - t1}

    def token_stats(self, model: torch.nn.Module, rows: dict[str, Tensor], top_k: int) -> TokenStats:
        """TokenStats of the response tokens of ``rows`` under ``model`` at the rollout temperature."""
        share = self.share_prompt and not self._sharded
        return rollout_token_stats(model, rows, top_k, self.temperature, self.stats_chunk_size, share_prompt=share)

    # ------------------------------------------------------------------ the RL step
    def training_step(self, batch: dict, batch_idx: int) -> None:
        examples, step = batch["examples"], int(batch["step"])
        t_step = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # mem/max_allocated_gib is this step's peak
        G = self.group_size
        rollouts, scores, timings = self.rollout(examples, step, G, self.temperature, self.top_p)
        trained = module_step_batch(self, examples, step, rollouts, scores, timings)  # filters, refills

        t_update = time.perf_counter()
        advantages = self.loss_fn.compute_advantages(trained.rewards.view(-1, G)).reshape(-1)
        diag_k = self.diagnostics_top_k
        metrics, diagnostics = update_policy(
            self.loss_fn,
            trained.rollouts,
            trained.scores,  # the verifier's rewards: what a loss calls correct (SimKO)
            advantages,
            token_stats=partial(self.token_stats, self.policy),
            optimizer_step=self._optimizer_step,
            zero_grad=partial(self.optimizers().zero_grad, set_to_none=True),
            generator=torch.Generator().manual_seed(step_seed(self.seed, step, 0)),  # the group shuffle
            ppo_epochs=self.ppo_epochs,
            num_mini_batches=self.num_mini_batches,
            micro_batch_size=self.micro_batch_size,
            reference_stats=self._reference_stats(),
            stats_top_k=max(self.loss_fn.top_k, diag_k),
            backward=self.manual_backward,
            no_sync=partial(distributed.no_sync, self.trainer.strategy),
            diagnose=self._diagnostics if diag_k else None,
            correction=self.correction,
            where=f" at RL step {step}",
        )
        t_sync = time.perf_counter()
        self.engine.sync_weights(lora.engine_view(self.policy))  # the next RL step samples from the updated policy
        timings["time/update"] = t_sync - t_update
        timings["time/weight_sync"] = time.perf_counter() - t_sync
        timings["time/step"] = time.perf_counter() - t_step
        self.rl_step = step + 1
        metrics = {
            k if k.startswith("rollout/") else f"train/{k}": v for k, v in {**metrics, **trained.metrics}.items()
        }
        diagnostics = concentration_over_ranks(diagnostics, self.trainer.strategy, self.device)  # same on all ranks
        if self.loss_fn.entropy_control is not None:  # its measured entropy (all ranks' tokens): equal on all ranks
            metrics.update({f"train/{k}": v for k, v in self.loss_fn.entropy_control.metrics().items()})
        metrics.update({f"diag/{k}": v for k, v in diagnostics.items()})
        # The step's trained rollouts as text, for logging samples (simko.callbacks.samples.RolloutSamples).
        self.last_rollout = dict(step=step, examples=trained.examples, completions=trained.rollouts.completions,
                                 rewards=trained.rewards, advantages=advantages)  # fmt: skip
        self._log_step(rollouts, scores, metrics, timings)  # reward, lengths: the step's first generation

    def _reference_stats(self):
        """The frozen reference's token statistics for a KL term (a copy of the policy, or a LoRA policy's base)."""
        if self._reference is not None:
            return partial(self.token_stats, self._reference)
        if self.loss_fn.needs_reference:
            return lora.base_model_stats(partial(self.token_stats, self.policy), self.policy)
        return None

    def _diagnostics(self, stats: TokenStats) -> dict[str, float]:
        """Token sums of the concentration diagnostics (diag/*) of the first mini-batch, under the policy that
        sampled it (:mod:`simko.diagnostics`)."""
        return concentration_sums(stats.with_top_k(self.diagnostics_top_k), self.diagnostics_tau)

    def _optimizer_step(self) -> float:
        """Clip, step the optimizer and the schedule; the gradient norm before clipping."""
        norm = distributed.clip_grad_norm(self.trainer.strategy, self.policy, self.grad_clip)
        self.optimizers().step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.loss_fn.end_optimizer_step(self._sum_over_ranks)  # the entropy controller's update (every rank)
        return norm

    def _sum_over_ranks(self, values: Tensor) -> Tensor:
        """All-reduce (sum) of a tensor through the strategy; itself in one process."""
        strategy = self.trainer.strategy
        if getattr(strategy, "world_size", 1) > 1:
            return strategy.reduce(values.to(self.device), reduce_op="sum")
        return values

    def _log_step(self, rollouts: Rollouts, rewards: Tensor, metrics: dict, timings: dict) -> None:
        G = self.group_size
        grouped = rewards.view(-1, G)
        lengths = rollouts.response_mask.sum(1).float()
        log = {
            "reward": rewards.mean().item(),
            "solved_all": (grouped.min(1).values >= 1.0).float().sum().item(),
            "solved_none": (grouped.max(1).values <= 0.0).float().sum().item(),
            "response_len": lengths.mean().item(),
            "rl_step": float(self.rl_step),
            **metrics,
            **timings,
            **self.verifier_failures(),
            **self._memory_metrics(),
        }
        for key, value in log.items():
            # Counts are summed over ranks, everything else averaged.
            summed = key in ("solved_all", "solved_none") or key.removeprefix("train/") in SUMMED_METRICS
            reduce = "sum" if summed or key.startswith("verifier/") else "mean"
            if key.startswith(("diag/", "mem/")):  # diag/: equal on all ranks already; mem/: the largest rank's
                reduce = "max"
            name = (
                key if key.startswith(("train/", "time/", "diag/", "verifier/", "rollout/", "mem/")) else f"train/{key}"
            )
            self.log(
                name,
                float(value),
                on_step=True,
                on_epoch=False,
                sync_dist=True,
                reduce_fx=reduce,
                prog_bar=key in ("reward",),
                batch_size=rollouts.num_rows,
            )

    def _memory_metrics(self) -> dict[str, float]:
        """On CUDA, the step's peak of memory allocated by tensors on this rank's GPU
        (``torch.cuda.max_memory_allocated``, reset at the step's start), in GiB; nothing on other devices."""
        if self.device.type != "cuda":
            return {}
        return {"mem/max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        """Sample n completions per held-out prompt (same seeds at every validation) and score them; pass@k, the
        solution diversity of the correct samples and the concentration diagnostics of all samples."""
        n = self.val_sampling["group_size"]
        rollouts, rewards, _ = self.rollout(
            batch,
            10_000_000 + batch_idx,
            n,
            self.val_sampling["temperature"],
            self.val_sampling["top_p"],
            seed_offset=1,
        )
        correct = rewards.view(-1, n) >= 1.0
        self.val_pass_at_k.update(correct)
        self.val_diversity.update(*grouped_solution_keys(batch, rollouts.completions, correct))
        if self.diagnostics_top_k:
            for idx in torch.arange(rollouts.num_rows, device=self.device).split(self.micro_batch_size):
                stats = self.token_stats(self.policy, rollouts.rows(idx), top_k=self.diagnostics_top_k)
                for key, value in concentration_sums(stats, self.diagnostics_tau).items():
                    self._val_diag[key] += value

    def on_validation_epoch_end(self) -> None:
        if self.val_pass_at_k.update_count == 0:
            return
        result = self.val_pass_at_k.compute()  # synced across ranks by torchmetrics
        self.val_pass_at_k.reset()
        for k, value in result.items():
            name = f"val/{k}" if isinstance(k, str) else f"val/pass@{k}"
            # torchmetrics has already synced the value, so every rank holds the same one; sync_dist tells Lightning
            # so (it warns otherwise), and the max of equal values is that value exactly.
            self.log(name, value, prog_bar=k == 1, rank_zero_only=False, sync_dist=True, reduce_fx="max")
        diversity = self.val_diversity.compute()  # synced across ranks by torchmetrics, as pass@k
        self.val_diversity.reset()
        diagnostics = concentration_over_ranks(dict(self._val_diag), self.trainer.strategy, self.device)
        self._val_diag.clear()
        for key, value in diversity.items():
            if value == value:  # NaN: undefined here (no solved problem, unknown solution counts); same on all ranks
                self.log(f"val/{key}", value, rank_zero_only=False, sync_dist=True, reduce_fx="max")
        for key, value in diagnostics.items():  # over every rank's samples already: equal on all ranks
            self.log(f"val/{key}", value, rank_zero_only=False, sync_dist=True, reduce_fx="max")
