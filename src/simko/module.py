"""The RLVR LightningModule: one ``training_step`` is one RL step.

    prompts -> G rollouts each, scored by the verifiers (the rollout engine, ``rollout.engine``; simko.evaluation)
    -> the step batch (simko.sampling_filters: dynamic sampling, truncation masks, rewards = scores + overlong
    penalty) -> group advantages of the rewards -> ppo_epochs x mini-batches of optimizer updates (simko.update,
    which gets the model, optimizer and strategy as plain callables) -> sync the engine's weights

Validation samples and scores held-out prompts through the same path and accumulates pass@k, solution diversity
and the concentration diagnostics as ``simko.eval`` does (:class:`simko.evaluation.SampleMetrics`).

Optimization is manual: one RL step makes ``ppo_epochs * num_mini_batches`` optimizer steps, so Lightning's
``global_step`` counts optimizer updates and ``rl_step`` (logged) counts RL steps. Set ``rl_steps`` in
``configs/train.yaml`` to fix the run length in RL steps.

The loss never sees logits: it gets :class:`~simko.losses.TokenStats`, computed from the last hidden states in
sequence chunks with recomputation (:mod:`simko.forward`), so no ``[B, T, V]`` log-softmax is kept for backward.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from simko import distributed
from simko.correction import RolloutCorrection
from simko.diagnostics import concentration_over_ranks, concentration_sums
from simko.engines import RolloutEngine, Sampling, available_engines, build_engine, check_engine, step_seed
from simko.evaluation import SampleMetrics, sample_and_score
from simko.forward import enable_checkpointing, rollout_token_stats
from simko.losses import PolicyLoss, TokenStats
from simko.metrics import default_ks
from simko.models import lora
from simko.rewards import failure_counts, score_batch
from simko.rewards.base import checked_scores
from simko.rollout import Rollouts, eos_ids
from simko.sampling_filters import (
    SUMMED_METRICS,
    DynamicSampling,
    OverlongPenalty,
    assemble_step_batch,
    check_refill_source,
    knob_group,
    refill_seed,
)
from simko.update import UpdateHooks, UpdateSchedule, update_policy


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
        gradient_checkpointing: recompute each transformer block's activations in the update's backward instead of
            keeping them (:func:`simko.forward.enable_checkpointing`; autograd forwards only, never generation); exact.
        micro_batch_tokens: form micro-batches by a token budget instead of ``micro_batch_size`` rows: rows (whole
            groups with ``share_prompt``, the prompt counted once), largest first, go first-fit into micro-batches
            of at most this many tokens (prompt + response; a longer row alone); None: ``micro_batch_size`` rows
            (:func:`simko.update.token_budget_bins`).
        padding_free: pack each micro-batch's rows into one sequence, positions restarting per row, so no padding
            token is computed; with ``share_prompt`` each distinct prompt runs once and the rows' responses are
            packed after it, each seeing its prompt and itself (:func:`simko.forward.packed_token_stats`);
            ``"auto"``: per micro-batch, packed where that computes fewer FLOPs (without a variable-length attention
            kernel a packed sequence attends over its whole length; :func:`simko.forward.packing_is_cheaper`).
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
        gradient_checkpointing: bool = False,
        micro_batch_tokens: int | None = None,
        padding_free: bool | str = "auto",
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
        if micro_batch_tokens is not None and (isinstance(micro_batch_tokens, bool) or micro_batch_tokens < 1):
            raise ValueError(f"micro_batch_tokens must be null or an integer >= 1, got {micro_batch_tokens!r}")
        if not isinstance(loss, PolicyLoss):
            raise TypeError(f"loss must be a simko.losses.PolicyLoss (build_loss), got {type(loss).__name__}")
        # An unknown engine, knobs that are not its own, vLLM not installed: fail now (the install command).
        check_engine(engine, dict(engine_knobs.get(engine) or {}))
        engines = available_engines()
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
        if not isinstance(correction, RolloutCorrection):
            correction = RolloutCorrection(**dict(correction or {}))
        self.correction = correction
        self._engine: RolloutEngine | None = None
        self.ppo_epochs = ppo_epochs
        self.num_mini_batches = num_mini_batches
        self.micro_batch_size = micro_batch_size
        self.grad_clip = grad_clip
        self.stats_chunk_size = stats_chunk_size
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.micro_batch_tokens = micro_batch_tokens
        if padding_free not in (True, False, "auto"):
            raise ValueError(f"padding_free must be true, false or auto, got {padding_free!r}")
        self.padding_free = padding_free
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
        if self.gradient_checkpointing:  # after the reference copy, which runs without autograd anyway
            enable_checkpointing(policy)
        self.rl_step = 0
        # pass@k, diversity and diagnostics of the validation samples (not persistent: never in checkpoints).
        self.val_metrics = SampleMetrics(default_ks(val_samples), self.diagnostics_top_k, diagnostics_tau)

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
        """The verifiers' scores of ``completions`` (or those of the ``verifier`` given to the constructor)."""
        if self._verifier is not None:
            return checked_scores(self._verifier(completions, answers, names), len(completions), "module.verifier")
        return score_batch(completions, answers, names, verifiers=self.verifiers)

    def verifier_failures(self) -> dict[str, float]:
        return {f"verifier/{k}": float(v) for k, v in failure_counts(self.verifiers).items()}

    # ------------------------------------------------------------------ rollouts and token statistics
    def rollout(
        self, examples: list[dict], group_size: int, temperature: float, top_p: float, seed: int
    ) -> tuple[Rollouts, Tensor, dict[str, float]]:
        """Sample ``group_size`` completions per example with the engine and score them (:func:`simko.evaluation.
        sample_and_score`): rollouts, verifier scores [N] and timings."""
        sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return sample_and_score(
            self.engine, self.tokenizer, examples, group_size, sampling, self.score, self.max_prompt_tokens, self.device
        )

    def token_stats(self, model: torch.nn.Module, rows: dict[str, Tensor], top_k: int) -> TokenStats:
        """TokenStats of the response tokens of ``rows`` under ``model`` at the rollout temperature."""
        share = self.share_prompt and not self._sharded
        return rollout_token_stats(
            model,
            rows,
            top_k,
            self.temperature,
            self.stats_chunk_size,
            share_prompt=share,
            padding_free=self.padding_free,
        )

    # ------------------------------------------------------------------ the RL step
    def training_step(self, batch: dict, batch_idx: int) -> None:
        examples, step = batch["examples"], int(batch["step"])
        t_step = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # mem/max_allocated_gib is this step's peak
        G = self.group_size

        # 1. Sample G completions per prompt and score them with the verifiers.
        seed = step_seed(self.seed, step, self.global_rank)
        rollouts, scores, timings = self.rollout(examples, G, self.temperature, self.top_p, seed)

        # 2. What is trained on (simko.sampling_filters): zero-variance groups dropped and refilled (dynamic
        #    sampling), truncated completions masked, and rewards = scores + the overlong penalty.
        trained = assemble_step_batch(
            rollouts,
            scores,
            examples,
            max_new_tokens=self.max_new_tokens,
            tokenizer=self.tokenizer,
            eos_token_ids=eos_ids(self.policy, self.tokenizer),
            dynamic_sampling=self.dynamic_sampling,
            mask_truncated=self.mask_truncated,
            overlong=self.overlong,
            draw=partial(self._refill_round, step, timings),
            any_rank=partial(self.trainer.strategy.reduce_boolean_decision, all=False),  # ranks agree on rounds
        )

        # 3. Group advantages from the rewards; ppo_epochs x num_mini_batches optimizer updates (simko.update).
        t_update = time.perf_counter()
        advantages = self.loss_fn.compute_advantages(trained.rewards.view(-1, G)).reshape(-1)
        diag_k = self.diagnostics_top_k
        hooks = UpdateHooks(
            token_stats=partial(self.token_stats, self.policy),
            optimizer_step=self._optimizer_step,
            zero_grad=partial(self.optimizers().zero_grad, set_to_none=True),
            reference_stats=self._reference_stats(),
            backward=self.manual_backward,
            no_sync=partial(distributed.no_sync, self.trainer.strategy),
            max_over_ranks=partial(distributed.max_over_ranks, self.trainer.strategy),
            diagnose=self._diagnostics if diag_k else None,
        )
        schedule = UpdateSchedule(
            ppo_epochs=self.ppo_epochs,
            num_mini_batches=self.num_mini_batches,
            micro_batch_size=self.micro_batch_size,
            micro_batch_tokens=self.micro_batch_tokens,
            share_prompt=self.share_prompt and not self._sharded,
            shuffle_seed=step_seed(self.seed, step, 0),  # the group shuffle, the same on every rank
            stats_top_k=max(self.loss_fn.top_k, diag_k),
            correction=self.correction,
            where=f" at RL step {step}",
        )
        metrics, diagnostics = update_policy(
            self.loss_fn, trained.rollouts, trained.scores, advantages, hooks, schedule
        )

        # 4. The next RL step samples from the updated policy.
        t_sync = time.perf_counter()
        self.engine.sync_weights(lora.engine_view(self.policy))
        timings["time/update"] = t_sync - t_update
        timings["time/weight_sync"] = time.perf_counter() - t_sync
        timings["time/step"] = time.perf_counter() - t_step
        self.rl_step = step + 1

        # 5. Log: the step's first generation (reward, lengths), the update's metrics, the diagnostics.
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
        self._log_step(rollouts, scores, metrics, timings)

    def _refill_round(self, step: int, timings: dict, round_: int) -> tuple[Rollouts, Tensor, list[dict]]:
        """Extra generation round ``round_`` of dynamic sampling: the data module's refill prompts for (step, round),
        sampled with their own seed (:func:`simko.sampling_filters.refill_seed`); its time adds to ``timings``."""
        examples = self.trainer.datamodule.refill_examples(step, round_)
        seed = refill_seed(self.seed, step, self.global_rank, round_)
        rollouts, scores, more_timings = self.rollout(examples, self.group_size, self.temperature, self.top_p, seed)
        for key, value in more_timings.items():
            timings[key] += value
        return rollouts, scores, examples

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

    def _log_step(self, rollouts: Rollouts, scores: Tensor, metrics: dict, timings: dict) -> None:
        """``train/reward`` and the solved counts are of the verifier scores of the step's first generation."""
        G = self.group_size
        grouped = scores.view(-1, G)
        lengths = rollouts.response_mask.sum(1).float()
        log = {
            "reward": scores.mean().item(),
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
        solution diversity of the correct samples and the concentration diagnostics of all samples
        (:class:`simko.evaluation.SampleMetrics`, as ``simko.eval``)."""
        seed = step_seed(self.seed + 1, 10_000_000 + batch_idx, self.global_rank)
        n, temperature, top_p = (self.val_sampling[key] for key in ("group_size", "temperature", "top_p"))
        rollouts, scores, _ = self.rollout(batch, n, temperature, top_p, seed)
        self.val_metrics.update(batch, rollouts, scores, partial(self.token_stats, self.policy), self.micro_batch_size)

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics.update_count == 0:
            return
        pass_at_k, diversity, diagnostics = self.val_metrics.compute(self.trainer.strategy, self.device)
        # Every value is over all ranks' samples already (torchmetrics' sync, the diagnostics' all-reduce), so every
        # rank holds the same one: sync_dist tells Lightning so (it warns otherwise), and the max of equal values is
        # that value exactly.
        for k, value in pass_at_k.items():
            name = f"val/{k}" if isinstance(k, str) else f"val/pass@{k}"
            self.log(name, value, prog_bar=k == 1, rank_zero_only=False, sync_dist=True, reduce_fx="max")
        for key, value in diversity.items():
            if value == value:  # NaN: undefined here (no solved problem, unknown solution counts); same on all ranks
                self.log(f"val/{key}", value, rank_zero_only=False, sync_dist=True, reduce_fx="max")
        for key, value in diagnostics.items():
            self.log(f"val/{key}", value, rank_zero_only=False, sync_dist=True, reduce_fx="max")
