"""A small Megatron GPTModel, sharded by hand, for the TP/PP equivalence tests.

The reference is the unsharded model run directly (no schedule) with torch's own cross entropy.
Sharded runs load the reference weights cut up with independent rules (`shard_full_tensor`)
and run through Megatron's `get_forward_backward_func`, so the test covers the schedule, the
p2p transfers, the vocab-parallel loss and the TP collectives together.
"""

from __future__ import annotations

import torch

VOCAB, SEQ, MICRO_BATCHES = 128, 16, 2
NUM_LAYERS = 4


def gpt_config(tp: int, pp: int, sequence_parallel: bool = False):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, ffn_hidden_size=96, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=True,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
    )


def build_gpt(config, tied: bool):
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
        max_sequence_length=64, position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
        pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage(),
    )


def causal_mask(seq: int = SEQ) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def make_batch(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def global_layer_name(name: str, pp_rank: int, pp: int) -> str:
    """Map a stage-local parameter name (decoder.layers.i...) to the unsharded model's name."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + pp_rank * NUM_LAYERS // pp)
    return ".".join(parts)


def shard_full_tensor(name: str, full: torch.Tensor, param, tp_rank: int, tp: int) -> torch.Tensor:
    """Cut the unsharded tensor into this rank's piece (independent of Megatron's own code)."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):
        # SwiGLU: the unsharded weight is [gate; up]; each rank holds [gate_r; up_r].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def reference(tied: bool, seed: int = 1234) -> dict:
    """Unsharded forward/backward in a world of one process; returns weights, logits, grads."""
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(1), seed=seed)
    torch.manual_seed(seed)
    model = build_gpt(gpt_config(1, 1), tied)
    with torch.no_grad():  # give the norms non-trivial weights so their grads mean something
        for name, p in model.named_parameters():
            if "layernorm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    tokens, labels = make_batch()
    pos = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCHES, -1)
    logits = model(tokens, pos, causal_mask())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    loss.backward()
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None
                  and "_extra_state" not in k},
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }


def sharded_run(rank: int, world_size: int, ref: dict, tp: int, pp: int, tied: bool,
                sequence_parallel: bool = False) -> dict:
    """Load `ref`'s weights into a TP x PP layout, run the schedule, report max differences."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp))
    tp_rank, pp_rank = mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank()
    config = gpt_config(tp, pp, sequence_parallel)
    model = build_gpt(config, tied)
    params = dict(model.named_parameters())
    state = {}
    for name, tensor in model.state_dict().items():
        if "_extra_state" in name or tensor is None:
            continue
        full = ref["state"][global_layer_name(name, pp_rank, pp)]
        piece = shard_full_tensor(name, full, params.get(name, tensor), tp_rank, tp)
        if piece.shape != tensor.shape:
            raise AssertionError(f"{name}: shard {tuple(piece.shape)} != param {tuple(tensor.shape)}")
        state[name] = piece
    model.load_state_dict(state, strict=False)

    tokens, labels = make_batch()
    batches = iter([(tokens[i : i + 1], labels[i : i + 1]) for i in range(MICRO_BATCHES)])
    captured_logits = []

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        out = model(tok, torch.arange(SEQ).unsqueeze(0), causal_mask())

        def loss_func(logits):
            # clone: Megatron's vocab-parallel cross entropy works on the logits in place
            captured_logits.append(gather_from_tensor_model_parallel_region(logits).detach().clone())
            loss = vocab_parallel_cross_entropy(logits.contiguous(), lab).mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model],
        num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=1, forward_only=False,
    )
    diffs = {}
    if mpu.is_pipeline_last_stage():
        logits = torch.cat(captured_logits, dim=0)
        diffs["logits"] = (logits - ref["logits"]).abs().max().item()
    for name, p in model.named_parameters():
        full = ref["grads"][global_layer_name(name, pp_rank, pp)]
        expected = shard_full_tensor(name, full, p, tp_rank, tp)
        grad = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
        if grad is None:
            raise AssertionError(f"{name}: no gradient on rank {rank}")
        diffs[f"grad:{name}"] = (grad - expected).abs().max().item()
    return diffs
