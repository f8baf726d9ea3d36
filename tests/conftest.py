from __future__ import annotations

import contextlib
import datetime
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import patternc
from patternc.diagnostics import Diagnostic

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def ab_sizes(anchors: int | None, queries: int) -> dict[str, int | None]:
    """Group sizes of the AB-UPT layouts: two branches of anchors and queries
    (anchors None: read from a KV cache)."""
    return {
        "surface_anchors": anchors,
        "surface_queries": queries,
        "volume_anchors": anchors,
        "volume_queries": queries,
    }


@contextlib.contextmanager
def warnings_as_errors(category: type[Warning] = Warning) -> Iterator[None]:
    """Warnings of ``category`` raise, except torch 2.6's own "Skipping
    serialization of ..." (its Dynamo config reports a dict setting as
    changed after the first compile, and inductor warns so when it writes a
    graph's config: noise from torch, not from the code under test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", category)
        warnings.filterwarnings("ignore", message="Skipping serialization of", category=UserWarning)
        yield


@pytest.fixture(scope="session")
def cpu_flex_kernel() -> None:
    """Skip unless this torch builds FlexAttention's C++ kernel for the CPU
    (torch 2.8.0 does not; flex then runs as batched, see
    ``patternc.nn.executors.flex._CPU_KERNEL_FAILED``): for tests of the
    kernel itself."""
    import torch

    from patternc.nn import PatternAttention
    from patternc.nn.executors import flex

    plan = patternc.compile("groups a q\na -> a\nq -> a, q [causal]").patterns["default"]
    config = patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2, implementation="flex")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PatternAttention(config, plan)(torch.randn(1, 10, 16), {"a": 3, "q": 7})
    if flex._CPU_KERNEL_FAILED:
        pytest.skip(flex._CPU_KERNEL_FAILED[0])


def diagnostics_of(source: str) -> list[Diagnostic]:
    """Compile text that must fail; return its diagnostics."""
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(source, filename="t.pc")
    return list(info.value.diagnostics)


def codes(diags: list[Diagnostic]) -> list[str]:
    return [d.code for d in diags]


@pytest.fixture
def matmul_precision() -> Iterator[Callable[[str], None]]:
    """Sets torch's float32 matmul precision for one test and puts it back
    (torch imported here: compiler-only tests must run without it)."""
    import torch

    matmul = torch.backends.cuda.matmul
    previous = getattr(matmul, "fp32_precision", None)

    def set_to(value: str) -> None:
        if previous is None:  # torch < 2.9: only the old switch
            if value != "none":
                torch.set_float32_matmul_precision("high" if value == "tf32" else "highest")
            return
        matmul.fp32_precision = value

    yield set_to
    if previous is not None:
        matmul.fp32_precision = previous
    else:
        torch.set_float32_matmul_precision("highest")


def forget_tables() -> None:
    """Drop what executors stored in the cached layouts' tables (device
    tables, ``auto``'s picks), keeping the layouts: the next call builds
    them again, as a layout's first call does."""
    from patternc.plan import LAYOUTS

    for layout in LAYOUTS.values():
        layout.tables.clear()


def free_port() -> int:
    """A TCP port free on this host, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A gloo process group of this process alone, destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
