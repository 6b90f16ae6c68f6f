"""simko-lightning: RLVR for language models (GRPO, SimKO, the pass@k loss family) on Lightning + Hydra."""

__version__ = "0.1.0"
