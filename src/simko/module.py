"""The RLVR LightningModule: one ``training_step`` is one RL step.

    prompts -> G rollouts each (policy.generate, KV cache) -> verifier rewards -> group advantages
    -> old log-probs (only when the policy will have moved before a token is used) -> ppo_epochs x mini-batches
    of optimizer updates, each accumulated over micro-batches.

Optimization is manual: one RL step makes ``ppo_epochs * num_mini_batches`` optimizer steps, so Lightning's
``global_step`` counts optimizer updates and ``rl_step`` (logged) counts RL steps. Set ``rl_steps`` in
``configs/train.yaml`` to fix the run length in RL steps.

The loss never sees logits: it gets :class:`~simko.losses.TokenStats`, computed from the last hidden states in
sequence chunks with recomputation, so no ``[B, T, V]`` log-softmax is kept for backward.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from simko.diagnostics import concentration_metrics
from simko.losses import PolicyLoss, TokenStats, aggregation_weight  # noqa: F401
from simko.metrics import PassAtK, default_ks
from simko.metrics.diversity import SolutionDiversity, grouped_solution_keys
from simko.rollout import Rollouts, generate_rollouts, rollout_token_stats, step_seed


class RLVRModule(LightningModule):
    """Policy-gradient RL with verifiable rewards.

    Args:
        policy: a ``transformers`` causal LM (trainable).
        tokenizer: its tokenizer (left padding is forced for generation).
        loss: a :class:`~simko.losses.PolicyLoss` (``configs/loss/*.yaml``).
        optimizer: a partial ``torch.optim`` constructor taking the parameters.
        group_size: G, rollouts per prompt (>= 2: group advantages need it).
        max_new_tokens, temperature, top_p: rollout sampling.
        ppo_epochs: passes over each rollout batch.
        num_mini_batches: optimizer steps per pass (rows are split evenly, whole groups kept together).
        micro_batch_size: rows per forward/backward (gradient accumulation inside a mini-batch).
        grad_clip: max global grad norm (0 disables clipping; the norm is logged either way).
        stats_chunk_size: sequence chunk of the token statistics (memory ~ rows x chunk x vocab).
        share_prompt: run each distinct prompt once per micro-batch in the update and hand its keys/values to the
            G rows that share it (exact up to float rounding; see :func:`simko.rollout.rollout_token_stats`).
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
        missing = [a for a in ("compute_advantages", "top_k", "aggregation", "needs_reference") if not hasattr(loss, a)]
        if missing or not callable(loss):
            raise TypeError(
                f"loss must be built by simko.losses.build_loss (got {type(loss).__name__}, missing {missing})"
            )
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = tokenizer
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.group_size = group_size
        self.sampling = dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, max_prompt_tokens=max_prompt_tokens
        )
        self.ppo_epochs = ppo_epochs
        self.num_mini_batches = num_mini_batches
        self.micro_batch_size = micro_batch_size
        self.grad_clip = grad_clip
        self.stats_chunk_size = stats_chunk_size
        self.share_prompt = share_prompt
        self.val_sampling = dict(group_size=val_samples, temperature=val_temperature, top_p=val_top_p)
        self.seed = seed
        vocab = policy.get_output_embeddings().weight.shape[0]
        self.diagnostics_top_k = min(diagnostics_top_k, vocab)
        self.diagnostics_tau = diagnostics_tau
        self.verifiers = dict(verifiers or {})
        self._verifier = verifier
        # The frozen reference exists only when the loss needs it (a KL term) and is never registered as a
        # submodule: it is not trained, not sharded and not written into checkpoints.
        self._reference: torch.nn.Module | None = None
        if loss.needs_reference:
            ref = copy.deepcopy(policy).eval().requires_grad_(False)
            object.__setattr__(self, "_reference", ref)
        self.rl_step = 0
        # Not persistent: metric state never enters checkpoints.
        self.val_pass_at_k = PassAtK(ks=default_ks(val_samples))
        self.val_diversity = SolutionDiversity()
        self._val_diag: dict[str, float] = defaultdict(float)  # row-weighted sums of the diagnostics of val samples

    # ------------------------------------------------------------------ Lightning plumbing
    def configure_model(self) -> None:
        """FSDP2 (ModelParallelStrategy): shard every transformer block, then the whole policy as the root."""
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.policy, FSDPModule):  # already sharded (validate() ran before fit())
            return
        mesh = self.device_mesh["data_parallel"]
        block_names = set(getattr(self.policy, "_no_split_modules", None) or [])
        blocks = [m for m in self.policy.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise RuntimeError(f"FSDP2: found no transformer blocks ({block_names}) in {type(self.policy).__name__}")
        for block in blocks:
            fully_shard(block, mesh=mesh)
        # The root keeps its parameters unsharded between forward and backward, which the chunked LM head
        # (applied after the forward, in TokenStats.from_hidden) relies on.
        fully_shard(self.policy, mesh=mesh)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    def on_fit_start(self) -> None:
        if self._reference is not None:
            self._reference.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_step"] = self.rl_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.rl_step = checkpoint.get("rl_step", 0)

    def score(self, completions: list[str], answers: list[str], names: list[str]) -> list[float]:
        if self._verifier is not None:
            return self._verifier(completions, answers, names)
        from simko.rewards import score_batch

        return score_batch(completions, answers, names, verifiers=self.verifiers)

    def verifier_failures(self) -> dict[str, float]:
        from simko.rewards import failure_counts

        return {f"verifier/{k}": float(v) for k, v in failure_counts(self.verifiers).items()}

    # ------------------------------------------------------------------ rollouts
    def _sharded(self) -> bool:
        return self.device_mesh is not None or "fsdp" in type(self.trainer.strategy).__name__.lower()

    def rollout(
        self, examples: list[dict], step: int, group_size: int, temperature: float, top_p: float, seed_offset: int = 0
    ) -> tuple[Rollouts, Tensor, dict[str, float]]:
        """Generate and score; returns rollouts, rewards [N] and timings."""
        t0 = time.perf_counter()
        was_training = self.policy.training
        self.policy.eval()
        rollouts = generate_rollouts(
            self.policy,
            self.tokenizer,
            [ex["prompt"] for ex in examples],
            group_size=group_size,
            max_new_tokens=self.sampling["max_new_tokens"],
            temperature=temperature,
            top_p=top_p,
            max_prompt_tokens=self.sampling["max_prompt_tokens"],
            seed=step_seed(self.seed + seed_offset, step, self.global_rank),
            synced_gpus=self.trainer.world_size > 1 and self._sharded(),
        )
        self.policy.train(was_training)
        t1 = time.perf_counter()
        answers = [ex["answer"] for ex in examples for _ in range(group_size)]
        names = [ex["verifier"] for ex in examples for _ in range(group_size)]
        rewards = torch.tensor(
            self.score(rollouts.completions, answers, names), dtype=torch.float32, device=self.device
        )
        t2 = time.perf_counter()
        return rollouts, rewards, {"time/generate": t1 - t0, "time/score": t2 - t1}

    # ------------------------------------------------------------------ token statistics
    def token_stats(self, model: torch.nn.Module, rows: dict[str, Tensor], top_k: int) -> TokenStats:
        """TokenStats of the response tokens of ``rows`` under ``model`` at the rollout temperature."""
        return rollout_token_stats(
            model,
            rows,
            top_k,
            self.sampling["temperature"],
            self.stats_chunk_size,
            share_prompt=self.share_prompt and not (self._trainer and self._sharded()),
        )

    @torch.no_grad()
    def _logprobs(self, model: torch.nn.Module, rollouts: Rollouts) -> Tensor:
        """Sampled-token log-probs [N, R] under ``model`` (no grad), micro-batched."""
        out = torch.zeros(rollouts.response_mask.shape, device=self.device)
        for idx in torch.arange(rollouts.num_rows, device=self.device).split(self.micro_batch_size):
            rows = rollouts.rows(idx)
            lp = self.token_stats(model, rows, top_k=0).logprobs
            out[idx, : lp.shape[1]] = lp
        return out

    # ------------------------------------------------------------------ the RL step
    def training_step(self, batch: dict, batch_idx: int) -> None:
        examples, step = batch["examples"], int(batch["step"])
        G = self.group_size
        rollouts, rewards, timings = self.rollout(
            examples, step, G, self.sampling["temperature"], self.sampling["top_p"]
        )
        t_update = time.perf_counter()
        advantages = self.loss_fn.compute_advantages(rewards.view(-1, G)).reshape(-1)

        # Old log-probs are needed only if some token is used after the policy has moved.
        needs_old = self.ppo_epochs * self.num_mini_batches > 1
        old_logprobs = self._logprobs(self.policy, rollouts) if needs_old else None
        ref_logprobs = self._logprobs(self._reference, rollouts) if self._reference is not None else None

        opt = self.optimizers()
        sched = self.lr_schedulers()
        metrics: dict[str, float] = defaultdict(float)
        diagnostics: dict[str, float] = defaultdict(float)
        diag_k = self.diagnostics_top_k
        num_updates = 0
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, 0))
        num_groups = rollouts.num_rows // G
        for _ in range(self.ppo_epochs):
            # Shuffle whole groups, then split them into mini-batches.
            group_order = torch.randperm(num_groups, generator=gen)
            for mb_groups in group_order.tensor_split(self.num_mini_batches):
                if len(mb_groups) == 0:
                    continue
                mb_rows = (mb_groups[:, None] * G + torch.arange(G)).reshape(-1).to(self.device)
                micro = list(mb_rows.split(self.micro_batch_size))
                weights = [aggregation_weight(rollouts.response_mask[i], self.loss_fn.aggregation) for i in micro]
                total_weight = sum(weights) or 1.0
                opt.zero_grad(set_to_none=True)
                for i, (idx, w) in enumerate(zip(micro, weights)):
                    rows = rollouts.rows(idx)
                    stats = self.token_stats(self.policy, rows, top_k=max(self.loss_fn.top_k, diag_k))
                    if num_updates == 0 and diag_k:  # the policy that sampled the rollouts
                        for k, v in concentration_metrics(stats.with_top_k(diag_k), self.diagnostics_tau).items():
                            diagnostics[k] += v * w / total_weight
                    R = stats.mask.shape[1]
                    old = old_logprobs[idx, :R] if needs_old else stats.logprobs.detach()
                    ref = ref_logprobs[idx, :R] if ref_logprobs is not None else None
                    out = self.loss_fn(
                        stats.with_top_k(self.loss_fn.top_k),
                        old_logprobs=old,
                        advantages=advantages[idx],
                        rewards=rewards[idx],
                        ref_logprobs=ref,
                    )
                    if not torch.isfinite(out.loss):
                        raise FloatingPointError(
                            f"non-finite loss {out.loss.item()} at RL step {step}, micro-batch {i}: "
                            f"metrics {out.metrics}. Stopping before the optimizer applies it."
                        )
                    sync = self._no_sync() if i < len(micro) - 1 else nullcontext()
                    with sync:
                        self.manual_backward(out.loss * (w / total_weight))
                    for k, v in out.metrics.items():
                        metrics[k] += v * w / total_weight
                metrics["grad_norm"] += self._clip_and_norm()
                opt.step()
                if sched is not None:
                    sched.step()
                num_updates += 1
        metrics = {f"train/{k}": v / max(num_updates, 1) for k, v in metrics.items()}
        metrics.update({f"diag/{k}": v for k, v in diagnostics.items()})
        timings["time/update"] = time.perf_counter() - t_update
        self.rl_step = step + 1
        self._log_step(rollouts, rewards, metrics, timings)

    def _no_sync(self):
        """Skip the gradient all-reduce on all but the last micro-batch (DDP); a no-op elsewhere."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    def _clip_and_norm(self) -> float:
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        wrapped = self.trainer.strategy.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP1 root: needs its own collective norm
            norm = wrapped.clip_grad_norm_(max_norm)
        else:
            params = [p for p in self.policy.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

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
        }
        for key, value in log.items():
            # Counts are summed over ranks, everything else averaged.
            reduce = "sum" if key in ("solved_all", "solved_none") or key.startswith("verifier/") else "mean"
            name = key if key.startswith(("train/", "time/", "diag/", "verifier/")) else f"train/{key}"
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
                for key, value in concentration_metrics(stats, self.diagnostics_tau).items():
                    self._val_diag[key] += value * len(idx)
                self._val_diag["rows"] += len(idx)

    def on_validation_epoch_end(self) -> None:
        if self.val_pass_at_k.update_count == 0:
            return
        result = self.val_pass_at_k.compute()  # synced across ranks by torchmetrics
        self.val_pass_at_k.reset()
        for k, value in result.items():
            name = f"val/{k}" if isinstance(k, str) else f"val/pass@{k}"
            self.log(name, value, prog_bar=k == 1, rank_zero_only=False)
        diversity = self.val_diversity.compute()
        self.val_diversity.reset()
        rows = self._val_diag.pop("rows", 0.0)
        diagnostics = {key: value / rows for key, value in self._val_diag.items()} if rows else {}
        self._val_diag.clear()
        for key, value in {**diversity, **diagnostics}.items():
            if value == value:  # NaN: undefined here (no solved problem, unknown solution counts)
                self.log(f"val/{key}", value, sync_dist=key in diagnostics, rank_zero_only=False)
