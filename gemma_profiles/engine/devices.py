"""Which torch devices this process can use (torch imported when asked)."""

from __future__ import annotations


def device_problem(device: str) -> str | None:
    """Why ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``) cannot be used here, or None when it can."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"this torch ({torch.__version__}) sees no CUDA device"
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            return f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "MPS is not available here"
    return None
