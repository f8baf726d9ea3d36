"""Block-mask construction: analytic (from group intervals) against torch's
``create_block_mask`` (the baseline), in one run.

Layout: 64 documents of 256-2048 tokens (78,649 tokens; each attends to
itself), plus the AB-UPT joint layout (10,240 tokens). ``create_block_mask``
runs compiled (``_compile=True``) and, where it fits in memory, eagerly (it
materialises an ``[n, n]`` mask: 46 GB at 78k tokens). Targets: analytic under
1 ms on a GPU and under 50 ms on CPU for the 78k layout.

A second table (``--frames``) builds block-causal video, a 256-token
prompt then 64 or 256 frames of 511 tokens (32k and 128k tokens; each frame
reads the prompt and every frame up to its own), from the pattern file's
family ``frame* -> prompt, frame*[upto]``: patternc's whole path from a new
set of sizes (bind, layout, tables, ``BlockMask``; every cache cleared)
against ``create_block_mask`` with the ``mask_mod`` a user writes (a
frame-id table, ``kv_frame <= q_frame``), compiled and, where the
``[n, n]`` mask fits, eager. Target: linear in the tokens on CPU, 1 ms for
128k tokens in 256 frames on a GPU. ``--counts`` sets the numbers of frames;
``--tokens N`` keeps about ``N`` tokens in every row (frames of
``(N - 256) // count`` tokens), so the rows differ in the number of members
only: the host work should grow linearly with it, the block mask not at all.

Run: ``python benchmarks/bench_blockmask.py [--device cuda] [--repeat 20] [--frames]
[--counts 256 1024 4096] [--tokens 131072] [--host-cost]``; ``--host-cost``
prints binding's and layout's CPU time, Python calls and traced memory
instead, which the load of a shared machine does not move, and the tensor
operations of the tables and the ``BlockMask`` on the device and on the
host (a GPU pays a launch for each device operation).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

import patternc
from patternc.nn.flexmask import BLOCK_SIZE, FlexTables
from patternc.nn.schedule import schedule_for


def documents(n_docs: int, seed: int = 0) -> tuple[patternc.Plan, dict[str, int]]:
    rng = random.Random(seed)
    names = [f"doc{i}" for i in range(n_docs)]
    source = "groups " + " ".join(names) + "\n" + "\n".join(f"{n} -> {n}" for n in names)
    sizes = {n: rng.randint(256, 2048) for n in names}
    return patternc.compile(source).patterns["default"], sizes


def ab_upt() -> tuple[patternc.Plan, dict[str, int]]:
    plan = patternc.compile(open("examples/ab_upt.patc").read()).patterns["joint"]
    return plan, {
        "surface_anchors": 1024,
        "surface_queries": 4096,
        "volume_anchors": 1024,
        "volume_queries": 4096,
    }


def median_ms(fn: Callable[[], object], repeat: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(max(3, repeat // 5)):  # warm-up: caches, allocator, clocks
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_layout(name: str, plan: patternc.Plan, sizes: dict[str, int], args: argparse.Namespace) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    schedule = schedule_for(plan.token_specs(sizes), plan)
    device = torch.device(args.device)

    def analytic() -> object:
        return FlexTables.build(schedule, {}, device).block_mask()

    tables = FlexTables.build(schedule, {}, device)
    mask_mod = tables.mask_mod()

    def created(compile_flag: bool) -> object:
        return create_block_mask(
            mask_mod, None, None, tables.q_len, tables.kv_len, device=args.device, _compile=compile_flag
        )

    rows = [("analytic (tables + BlockMask)", median_ms(analytic, args.repeat, args.device))]
    try:
        rows.append(
            ("create_block_mask(_compile=True)", median_ms(lambda: created(True), args.repeat, args.device))
        )
    except Exception as error:
        rows.append((f"create_block_mask(_compile=True): {type(error).__name__}", float("nan")))
    if tables.q_len <= args.eager_limit:
        eager_ms = median_ms(lambda: created(False), max(3, args.repeat // 4), args.device)
        rows.append(("create_block_mask (eager)", eager_ms))
    else:
        rows.append((f"create_block_mask (eager): skipped, [{tables.q_len}]^2 mask", float("nan")))
    base = rows[0][1]
    for method, ms in rows:
        print(f"{name:<34} {schedule.n_tokens:>7} {method:<32} {ms:>9.3f} {ms / base:>11.1f}")
    print(f"{'':<34} {'':>7} block sparsity {tables.sparsity:.3f}")


FRAMES = "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]"


def frames_mask_mod(
    prompt: int, frame: int, length: int, device: torch.device
) -> Callable[..., torch.Tensor]:
    """Block-causal video as users write it: a frame-id table (the prompt is
    frame -1, causal inside itself); a frame reads the prompt and frames up
    to its own."""
    frame_id = ((torch.arange(length, device=device) - prompt) // frame).clamp_min(-1)

    def block_causal(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        q_frame, kv_frame = frame_id[q_idx], frame_id[kv_idx]
        prompt_pair = (q_frame < 0) & (kv_idx <= q_idx)
        return prompt_pair | ((q_frame >= 0) & (kv_frame <= q_frame))

    return block_causal


def measure_frames(count: int, args: argparse.Namespace, prompt: int = 256, frame: int = 511) -> None:
    """One row group of the ``--frames`` table: patternc cold (every cache
    cleared, so binding and layout count) and its stages, against
    ``create_block_mask``; the block classes of the two masks are compared
    over the blocks both hold whole."""
    from torch.nn.attention.flex_attention import create_block_mask

    from patternc.plan import BINDINGS, LAYOUTS

    plan = patternc.compile(FRAMES).patterns["default"]
    sizes = {"prompt": prompt, **{f"frame{i}": frame for i in range(count)}}
    device = torch.device(args.device)
    n = prompt + count * frame

    def clear() -> None:
        LAYOUTS.clear()  # a layout's tables leave with it
        BINDINGS.clear()

    def cold() -> object:
        clear()
        return FlexTables.build(plan.layout(sizes), {}, device).block_mask()

    def layout_only() -> object:
        clear()
        return plan.layout(sizes)

    layout = plan.layout(sizes)

    def tables_only() -> object:
        layout.tables.clear()
        return FlexTables.build(layout, {}, device)

    tables = FlexTables.build(layout, {}, device)
    ours = tables.block_mask()
    mask_mod = frames_mask_mod(prompt, frame, n, device)

    def created(compile_flag: bool) -> object:
        return create_block_mask(mask_mod, None, None, n, n, device=args.device, _compile=compile_flag)

    def host_lists() -> object:
        """The tables' host work (plain Python, what a GPU does not speed up)."""
        from patternc.lower.blocks import allowed_rects, group_segments, pair_runs

        rects = allowed_rects(layout)
        return group_segments(layout, {}), pair_runs(layout), rects.block_counts(BLOCK_SIZE)

    rows = [
        ("patternc cold: bind, layout, tables, BlockMask", median_ms(cold, args.repeat, args.device)),
        ("  bind + layout", median_ms(layout_only, args.repeat, args.device)),
        ("  tables (group tables included)", median_ms(tables_only, args.repeat, args.device)),
        ("    of which host lists (rects, runs, segments)", median_ms(host_lists, args.repeat, "cpu")),
        ("  BlockMask from tables", median_ms(tables.block_mask, args.repeat, args.device)),
    ]
    agree = "not compared"
    if not args.no_baseline:
        try:
            rows.append(
                (
                    "create_block_mask(_compile=True)",
                    median_ms(lambda: created(True), args.repeat, args.device),
                )
            )
            theirs = created(True)
            whole = n // BLOCK_SIZE  # blocks whose tokens are all real in both masks
            mine_dense = ours.to_dense()[0, 0, :whole, :whole]
            theirs_dense = theirs.to_dense()[0, 0, :whole, :whole]  # type: ignore[attr-defined]
            agree = str(bool(torch.equal(mine_dense.bool(), theirs_dense.bool())))
        except Exception as error:
            rows.append((f"create_block_mask(_compile=True): {type(error).__name__}", float("nan")))
        if n <= args.eager_limit:
            eager_ms = median_ms(lambda: created(False), max(3, args.repeat // 4), args.device)
            rows.append(("create_block_mask (eager)", eager_ms))
        else:
            rows.append((f"create_block_mask (eager): skipped, [{n}]^2 mask", float("nan")))
    base = rows[0][1]
    name = f"video: {prompt} + {count} frames of {frame}"
    for method, ms in rows:
        print(f"{name:<34} {n:>7} {method:<48} {ms:>9.3f} {ms / base:>11.2f}")
    runs = tables.groups.runs.shape[1]
    pairs = sum(len(c.query_tokens) * len(c.attention.keys) for c in layout.calls)
    segments = sum(len(c.keys) for c in layout.calls)
    print(
        f"{'':<34} {'':>7} {pairs} group pairs in {len(layout.calls)} calls, {segments} key segments, "
        f"{runs} runs; non-empty blocks agree: {agree}"
    )


def op_counts(layout: object) -> tuple[int, int]:
    """Tensor operations of one ``FlexTables.build(...).block_mask()``: on
    the device and on host (CPU) tensors. The build runs on the ``meta``
    device, which stands for a GPU here: every operation with a meta tensor
    among its inputs or outputs would be a launch there, the others run on
    small CPU tensors. (On a GPU the block lists are ordered by one sort,
    here by a prefix-sum partition of about ten operations: the count is a
    little high.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.device = self.host = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            leaves = tree_leaves((args, kwargs, out))
            if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
                self.device += 1
            else:
                self.host += 1
            return out

    layout.tables.clear()  # type: ignore[attr-defined]
    with Count() as counted:
        FlexTables.build(layout, {}, torch.device("meta")).block_mask()  # type: ignore[arg-type]
    layout.tables.clear()  # type: ignore[attr-defined]
    return counted.device, counted.host


def host_cost(count: int, tokens: int, prompt: int = 256) -> None:
    """One row of the ``--host-cost`` table: what binding and layout cost
    for ``count`` block-causal frames in about ``tokens`` tokens, by
    measures that the load of a shared machine does not move: CPU time
    (``time.process_time``, minimum of 5), Python function calls (cProfile)
    and peak traced memory (tracemalloc), the tables' Python calls, and the
    tensor operations of the tables and the ``BlockMask`` (:func:`op_counts`)."""
    import cProfile
    import pstats
    import tracemalloc

    from patternc.plan import BINDINGS, LAYOUTS

    plan = patternc.compile(FRAMES).patterns["default"]
    frame = max(1, (tokens - prompt) // count)
    sizes = {"prompt": prompt, **{f"frame{i}": frame for i in range(count)}}
    names = list(sizes)
    bind_s, layout_s = [], []
    for _ in range(5):
        LAYOUTS.clear()
        BINDINGS.clear()
        start = time.process_time()
        plan.bind(names)
        bound = time.process_time()
        plan.layout(sizes)
        bind_s.append(bound - start)
        layout_s.append(time.process_time() - bound)
    LAYOUTS.clear()
    BINDINGS.clear()
    profiler = cProfile.Profile()
    profiler.enable()
    layout = plan.layout(sizes)
    profiler.disable()
    layout_calls = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    profiler = cProfile.Profile()
    profiler.enable()
    FlexTables.build(layout, {}, torch.device("cpu"))
    profiler.disable()
    table_calls = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    device_ops, host_ops = op_counts(layout)
    LAYOUTS.clear()
    BINDINGS.clear()
    tracemalloc.start()
    plan.layout(sizes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    LAYOUTS.clear()
    BINDINGS.clear()
    print(
        f"{count:>6} {frame:>6} {1e3 * min(bind_s):>10.1f} {1e3 * min(layout_s):>10.1f} "
        f"{layout_calls:>12,} {peak / 2**20:>9.1f} {table_calls:>12,} {device_ops:>10} {host_ops:>8}"
    )


def breakdown(args: argparse.Namespace) -> None:
    """Where the analytic build spends its time (tables vs BlockMask), with a profile."""
    plan, sizes = documents(64)
    schedule = schedule_for(plan.token_specs(sizes), plan)
    device = torch.device(args.device)
    tables = FlexTables.build(schedule, {}, device)
    print("tables   ms", median_ms(lambda: FlexTables.build(schedule, {}, device), args.repeat, args.device))
    print("BlockMask ms", median_ms(tables.block_mask, args.repeat, args.device))
    from patternc.nn.flexmask import _partition

    stacked = torch.stack([tables.partial, tables.full, tables.partial.t(), tables.full.t()])[:, None]
    counts = stacked.sum(dim=-1, dtype=torch.int32)
    by_sort = median_ms(
        lambda: torch.argsort(stacked, dim=-1, descending=True, stable=True).to(torch.int32),
        args.repeat,
        args.device,
    )
    by_scan = median_ms(lambda: _partition(stacked, counts), args.repeat, args.device)
    print(
        f"ordering {tuple(stacked.shape)}: stable sort {by_sort:.3f} ms, prefix-sum partition {by_scan:.3f} ms"
    )
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        FlexTables.build(schedule, {}, device).block_mask()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        FlexTables.build(schedule, {}, device).block_mask()
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--eager-limit", type=int, default=20000, help="largest n for eager create_block_mask"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="time the stages and profile the 64-doc build"
    )
    parser.add_argument(
        "--frames", action="store_true", help="block-causal video at 32k and 128k tokens instead"
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 256], help="frames per --frames row")
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="--frames: about this many tokens per row (frames of 511 if unset)",
    )
    parser.add_argument(
        "--host-cost",
        action="store_true",
        help="bind + layout of --counts frames in --tokens tokens: CPU time, Python calls, traced memory",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="--frames: patternc's rows only (no create_block_mask)"
    )
    args = parser.parse_args()
    if args.host_cost:
        tokens = args.tokens or 131072
        print(f"bind and layout of block-causal frames in ~{tokens} tokens (CPU ms: minimum of 5)")
        print(
            f"{'frames':>6} {'frame':>6} {'bind ms':>10} {'layout ms':>10} "
            f"{'Python calls':>12} {'peak MiB':>9} {'table calls':>12} {'device ops':>10} {'host ops':>8}"
        )
        for count in args.counts:
            host_cost(count, tokens)
        return
    if args.frames:
        print(
            f"block-causal video masks on {args.device}, torch {torch.__version__}, median of {args.repeat}"
        )
        header = f"{'layout':<34} {'tokens':>7} {'method':<48} {'ms':>9} {'vs patternc':>11}"
        print(header)
        print("-" * len(header))
        for count in args.counts:
            frame = 511 if args.tokens is None else max(1, (args.tokens - 256) // count)
            measure_frames(count, args, frame=frame)
        return
    if args.breakdown:
        breakdown(args)
        return
    print(f"block-mask construction on {args.device}, torch {torch.__version__}, median of {args.repeat}")
    header = f"{'layout':<34} {'tokens':>7} {'method':<32} {'ms':>9} {'vs analytic':>11}"
    print(header)
    print("-" * len(header))
    layouts = {
        "64 documents, each to itself": documents(64),
        "16 documents, each to itself": documents(16, seed=1),
        "AB-UPT joint, 2x(1k+4k)": ab_upt(),
    }
    for name, (plan, sizes) in layouts.items():
        measure_layout(name, plan, sizes, args)


if __name__ == "__main__":
    main()
