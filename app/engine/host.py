"""Reading results back from the device: each read waits for the device to finish its queued work (on a GPU, a
sync that stalls the pipeline), so the engine reads a step's numbers in as few copies as it can."""

from __future__ import annotations

import torch
from torch import Tensor


def to_host(*tensors: Tensor) -> list[list]:
    """Each tensor's ``tolist()``, read from the device in one copy (each read waits for the device to finish its
    queued work). Integer tensors come back as ints; values must be exact in float32 (token ids, positions, scores)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu()
    out, offset = [], 0
    for t in tensors:
        part = flat[offset : offset + t.numel()].reshape(t.shape)
        offset += t.numel()
        out.append((part.long() if not t.is_floating_point() else part).tolist())
    return out
