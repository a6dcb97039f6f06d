"""A vLLM engine living inside a training process, refitted in place from Megatron.

Every training rank holds one vLLM worker. Rollout TP is chosen independently of training
TP/PP; the engine only has to know how the training world is cut into rollout replicas:

* rollout TP = 1: each process runs its own in-process engine ("uni" executor); the training
  world holds `world` replicas that share the prompts.
* rollout TP > 1: replicas of `rollout_tp` consecutive ranks, with vLLM's
  ``external_launcher`` executor, which joins the torch.distributed world the trainer already
  created (Megatron's groups and vLLM's groups coexist over gloo on CPU); with more than one
  replica vLLM runs them as its data-parallel ranks.

Weights arrive through `reload`, which runs *inside* the vLLM worker (``collective_rpc`` with
a function, so a lazy iterator of tensors crosses no process boundary) and uses vLLM's layerwise
in-place reload: each layer is rebuilt from checkpoint-format tensors, re-packed for the CPU
kernels and copied back into the live storage.

Zero-gather reloads (`local_shards=True`): when rollout TP equals training TP, each rank
passes only its own block of every HF tensor. vLLM's loaders would slice that block again at
offset ``tp_rank * size``; for the duration of the reload every TP-sharded layer is told it is
rank 0 (vLLM does the same internally for replicated shards) and every vocab-parallel
embedding that its rows start at 0, so blocks are copied as they are. The caller checks first
that vLLM's vocab rows per rank are the ones Megatron holds (`vocab_rows`).

CPU weight layouts (`cpu_weights`). vLLM's CPU backend replaces every linear weight by a
oneDNN-packed copy after loading ("packed", the default). An in-place reload must then rebuild
each layer and re-pack it, which measured 1.1-3.3 s for a 0.5B float32 model, 11-33x a copy of
the same bytes. With "plain" the engine is built keeping each linear layer's weight as an
ordinary tensor, multiplied by oneDNN's matmul on the plain layout (`parallel.cpu_gemm`); a
refit is then vLLM's own `load_weights` copying into the live parameters, measured 1.1x a copy.
The price is decode speed: 119 against 146 tokens/s on that model, and 10.6-11.0 s against
8.1-9.3 s of generation per step in the end-to-end benchmark, whose refit saves only 0.2 s;
hence "packed" by default. On GPU there is no repacking and the choice does not apply.

One repair for "packed" lives here: a tied LM head shares the embedding's storage, but vLLM
also builds a packed GEMM handle for it at start-up. The in-place reload refreshes the
embedding and leaves that handle pointing at the *old* weights (vLLM logs "ParallelLMHead:
Failed to load weights" and carries on), so after every reload the head's handle is rebuilt.
With "plain" the head multiplies by the live embedding and nothing goes stale.

Sleep/wake (freeing KV cache and weights while Megatron trains) only exists on GPU, where the
engine is built with vLLM's sleep mode; on CPU both are no-ops. Sleep is level 1 (weights
kept in host memory), not level 2 (weights dropped): a refit sends only trainable weights, so
a frozen vision tower must survive the sleep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from mcore_r1.rollout.engine import build_llm


@dataclass
class SamplingOptions:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    stop: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False  # sample until max_tokens (fixed-length responses)

    def to_vllm(self):
        from vllm import SamplingParams

        # logprobs=0: the sampled token's own log-prob. vLLM's default logprobs mode is
        # "raw_logprobs" (before temperature/top-p), i.e. the policy's log-probs.
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, max_tokens=self.max_tokens, stop=self.stop,
                              stop_token_ids=self.stop_token_ids, seed=self.seed, logprobs=0,
                              ignore_eos=self.ignore_eos)


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # the rollout engine's log-prob of each sampled token
    finish_reason: Optional[str]
    text: str = ""


@dataclass
class RolloutResult:
    prompt_token_ids: list[int]
    samples: list[Sample] = field(default_factory=list)


def replica_layout(world: int, rank: int, rollout_tp: int) -> tuple[int, int]:
    """(replica index, number of replicas) of this rank; refuses TPs that do not divide."""
    if rollout_tp < 1 or world % rollout_tp:
        raise ValueError(f"rollout TP {rollout_tp} does not divide the training world of {world}")
    return rank // rollout_tp, world // rollout_tp


def _executor_options(world: int, rollout_tp: int) -> dict:
    """vLLM executor settings for `world // rollout_tp` replicas of TP `rollout_tp`."""
    if rollout_tp == 1:
        return {"backend": "uni"}
    # consecutive ranks form one replica, as Megatron's TP groups do (rank // rollout_tp)
    return {"backend": "external_launcher", "data_parallel_size": world // rollout_tp}


def _as_request(prompt: Any) -> dict:
    """Token ids, text, or a dict already in vLLM's prompt format (e.g. with images)."""
    if isinstance(prompt, dict):
        return prompt
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt_token_ids": [int(t) for t in prompt]}


