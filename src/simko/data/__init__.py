"""Prompt data for RLVR: sources of {id, question, answer, verifier} examples and the DataModule.

* ``LocalFileSource``: JSONL / JSON list / parquet files (incl. the official SimKO verl parquet files), Hugging Face
  datasets (``hf://NAME``) and dataset folders;
* ``ArithmeticSource``: procedural integer arithmetic for the tiny CPU model;
* ``PromptDataModule``: deterministic per-step, rank-sharded, resumable prompt batches;
* ``render_prompt``: instruction template + optional chat template -> the text fed to the model.
"""

from simko.data.arithmetic import ArithmeticSource
from simko.data.datamodule import PromptDataModule, render_prompt
from simko.data.sources import LocalFileSource

__all__ = ["ArithmeticSource", "LocalFileSource", "PromptDataModule", "render_prompt"]
