"""Peak memory of a region, for the benchmarks: the CUDA allocator's peak on a
GPU, else the rise of the process's peak RSS (Linux; run each case in a
fresh process, since freed memory stays mapped)."""

from __future__ import annotations

import torch

__all__ = ["Peak"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class Peak:
    """Peak memory of a region: the CUDA allocator's, else the process's peak RSS (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *args: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = max(_rss_kib("VmHWM") * 1024 - self.base, 0)
