"""The vLLM engine arguments built for CPU and GPU (`llm_options`), checked against vLLM's own
argument parser so that a renamed or removed option fails here instead of on a GPU cluster."""

import dataclasses

import pytest

from mcore_r1.rollout.engine import llm_options

COMMON = dict(tp=2, seed=3, max_model_len=512, enforce_eager=True)


def engine_fields() -> set[str]:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


@pytest.mark.parametrize("on_gpu", [False, True])
def test_every_option_is_an_engine_argument(on_gpu):
    options = llm_options("/m", on_gpu=on_gpu, sleep_mode=True, backend="external_launcher",
                          pixel_limits={"min_pixels": 3136, "max_pixels": 12544},
                          max_images_per_prompt=2, **COMMON)
    assert set(options) <= engine_fields()


def test_colocated_gpu_engine_can_sleep_and_cpu_engine_is_float32():
    gpu = llm_options("/m", on_gpu=True, sleep_mode=True, gpu_memory_utilization=0.4, **COMMON)
    assert gpu["enable_sleep_mode"] is True and gpu["dtype"] == "auto"
    assert gpu["gpu_memory_utilization"] == 0.4
    cpu = llm_options("/m", on_gpu=False, sleep_mode=True, **COMMON)
    assert "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu
    assert cpu["dtype"] == "float32"
    # Evaluation engines never sleep.
    assert "enable_sleep_mode" not in llm_options("/m", on_gpu=True, **COMMON)


def test_single_rank_engines_run_in_process():
    assert llm_options("/m", on_gpu=False, **{**COMMON, "tp": 1})["distributed_executor_backend"] == "uni"
    assert llm_options("/m", on_gpu=False, **COMMON)["distributed_executor_backend"] is None



def vllm_dtype_names() -> set[str]:
    import typing

    from vllm.config.model import ModelConfig

    literal = next(a for a in typing.get_args(typing.get_type_hints(ModelConfig)["dtype"])
                   if typing.get_origin(a) is typing.Literal)
    return set(typing.get_args(literal))


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_colocated_engine_takes_the_trainers_dtype(name):
    # hybrid workers pass str(training dtype) without "torch.": vLLM must know each such name
    for on_gpu in (False, True):
        assert llm_options("/m", on_gpu=on_gpu, dtype=name, **COMMON)["dtype"] == name
    assert name in vllm_dtype_names()
