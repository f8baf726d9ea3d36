"""An AB-UPT-style surrogate trained end to end on potential flow around a sphere.

Each sample is a sphere of radius ``a`` (0.4-1.6) in a uniform flow of unit
speed and random direction ``d``. Anchor points carry the field measured
there; query points carry only their position. The model predicts, at the
queries, the surface pressure coefficient ``Cp = 1 - 9/4 sin^2(theta)``
on surface points and the velocity ``u = d + a^3/2 (d/r^3 - 3 (d.x) x / r^5)``
at volume points (both exact, computed here). Both depend on the flow
direction, which no query reveals but the anchors' measurements do: the
transformer, whose layers run the patterns of ``examples/ab_upt.patc``
(surface/volume anchors and queries, untied weights per branch), reads it
off the anchors; a per-point MLP with as many parameters sees one point and
cannot.

Run: ``python examples/ab_upt_toy.py`` (about 2 minutes; it runs on one CPU
thread, as the tensors are small: ``--threads N`` to change it; ``--plot
out.png`` saves prediction vs truth, needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _threads import add_threads_option, cpu_threads
from torch import Tensor, nn

import patternc
from patternc import TransformerConfig
from patternc.nn import Transformer

GROUPS = ("surface_anchors", "surface_queries", "volume_anchors", "volume_queries")
FEATURES = 10
LAYERS = ["self_anchor", "cross_anchor", "self_anchor", "cross_anchor", "joint"]


def sample_flow(
    batch: int, anchors: int, queries: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs [B, N, FEATURES], targets [B, N, 4], query_kind [N])``, tokens
    in the order of ``GROUPS``. Every token gets its direction from the
    sphere's centre and its distance; anchors also get the field measured
    there (``Cp`` on the surface, ``u`` in the volume) and a flag. Targets:
    ``Cp`` (slot 0) on the surface, ``u`` (slots 1-3) in the volume.
    ``query_kind`` is 1 for surface queries, 2 for volume queries, 0 for anchors."""
    radius = 0.4 + 1.2 * torch.rand(batch, 1, 1, generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(batch, 1, 3, generator=generator), dim=-1)
    n_surface = anchors + queries
    normals = torch.nn.functional.normalize(torch.randn(batch, n_surface, 3, generator=generator), dim=-1)
    surface = radius * normals
    cos = (normals * direction).sum(-1, keepdim=True)
    cp = 1 - 2.25 * (1 - cos**2)
    # volume points within 1.2 of the surface, where the sphere shapes the flow
    where = torch.nn.functional.normalize(torch.randn(batch, n_surface, 3, generator=generator), dim=-1)
    r = radius + 1.2 * torch.rand(batch, n_surface, 1, generator=generator)
    volume = r * where
    d_dot_x = (volume * direction).sum(-1, keepdim=True)
    velocity = direction + radius**3 / 2 * (direction / r**3 - 3 * d_dot_x * volume / r**5)
    points = torch.cat([surface, volume], dim=1)
    distance = points.norm(dim=-1, keepdim=True)
    zeros_s, zeros_v = torch.zeros(batch, n_surface, 3), torch.zeros(batch, n_surface, 1)
    targets = torch.cat([torch.cat([cp, zeros_s], -1), torch.cat([zeros_v, velocity], -1)], dim=1)
    kinds = [0] * anchors + [1] * queries + [0] * anchors + [2] * queries
    query_kind = torch.tensor(kinds)
    is_anchor = (query_kind == 0).float()[None, :, None].expand(batch, -1, -1)
    is_surface = torch.cat([torch.ones(n_surface), torch.zeros(n_surface)])[None, :, None].expand(
        batch, -1, -1
    )
    observed = targets * is_anchor  # measurements at anchors only
    inputs = torch.cat([points / distance, distance, is_surface, is_anchor, observed], -1)
    return inputs, targets, query_kind


