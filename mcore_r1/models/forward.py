"""Forward passes over any TP/PP layout, returning full-vocabulary logits.

Megatron's pipeline schedule (`get_forward_backward_func`) drives the stages even for
inference, so the same code path serves PP=1 and PP>1. Vocabulary-parallel logits are gathered
over TP and the padding rows (added so the vocabulary divides by TP) are cut off, so callers
see exactly the HF model's vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch


def causal_mask(seq_len: int, device: Optional[torch.device] = None,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Megatron's boolean attention mask: True marks positions that may NOT be attended.

    With `padding_mask` ([batch, seq], 1 = real token) padded keys are masked too.
    """
    mask = torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), 1)
    if padding_mask is not None:
        mask = mask | ~padding_mask.bool()[:, None, None, :].to(mask.device)
    return mask


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    vocab_size: int,
    position_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **model_inputs,
) -> Optional[torch.Tensor]:
    """Logits [batch, seq, vocab_size] on the last pipeline stage; None on the other stages.

    `model_inputs` go to the model's forward as they are (e.g. `pixel_values`,
    `image_grid_thw` for the VL models); `position_ids` may be 3D (mrope).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    batch, seq = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    if attention_mask is None:
        attention_mask = causal_mask(seq, input_ids.device)
    captured: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        output = model(input_ids, position_ids, attention_mask, **model_inputs)

        def collect(logits):
            full = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]
            captured.append(full.detach().clone())
            return torch.zeros((), device=logits.device), {}

        return output, collect

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
        )
    return captured[0] if mpu.is_pipeline_last_stage() else None
