"""The papers' recipes (configs/experiment/paper_*.yaml): each composes, builds (the tiny model and the CPU
substituted for the 7B/3B model and the 8 GPUs) and carries the official run's numbers, listed here from the
official scripts (github.com/CLR-Lab/SimKO commit 306f4ff: run_qwen2.5-math-7b_{SimKO,grpo}.sh,
run_llama3.2-3b_{SimKO,grpo}.sh, verl/trainer/config/ppo_trainer.yaml, verl/utils/dataset/rl_dataset.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import UNTRAINED_TINY, shared_file
from simko.losses.grpo import GRPOLoss
from simko.losses.simko import SimKOLoss
from simko.train import build

# trainer.* and model.* replaced so that the preset builds here: a 1-layer untrained tiny model, the CPU
TINY_ON_CPU = [
    "model=tiny",
    *UNTRAINED_TINY,
    "model.max_position_embeddings=4096",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
]

# the official prompt text (rl_dataset.py, prompt_template_type "qwen", the default, used by all four runs)
OFFICIAL_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{input}\nPlease reason step by "
    "step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
)

# experiment: (train file, loss class, entropy_coef, RL steps = 20 epochs x floor(rows / 1024), test_freq, save_freq)
RECIPES = {
    "paper_simko_qwen_math": ("math/train.parquet", SimKOLoss, 0.0, 140, 14, 7),  # entropy detached there: inert
    "paper_grpo_qwen_math": ("math/train.parquet", GRPOLoss, 0.001, 140, 7, 7),  # inherits entropy_coeff 0.001
    "paper_simko_llama_level1": ("gsm8k_level1/train.parquet", SimKOLoss, 0.0, 160, 8, 8),  # entropy_coeff=0
    "paper_grpo_llama_level1": ("gsm8k_level1/train.parquet", GRPOLoss, 0.0, 160, 8, 8),  # entropy_coeff=0
}


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_paper_recipe_composes_builds_and_has_the_official_numbers(compose_train, experiment):
    train_file, loss_cls, entropy_coef, rl_steps, test_freq, save_freq = RECIPES[experiment]
    shared_file(f"simko-official/{train_file}")
    shared_file("simko-official/math/test.parquet")
    as_shipped = compose_train(f"experiment={experiment}", "model.name_or_path=/models/x")
    # the one command on 8 GPUs: model=hf (its path on the command line), FSDP2, bf16 autocast over fp32 weights
    assert as_shipped.model._target_ == "simko.models.load_pretrained" and as_shipped.model.dtype == "float32"
    trainer = as_shipped.trainer
    assert (trainer.accelerator, trainer.devices, trainer.precision) == ("gpu", 8, "bf16-mixed")
    assert trainer.strategy._target_ == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert trainer.val_check_interval == test_freq and as_shipped.validate_first is False  # val_before_train=False

    cfg = compose_train(f"experiment={experiment}", *TINY_ON_CPU)
    module, datamodule, trainer = build(cfg)
    loss = module.loss_fn
    assert type(loss) is loss_cls and loss.entropy_coef == entropy_coef
    assert (loss.clip_low, loss.clip_high, loss.aggregation, loss.kl_coef) == (0.2, 0.2, "token_mean", 0.0)
    assert (loss.subset, loss.dual_clip_c) == ("all", None)
    if loss_cls is SimKOLoss:  # top_k=3, mix_topk_coef=0.01, tau=0.8; lambda 1.1 is hard-coded there
        assert (loss.k, loss.alpha, loss.lam, loss.tau) == (3, 0.01, 1.1, 0.8)
    # rollouts: n=8, temperature 1, top_p 1, max_response_length 3072, max_prompt_length 1024
    assert (module.group_size, module.temperature, module.top_p) == (8, 1.0, 1.0)
    assert (module.max_new_tokens, module.max_prompt_tokens) == (3072, 1024)
    # update: 1024 prompts, ppo_mini_batch_size 256 -> 4 optimizer steps, 1 epoch, grad clip 1
    assert datamodule.prompts_per_step == 1024 and (module.ppo_epochs, module.num_mini_batches) == (1, 4)
    assert module.grad_clip == 1.0
    optimizer = module.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.AdamW) and module.scheduler_factory is None  # constant lr
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-6, 0.01, (0.9, 0.999))
    # run length and checkpoints (optimizer steps: 4 per RL step)
    assert trainer.max_steps == rl_steps * 4
    checkpoints = cfg.callbacks.model_checkpoint  # in RL steps, as verl's save_freq
    assert checkpoints.every_n_steps == checkpoints.last_every_n_steps == save_freq
    rows = len(pd.read_parquet(shared_file(f"simko-official/{train_file}")))
    assert rl_steps == 20 * (rows // 1024)  # total_epochs=20, verl's train loader drops the last partial batch
    # validation: MATH test, one greedy completion per problem
    assert str(datamodule.val_source.path).endswith("simko-official/math/test.parquet") and len(datamodule.val_source)
    assert datamodule.val_prompts is None
    assert module.val_sampling["group_size"] == 1 and module.val_sampling["temperature"] <= 1e-5
    # the prompt text is the official one, character for character
    example = datamodule.train_source[0]
    official = pd.read_parquet(shared_file(f"simko-official/{train_file}")).iloc[0]["prompt"][0]["content"]
    assert example["question"] == official
    assert datamodule._render(dict(example))["prompt"] == OFFICIAL_TEMPLATE.replace("{input}", official)


def test_the_recipes_validation_temperature_is_greedy_decoding():
    """module.val_temperature 1e-6 (their validation: do_sample=False): the HF engine's samples are the greedy
    completions, whatever the seed."""
    from helpers import digit_tokenizer, random_qwen2
    from simko.engines.hf import generate_rollouts

    tok, model = digit_tokenizer(), random_qwen2(seed=3)
    prompts = ["12+3=", "5+5=", "71+40="]
    inputs = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    greedy = model.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=1)
    greedy_text = tok.batch_decode(greedy[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for seed in (0, 1):
        rollouts = generate_rollouts(model, tok, prompts, group_size=2, max_new_tokens=8, temperature=1e-6, seed=seed)
        assert rollouts.completions == [text for text in greedy_text for _ in range(2)]
    hot = generate_rollouts(model, tok, prompts, group_size=2, max_new_tokens=8, temperature=1.0, seed=0)
    assert hot.completions != rollouts.completions  # the test can fail: sampling at temperature 1 differs
