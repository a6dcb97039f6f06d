"""3D (temporal, height, width) position ids for Qwen2-VL / Qwen2.5-VL multimodal RoPE.

The one implementation used for training, log-prob recomputation and parity checks. Semantics
follow transformers' `get_rope_index` for images:

* text tokens advance all three coordinates together, one per token;
* an image of merged grid (1, h, w) starting at position p gets t = p, rows p..p+h-1 and
  columns p..p+w-1 (each image token at its own (row, column));
* the text after an image resumes at p + max(h, w);
* padded positions (attention_mask == 0) are 0; positions count valid tokens only, so left and
  right padding give the same ids for the same sample.

Also the vision tower's own 2D positions (`vision_patch_positions`) and Qwen2.5-VL's window
ordering (`window_index`), which depend only on the image grids.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor],
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Position ids [3, batch, seq] for a batch of token sequences with image placeholders."""
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long, device=input_ids.device)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(batch):
        valid = attention_mask[b].bool() if attention_mask is not None else torch.ones(seq, dtype=torch.bool)
        ids = input_ids[b][valid]
        is_image = (ids == image_token_id).tolist()
        chunks, start, cur = [], 0, 0
        while start < len(ids):
            end = start
            while end < len(ids) and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                chunks.append(torch.arange(end - start).expand(3, -1) + cur)
                cur += end - start
            else:
                grid = next(grids, None)
                chunks.append(_image_positions(grid, spatial_merge_size, cur, end - start, b))
                cur += max(grid[1], grid[2]) // spatial_merge_size
            start = end
        if chunks:
            positions[:, b, valid] = torch.cat(chunks, dim=1).to(positions.device)
    leftover = next(grids, None)
    if leftover is not None:
        raise ValueError(f"image_grid_thw has more images than the input ids ({leftover} unused)")
    return positions


def _image_positions(grid, merge: int, start: int, num_tokens: int, row: int) -> torch.Tensor:
    if grid is None:
        raise ValueError(f"sample {row}: more image-pad runs than entries in image_grid_thw")
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    if t * h * w != num_tokens:
        raise ValueError(
            f"sample {row}: an image run has {num_tokens} image-pad tokens but its grid {tuple(grid)} "
            f"needs {t * h * w} (= t*h*w/merge^2); the prompt was truncated or the processor's "
            "pixel bounds differ from the ones used to build the prompt"
        )
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start


def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, column) of every patch [num_patches, 2], in the processor's patch order.

    The processor emits patches merge-block by merge-block (each m x m block contiguous), so the
    plain row-major grid is regrouped the same way.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def image_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Boundaries of full attention: every frame of every image attends within itself."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0), (1, 0))


def window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int):
    """Qwen2.5-VL windows: an order of merged tokens that makes each window contiguous, and
    the window boundaries in patches.

    Windows are `window_size` pixels square (in merged tokens: window_size / patch / merge);
    the grid is padded up to whole windows, and empty windows vanish from the boundaries.
    """
    per_window = window_size // merge // patch_size
    order, bounds, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = per_window - gh % per_window, per_window - gw % per_window
        padded = F.pad(ids, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // per_window, (gw + pad_w) // per_window
        windows = padded.reshape(t, nh, per_window, nw, per_window).permute(0, 1, 3, 2, 4)
        windows = windows.reshape(t, nh * nw, per_window * per_window)
        sizes = (windows >= 0).sum(-1).flatten()
        flat = windows.flatten()
        order.append(flat[flat >= 0] + offset)
        bounds.extend((sizes.cumsum(0) * merge * merge + bounds[-1]).tolist())
        offset += t * gh * gw
    return torch.cat(order), torch.unique_consecutive(torch.tensor(bounds))
