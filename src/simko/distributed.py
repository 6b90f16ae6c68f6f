"""Everything that depends on the Lightning strategy (configs/trainer/*.yaml), in one place.

- :func:`is_sharded`: FSDP (``FSDPStrategy``) or FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), where
  generation must keep ranks in lockstep and a second forward inside one backward is impossible;
- :func:`transformer_blocks`: the policy's decoder blocks (the unit of FSDP2 sharding and of activation
  checkpointing, :func:`simko.forward.enable_checkpointing`);
- :func:`shard_fsdp2`: the FSDP2 sharding of the policy (``RLVRModule.configure_model``);
- :func:`transformer_block_policy`: FSDP1's auto-wrap policy;
- :func:`max_over_ranks`: one count all ranks agree on (token-budget micro-batches under FSDP);
- :func:`no_sync`: skip DDP's gradient all-reduce on all but the last micro-batch;
- :func:`clip_grad_norm`: the global gradient norm and clipping under every strategy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, ParallelStrategy, Strategy

DECODER_BLOCKS = ("Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer")


def is_sharded(strategy: Strategy | None) -> bool:
    """Whether parameters are sharded across ranks (FSDP1 or FSDP2); False without a strategy (no trainer)."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def transformer_blocks(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers model (or a peft model around one): the modules whose class is one of
    the model's ``_no_split_modules``, or derives from one (FSDP2's ``fully_shard`` turns a ``Qwen2DecoderLayer``
    into an ``FSDPQwen2DecoderLayer`` subclass); an error naming the model when there are none."""
    block_names = set(getattr(policy, "_no_split_modules", None) or [])
    blocks = [m for m in policy.modules() if any(c.__name__ in block_names for c in type(m).__mro__)]
    if not blocks:
        raise RuntimeError(f"found no transformer blocks ({block_names}) in {type(policy).__name__}")
    return blocks


def shard_fsdp2(policy: torch.nn.Module, mesh) -> None:
    """FSDP2: ``fully_shard`` every transformer block over ``mesh``, then the whole policy as the root."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(policy, FSDPModule):  # already sharded (validate() ran before fit())
        return
    for block in transformer_blocks(policy):
        fully_shard(block, mesh=mesh)
    # The root keeps its parameters unsharded between forward and backward, which the chunked LM head
    # (applied after the forward, in TokenStats.from_hidden) relies on.
    fully_shard(policy, mesh=mesh)


def transformer_block_policy(block_names: tuple[str, ...] | list[str] = DECODER_BLOCKS):
    """An FSDP1 ``auto_wrap_policy`` that wraps every decoder block, matched by class name.

    By name rather than by class so the YAML needs no import of a model-specific class; add names for other
    architectures (``trainer.strategy.auto_wrap_policy.block_names=[...]``).
    """
    names = set(block_names)

    def policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return True if recurse else type(module).__name__ in names

    return policy


def max_over_ranks(strategy: Strategy, value: int) -> int:
    """The largest ``value`` of all ranks (ranks agree on a count of forwards: FSDP's collectives need it)."""
    if strategy.world_size == 1:
        return value
    return int(strategy.reduce(torch.tensor(value, device=strategy.root_device), reduce_op="max"))


def no_sync(strategy: Strategy) -> AbstractContextManager:
    """Skip the gradient all-reduce of this backward (DDP); a no-op under every other strategy."""
    return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()


def clip_grad_norm(strategy: Strategy, policy: torch.nn.Module, max_norm: float) -> float:
    """Clip the policy's gradients to the global norm ``max_norm`` (0 or less: no clipping); return the norm."""
    from torch.distributed.tensor import DTensor

    max_norm = max_norm if max_norm and max_norm > 0 else float("inf")
    if isinstance(strategy, FSDPStrategy):  # FSDP1: the root computes the norm over all ranks' shards
        norm = strategy.model.clip_grad_norm_(max_norm)
    else:
        params = [p for p in policy.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    if isinstance(norm, DTensor):  # FSDP2: the norm of sharded gradients is a DTensor
        norm = norm.full_tensor()
    return float(norm)
