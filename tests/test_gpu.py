"""On a CUDA GPU: token statistics, an RL step under bf16-mixed with its memory metric, seeded sampling.

Skipped without CUDA (this machine, CI); ``scripts/gpu_smoke.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from helpers import digit_tokenizer, random_qwen2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rows(tok, n: int = 6, seed: int = 0) -> dict:
    """Rollout rows of ragged prompts and responses (left-padded prompts, right-padded responses)."""
    from simko.rollout import build_rollouts

    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(2, 14, (int(k),), generator=g).tolist() for k in torch.randint(2, 7, (n // 2,), generator=g)
    ]
    responses = [torch.randint(2, 14, (int(k),), generator=g).tolist() for k in torch.randint(1, 9, (n,), generator=g)]
    rollouts = build_rollouts(tok, prompts, responses, 2, [1])
    return rollouts.rows(torch.arange(rollouts.num_rows))


def test_token_stats_on_cuda_equal_cpu():
    """The update's token statistics (log-probs, entropy, top-k) on the GPU equal the CPU's in fp32 (TF32 off)."""
    from simko.forward import rollout_token_stats

    torch.backends.cuda.matmul.allow_tf32 = False
    tok, model = digit_tokenizer(), random_qwen2()
    batch = rows(tok)
    cpu = rollout_token_stats(model, batch, 3, 1.0, 4, share_prompt=True)
    on_gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    gpu = rollout_token_stats(model.cuda(), on_gpu, 3, 1.0, 4, share_prompt=True)
    for name in ("logprobs", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-4, atol=1e-5)


def test_rl_step_bf16_mixed_logs_time_and_peak_memory(tmp_path):
    """Two RL steps on the GPU with bf16-mixed: weights change, time/step and mem/max_allocated_gib are logged."""
    import lightning.pytorch as pl

    from helpers import make_loss
    from simko.data import ArithmeticSource, PromptDataModule
    from simko.module import RLVRModule

    tok, policy = digit_tokenizer(), random_qwen2()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    module = RLVRModule(
        policy,
        tok,
        make_loss("grpo"),
        torch.optim.AdamW,
        group_size=4,
        max_new_tokens=6,
        micro_batch_size=8,
        val_samples=2,
        overlong={"buffer": 4},
    )  # fmt: skip  (rewards vary)
    data = PromptDataModule(ArithmeticSource(seed=0, split="train"), prompts_per_step=4, prompt_template="{question}=",
                            use_chat_template=False, tokenizer=tok)  # fmt: skip
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    assert logged["mem/max_allocated_gib"] > 0 and logged["time/step"] > 0
    assert any(not torch.equal(before[k], v.cpu()) for k, v in policy.state_dict().items())


def test_hf_engine_samples_the_same_with_the_same_seed_on_cuda():
    from simko.engines import Sampling, build_engine

    tok, model = digit_tokenizer(), random_qwen2().cuda()
    engine = build_engine("hf", model, tok)
    prompts = [tok("12+34=")["input_ids"], tok("7+8=")["input_ids"]]
    a = engine.generate(prompts, 3, Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5))
    b = engine.generate(prompts, 3, Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5))
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.is_cuda
