"""Peak device memory above the static footprint, per phase.

The static footprint is what is allocated when a phase starts (model, adapters, inputs); the
phase's figure is ``max_memory_allocated() - allocated_at_start``: the transient memory the
phase needs on top of what already lives. On the CPU there is no allocator statistic to read, so
the value is ``None`` and :data:`CPU_REASON` says why.
"""

from __future__ import annotations

import gc
from typing import Optional

import torch

__all__ = ["CPU_REASON", "PeakMemory", "allocated", "free_bytes", "release"]

CPU_REASON = "peak memory needs torch.cuda allocator statistics; not measured on the CPU"


def allocated(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def release(device: torch.device) -> None:
    """Drop garbage and cached blocks between cases so one case's leftovers never count in the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


_open_windows: list = []  # the PeakMemory windows entered and not yet exited, outermost first


def _reset_peak(device: torch.device, restarting: Optional["PeakMemory"]) -> None:
    """Reset the allocator's peak, first folding the peak so far into every other open window: a
    window nested in another (a step's forward inside the step) must not erase the outer one's
    peak (it did: a layer step's figure then missed its forward's peak)."""
    current = int(torch.cuda.max_memory_allocated(device))
    for window in _open_windows:
        if window is not restarting and window.device == device:
            window._seen = max(window._seen, current)
    torch.cuda.reset_peak_memory_stats(device)


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_extra`` (bytes, or ``None`` on CPU).

    Windows nest: an inner window's start does not hide the outer window's earlier peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.static: Optional[int] = None
        self.start: Optional[int] = None
        self.peak: Optional[int] = None
        self._seen = 0

    def __enter__(self) -> "PeakMemory":
        _open_windows.append(self)
        self.restart()
        self.start = self.static
        return self

    def restart(self) -> None:
        """Start the window again from what is allocated now (``start`` keeps the first value)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.static = int(torch.cuda.memory_allocated(self.device))
            self._seen = 0
            _reset_peak(self.device, self)

    def __exit__(self, *exc) -> None:
        if self in _open_windows:
            _open_windows.remove(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self._seen, int(torch.cuda.max_memory_allocated(self.device)))

    @property
    def peak_extra(self) -> Optional[int]:
        if self.static is None or self.peak is None:
            return None
        return max(0, self.peak - self.static)

    @property
    def reason(self) -> Optional[str]:
        return None if self.device.type == "cuda" else CPU_REASON
