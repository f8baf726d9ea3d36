"""GPU attention: every executor against the floor and the ceiling, in one run.

Layouts (batch 1, 12 heads of 64): AB-UPT self-anchor and joint at
2x(1k anchors + 4k queries) and 2x(8k + 24k), and 16 / 64 documents of
256-2048 tokens each attending to itself. For each: the ceiling (dense SDPA
over all tokens, no mask: the TFLOP/s the GPU reaches), the floor ("ideal":
one SDPA call per pattern on ready contiguous tensors, copies made outside
the timing), then ``batched``, ``batched+graph`` (the same executor captured in a CUDA
graph and replayed: what is left once host time is gone), ``varlen``,
``flex``, ``auto`` (and ``dense``
with its mask where it fits) on ready Q/K/V (projections excluded everywhere);
where some tokens are never keys (AB-UPT), ``batched:keys``, ``batched:keys+graph``, ``flex:keys``
and ``auto:keys`` get K/V of the key tokens only, as the layers hand them over;
with ``--control``, ``auto``'s pick a second time as its own row (``<pick>
again``, and ``<pick>:keys again`` on compact K/V): the spread between two
rows of the same code in this run, against which ``auto``'s own gap to its
pick is read.
Useful TFLOP/s count allowed score entries only (``4 * entries * H * D`` per
forward; forward+backward counts 3.5x). ``vs ideal`` is time / ideal time;
``+proj`` adds the projections a layer runs around attention (the fused QKV
and the output ``nn.Linear`` at width 768, timed in the same run) to both
sides: how close a whole layer comes to one written by hand. ``b2b`` times
``--b2b`` calls back to back per sample (per call): host time that one call
alone exposes hides behind kernels there, as it does in a layer stack.
The rows of one layout and pass are sampled round by round (one sample of
each per round), so drift in the host's or the GPU's speed over the run
reaches all of them alike; the dense rows (ceiling, ``dense``) are sampled
apart, after the others, as their long full-power calls slow the rows
sampled after them. A second table sweeps FlexAttention
``kernel_options``, its rows interleaved the same way.

Run: ``python benchmarks/bench_gpu.py [--dtypes bf16 fp32] [--repeat 20] [--quick]``
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import patternc
from patternc.lower.layout import Layout as Schedule
from patternc.nn.executors import EXECUTORS
from patternc.nn.executors.auto import choose
from patternc.nn.executors.common import AttentionInputs, compact_keys
from patternc.nn.executors.flexkernels import backward_tiles
from patternc.nn.schedule import schedule_for

HEADS, DIM = 12, 64


def random_qkv(
    n: int,
    dtype: torch.dtype = torch.bfloat16,
    backward: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token-major ``[1, n, HEADS, DIM]`` Q, K and V on the GPU: leaves that
    take a gradient when ``backward``."""
    q, k, v = (
        torch.randn(1, n, HEADS, DIM, device="cuda", dtype=dtype, generator=generator).requires_grad_(
            backward
        )
        for _ in range(3)
    )
    return q, k, v


AB = patternc.compile(open("examples/ab_upt.patc").read())


def documents(n_docs: int, seed: int) -> tuple[patternc.Plan, dict[str, int]]:
    rng = random.Random(seed)
    plan = patternc.compile("groups doc*\ndoc* -> self").patterns["default"]
    return plan, {f"doc{i}": rng.randint(256, 2048) for i in range(n_docs)}


def ab(pattern: str, anchors: int, queries: int) -> tuple[patternc.Plan, dict[str, int]]:
    sizes = {
        "surface_anchors": anchors,
        "surface_queries": queries,
        "volume_anchors": anchors,
        "volume_queries": queries,
    }
    return AB[pattern], sizes


