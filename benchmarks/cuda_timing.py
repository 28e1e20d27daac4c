"""Eager GPU timing for the benchmark scripts: the median of CUDA-event times of a call, after one warm-up call.

(``decode.Timer`` times CUDA-graph replays after an L2 flush instead: for calls of microseconds, where launch
overhead would dominate.)"""

from __future__ import annotations

import torch


def median_ms(fn, reps: int = 5) -> float:
    """Milliseconds ``fn()`` takes on the current CUDA stream, median of ``reps`` runs after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
