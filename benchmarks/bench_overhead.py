"""Host overhead per attention call: executors against a bare SDPA loop.

64 documents of 8..71 tokens (every one a different shape, so each is its own
launch), 2 heads of 8, one CPU thread: the attention itself is tiny, so the
time is mostly Python and dispatch, which on a GPU decides whether
many-group layouts are host-bound. "bare" is one SDPA call per document on
ready contiguous head-major tensors; "bare on views" slices the token-major
input and concatenates the outputs, the floor for an executor that makes no
copies (on CPU the strided views cost the kernel itself some time; a GPU
kernel reads them natively). "module forward" is a whole ``PatternAttention``
(projections, schedule lookup, executor, KV-cache views); "flex block mask" is
a cold block-mask build for the layout (tables + ``BlockMask``), whose tiny
tensors make it mostly host time too. The fwd+bwd rows compare the
executor's backward pass with SDPA's on ready leaf tensors. A second table
times the self-anchor hot path's input views with and without gradients.

Further tables: flex around its kernel against a hand-written compiled
``flex_attention``, and whole flex layers against the hand-written layer of
``bench_users.py`` (host work alone, and with the compiled kernels).

Run: ``python benchmarks/bench_overhead.py [--repeat 200] [--tables executors views flex layers]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import patternc
from patternc.lower.layout import Layout
from patternc.nn import PatternAttention
from patternc.nn.executors import EXECUTORS
from patternc.nn.executors.common import AttentionInputs
from patternc.nn.flexmask import FlexTables
from patternc.nn.schedule import schedule_for


def timings_us(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, minimum) in us. On a shared 2-core VM the median swings by
    +-30% between runs; the minimum is the cost with no interference and is
    what to compare across commits."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, min(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=TABLES,
        default=list(TABLES),
        help="which tables to print (default: all)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "executors" in args.tables:
        executors(args.repeat)
    if "views" in args.tables:
        periodic_views(args.repeat)
    if "flex" in args.tables:
        flex_host(args.repeat)
    if "layers" in args.tables:
        flex_layers(args.repeat)


TABLES = ("executors", "views", "flex", "layers")
"""The tables: executors against a bare SDPA loop, the self-anchor hot
path's views, flex around its kernel, flex layers against hand-written ones."""