LAYOUTS: dict[str, Callable[[], tuple[patternc.Plan, dict[str, int]]]] = {
    "AB-UPT self-anchor 2x(1k+4k)": lambda: ab("self_anchor", 1024, 4096),
    "AB-UPT joint 2x(1k+4k)": lambda: ab("joint", 1024, 4096),
    "AB-UPT self-anchor 2x(8k+24k)": lambda: ab("self_anchor", 8192, 24576),
    "AB-UPT joint 2x(8k+24k)": lambda: ab("joint", 8192, 24576),
    "16 documents": lambda: documents(16, 1),
    "64 documents": lambda: documents(64, 0),
}


HEAVY_ROWS = ("ceiling", "dense")
"""Rows sampled apart from the others (see :func:`measure`)."""


def _sample_ms(fn: Callable[[], object], calls: int) -> float:
    """One sample: ``calls`` runs of ``fn`` between two events, per run."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / calls


def cuda_ms(fn: Callable[[], object], repeat: int, calls: int = 1) -> float:
    """Median GPU time of ``fn`` between two events. With ``calls > 1`` each
    sample runs ``fn`` that many times back to back and is divided by it: the
    host queues ahead as in a model's layer stack, so host time hides behind
    kernels wherever it is shorter than them (one call alone exposes it)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return statistics.median(_sample_ms(fn, calls) for _ in range(repeat))


def interleaved_ms(
    fns: dict[str, Callable[[], object]], repeat: int, calls: int = 1
) -> dict[str, float | Exception]:
    """:func:`cuda_ms` of several rows, sampled round by round (one sample of
    each row per round, in a fresh shuffled order each round), so drift in
    the host's or the GPU's speed over the run reaches every row alike, and
    no row always runs after the same other one (a row that always follows
    a heavy one reads slower for it). A row that raises is reported as its exception."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, Exception] = {}
    for name, fn in fns.items():
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        except Exception as error:  # report and go on: one table per run
            failed[name] = error
    order = [name for name in fns if name not in failed]
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            samples[name].append(_sample_ms(fns[name], calls))
    return {name: failed.get(name) or statistics.median(samples[name]) for name in fns}


def compiled_kernel() -> Callable[..., Tensor]:
    """``flex_attention`` alone, compiled as the executor compiles its graph
    around it: the kernel rows that ``flex``'s own rows are set against."""
    from torch.nn.attention.flex_attention import flex_attention

    from patternc.nn.executors.flex import _raise_recompile_limit

    _raise_recompile_limit(64)
    return torch.compile(flex_attention, dynamic=False)


def entries(schedule: Schedule) -> int:
    return sum(c.n_queries * sum(s.length for s in c.keys) for c in schedule.calls)


def ideal_fn(q: Tensor, k: Tensor, v: Tensor, schedule: Schedule, backward: bool) -> Callable[[], object]:
    """One SDPA per call on contiguous ``[1, H, L, D]`` copies made here, untimed."""

    def take(t: Tensor, segments: object) -> Tensor:
        parts = [t[:, s.start : s.stop] for s in segments]  # type: ignore[attr-defined]
        return torch.cat(parts, 1).transpose(1, 2).contiguous().detach().requires_grad_(backward)

    calls = [(take(q, c.queries), take(k, c.keys), take(v, c.keys)) for c in schedule.calls if c.n_queries]

    def run() -> None:
        for cq, ck, cv in calls:
            out = F.scaled_dot_product_attention(cq, ck, cv)
            if backward:
                out.backward(torch.ones_like(out))

    return run


def projections_fn(n: int, dtype: torch.dtype, backward: bool) -> Callable[[], object]:
    """The fused QKV and output projections of one layer on ``n`` tokens."""
    width = HEADS * DIM
    qkv = torch.nn.Linear(width, 3 * width, device="cuda", dtype=dtype)
    out = torch.nn.Linear(width, width, device="cuda", dtype=dtype)
    x = torch.randn(1, n, width, device="cuda", dtype=dtype, requires_grad=backward)
    h = torch.randn(1, n, width, device="cuda", dtype=dtype, requires_grad=backward)

    grads = (torch.ones(1, n, 3 * width, device="cuda", dtype=dtype), torch.ones_like(h))

    def run() -> None:
        outputs = (qkv(x), out(h))
        if backward:
            torch.autograd.backward(outputs, grads)

    return run


