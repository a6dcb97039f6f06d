"""Read a vLLM model's weights back exactly, whatever the CPU kernels did to them.

On CPU vLLM hands linear weights to packed GEMM kernels (oneDNN / sgl) and drops the plain
tensor, so the stored layout is opaque. Multiplying by the identity through the layer's own
kernel returns W^T exactly (every output element is one product with 1.0 plus exact zeros),
so the comparison sees precisely what generation uses. Other tensors are read directly.
"""

import torch


def vllm_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        linear = getattr(module, "cpu_linear", None)
        if isinstance(weight, torch.Tensor) and linear is not None:
            # probe even when a plain weight is kept (tied LM head): the kernel's handle is
            # what generation uses, and it is where stale weights would hide
            k = weight.shape[1] if weight.numel() else module.input_size_per_partition
            eye = torch.eye(k, dtype=torch.float32)
            with torch.no_grad():
                out[f"{name}.weight"] = linear(eye, weight, None).t().contiguous()
        elif isinstance(weight, torch.Tensor) and weight.numel():
            out[f"{name}.weight"] = weight.detach().clone()
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.numel():
            out[f"{name}.bias"] = bias.detach().clone()
    return out


def fuse_like_vllm(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors of a dense Qwen2/Llama model under vLLM's module names (q/k/v and gate/up
    concatenated as vLLM stores them at TP=1)."""
    out, done = {}, set()
    for name, t in hf.items():
        if ".q_proj." in name:
            k, v = name.replace("q_proj", "k_proj"), name.replace("q_proj", "v_proj")
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([t, hf[k], hf[v]])
            done |= {k, v}
        elif ".gate_proj." in name:
            up = name.replace("gate_proj", "up_proj")
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, hf[up]])
            done.add(up)
        elif name not in done and ".k_proj." not in name and ".v_proj." not in name \
                and ".up_proj." not in name:
            out[name] = t
    return out
