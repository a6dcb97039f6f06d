"""Datasets for RL prompts: sources, record formats, images, prompt building, sampling.

Flow: `sources.read_rows` (files, folders, saved datasets, local hub caches) -> `formats`
(EasyR1 or LMM-R1 records to one `Example`) -> `prompts` (format prompt, system prompt, chat
template) -> `dataset.PromptDataset` (tokenise with the model's processor, filter over-long
prompts) -> `sampler.ResumableSampler`. `synthetic` makes the offline counting/arithmetic tasks.
"""

from mcore_r1.data.dataset import (LoadStats, PromptDataset, PromptItem, load_processor,
                                   resolve_source, tokenize_prompt)
from mcore_r1.data.errors import DataError
from mcore_r1.data.sampler import ResumableSampler

__all__ = ["DataError", "LoadStats", "PromptDataset", "PromptItem", "ResumableSampler",
           "load_processor", "resolve_source", "tokenize_prompt"]