class ColocatedEngine:
    """One rank's share of a vLLM rollout engine, built from an HF directory (config,
    tokenizer, initial weights) and refitted from Megatron afterwards."""

    def __init__(self, model_dir: str | Path, rollout_tp: int = 1, max_model_len: int = 512,
                 seed: int = 0, kv_cache_gib: float = 1.0, enforce_eager: bool = True,
                 pixel_limits: Optional[dict] = None, max_images_per_prompt: int = 0,
                 cpu_weights: str = "packed", **engine_options: Any):
        import torch.distributed as dist

        # The refit hands vLLM a lazy iterator of tensors living in this process, so the engine
        # core (and its worker) must run in-process, on GPU as on CPU.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("a colocated vLLM engine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                             "(the refit passes tensors in memory to the in-process worker)")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.rollout_tp = rollout_tp
        self.replica, self.num_replicas = replica_layout(self.world, self.rank, rollout_tp)
        self.model_dir = Path(model_dir)
        self.checkpoint_shapes: Optional[dict] = None  # filled by the first refit
        if cpu_weights not in CPU_WEIGHT_LAYOUTS:
            raise ValueError(f"cpu_weights={cpu_weights!r}: expected one of {CPU_WEIGHT_LAYOUTS}")
        plain = cpu_weights == "plain" and _on_cpu()
        with _plain_cpu_linear_weights() if plain else contextlib.nullcontext():
            self.llm = build_llm(
                model_dir, tp=rollout_tp, seed=seed, max_model_len=max_model_len,
                enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib,
                **_executor_options(self.world, rollout_tp), pixel_limits=pixel_limits,
                max_images_per_prompt=max_images_per_prompt, sleep_mode=True, **engine_options,
            )
        # the layout actually built ("plain" needs every linear weight to have survived)
        self.plain_weights = plain and self.llm.collective_rpc(_linear_weights_kept)[0]

    # -- generation -------------------------------------------------------------------------

    def my_share(self, items: Sequence[Any]) -> list:
        """This replica's contiguous slice of `items` (every rank of a replica gets the same
        slice, as the external launcher requires); replicas split the batch evenly."""
        per, extra = divmod(len(items), self.num_replicas)
        start = self.replica * per + min(self.replica, extra)
        return list(items[start:start + per + (self.replica < extra)])

    def generate(self, prompts: Sequence[Any], options: SamplingOptions,
                 seeds: Optional[Sequence[int]] = None) -> list[RolloutResult]:
        """Sample `options.n` responses per prompt; every rank of a replica passes the same
        prompts (external launcher) and gets the same results.

        `seeds` gives each prompt its own random stream (vLLM seeds response i of a prompt
        with seed + i): a prompt's responses then depend neither on the batch it is in nor on
        what the engine sampled before, which is what makes an interrupted run resumable."""
        if seeds is None:
            params = options.to_vllm()
        else:
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            params = [dataclasses.replace(options, seed=int(s)).to_vllm() for s in seeds]
        outputs = self.llm.generate([_as_request(p) for p in prompts], params, use_tqdm=False)
        results = []
        for out in outputs:
            samples = []
            for o in out.outputs:
                lps = [step[tok].logprob for step, tok in zip(o.logprobs or [], o.token_ids)]
                samples.append(Sample(list(o.token_ids), lps, o.finish_reason, o.text))
            results.append(RolloutResult(list(out.prompt_token_ids), samples))
        return results

    # -- weights ----------------------------------------------------------------------------

    def reload(self, weights: Iterable[tuple[str, torch.Tensor]], local_shards: bool = False) -> int:
        """Load HF-named tensors in place; returns how many tensors vLLM consumed.

        Full tensors by default (vLLM's loaders slice them for this TP rank); with
        `local_shards` each tensor is already this rank's contiguous block."""
        try:
            return self.llm.collective_rpc(
                _reload_in_worker, args=(weights, local_shards, self.plain_weights))[0]
        finally:
            self._forget_derived_state()

    def _forget_derived_state(self) -> None:
        """Drop everything computed from the old weights: cached prefix KV blocks (a repeated
        prompt would otherwise reuse KV from before the refit) and the scheduler's record of
        cached image embeddings (the worker's copies are cleared by the reload itself; a stale
        record makes vLLM fail with "Encoder cache miss")."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def vocab_rows(self) -> dict[str, tuple[int, int]]:
        """Module name -> [start, end) of the real vocabulary rows this rank's vLLM holds."""
        def rows(worker):
            from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

            return {name: (m.shard_indices.org_vocab_start_index, m.shard_indices.org_vocab_end_index)
                    for name, m in worker.model_runner.get_model().named_modules()
                    if isinstance(m, VocabParallelEmbedding)}

        return self.llm.collective_rpc(rows)[0]

    def vllm_model(self) -> torch.nn.Module:
        """This process's vLLM model (in-process executors only; for checks and tests)."""
        return self.llm.collective_rpc(lambda worker: worker.model_runner.get_model())[0]

    def sleep(self) -> None:
        """Free KV cache and weights while Megatron trains (GPU); nothing to free on CPU."""
        from mcore_r1.parallel.device import cuda_available

        if cuda_available():
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        from mcore_r1.parallel.device import cuda_available

        if cuda_available():
            self.llm.wake_up()

    def close(self) -> None:
        """Shut the engine down while torch.distributed is still up (vLLM tears down its
        groups on shutdown and fails if the default group is already gone). With the external
        launcher vLLM's shutdown also destroys the default group: close last."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None


def _reload_in_worker(worker, weights: Iterable[tuple[str, torch.Tensor]],
                      local_shards: bool, plain_weights: bool) -> int:
    """Runs inside the vLLM worker. Plain CPU weights: vLLM's loaders copy straight into the
    live parameters (nothing to re-pack). Otherwise vLLM's layerwise in-place reload, then the
    repair of CPU-packed tied heads."""
    counted = _Counter(weights)
    model = worker.model_runner.get_model()
    with _local_shard_loading(model) if local_shards else contextlib.nullcontext():
        if plain_weights:
            model.load_weights(iter(counted))
            worker.model_runner.reset_encoder_cache()
            worker.model_runner.reset_mm_cache()
        else:
            worker.reload_weights(weights_iterator=iter(counted))
    if not plain_weights:
        _refresh_tied_heads(model)
    return counted.count


@contextlib.contextmanager
def _local_shard_loading(model: torch.nn.Module):
    """Make vLLM's loaders take pre-sliced blocks: TP rank 0 for sharded linear layers (module
    and parameters, including the meta copies the layerwise reload re-creates parameters
    from) and row offset 0 for vocab-parallel embeddings. Everything is restored on exit."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    saved: list[tuple[object, str, object]] = []

    def override(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        for layer in model.modules():
            if isinstance(layer, LinearBase) and getattr(layer, "tp_size", 1) > 1:
                override(layer, "tp_rank", 0)
                restore = get_layerwise_info(layer).restore_metadata  # empty unless reloading
                meta_params = restore[0].values() if restore else ()
                for param in [*meta_params, *layer.parameters(recurse=False)]:
                    if hasattr(param, "tp_rank"):
                        override(param, "tp_rank", 0)
            elif isinstance(layer, VocabParallelEmbedding) and layer.tp_size > 1:
                idx = layer.shard_indices
                local = idx.org_vocab_end_index - idx.org_vocab_start_index
                override(layer, "shard_indices", dataclasses.replace(
                    idx, org_vocab_start_index=0, org_vocab_end_index=local))
                override(layer, "org_vocab_size", local)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


class _Counter:
    def __init__(self, items):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def _refresh_tied_heads(model: torch.nn.Module) -> None:
    """Rebuild the CPU GEMM handle of LM heads that share the embedding's weight.

    The reload copies new values into the embedding's storage; a tied head has no checkpoint
    tensor of its own, so vLLM never re-runs its post-load processing and its packed copy
    would stay stale.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead, VocabParallelEmbedding,
    )

    embeddings = {m.weight.data_ptr() for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and module.weight.data_ptr() in embeddings:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


# -- plain CPU weights ------------------------------------------------------------------------

CPU_WEIGHT_LAYOUTS = ("plain", "packed")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@contextlib.contextmanager
def _plain_cpu_linear_weights():
    """While the engine is built, vLLM's CPU GEMM dispatch keeps 2-D linear weights as they are
    and multiplies with `cpu_gemm.linear` (weights of other shapes keep vLLM's handling)."""
    import vllm.model_executor.layers.utils as vllm_utils

    from mcore_r1.parallel import cpu_gemm

    original = getattr(vllm_utils, "dispatch_cpu_unquantized_gemm", None)
    if original is None:  # a vLLM without this hook: it builds "packed"; checked after build
        yield
        return

    def keep_plain_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2 or layer.weight.is_meta:
            return original(layer, remove_weight)
        layer.cpu_linear = cpu_gemm.linear

    vllm_utils.dispatch_cpu_unquantized_gemm = keep_plain_weight
    try:
        yield
    finally:
        vllm_utils.dispatch_cpu_unquantized_gemm = original


def _linear_weights_kept(worker) -> bool:
    from vllm.model_executor.layers.linear import LinearBase

    return all(m.weight.numel() > 0 for m in worker.model_runner.get_model().modules()
               if isinstance(m, LinearBase) and hasattr(m, "weight"))
