"""A tiny differentiable problem for the split-invariance tests (in-process and 2-process).

A linear "policy" W (H x V) scores fixed features; log-probs of fixed tokens feed the full actor
loss (policy loss + entropy bonus + k3 KL in the loss). Responses have unequal lengths, so
micro-batches have unequal token counts, and each micro-batch is trimmed to its own longest
response, as a packer would do, so the padded width differs between micro-batches too.
"""

import torch

from mcore_r1.algos import (
    AdvantageOptions, LossNormaliser, actor_loss_matrix, aggregate_loss, entropy_from_logits,
    get_advantage_estimator, get_policy_loss, kl_penalty,
)

LENS = [7, 3, 5, 1, 8, 2, 6, 4]
B, T, H, V = len(LENS), 8, 5, 11
NORM_LEN = 8.0
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo")
CLIPS = {"ppo_clip": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0),
         "gspo": dict(clip_ratio_low=0.01, clip_ratio_high=0.02),
         "gspo_token": dict(clip_ratio_low=0.01, clip_ratio_high=0.02),
         "cispo": dict(clip_ratio_low=1.0, clip_ratio_high=0.1)}


def make_problem(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENS])
    feats = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    w0 = torch.randn(H, V, generator=g, dtype=torch.float64) * 0.5
    with torch.no_grad():
        logp0 = torch.log_softmax(feats @ w0, -1).gather(-1, tokens[..., None])[..., 0]
    old = logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios != 1: clips fire
    ref = logp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    scores = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0.5], dtype=torch.float64)
    rewards[torch.arange(B), torch.tensor(LENS) - 1] = scores
    index = [0, 0, 0, 0, 1, 1, 1, 1]
    adv = get_advantage_estimator("grpo")(rewards, mask, index, AdvantageOptions()).advantages
    junk = ~mask
    # Junk in padded slots of every input: it must not change anything.
    for x in (old, ref, adv):
        x[junk] = float("nan")
    return dict(mask=mask, feats=feats, tokens=tokens, w0=w0, old=old, ref=ref, adv=adv)


def micro_loss(p: dict, w: torch.Tensor, rows, mode: str, loss_name: str,
               normaliser: LossNormaliser | None) -> torch.Tensor:
    """The loss contribution of the micro-batch `rows`, trimmed to its own longest response."""
    rows = torch.as_tensor(rows)
    width = int(p["mask"][rows].sum(-1).max())
    cut = lambda x: x[rows, :width]  # noqa: E731
    mask = cut(p["mask"])
    logits = cut(p["feats"]) @ w
    logp = torch.log_softmax(logits, -1).gather(-1, cut(p["tokens"])[..., None])[..., 0]
    out = get_policy_loss(loss_name)(logp, cut(p["old"]), cut(p["adv"]), mask, **CLIPS[loss_name])
    mat = actor_loss_matrix(out.loss_mat, mask, entropy=entropy_from_logits(logits),
                            entropy_coeff=0.01, kl=kl_penalty(logp, cut(p["ref"]), "k3", mask),
                            kl_coef=0.1)
    return aggregate_loss(mat, mask, mode, normaliser=normaliser, norm_len=NORM_LEN)


def run_split(p: dict, splits, mode: str, loss_name: str, group_reduce=None):
    """Sum of micro-batch losses and the accumulated gradient of W over `splits` (this rank).

    `group_reduce(normaliser)` turns the local counts into global ones (DP all-reduce).
    """
    w = p["w0"].clone().requires_grad_(True)
    norm = LossNormaliser(0.0, 0.0)
    for rows in splits:
        norm = norm + LossNormaliser.of(p["mask"][torch.as_tensor(rows)])
    if group_reduce is not None:
        norm = group_reduce(norm)
    total = torch.zeros((), dtype=torch.float64)
    for rows in splits:
        loss = micro_loss(p, w, rows, mode, loss_name, norm)
        loss.backward()  # gradient accumulation, as a pipeline schedule does
        total = total + loss.detach()
    return total, w.grad.clone()


def whole(p: dict, mode: str, loss_name: str):
    """Reference: the whole mini-batch in one piece with its own (local = global) counts."""
    w = p["w0"].clone().requires_grad_(True)
    loss = micro_loss(p, w, list(range(B)), mode, loss_name, None)
    loss.backward()
    return loss.detach(), w.grad.clone()
