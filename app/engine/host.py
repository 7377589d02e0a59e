"""Reading results back from the device: each read waits for the device to finish its queued work (on a GPU, a
sync that stalls the pipeline), so the engine reads a step's numbers in as few copies as it can."""

from __future__ import annotations

import torch
from torch import Tensor


def to_host(*tensors: Tensor) -> list[list]:
    """Each tensor's ``tolist()``, read from the device in one copy (each read waits for the device to finish its
    queued work). The copy is float32: integer and bool tensors come back as ints (bools as 0 and 1) and must be exact
    in float32 (token ids, positions, counts below 2**24); float64 is refused (it would lose digits)."""
    if not tensors:
        return []
    if any(t.dtype in (torch.float64, torch.complex64, torch.complex128) for t in tensors):
        raise TypeError("to_host copies through float32: a float64 or complex tensor would lose digits")
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu()
    out, offset = [], 0
    for t in tensors:
        part = flat[offset : offset + t.numel()].reshape(t.shape)
        offset += t.numel()
        out.append((part.long() if not t.is_floating_point() else part).tolist())
    return out
