"""Timing and statistics: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

One call of :func:`measure` gives ``warmup`` untimed runs and ``repeats`` timed runs of
``fn(i)``; ``i`` counts all calls (warm-up included) so a caller can rotate its inputs
(``inputs[i % len(inputs)]``) and no two consecutive repeats read the same buffers from L2.
``before(i)`` runs outside the timed region before every call: building a graph whose
backward is timed, zeroing gradients, changing parameters in place as an optimizer would.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

__all__ = [
    "Stats",
    "percentile",
    "summarize",
    "measure",
    "timer_name",
    "rotation_count",
    "synchronize",
    "measure_graph",
]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values; ``q`` in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q!r} must lie in [0, 100]")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo]) * (1.0 - frac) + float(sorted_values[hi]) * frac


@dataclasses.dataclass(frozen=True)
class Stats:
    """Median and spread of repeated measurements (all in the samples' unit)."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    mean: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    def spread(self) -> dict[str, Any]:
        """The ``spread`` object of a result row (SCHEMA.md)."""
        return {"iqr": self.iqr, "q25": self.q25, "q75": self.q75, "min": self.min, "max": self.max, "n": self.n}


def summarize(samples: Sequence[float]) -> Stats:
    """Median, quartiles, extremes and mean of ``samples`` (at least one finite value)."""
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("summarize needs at least one sample")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"summarize got non-finite samples: {values}")
    return Stats(
        median=percentile(values, 50.0),
        q25=percentile(values, 25.0),
        q75=percentile(values, 75.0),
        min=values[0],
        max=values[-1],
        mean=sum(values) / len(values),
        n=len(values),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device) -> str:
    return "cuda_events" if device.type == "cuda" else "time.perf_counter"


def rotation_count(bytes_per_input: int, device: torch.device, cap: int = 8, free_bytes: Optional[int] = None) -> int:
    """How many distinct inputs to rotate through so that consecutive repeats miss in L2.

    Enough inputs to cover twice the L2 cache (at least 2, at most ``cap``), bounded so they
    take no more than a quarter of ``free_bytes`` when that is given.
    """
    if bytes_per_input <= 0:
        raise ValueError(f"bytes_per_input={bytes_per_input} must be positive")
    l2 = 0
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
    l2 = l2 or 64 * 1024 * 1024
    count = max(2, min(cap, math.ceil(2 * l2 / bytes_per_input)))
    if free_bytes is not None:
        count = max(1, min(count, free_bytes // (4 * bytes_per_input)))
    return int(count)


def measure(
    fn: Callable[[int], Any],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    before: Optional[Callable[[int], Any]] = None,
    on_first_timed: Optional[Callable[[], Any]] = None,
) -> Stats:
    """Time ``fn(i)``: ``warmup`` untimed calls, then ``repeats`` timed ones; returns ms statistics.

    ``before(i)`` runs untimed before each call (and the device is synchronised after it), so
    work it launches never overlaps the timed region. ``on_first_timed()`` runs once, after the
    warm-up and the first timed call's ``before``: e.g. to restart a peak-memory window so
    one-time warm-up allocations (autotuning) do not count.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    samples: list[float] = []
    use_events = device.type == "cuda"
    events: list[tuple[Any, Any]] = []
    for i in range(warmup + repeats):
        if before is not None:
            before(i)
        synchronize(device)
        timed = i >= warmup
        if i == warmup and on_first_timed is not None:
            on_first_timed()
        if use_events:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            if timed:
                events.append((start, end))
            synchronize(device)
        else:
            t0 = time.perf_counter()
            fn(i)
            t1 = time.perf_counter()
            if timed:
                samples.append((t1 - t0) * 1e3)
    if use_events:
        samples = [s.elapsed_time(e) for s, e in events]
    return summarize(samples)


def measure_graph(launch: Callable[[int], Any], count: int, *, device: torch.device, repeats: int = 5,
                  min_launches: int = 32) -> Stats:
    """Device time (ms) per call of ``launch(i)``, ``i = 0..count-1``, replayed from one CUDA graph.

    What a kernel takes on its own: no host gaps between launches (a graph replays back to
    back), and with ``count`` distinct input sets no call finds the previous one's data in L2.
    The graph holds at least ``min_launches`` calls (passes over the ``count`` inputs): replaying
    a graph has a fixed cost of its own (µs), which over only ``count = 2`` calls of a 40 µs
    kernel read as ~6% of the kernel's time.
    Call ``launch`` once per ``i`` beforehand so autotuning happens outside the capture.
    """
    if device.type != "cuda":
        raise ValueError(f"measure_graph needs a CUDA device, got {device}")
    if count < 1 or repeats < 1 or min_launches < 1:
        raise ValueError(f"measure_graph needs count, repeats and min_launches >= 1, got {count}, {repeats}, "
                         f"{min_launches}")
    calls = count * -(-min_launches // count)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for i in range(count):
            launch(i)
    torch.cuda.current_stream(device).wait_stream(side)
    synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(calls):
            launch(k % count)
    graph.replay()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        synchronize(device)
        samples.append(start.elapsed_time(end) / calls)
    del graph
    return summarize(samples)
