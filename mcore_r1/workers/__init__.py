"""Training-side workers: micro-batching/packing, per-token log-probs, the policy-loss step.

`batching` forms token-budget micro-batches and packs them; `logprobs` computes per-token
log-probs (and entropy) from vocab-parallel logits through Megatron's schedule at any TP/PP;
`policy_step` runs forward + policy loss + backward over the micro-batches of a mini-batch.
"""
