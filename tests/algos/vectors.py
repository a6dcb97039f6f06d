"""The common test input of ../shared/reference/algorithms.md section 0, as plain Python data.

Expected values in the tests come from the reference's worked numbers or from independent
plain-Python arithmetic on these lists, never from the code under test. Padded slots are
filled with junk (NaN by default) so leaks show up as NaN or wrong numbers.
"""

import math

import torch

NAN = float("nan")
B, T = 6, 4
UID = ["a", "a", "a", "b", "b", "b"]
LENS = [4, 3, 2, 4, 1, 3]
MASK = [[1 if t < n else 0 for t in range(T)] for n in LENS]
SCORES = [1.0, 0.0, 1.0, 0.0, 1.0, 0.5]
VALUES = [[0.5, 0.6, 0.7, 0.8], [0.4, 0.3, 0.2, 9], [0.5, 0.5, 9, 9], [0.2, 0.1, 0.0, -0.1],
          [0.3, 9, 9, 9], [0.6, 0.5, 0.4, 9]]
RATIO = [[1.5, 0.7, 1.1, 1.0], [4.0, 0.5, 1.0, 2.0], [1.25, 0.9, 2, 2], [1.3, 0.85, 0.75, 2.5],
         [1.35, 2, 2, 2], [1.2, 0.6, 1.05, 2]]
OLD_LOGP = [[-0.5, -1, -1.5, -2], [-0.2, -0.4, -0.6, -0.8], [-1, -2, -3, -4], [-0.3] * 4,
            [-1.2] * 4, [-0.7, -0.8, -0.9, -1.0]]
N_VALID = 17

# GRPO advantages of the common input (reference 6.1), per sequence.
GRPO_ADV = [0.577349, -1.154699, 0.577349, -0.999998, 0.999998, 0.0]


def valid(i, t):
    return MASK[i][t] == 1


def tensor(rows, junk=NAN, dtype=torch.float64):
    """B x T tensor of `rows` with `junk` written into every padded slot."""
    return torch.tensor([[rows[i][t] if valid(i, t) else junk for t in range(T)] for i in range(B)],
                        dtype=dtype)


def mask():
    return torch.tensor(MASK, dtype=torch.bool)


def token_rewards(junk=NAN):
    """Outcome score on the last valid token, zeros elsewhere, junk in padding."""
    rows = [[SCORES[i] if t == LENS[i] - 1 else 0.0 for t in range(T)] for i in range(B)]
    return tensor(rows, junk)


def per_token(per_seq):
    """B x T plain lists with the per-sequence value on valid tokens and 0 on padding."""
    return [[per_seq[i] if valid(i, t) else 0.0 for t in range(T)] for i in range(B)]


def log_probs(junk=NAN):
    """old_logp + log(ratio) on valid tokens, as a leaf tensor that requires grad."""
    rows = [[OLD_LOGP[i][t] + math.log(RATIO[i][t]) for t in range(T)] for i in range(B)]
    return tensor(rows, junk).requires_grad_(True)


def assert_close(actual, expected, tol=1e-6):
    """Compare a tensor with nested lists (or a number) elementwise, absolute tolerance."""
    got = torch.as_tensor(actual, dtype=torch.float64)
    want = torch.as_tensor(expected, dtype=torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), got
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol}:\n{got}\nexpected\n{want}"
