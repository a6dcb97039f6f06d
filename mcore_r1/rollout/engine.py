"""vLLM generation: build an engine from the rollout config and sample n responses per prompt.

This is the single place that talks to vLLM's offline `LLM` API. Today it serves evaluation
(one in-process engine, ``distributed_executor_backend="uni"``); the colocated training engine
(weights refitted in place from Megatron) grows out of this class, so the construction options
and the prompt format live here only.

Prompts go in as `PromptItem`-like objects (``prompt`` text with the chat template already
applied, ``images``): vLLM expands each image into its tokens with the model's processor, using
the same ``min_pixels``/``max_pixels`` as the data loader (`mcore_r1.data.images.pixel_limits`),
and each result carries vLLM's own prompt token ids so callers can check that both agree.

On CPU, vLLM reads its KV-cache size and multiprocessing mode from environment variables at
import time; `configure_cpu_env` sets them (without overriding the user's) before the import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence


@dataclass
class Generation:
    text: str               # decoded with special tokens skipped
    token_ids: list[int]
    finish_reason: Optional[str]


@dataclass
class PromptResult:
    prompt_token_ids: list[int]  # as vLLM tokenised the prompt (images expanded)
    samples: list[Generation]


def configure_cpu_env(kv_cache_gib: float) -> None:
    """vLLM-on-CPU settings that must exist before `import vllm`."""
    from mcore_r1.parallel.device import cuda_available

    if cuda_available():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
    # In-process engine core: starts in ~2 s instead of ~18 s and keeps one process per rank.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def llm_options(model_dir: str | Path, *, tp: int, seed: int, max_model_len: int,
                enforce_eager: bool, on_gpu: bool, gpu_memory_utilization: float = 0.5,
                backend: Optional[str] = None, pixel_limits: Optional[dict] = None,
                max_images_per_prompt: int = 0, sleep_mode: bool = False,
                dtype: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of vLLM's `LLM` for these settings.

    `dtype` is the weights' dtype in vLLM; by default the checkpoint's on GPU and float32 on
    CPU. A colocated engine passes the trainer's, so that a refit copies without converting.

    `sleep_mode` asks for an engine that can free its KV cache and weights while Megatron
    trains (`LLM.sleep`), which vLLM only offers on GPU and only when the engine is built
    with it; on CPU there is nothing to free and the option is left out.
    """
    from mcore_r1.data.images import processor_size

    options: dict[str, Any] = dict(
        model=str(model_dir), tensor_parallel_size=tp, seed=seed,
        max_model_len=max_model_len, enforce_eager=enforce_eager,
        distributed_executor_backend=backend or ("uni" if tp == 1 else None),
        dtype=dtype or ("auto" if on_gpu else "float32"),
    )
    if on_gpu:
        options["gpu_memory_utilization"] = gpu_memory_utilization
        if sleep_mode:
            options["enable_sleep_mode"] = True
    if pixel_limits is not None:  # a vision-language model
        options["limit_mm_per_prompt"] = {"image": max(1, max_images_per_prompt), "video": 0}
        options["mm_processor_kwargs"] = processor_size(pixel_limits)  # same as the trainer's
    options.update(extra)
    return options


def build_llm(model_dir: str | Path, *, kv_cache_gib: float, **settings: Any):
    """The one place a vLLM `LLM` is constructed (evaluation and colocated rollout alike);
    `settings` are `llm_options`' arguments but `on_gpu`, which is detected here.

    `backend` is vLLM's ``distributed_executor_backend``; by default an in-process ("uni")
    engine at TP=1 and vLLM's own choice otherwise. The colocated engine passes
    ``"external_launcher"`` so that vLLM joins the training processes' torch.distributed world.
    """
    from mcore_r1.parallel.device import cuda_available

    configure_cpu_env(kv_cache_gib)
    from vllm import LLM

    return LLM(**llm_options(model_dir, on_gpu=cuda_available(), **settings))


class VLLMGenerator:
    """An offline vLLM engine for one checkpoint directory."""

    def __init__(self, model_dir: str | Path, rollout_cfg: Any, max_model_len: int,
                 pixel_limits: Optional[dict] = None, max_images_per_prompt: int = 0):
        self.llm = build_llm(
            model_dir, tp=rollout_cfg.tp, seed=rollout_cfg.seed, max_model_len=max_model_len,
            enforce_eager=rollout_cfg.enforce_eager, kv_cache_gib=rollout_cfg.cpu_kv_cache_gib,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            pixel_limits=pixel_limits, max_images_per_prompt=max_images_per_prompt,
        )

    def generate(self, prompts: Sequence[Any], n: int, temperature: float, top_p: float = 1.0,
                 top_k: int = -1, max_tokens: int = 128) -> list[PromptResult]:
        """`n` samples for each prompt (objects with ``prompt`` and ``images``), in order."""
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                max_tokens=max_tokens)
        requests = []
        for p in prompts:
            images = list(getattr(p, "images", None) or [])
            requests.append({"prompt": p.prompt, "multi_modal_data": {"image": images}} if images
                            else {"prompt": p.prompt})
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [PromptResult(list(out.prompt_token_ids),
                             [Generation(o.text, list(o.token_ids), o.finish_reason) for o in out.outputs])
                for out in outputs]