def executors(repeat: int) -> None:
    """The first table: 64 documents, each executor against bare SDPA."""
    plan = patternc.compile("groups doc*\ndoc* -> self").patterns["default"]
    sizes = {f"doc{i}": 8 + i for i in range(64)}
    schedule = schedule_for(plan.token_specs(sizes), plan)
    q, k, v = (torch.randn(1, schedule.n_tokens, 2, 8) for _ in range(3))
    inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
    ready = [
        tuple(t[:, c.queries[0].start : c.queries[0].stop].transpose(1, 2).contiguous() for t in (q, k, v))
        for c in schedule.calls
    ]

    def bare() -> None:
        for a, b, c in ready:
            F.scaled_dot_product_attention(a, b, c)

    slices = [(c.queries[0].start, c.queries[0].length) for c in schedule.calls]

    def bare_views() -> torch.Tensor:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        outs = [
            F.scaled_dot_product_attention(qt.narrow(2, a, n), kt.narrow(2, a, n), vt.narrow(2, a, n))
            for a, n in slices
        ]
        return torch.cat([o.transpose(1, 2) for o in outs], 1)

    rows = [
        ("bare SDPA loop", *timings_us(bare, repeat)),
        ("bare on views", *timings_us(bare_views, repeat)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("batched", "loop", "dense"):
            rows.append((name, *timings_us(lambda n=name: EXECUTORS[n](inputs), repeat)))  # type: ignore[misc]
    # forward+backward: the executor's backward against SDPA's on ready leaves
    leaves = [tuple(t.detach().requires_grad_() for t in call) for call in ready]
    q_grad, k_grad, v_grad = (t.detach().requires_grad_() for t in (q, k, v))
    grad_inputs = AttentionInputs(q_grad, k_grad, v_grad, schedule, {}, None, 0.0, None)

    def bare_backward() -> None:
        outs = [F.scaled_dot_product_attention(a, b, c) for a, b, c in leaves]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def batched_backward() -> None:
        out = EXECUTORS["batched"](grad_inputs)
        out.backward(torch.ones_like(out))

    rows.append(("bare fwd+bwd", *timings_us(bare_backward, repeat)))
    rows.append(("batched fwd+bwd", *timings_us(batched_backward, repeat)))
    attention = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan)
    x = torch.randn(1, schedule.n_tokens, 16)
    with torch.no_grad():
        rows.append(("module forward", *timings_us(lambda: attention(x, sizes), repeat)))
    rows.append(
        (
            "flex block mask",
            *timings_us(lambda: FlexTables.build(schedule, {}, "cpu").block_mask(), repeat),
        )
    )
    base = rows[0][1]
    print(f"{len(schedule.calls)} calls, {schedule.n_tokens} tokens, CPU, 1 thread, {repeat} samples")
    print(f"{'variant':<16} {'median us':>9} {'min us':>8} {'us/call':>8} {'vs bare':>8}")
    for name, us, low in rows:
        print(f"{name:<16} {us:>9.0f} {low:>8.0f} {us / len(schedule.calls):>8.1f} {us / base:>8.2f}")


def periodic_views(repeat: int) -> None:
    """The self-anchor hot path's input views (one periodic launch, three
    tensors): one ``as_strided`` each when no gradient flows, against the
    reshape/narrow/transpose chain kept for training; the output's way back
    to token order, its shape passed as a ``torch.Size`` or as ints; then
    the executor's whole call in each mode (tiny tensors: host time)."""
    from patternc.nn.executors.batched import _back_to_tokens, _periods

    plan = patternc.compile(open("examples/ab_upt.patc").read()).patterns["self_anchor"]
    sizes = {"surface_anchors": 4, "surface_queries": 12, "volume_anchors": 4, "volume_queries": 12}
    schedule = schedule_for(plan.token_specs(sizes), plan)
    launch = schedule.batched.periodic_launches[0]
    assert launch is not None
    frozen = [torch.randn(1, schedule.n_tokens, 2, 8) for _ in range(3)]
    trained = [t.clone().requires_grad_() for t in frozen]

    def views(tensors: list[torch.Tensor]) -> Callable[[], object]:
        q, k, v = tensors
        count, period = launch.count, launch.period
        return lambda: (
            _periods(q, count, period, launch.q_start, launch.q_length),
            _periods(k, count, period, launch.k_start, launch.k_length),
            _periods(v, count, period, launch.k_start, launch.k_length),
        )

    # the launch's output, [B * count, H, L, D] laid out token-major as SDPA
    # leaves it, back to [B, N, H, D]: the shape as a torch.Size or as ints,
    # or one as_strided (the executor's way without a gradient)
    q = frozen[0]
    out = q.view(launch.count, launch.period, *q.shape[2:]).transpose(1, 2)

    def call(tensors: list[torch.Tensor]) -> Callable[[], object]:
        inputs = AttentionInputs(*tensors, schedule, {}, None, 0.0, None)
        return lambda: EXECUTORS["batched"](inputs)

    rows = [
        ("views, no grad (as_strided)", *timings_us(views(frozen), repeat)),
        ("views, grad (chain)", *timings_us(views(trained), repeat)),
        ("out back, reshape(Size)", *timings_us(lambda: out.transpose(1, 2).reshape(q.shape), repeat)),
        ("out back, reshape(*ints)", *timings_us(lambda: out.transpose(1, 2).reshape(*q.shape), repeat)),
        ("out back, as_strided", *timings_us(lambda: _back_to_tokens(out, q.shape[0], q.shape[1]), repeat)),
        ("batched, no grad", *timings_us(call(frozen), repeat)),
        ("batched, grad (forward)", *timings_us(call(trained), repeat)),
    ]
    print(f"\nself-anchor 2x(4+12), one periodic launch, CPU, 1 thread, {repeat} samples")
    print(f"{'variant':<30} {'median us':>9} {'min us':>8}")
    for name, us, low in rows:
        print(f"{name:<30} {us:>9.1f} {low:>8.1f}")


VLM = "groups registers image text\nregisters, image -> registers, image\ntext -> registers, image, text[causal]"
PREFIX = "groups prefix text\nprefix -> prefix\ntext -> prefix, text[causal]"


def _flex_layouts(scale: int) -> list[tuple[str, Layout]]:
    """bench_users' VLM and prefix-LM layouts, lengths divided by ``scale``."""
    vlm = patternc.compile(VLM).patterns["default"]
    prefix = patternc.compile(PREFIX).patterns["default"]
    return [
        (
            f"VLM 16+{1024 // scale}+{3072 // scale}",
            vlm.layout({"registers": 16, "image": 1024 // scale, "text": 3072 // scale}),
        ),
        (
            f"prefix {1024 // scale}+{3072 // scale}",
            prefix.layout({"prefix": 1024 // scale, "text": 3072 // scale}),
        ),
    ]


def flex_host(repeat: int, rounds: int = 3) -> None:
    """patternc ``flex`` against a hand-written compiled ``flex_attention``
    (ready head-major inputs at the bucketed length, the block mask built
    once), forward without gradients, 2 heads of 16, one CPU thread.

    "around the kernel" is ``run_flex`` with its compiled call replaced by a
    stub, at bench_users' full lengths: the per-call Python (table and block
    mask lookups, kernel options) and the padding copies to the bucketed
    length. The whole calls run at a 16th of the lengths (the CPU kernel at
    full length would hide the host time), interleaved round by round; the
    "value guard off" row forces the non-finite guard off (what the guard's
    reductions, copies and Dynamo guards cost); "key guard" runs the guard a
    CUDA Triton call takes where blocks mix groups (one pass over K and V)."""
    from torch.nn.attention.flex_attention import flex_attention

    from patternc.nn.executors import flex

    original = flex._attend_fn
    # code before flex._guard took the guard as a bool (True on every CPU call)
    named = hasattr(flex, "_guard")

    def stub(guard: flex.Guard | bool, traced: bool) -> Callable[..., torch.Tensor]:
        return lambda q, *rest: q if guard in (True, "poison") else q.transpose(1, 2)

    print(
        f"\nflex, forward without gradients, 2 heads of 16, CPU, 1 thread, median of {repeat} x {rounds} rounds"
    )
    print(f"{'layout':<22} {'variant':<34} {'median us':>9} {'min us':>8}")
    flex._attend_fn = stub
    try:
        for name, layout in _flex_layouts(1):
            inputs = _flex_inputs(layout)
            q_len = flex.flex_tables(layout, {}, inputs.q.device).q_len
            label = f"around the kernel ({layout.n_tokens} -> {q_len})"
            with torch.no_grad():
                median, low = timings_us(functools.partial(flex.run_flex, inputs), repeat)
            print(f"{name:<22} {label:<34} {median:>9.1f} {low:>8.1f}")
    finally:
        flex._attend_fn = original
    hand = torch.compile(flex_attention, dynamic=False, fullgraph=True)

    def unguarded_fn(guard: flex.Guard | bool, traced: bool) -> Callable[..., torch.Tensor]:
        # the value guard always runs on CPU: its tables dropped, the kernel's output transposed
        attend = original("none" if named else False, traced)  # type: ignore[arg-type]
        return lambda *args: attend(*args[:7]).transpose(1, 2)

    def without_guard(inputs: AttentionInputs) -> torch.Tensor:
        flex._attend_fn = unguarded_fn
        try:
            return flex.run_flex(inputs)
        finally:
            flex._attend_fn = original

    def key_guard_fn(guard: flex.Guard | bool, traced: bool) -> Callable[..., torch.Tensor]:
        # the guard of a CUDA Triton call whose blocks mix groups, here on the CPU kernel
        attend = original("keys", traced)
        return lambda *args: attend(*args[:7]).transpose(1, 2)

    def key_guard(inputs: AttentionInputs) -> torch.Tensor:
        flex._attend_fn = key_guard_fn
        try:
            return flex.run_flex(inputs)
        finally:
            flex._attend_fn = original

    for name, layout in _flex_layouts(16):
        inputs = _flex_inputs(layout)
        tables = flex.flex_tables(layout, {}, inputs.q.device)
        pad = (0, 0, 0, 0, 0, tables.q_len - layout.n_tokens)
        q, k, v = (F.pad(t, pad).transpose(1, 2).contiguous() for t in (inputs.q, inputs.k, inputs.v))
        variants: list[tuple[str, Callable[[], object]]] = [
            ("hand compiled flex", functools.partial(hand, q, k, v, block_mask=tables.block_mask())),
            ("patternc flex", functools.partial(flex.run_flex, inputs)),
            ("patternc flex, value guard off", functools.partial(without_guard, inputs)),
        ]
        if named:
            variants.append(("patternc flex, key guard", functools.partial(key_guard, inputs)))
        samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in variants}
        with torch.no_grad():
            for _ in range(rounds):
                for label, fn in variants:
                    samples[label].append(timings_us(fn, repeat))
        for label, found in samples.items():
            median = statistics.median(m for m, _ in found)
            low = min(m for _, m in found)
            print(f"{name:<22} {label:<34} {median:>9.1f} {low:>8.1f}")


def flex_layers(repeat: int, rounds: int = 3) -> None:
    """Host time of one attention layer per bench_users row at its full
    lengths, forward without gradients, one CPU thread: the hand-written
    FlexAttention layer against ``PatternAttention(backend="flex")``, same
    weights, interleaved round by round, each with its compiled attention
    call replaced by a stub that returns its first input (the hand layer's
    ``flex_attention``; patternc's compiled graph, for the guard a CUDA
    Triton call of the layout takes). What is left is the host work around
    the kernel: projections, views, lookups, pads, the output's way back.
    A narrow layer (width 8, 2 heads of 4) keeps the tensor work small;
    on CPU a pad still copies its bytes, where a GPU launches it."""
    import bench_users

    from patternc.nn.executors import flex

    def stub(guard: flex.Guard | bool, traced: bool) -> Callable[..., torch.Tensor]:
        # the poisoning guard's graph returns token-major output, the others the kernel's head-major
        return lambda q, *rest: q if guard in (True, "poison") else q.transpose(1, 2)

    # code before flex._guard guards every CPU call (the flex table's comparisons are against it)
    on_cpu = getattr(flex, "_guard", None)
    cuda = torch.device("cuda")
    width, heads = 8, 2
    print(
        f"\nflex layer host time (kernel stubbed), forward without gradients, width {width}, "
        f"{heads} heads, CPU, 1 thread, median of {repeat} x {rounds} rounds"
    )
    print(f"{'layout':<44} {'variant':<16} {'median us':>9} {'min us':>8}")
    for key in ("vlm", "prefix", "interleaved", "window"):
        row = bench_users.rows(tiny=False)[key]
        plan = patternc.compile(row.source).patterns["default"]
        torch.manual_seed(0)
        layer = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=width, num_heads=heads), plan)
        layer.executor = EXECUTORS["flex"]
        hand = bench_users.HandFlexAttention(width, heads, None, lambda q, k, v, block_mask: q)
        bench_users._copy_weights(hand, layer)
        x = torch.randn(1, row.n_tokens, width)
        layout = plan.layout(row.sizes)
        tables = flex.flex_tables(layout, {}, x.device)
        guard = "poison (every CPU call)"
        original, flex._attend_fn = flex._attend_fn, stub
        if on_cpu is not None:
            guard = on_cpu(
                layout, tables, flex._tables_key({}, x.device, 128, False, False)[1:], False, cuda, False
            )
            flex._guard = lambda *args, chosen=guard: chosen
        variants = {
            "hand": functools.partial(hand, x),
            "patternc flex": functools.partial(layer, x, row.sizes),
        }
        samples: dict[str, list[tuple[float, float]]] = {label: [] for label in variants}
        try:
            with torch.no_grad():
                for _ in range(rounds):
                    for label, fn in variants.items():
                        samples[label].append(timings_us(fn, repeat))
        finally:
            flex._attend_fn = original
            if on_cpu is not None:
                flex._guard = on_cpu
        name = f"{key} {row.n_tokens} -> {tables.q_len}, {guard}"
        for label, found in samples.items():
            median = statistics.median(m for m, _ in found)
            low = min(m for _, m in found)
            print(f"{name:<44} {label:<16} {median:>9.1f} {low:>8.1f}")


def _flex_inputs(layout: Layout) -> AttentionInputs:
    """Q, K, V as a layer hands them over: views of one fused projection."""
    q, k, v = torch.randn(1, layout.n_tokens, 3 * 2 * 16).view(1, layout.n_tokens, 3, 2, 16).unbind(2)
    return AttentionInputs(q, k, v, layout, {}, None, 0.0, None)


if __name__ == "__main__":
    main()