def executor_fn(name: str, inputs: AttentionInputs, backward: bool) -> Callable[[], object]:
    executor = EXECUTORS[name]

    def run() -> None:
        out = executor(inputs)
        if backward:
            out.backward(torch.ones_like(out))

    return run


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph (after warm-up on a side stream):
    the replay runs the same kernels with no host work between them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ceiling_fn(q: Tensor, k: Tensor, v: Tensor, backward: bool) -> Callable[[], object]:
    qt, kt, vt = (t.transpose(1, 2).contiguous().detach().requires_grad_(backward) for t in (q, k, v))

    def run() -> None:
        out = F.scaled_dot_product_attention(qt, kt, vt)
        if backward:
            out.backward(torch.ones_like(out))

    return run


def measure(args: argparse.Namespace) -> None:
    header = f"{'layout':<30} {'dtype':<5} {'pass':<8} {'variant':<18} {'ms':>9} {'TFLOP/s':>8} {'vs ideal':>8} {'+proj':>6} {'b2b ms':>9} {'b2b/ideal':>9}"
    print(header)
    print("-" * len(header))
    for layout_name, make in LAYOUTS.items():
        plan, sizes = make()
        schedule = schedule_for(plan.token_specs(sizes), plan)
        n, useful = schedule.n_tokens, entries(schedule)
        for dtype_name in args.dtypes:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
            for backward in (False, True):
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = random_qkv(n, dtype=dtype, backward=backward, generator=gen)
                inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
                flops = 4 * useful * HEADS * DIM * (3.5 if backward else 1.0)
                rows: dict[str, tuple[Callable[[], object], float]] = {
                    "ideal": (ideal_fn(q, k, v, schedule, backward), flops)
                }
                proj = cuda_ms(projections_fn(n, dtype, backward), args.repeat)
                if n <= args.ceiling_limit:
                    dense_flops = 4 * n * n * HEADS * DIM * (3.5 if backward else 1.0)
                    rows["ceiling"] = (ceiling_fn(q, k, v, backward), dense_flops)
                variants = ["batched", "batched+graph", "varlen", "flex", "auto", "auto+graph"] + (
                    ["dense"] if n <= args.dense_limit else []
                )
                # keys in their own space: K/V of the key tokens only, as the
                # layers now hand them over (made here, untimed)
                compact = None
                if not schedule.key_space.identity:
                    variants += ["batched:keys", "batched:keys+graph", "flex:keys", "auto:keys"]
                    ck, cv = (
                        compact_keys(t.detach(), schedule.key_space).contiguous().requires_grad_(backward)
                        for t in (k, v)
                    )
                    compact = AttentionInputs(q, ck, cv, schedule, {}, None, 0.0, None, keys_compact=True)
                variants = [v for v in variants if args.variants is None or v in args.variants]
                pass_label = f"{layout_name:<30} {dtype_name:<5} {'fwd+bwd' if backward else 'fwd':<8}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for variant in variants:
                        if variant == "varlen" and dtype == torch.float32:
                            continue  # the kernel has no float32: it would run as batched
                        given = compact if ":keys" in variant else inputs
                        assert given is not None
                        label = (
                            variant
                            if not variant.startswith("auto")
                            else variant.replace("auto", f"auto:{choose(given)}")
                        )
                        try:
                            name = variant.removesuffix("+graph").removesuffix(":keys")
                            fn = executor_fn(name, given, backward)
                            rows[label] = (graphed(fn) if variant.endswith("+graph") else fn, flops)
                        except Exception as error:
                            print(f"{pass_label} {label:<18} failed: {type(error).__name__}: {error}"[:200])
                    if args.control and "auto" in variants:
                        # auto's pick once more as its own row: how far two rows
                        # running the same code read apart in this run, the noise
                        # against which auto's gap to its pick is read
                        pick = choose(inputs)
                        rows[f"{pick} again"] = (executor_fn(pick, inputs, backward), flops)
                        if compact is not None and "auto:keys" in variants:  # the same on compact K/V
                            pick = choose(compact)
                            rows[f"{pick}:keys again"] = (executor_fn(pick, compact, backward), flops)
                    # the dense rows (ceiling, dense executor) are sampled apart,
                    # after the rows they are set against: interleaved, their long
                    # full-power calls slow the rows sampled after them (by about
                    # a tenth at 65k tokens)
                    single, b2b_ms = {}, {}
                    for group in (
                        [label for label in rows if label not in HEAVY_ROWS],
                        [label for label in rows if label in HEAVY_ROWS],
                    ):
                        fns = {label: rows[label][0] for label in group}
                        single |= interleaved_ms(fns, args.repeat)
                        b2b_ms |= (
                            interleaved_ms(fns, max(3, args.repeat // 2), args.b2b)
                            if args.b2b > 1
                            else dict.fromkeys(fns, float("nan"))
                        )
                ideal, ideal_b2b = single["ideal"], b2b_ms["ideal"]
                assert isinstance(ideal, float) and isinstance(ideal_b2b, float)
                for label, (_, f) in rows.items():
                    ms, b2b = single[label], b2b_ms[label]
                    if isinstance(ms, Exception) or isinstance(b2b, Exception):
                        error = ms if isinstance(ms, Exception) else b2b
                        print(f"{pass_label} {label:<18} failed: {type(error).__name__}: {error}"[:200])
                        continue
                    tflops = f / (ms * 1e-3) / 1e12
                    print(
                        f"{pass_label} {label:<18} {ms:>9.3f} {tflops:>8.0f} {ms / ideal:>8.2f} "
                        f"{(ms + proj) / (ideal + proj):>6.2f} {b2b:>9.3f} {b2b / ideal_b2b:>9.2f}",
                        flush=True,
                    )
                del q, k, v, inputs, compact
                torch.cuda.empty_cache()


def kernel_options_sweep(args: argparse.Namespace) -> None:
    """FlexAttention ``kernel_options`` on the AB-UPT layouts (bf16): forward
    tiles (``fwd_`` keys) timed forward, backward tiles (``bwd_`` keys, with
    the executor's forward tiles) timed forward+backward."""
    from patternc.nn.executors.flex import _pad_heads_first, flex_tables
    from patternc.nn.executors.flexkernels import _HALF_KERNEL_OPTIONS

    flex = compiled_kernel()
    forward: dict[str, dict[str, int] | None] = {
        "default": None,
        "M128 N64 w4 s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
        "M64 N128 w4 s2": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_warps": 4, "fwd_num_stages": 2},
        "M128 N128 w8 s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
    }

    def bwd(m1: int, n1: int, m2: int, n2: int, warps: int, stages: int) -> dict[str, int]:
        return {**_HALF_KERNEL_OPTIONS, **backward_tiles(m1, n1, m2, n2, warps, stages)}

    backward: dict[str, dict[str, int] | None] = {
        "default": None,
        "fwd tuned, bwd default": dict(_HALF_KERNEL_OPTIONS),
        "bwd 64/128/128/64 w8 s3": bwd(64, 128, 128, 64, 8, 3),
        "bwd 32/128/128/32 w4 s3": bwd(32, 128, 128, 32, 4, 3),
        "bwd 64/64/64/64 w4 s3": bwd(64, 64, 64, 64, 4, 3),
        "bwd 64/64/64/64 w4 s2": bwd(64, 64, 64, 64, 4, 2),
        "bwd 32/64/64/32 w4 s3": bwd(32, 64, 64, 32, 4, 3),
    }
    print(f"\n{'flex kernel_options':<30} {'pass':<8} {'options':<26} {'ms':>9} {'TFLOP/s':>8}")
    for layout_name in [name for name in LAYOUTS if name.startswith("AB-UPT")]:
        plan, sizes = LAYOUTS[layout_name]()
        schedule = schedule_for(plan.token_specs(sizes), plan)
        tables = flex_tables(schedule, {}, torch.device("cuda"))
        mask = tables.block_mask()
        useful = 4 * entries(schedule) * HEADS * DIM
        for backward_pass, options in ((False, forward), (True, backward)):
            q, k, v = (
                _pad_heads_first(
                    torch.randn(1, schedule.n_tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16),
                    tables.q_len,
                ).requires_grad_(backward_pass)
                for _ in range(3)
            )

            def step(
                opts: dict[str, int] | None, q: Tensor = q, k: Tensor = k, v: Tensor = v, mask: object = mask
            ) -> None:
                out = flex(q, k, v, block_mask=mask, kernel_options=opts)
                if q.requires_grad:
                    out.backward(torch.ones_like(out))

            flops = useful * (3.5 if backward_pass else 1.0)
            label_pass = "fwd+bwd" if backward_pass else "fwd"
            times = interleaved_ms(
                {label: functools.partial(step, opts) for label, opts in options.items()}, args.repeat
            )
            for label, ms in times.items():
                if isinstance(ms, Exception):
                    print(f"{layout_name:<30} {label_pass:<8} {label:<26} failed: {type(ms).__name__}"[:140])
                    continue
                print(
                    f"{layout_name:<30} {label_pass:<8} {label:<26} {ms:>9.3f} {flops / (ms * 1e-3) / 1e12:>8.0f}",
                    flush=True,
                )


def fp32_sweep(args: argparse.Namespace) -> None:
    """FlexAttention in float32 on AB-UPT self-anchor 2x(1k+4k): the products'
    precision (``FLOAT32_PRECISION``: torch's ``'ieee'`` by default, ``'tf32x3'``
    three TF32 products per float32 one, ``'tf32'`` one) and backward tiles
    (torch's float32 default is 16/16/16/16, 1 stage, 4 warps), timed forward
    and forward+backward, output and gradients checked against torch's
    default (``'ieee'``, default tiles)."""
    from patternc.nn.executors.flex import _pad_heads_first, flex_tables

    flex = compiled_kernel()

    def precision(name: str) -> dict[str, object]:
        return {"FLOAT32_PRECISION": f"'{name}'"}

    options: dict[str, dict[str, object] | None] = {
        "ieee, default tiles": None,
        "ieee, bwd 64/64/64/64 w8 s1": {**precision("ieee"), **backward_tiles(64, 64, 64, 64, 8, 1)},
        "tf32x3, default tiles": precision("tf32x3"),
        "tf32x3, bwd 64/64/64/64 w8 s1": {**precision("tf32x3"), **backward_tiles(64, 64, 64, 64, 8, 1)},
        "tf32x3, bwd 32/64/64/32 w4 s2": {**precision("tf32x3"), **backward_tiles(32, 64, 64, 32, 4, 2)},
        "tf32x3, bwd 64/64/64/64 w4 s2": {**precision("tf32x3"), **backward_tiles(64, 64, 64, 64, 4, 2)},
        "tf32x3, bwd 32/32/32/32 w4 s2": {**precision("tf32x3"), **backward_tiles(32, 32, 32, 32, 4, 2)},
        "tf32x3, fwd M64 N64 w4 s2, bwd 64/64/64/64 w8 s1": {
            **precision("tf32x3"),
            **backward_tiles(64, 64, 64, 64, 8, 1),
            "fwd_BLOCK_M": 64,
            "fwd_BLOCK_N": 64,
            "fwd_num_warps": 4,
            "fwd_num_stages": 2,
        },
        "tf32x3, fwd M128 N64 w8 s2, bwd 64/64/64/64 w8 s1": {
            **precision("tf32x3"),
            **backward_tiles(64, 64, 64, 64, 8, 1),
            "fwd_BLOCK_M": 128,
            "fwd_BLOCK_N": 64,
            "fwd_num_warps": 8,
            "fwd_num_stages": 2,
        },
        "tf32 (one product), bwd 64/64/64/64 w8 s1": {
            **precision("tf32"),
            **backward_tiles(64, 64, 64, 64, 8, 1),
        },
    }
    print(
        f"\n{'flex float32':<30} {'options':<50} {'fwd ms':>8} {'f+b ms':>8} {'TF/s f+b':>8}  out, grads vs ieee default"
    )
    for layout_name in [name for name in LAYOUTS if "self-anchor 2x(1k+4k)" in name]:
        plan, sizes = LAYOUTS[layout_name]()
        schedule = schedule_for(plan.token_specs(sizes), plan)
        tables = flex_tables(schedule, {}, torch.device("cuda"))
        mask = tables.block_mask()
        flops = 4 * entries(schedule) * HEADS * DIM * 3.5
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            _pad_heads_first(
                torch.randn(1, schedule.n_tokens, HEADS, DIM, device="cuda", generator=gen), tables.q_len
            ).requires_grad_()
            for _ in range(3)
        )
        reference: list[Tensor] = []
        for label, opts in options.items():

            def forward(
                opts: dict[str, object] | None = opts,
                qkv: tuple[Tensor, ...] = (q, k, v),
                mask: object = mask,
            ) -> Tensor:
                return flex(*(t.detach() for t in qkv), block_mask=mask, kernel_options=opts)

            def step(
                opts: dict[str, object] | None = opts,
                qkv: tuple[Tensor, ...] = (q, k, v),
                mask: object = mask,
            ) -> None:
                out = flex(*qkv, block_mask=mask, kernel_options=opts)
                out.backward(torch.ones_like(out))

            try:
                q.grad = k.grad = v.grad = None
                out = forward()
                step()
                results = [out, *(t.grad.clone() for t in (q, k, v))]  # type: ignore[union-attr]
                reference = reference or results
                diffs = [float((r - ref).norm() / ref.norm()) for r, ref in zip(results, reference)]
                fwd_ms = cuda_ms(forward, args.repeat)
                ms = cuda_ms(step, args.repeat)
            except Exception as error:
                print(f"{layout_name:<30} {label:<50} failed: {type(error).__name__}: {error}"[:200])
                continue
            print(
                f"{layout_name:<30} {label:<50} {fwd_ms:>8.3f} {ms:>8.3f} {flops / (ms * 1e-3) / 1e12:>8.1f}  "
                f"{diffs[0]:.1e}, {max(diffs[1:]):.1e}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--ceiling-limit", type=int, default=80000)
    parser.add_argument(
        "--dense-limit", type=int, default=20000, help="largest n for the dense-mask executor"
    )
    parser.add_argument(
        "--b2b", type=int, default=8, help="calls per sample for the back-to-back columns (<2: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="the two smallest layouts only")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="only the kernel_options table")
    parser.add_argument(
        "--sweep-fp32", action="store_true", help="only the float32 precision and backward-tile table"
    )
    parser.add_argument("--layouts", nargs="+", help="substrings of the layout names to run")
    parser.add_argument("--variants", nargs="+", help="executor rows to run (ideal and ceiling always run)")
    parser.add_argument(
        "--control",
        action="store_true",
        help="add a second row of auto's pick: the spread between two rows of the same code",
    )
    args = parser.parse_args()
    if args.quick:
        for name in list(LAYOUTS)[2:4]:
            del LAYOUTS[name]
    if args.layouts:
        for name in list(LAYOUTS):
            if not any(part in name for part in args.layouts):
                del LAYOUTS[name]
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {HEADS} heads x {DIM}, batch 1, median of {args.repeat}"
    )
    if args.sweep_fp32:
        fp32_sweep(args)
        return
    if not args.sweep_only:
        measure(args)
    if not args.no_sweep:
        kernel_options_sweep(args)


if __name__ == "__main__":
    main()
