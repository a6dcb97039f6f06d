"""Masked tensor arithmetic shared by every algorithm module.

Conventions for all of `mcore_r1.algos`: responses are `B x T`, right padded; `response_mask`
is `B x T` (bool or 0/1), true on response tokens up to and including EOS; `index` is `(B,)`
and groups the responses of one prompt.

Padding policy (decided once, here). Padded slots may hold anything, NaN and Inf included,
because engines leave garbage there. So:

* `check_finite(name, x, mask)` inspects only the valid positions and names the tensor when
  one of them is NaN/Inf; junk under `mask = 0` is allowed.
* Every function first replaces padded slots by 0 with `torch.where` (`masked_fill`), never
  `x * mask`: `NaN * 0` is NaN, and a NaN that takes part in a forward op also poisons the
  backward pass even when the result is masked later. Selecting first keeps both the values
  and the gradients at padded slots exactly 0.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def as_bool_mask(mask: Tensor) -> Tensor:
    """`mask` as a bool tensor (accepts bool, int or 0/1 float masks)."""
    return mask if mask.dtype == torch.bool else mask != 0


def check_finite(name: str, tensor: Tensor, mask: Tensor | None = None) -> None:
    """Raise `ValueError` naming `name` if a (valid, when `mask` is given) entry is NaN or Inf.

    With a mask of fewer dimensions than the tensor (e.g. a `B x T` mask for `B x T x V`
    log-probs) the mask selects whole leading positions.
    """
    values = tensor.detach()
    if mask is not None:
        values = values[as_bool_mask(mask)]
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        where = "at valid positions " if mask is not None else ""
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) {where}(NaN or Inf); "
            "check the model outputs and the rollout data that produced it"
        )


def check_shapes(**tensors: Tensor) -> None:
    """Raise if the named tensors do not all have the same shape (names them all)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"shape mismatch: {listed}")


def clean(name: str, tensor: Tensor, mask: Tensor) -> Tensor:
    """Validate the valid entries of `tensor` and return it with padded slots set to 0."""
    check_finite(name, tensor, mask)
    m = as_bool_mask(mask)
    # A `B x T` mask on `B x T x V` values covers whole trailing rows.
    m = m.reshape(m.shape + (1,) * (tensor.dim() - m.dim()))
    return tensor.masked_fill(~m, 0.0)


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """sum of x over positions where mask is true (padding never read)."""
    x = x.masked_fill(~as_bool_mask(mask), 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """sum_M(x) / count_M; an empty selection gives 0, not NaN (no eps in the denominator)."""
    m = as_bool_mask(mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean_M(x)) / sqrt(var_M(x) + eps) over all valid tokens, result re-masked to 0.

    Variance is the unbiased one (x n/(n-1)) and eps sits inside the square root, as in
    verl/EasyR1 `masked_whiten` (OpenRLHF uses the biased variance and max(var, eps)).
    Unlike those, padding is set to 0 (verl re-masks REINFORCE++ outputs too). Fewer than
    two valid tokens make the variance undefined: raise, as verl does.
    """
    m = as_bool_mask(mask)
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"cannot whiten over {n} valid token(s); need at least 2")
    x = x.masked_fill(~m, 0.0)
    mean = x.sum() / n
    var = ((x - mean) ** 2).masked_fill(~m, 0.0).sum() / (n - 1)
    return ((x - mean) * torch.rsqrt(var + eps)).masked_fill(~m, 0.0)


def group_ids(index) -> Tensor:
    """Map any group labels (tensor, list of str/int, numpy array) to dense ids 0..G-1.

    Ids follow the order of first appearance, so results do not depend on label values.
    """
    if isinstance(index, Tensor):
        labels = index.tolist()
    else:
        labels = list(index)
    first_seen: dict = {}
    ids = [first_seen.setdefault(label, len(first_seen)) for label in labels]
    return torch.tensor(ids, dtype=torch.long)
