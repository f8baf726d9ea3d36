"""Write the golden files of ``tests/test_noether_compat.py`` from the real peer package.

Needs ``noether`` importable: emmiai-noether 2026.4.0 (Python >= 3.12) with
torch, einops, loguru, pydantic and numpy, and patternc on the path::

    python3.12 -m venv /tmp/peer && /tmp/peer/bin/pip install torch einops loguru pydantic numpy lark networkx
    /tmp/peer/bin/pip download --no-deps emmiai-noether==2026.4.0 && /tmp/peer/bin/pip install --no-deps emmiai_noether-*.whl
    PYTHONPATH=. /tmp/peer/bin/python tests/golden/noether/make_golden.py

For each case of ``tests/noether_cases.py`` it builds the peer's module with a
fixed seed, draws every parameter at random (so conditioning, layer scale
and biases all matter), runs the case and saves ``<case>.pt``: the state
dict, the inputs, the outputs and the gradients (float32). The peer itself is
never a dependency of patternc or of its tests.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/: noether_cases

import noether  # noqa: E402 - the peer; this script exists to run it
from noether.core.schemas.modules import attention as peer_attention  # noqa: E402
from noether.core.schemas.modules import blocks, layers, mlp, untied  # noqa: E402
from noether.modeling.modules import layers as peer_layers  # noqa: E402
from noether.modeling.modules.attention.anchor_attention import (  # noqa: E402
    CrossAnchorAttention,
    JointAnchorAttention,
    SelfAnchorAttention,
)
from noether.modeling.modules.attention.anchor_attention.mixed import MixedAttention  # noqa: E402
from noether.modeling.modules.blocks import PerceiverBlock, TransformerBlock  # noqa: E402
from noether.modeling.modules.untied import (  # noqa: E402
    UntiedLinear,
    UntiedMixedAttention,
    UntiedMLP,
    UntiedPerceiverBlock,
    UntiedTransformerBlock,
)
from noether_cases import CASES, grad_target  # noqa: E402

PEER = SimpleNamespace(
    **{
        n: getattr(m, n)
        for m in (peer_attention, blocks, layers, mlp, untied)
        for n in dir(m)
        if n.endswith("Config")
    },
    TokenSpec=peer_attention.TokenSpec,
    AttentionPattern=peer_attention.AttentionPattern,
    RopeFrequency=peer_layers.RopeFrequency,
    LinearProjection=peer_layers.LinearProjection,
    MixedAttention=MixedAttention,
    SelfAnchorAttention=SelfAnchorAttention,
    CrossAnchorAttention=CrossAnchorAttention,
    JointAnchorAttention=JointAnchorAttention,
    TransformerBlock=TransformerBlock,
    PerceiverBlock=PerceiverBlock,
    UntiedLinear=UntiedLinear,
    UntiedMLP=UntiedMLP,
    UntiedMixedAttention=UntiedMixedAttention,
    UntiedTransformerBlock=UntiedTransformerBlock,
    UntiedPerceiverBlock=UntiedPerceiverBlock,
)


def gradients(
    outputs: dict[str, torch.Tensor], inputs: dict[str, Any], module: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """d grad_target(outputs) / d (float inputs and parameters), by name."""
    targets = {f"input.{k}": v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    targets.update({f"param.{k}": p for k, p in module.named_parameters()})
    loss = sum(grad_target(out) for out in outputs.values() if out.requires_grad)
    grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)  # type: ignore[arg-type]
    return {k: (g if g is not None else torch.zeros_like(t)) for (k, t), g in zip(targets.items(), grads)}


def pack(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Float32 tensors as one flat tensor, names and shapes (a file of a few
    large records is a fraction of the size of one with a record per tensor)."""
    values = {k: v.detach().float() for k, v in tensors.items()}
    return {
        "names": list(values),
        "shapes": [list(v.shape) for v in values.values()],
        "flat": torch.cat([v.reshape(-1) for v in values.values()]) if values else torch.zeros(0),
    }


def main() -> None:
    print(f"noether from {noether.__file__}, torch {torch.__version__}")
    total = 0
    states: dict[str, dict[str, torch.Tensor]] = {}
    for index, case in enumerate(CASES):
        torch.manual_seed(1000 + index)
        module = case.build(PEER)
        if case.weights_of is None:
            with torch.no_grad():
                for p in module.parameters():
                    p.normal_(0.0, 0.3)
        else:
            module.load_state_dict(states[case.weights_of], strict=True)
        states[case.name] = module.state_dict()
        module.eval()
        inputs = case.inputs(PEER, torch.Generator().manual_seed(index))
        for key in ("x", "q", "kv", "condition", "geometry", "query_x"):
            if isinstance(inputs.get(key), torch.Tensor):
                inputs[key] = inputs[key].clone().requires_grad_(True)
        outputs = case.run(PEER, module, inputs)
        grads = gradients(outputs, inputs, module)
        record = {
            "state_dict": pack(module.state_dict()) if case.weights_of is None else {"of": case.weights_of},
            "inputs": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
            "outputs": pack(outputs),
            "grads": pack(grads),
            "peer": "emmiai-noether 2026.4.0",
        }
        path = HERE / f"{case.name}.pt"
        torch.save(record, path)
        total += path.stat().st_size
        print(f"{case.name}: {len(outputs)} outputs, {len(grads)} gradients, {path.stat().st_size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
