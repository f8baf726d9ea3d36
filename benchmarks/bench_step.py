"""A whole training step of an AB-UPT surrogate: patternc's stack against the
same model written by hand, eager and under ``torch.compile``, in one run.

The model: ``patternc.nn.Transformer`` with 12 layers of width 768 (12 heads
of 64, GELU MLP of 3072, pre-norm), untied per token type (surface, volume),
the layers cycling self-anchor / cross-anchor / joint attention over
2 x (8k anchors + 24k queries). The reference (``HandModel``) shares those
parameters and places one ``scaled_dot_product_attention`` per pattern on
views of the projections by hand, as one would without patternc. A step is
forward, an MSE loss, backward and a fused AdamW update (bf16 autocast,
float32 weights). Both models are checked to agree before timing.

Reported per variant: step time (median of ``--steps``), tokens/s, model
FLOP utilisation (linear layers plus attention on allowed pairs only, against
``--peak`` TFLOP/s: the default 989 is Hopper SXM's dense bf16 peak), the ratio to the hand
model in the same mode, and the compile time. ``torch.compile`` runs with
``fullgraph=True``: a graph break is an error, not a silent split.

Two more rows: ``hand, anchor K/V`` projects K/V for the anchors only (no
pattern reads a query as a key), as a careful hand-written model would, and
``patternc, all K/V`` runs patternc with every layout's key space read as all
tokens (the layers project K/V for queries too: what the key space saves).
MFU counts the nominal model (K/V projected for every token) for every row.

Run on the GPU:  python benchmarks/bench_step.py [--steps 20]
Small, on CPU:   python benchmarks/bench_step.py --tiny
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import patternc
from patternc.lower.layout import KeySpace
from patternc.nn import Transformer

KEY_TOKENS = KeySpace.identity
ALL_TOKENS = property(lambda space: True)

SOURCE = """groups surface_anchors surface_queries volume_anchors volume_queries
types {
    surface: surface_*
    volume: volume_*
}
pattern self_anchor {
    surface_* -> surface_anchors
    volume_* -> volume_anchors
}
pattern cross_anchor {
    surface_* -> volume_anchors
    volume_* -> surface_anchors
}
pattern joint {
    * -> *_anchors
}
"""
SCHEDULE = ("self_anchor", "cross_anchor", "joint")
VARIANTS = ("hand", "hand, anchor K/V", "patternc", "patternc, all K/V")


def build(args: argparse.Namespace, device: torch.device) -> Transformer:
    config = patternc.TransformerConfig(
        vocab_size=None,
        d_model=args.dim,
        num_heads=args.heads,
        num_layers=args.layers,
        d_ff=4 * args.dim,
        dropout_rate=0.0,
        max_len=max(args.anchors, args.queries),
        pos_emb_type="none",
        untied=True,
        attention_type=args.backend,
    )
    patterns = [SCHEDULE[i % 3] for i in range(args.layers)]
    torch.manual_seed(0)
    return Transformer(config, patternc.compile(SOURCE), layer_patterns=patterns).to(device)


class HandModel(nn.Module):
    """The same function written by hand on the same parameters: per-type
    linear layers on the two halves, one SDPA per pattern on views."""

    def __init__(self, model: Transformer, anchors: int, queries: int, anchor_kv: bool = False) -> None:
        """``anchor_kv``: project K/V for the anchors only (no pattern reads a
        query as a key), as a careful hand-written model would."""
        super().__init__()
        self.model = model
        self.anchors, self.half = anchors, anchors + queries
        self.anchor_kv = anchor_kv

    def _per_type(self, banks: nn.Module, x: Tensor, rows: slice = slice(None)) -> Tensor:
        surface, volume = x.split(self.half, dim=1)
        return torch.cat([self._bank(banks, 0, surface, rows), self._bank(banks, 1, volume, rows)], dim=1)

    @staticmethod
    def _bank(banks: nn.Module, bank: int, x: Tensor, rows: slice = slice(None)) -> Tensor:
        """Bank ``bank`` of an untied linear (``rows``: some of its outputs)."""
        return F.linear(x, banks.weight[bank][rows], banks.bias[bank][rows])  # type: ignore[index]

    def _attention(self, pattern: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Head-major ``[B, H, N, D]`` in and out (K/V ``[B, H, 2 * anchors, D]``
        with ``anchor_kv``)."""
        a, s = self.anchors, self.half
        if self.anchor_kv:
            s = a  # surface anchors, then volume anchors
        surface_kv = (k[:, :, :a], v[:, :, :a])
        volume_kv = (k[:, :, s : s + a], v[:, :, s : s + a])
        s = self.half
        if pattern == "joint":
            if self.anchor_kv:
                return F.scaled_dot_product_attention(q, k, v)
            keys = torch.cat([surface_kv[0], volume_kv[0]], dim=2)
            values = torch.cat([surface_kv[1], volume_kv[1]], dim=2)
            return F.scaled_dot_product_attention(q, keys, values)
        first, second = (surface_kv, volume_kv) if pattern == "self_anchor" else (volume_kv, surface_kv)
        return torch.cat(
            [
                F.scaled_dot_product_attention(q[:, :, :s], *first),
                F.scaled_dot_product_attention(q[:, :, s:], *second),
            ],
            dim=2,
        )

    def forward(self, h: Tensor) -> Tensor:
        b, n, d = h.shape
        heads = self.model.config.num_heads
        for layer, pattern in zip(self.model.layers, self.model.layer_patterns):
            x = layer.norm1(h)
            qkv = layer.attention.qkv  # rows of each bank: Q, then K and V
            q = self._per_type(qkv, x, slice(0, d)).view(b, n, heads, -1).transpose(1, 2)
            if self.anchor_kv:
                a, s = self.anchors, self.half
                anchors = [
                    self._bank(qkv, 0, x[:, :a], slice(d, None)),
                    self._bank(qkv, 1, x[:, s : s + a], slice(d, None)),
                ]
                kv = torch.cat(anchors, dim=1).view(b, 2 * a, 2, heads, -1)
            else:
                kv = self._per_type(qkv, x, slice(d, None)).view(b, n, 2, heads, -1)
            k, v = (t.transpose(1, 2) for t in kv.unbind(2))
            out = self._attention(pattern, q, k, v).transpose(1, 2).reshape(b, n, d)
            h = h + self._per_type(layer.attention.proj, out)
            x = layer.norm2(h)
            hidden = F.gelu(self._per_type(layer.ff.up, x))
            h = h + self._per_type(layer.ff.down, hidden)
        return self.model.final_norm(h)  # type: ignore[no-any-return]


