"""What the training examples share: their ``--threads`` option and running
on that many CPU threads. The examples import it by name, which works when
one runs as a script (Python puts the script's folder first on ``sys.path``)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, 1 by default."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: the tensors are small, so more threads mostly wait on each other)",
    )


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Runs its body on ``threads`` CPU threads and gives the caller its own
    thread count back afterwards, also when the body raises."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