class Surrogate(nn.Module):
    """Embed points, run the pattern stack, read out ``Cp`` / ``u``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        program = patternc.compile(open("examples/ab_upt.patc").read())
        config = TransformerConfig(
            vocab_size=None, d_model=dim, num_heads=heads, num_layers=len(LAYERS), d_ff=2 * dim,
            dropout_rate=0.0, max_len=4096, pos_emb_type="none", untied=True,
        )  # fmt: skip
        self.embed = nn.Linear(FEATURES, dim)
        self.stack = Transformer(config, program, LAYERS)
        self.out = nn.Linear(dim, 4)

    def forward(self, inputs: Tensor, sizes: dict[str, int]) -> Tensor:
        return self.out(self.stack(self.embed(inputs), sizes))  # type: ignore[no-any-return]


def mlp_baseline(params: int) -> nn.Module:
    """A per-point MLP (3 hidden layers) sized to ``params`` parameters."""
    width = int(
        (-(FEATURES + 8) + math.sqrt((FEATURES + 8) ** 2 + 8 * (params - 4))) / 4
    )  # 2w^2 + (F + 8)w + 4
    return nn.Sequential(
        nn.Linear(FEATURES, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4),
    )  # fmt: skip


def masked_errors(pred: Tensor, target: Tensor, query_kind: Tensor) -> tuple[float, float]:
    """Relative L2 error at the queries: ``Cp`` on the surface, ``u`` in the volume."""
    cp, cp_true = pred[:, query_kind == 1, 0], target[:, query_kind == 1, 0]
    u, u_true = pred[:, query_kind == 2, 1:], target[:, query_kind == 2, 1:]
    return float((cp - cp_true).norm() / cp_true.norm()), float((u - u_true).norm() / u_true.norm())


def loss_of(pred: Tensor, target: Tensor, query_kind: Tensor) -> Tensor:
    """Mean squared error at the queries (anchors carry their values as inputs)."""
    cp = (pred[:, query_kind == 1, 0] - target[:, query_kind == 1, 0]).pow(2).mean()
    u = (pred[:, query_kind == 2, 1:] - target[:, query_kind == 2, 1:]).pow(2).mean()
    return cp + u


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--anchors", type=int, default=16)
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    add_threads_option(parser)
    parser.add_argument("--plot", default=None, help="save prediction vs truth to this .png")
    args = parser.parse_args(argv)
    with cpu_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    sizes = {
        "surface_anchors": args.anchors, "surface_queries": args.queries,
        "volume_anchors": args.anchors, "volume_queries": args.queries,
    }  # fmt: skip
    surrogate = Surrogate(args.dim, args.heads)
    n_params = sum(p.numel() for p in surrogate.parameters())
    baseline = mlp_baseline(n_params)
    print(f"transformer: {n_params:,} parameters; per-point MLP baseline: "
          f"{sum(p.numel() for p in baseline.parameters()):,}")  # fmt: skip
    models = {"transformer": surrogate, "mlp": baseline}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    schedulers = {
        name: torch.optim.lr_scheduler.CosineAnnealingLR(o, args.steps) for name, o in optimizers.items()
    }
    train = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    print(f"{'step':>6} {'transformer loss':>17} {'mlp loss':>10}")
    for step in range(1, args.steps + 1):
        inputs, targets, query_kind = sample_flow(args.batch, args.anchors, args.queries, train)
        losses = {}
        for name, model in models.items():
            pred = model(inputs, sizes) if name == "transformer" else model(inputs)
            loss = loss_of(pred, targets, query_kind)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            schedulers[name].step()
            losses[name] = loss.item()
        if step % max(1, args.steps // 12) == 0 or step == 1:
            print(f"{step:>6} {losses['transformer']:>17.5f} {losses['mlp']:>10.5f}", flush=True)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    test = torch.Generator().manual_seed(2)
    inputs, targets, query_kind = sample_flow(64, args.anchors, args.queries, test)
    results = {}
    with torch.no_grad():
        predictions = {"transformer": surrogate(inputs, sizes), "mlp": baseline(inputs)}
    print(f"{'test error (relative L2)':<26} {'surface Cp':>10} {'volume u':>10}")
    for name, pred in predictions.items():
        cp_error, u_error = masked_errors(pred, targets, query_kind)
        results[f"{name}_cp"], results[f"{name}_u"] = cp_error, u_error
        print(f"{name:<26} {cp_error:>10.4f} {u_error:>10.4f}")
    ratio = results["mlp_u"] / max(results["transformer_u"], 1e-12)
    print(f"volume error: the MLP's is {ratio:.1f}x the transformer's")
    if args.plot:
        plot(predictions, targets, query_kind, args.plot)
    return results


def plot(predictions: dict[str, Tensor], targets: Tensor, query_kind: Tensor, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for name, pred in predictions.items():
        axes[0].scatter(
            targets[:4, query_kind == 1, 0].flatten(), pred[:4, query_kind == 1, 0].flatten(), s=3, label=name
        )
        axes[1].scatter(
            targets[:4, query_kind == 2, 1].flatten(), pred[:4, query_kind == 2, 1].flatten(), s=3, label=name
        )
    for ax, title in zip(axes, ("surface Cp", "volume u_x")):
        ax.plot(*[[-1.5, 1.5]] * 2, "k--", lw=0.8)
        ax.set(title=title, xlabel="truth", ylabel="prediction")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