def model_flops(model: Transformer, sizes: dict[str, int], batch: int) -> float:
    """Forward+backward FLOPs: 3x the linear layers' 2*N*in*out, 3.5x attention's
    4*allowed*width (FlashAttention's backward recomputes the scores)."""
    n = sum(sizes.values())
    c = model.config
    linear = 2 * n * (c.d_model * 3 * c.d_model + c.d_model * c.d_model + 2 * c.d_model * c.d_ff)
    attention = 0
    for pattern in model.layer_patterns:
        plan = model.plans[pattern]
        attention += 4 * plan.bind(list(sizes)).layout(sizes).allowed_entries * c.d_model
    return batch * (3 * linear * c.num_layers + 3.5 * attention)


def step_fn(
    forward: Callable[[Tensor], Tensor],
    params: list[nn.Parameter],
    x: Tensor,
    target: Tensor,
    device: torch.device,
) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(forward(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--anchors", type=int, default=8192)
    parser.add_argument("--queries", type=int, default=24576)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--peak", type=float, default=989.0, help="dense bf16 TFLOP/s of the device")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke run")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="the rows to run (the first is each mode's baseline)",
    )
    args = parser.parse_args()
    if args.tiny:
        args.anchors, args.queries, args.layers, args.dim, args.heads, args.steps = 16, 48, 3, 64, 4, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args, device)
    hand = HandModel(model, args.anchors, args.queries)
    hand_anchor_kv = HandModel(model, args.anchors, args.queries, anchor_kv=True)
    sizes = {
        "surface_anchors": args.anchors,
        "surface_queries": args.queries,
        "volume_anchors": args.anchors,
        "volume_queries": args.queries,
    }
    n = sum(sizes.values())
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, n, args.dim, device=device, generator=gen)
    target = torch.randn(args.batch, n, args.dim, device=device, generator=gen)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        ours, theirs, theirs_anchor_kv = model(x, sizes).float(), hand(x).float(), hand_anchor_kv(x).float()
    error = float((ours - theirs).norm() / theirs.norm())
    error = max(error, float((ours - theirs_anchor_kv).norm() / theirs_anchor_kv.norm()))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}, torch {torch.__version__}: {args.layers} layers, width {args.dim}, {args.heads} heads, "
        f"untied surface/volume, 2x({args.anchors}+{args.queries}) = {n} tokens, batch {args.batch}, "
        f"backend {args.backend!r}, bf16 autocast, fused AdamW; patternc vs hand relative difference {error:.1e}"
    )
    assert error < 2e-2, f"the hand model disagrees with patternc's stack ({error:.3g})"
    flops = model_flops(model, sizes, args.batch)
    params = list(model.parameters())
    header = f"{'variant':<28} {'step ms':>9} {'tokens/s':>11} {'MFU':>6} {'vs hand':>8} {'compile s':>10}"
    print(header + "\n" + "-" * len(header))
    handler = _Warnings()
    logging.getLogger("torch._dynamo").addHandler(handler)
    for mode in args.modes:
        baseline = None
        rows = {
            "hand": (hand, lambda m: lambda t: m(t)),
            "hand, anchor K/V": (hand_anchor_kv, lambda m: lambda t: m(t)),
            "patternc": (model, lambda m: lambda t: m(t, sizes)),
            "patternc, all K/V": (model, lambda m: lambda t: m(t, sizes)),
        }
        for label in args.variants:
            module, call = rows[label]
            # "all K/V": every layout's key space read as every token, so
            # the layers project K/V for queries too: what the key space saves
            KeySpace.identity = ALL_TOKENS if label.endswith("all K/V") else KEY_TOKENS  # type: ignore[method-assign,assignment]
            torch._dynamo.reset()
            forward = call(module)
            if mode == "compile":
                forward = torch.compile(forward, fullgraph=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = step_fn(forward, params, x, target, device)
                start = time.perf_counter()
                try:
                    step()
                except Exception as error:  # report and go on: one table per run
                    print(
                        f"{label + ' ' + mode:<28} failed: {type(error).__name__}: {str(error)[:200]} ... {str(error)[-1200:]}"
                    )
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - start
                for _ in range(2):
                    step()
            ours_warned = [
                str(w.message)
                for w in caught
                if "patternc" in str(w.filename) or "patternc" in str(w.message)
            ]
            times = []
            for _ in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1e3
            baseline = baseline or ms
            mfu = flops / (ms * 1e-3) / (args.peak * 1e12)
            print(
                f"{label + ' ' + mode:<28} {ms:>9.2f} {args.batch * n / (ms * 1e-3):>11.0f} {mfu:>6.1%} "
                f"{ms / baseline:>8.3f} {compile_s:>10.1f}",
                flush=True,
            )
            if ours_warned:
                print(f"  warnings from patternc: {ours_warned[:3]}")
    KeySpace.identity = KEY_TOKENS  # type: ignore[method-assign,assignment]
    logging.getLogger("torch._dynamo").removeHandler(handler)
    dynamo = [m for m in handler.messages if "patternc" in m]
    print(f"Dynamo warnings naming patternc: {len(dynamo)}{': ' + dynamo[0][:200] if dynamo else ''}")
    print(f"model FLOPs per step {flops / 1e12:.2f} TFLOP (MFU against {args.peak:.0f} TFLOP/s)")
    if args.backend == "auto":
        from patternc.nn.executors.auto import picks as kept_picks

        picks = sorted({(f"training={c[4]}, compact={c[5]}", pick) for c, pick in kept_picks()})
        print("auto's picks on record:")
        for conditions, pick in picks:
            print(f"  {conditions}: {pick}")


if __name__ == "__main__":
    main()
