"""The ``Transformer``'s inputs: ``pad_token_id`` (default 0, or None), the
padding check under ``torch.compile(fullgraph=True)``, shape checks with
messages that name the expected shape, and the length cap of ``max_len``."""

from __future__ import annotations

import pytest
import torch

from patternc import TransformerConfig, VisionTransformerConfig
from patternc.nn import Transformer, VisionTransformer


def _tokens(**options: object) -> Transformer:
    torch.manual_seed(0)
    fields: dict[str, object] = {
        "vocab_size": 20, "d_model": 8, "num_heads": 2, "num_layers": 2, "d_ff": 16, "dropout_rate": 0.0,
        "causal": True, **options,
    }  # fmt: skip
    return Transformer(TransformerConfig(**fields)).double()  # type: ignore[arg-type]


def test_pad_token_id_none_makes_every_id_a_real_token() -> None:
    """Default 0 (the seed's): id 0 is masked out as a key. None: id 0 is a
    word like any other, as an explicit all-True padding mask says."""
    ids = torch.tensor([[5, 0, 7, 0, 3, 9], [1, 2, 3, 4, 5, 6]])
    padded, plain = _tokens(), _tokens(pad_token_id=None)
    plain.load_state_dict(padded.state_dict())
    real = torch.ones(ids.shape, dtype=torch.bool)
    assert torch.equal(plain(ids), padded(ids, key_padding_mask=real))
    assert torch.equal(padded(ids), padded(ids, key_padding_mask=ids != 0))
    assert not torch.allclose(plain(ids)[0], padded(ids)[0])  # id 0 is a key only without padding
    assert torch.equal(plain(ids)[1], padded(ids)[1])  # a row without id 0 is the same
    assert TransformerConfig(vocab_size=20).pad_token_id == 0


def test_pad_token_id_outside_the_vocabulary_names_none() -> None:
    with pytest.raises(
        ValueError, match=r"pad_token_id=20 is outside the vocabulary \[0, 20\).*pad_token_id=None"
    ):
        TransformerConfig(vocab_size=20, pad_token_id=20)


@pytest.mark.parametrize("pad_token_id", [0, None])
def test_a_token_model_compiles_fullgraph_on_its_first_call(pad_token_id: int | None) -> None:
    """The padding check read the ids on the host (``bool(real.all())``), a
    graph break: fullgraph failed on the first call. Traced, the mask is
    always built (Dynamo's eager backend: this checks the trace, not a kernel)."""
    model = _tokens(pad_token_id=pad_token_id, num_layers=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with_padding = torch.tensor([[4, 0, 6, 7, 0], [1, 2, 3, 4, 5]])
    without = torch.tensor([[4, 8, 6, 7, 9], [1, 2, 3, 4, 5]])
    for ids in (with_padding, without):
        assert torch.allclose(compiled(ids), model(ids), rtol=0, atol=1e-12)


def _features(**options: object) -> Transformer:
    config = TransformerConfig(vocab_size=None, d_model=8, num_heads=2, num_layers=1, d_ff=16, **options)  # type: ignore[arg-type]
    return Transformer(config, "groups a b\na -> a\nb -> a, b\n")


def test_inputs_of_the_wrong_shape_name_the_expected_shape() -> None:
    features, tokens = _features(), _tokens()
    sizes = {"a": 3, "b": 4}
    x = torch.randn(2, 7, 8)
    ids = torch.randint(1, 20, (2, 7))
    cases = [
        (
            features,
            (x[0], sizes),
            r"x has shape \(7, 8\), which has no batch dimension; expected \[batch, 7, 8\] for sizes a=3, b=4: add one with x\[None\]",
        ),
        (
            features,
            (x[:, :6], sizes),
            r"x has shape \(2, 6, 8\) but sizes a=3, b=4 put 7 tokens in it; expected \[batch, 7, 8\]",
        ),
        (features, (x[..., :6], sizes), r"x has shape \(2, 7, 6\); expected \[batch, 7, d_model=8\]"),
        (
            features,
            (ids, sizes),
            r"x has shape \(2, 7\) \(torch.int64\), token ids, but this Transformer has vocab_size=None",
        ),
        (tokens, (ids[0],), r"x has shape \(7,\), which has no batch dimension; expected \[batch, 7\]"),
        (
            tokens,
            (x,),
            r"x has shape \(2, 7, 8\) \(torch.float32\) but this Transformer embeds token ids \(vocab_size=20\)",
        ),
        (
            tokens,
            (ids.double(),),
            r"x has shape \(2, 7\) \(torch.float64\) but this Transformer embeds token ids",
        ),
        (
            tokens,
            (ids[None],),
            r"x has shape \(1, 2, 7\) but token ids are \[batch, n_tokens\], two dimensions",
        ),
    ]
    for model, args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \[batch, n_tokens\] = \[2, 7\]"):
        features(x, sizes, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"size of `a` must be an integer >= 0 \(or None for a cached group\), got -1"
    ):
        features(x, {"a": -1, "b": 8})


def test_max_len_caps_groups_only_where_positions_are_encoded() -> None:
    x = torch.randn(1, 9, 8)
    assert _features(pos_emb_type="none", max_len=4)(x, {"a": 2, "b": 7}).shape == (1, 9, 8)
    with pytest.raises(
        ValueError,
        match=r"group `b` has 7 tokens but max_len=4 \(positions count within each group, "
        r"pos_emb_type='sinusoidal'\); raise TransformerConfig.max_len, or split the group",
    ):
        _features(max_len=4)(x, {"a": 2, "b": 7})
    rope = _features(pos_emb_type="rope", max_len=4, rope_max_positions=8)
    assert rope(x, {"a": 2, "b": 7}).shape == (1, 9, 8)  # rope_max_positions is rope's limit
    with pytest.raises(ValueError, match=r"group `b` has 7 tokens but rope_max_positions=6"):
        _features(pos_emb_type="rope", rope_max_positions=6)(x, {"a": 2, "b": 7})


def test_a_vision_transformer_without_positions_takes_any_number_of_patches() -> None:
    stack = TransformerConfig(
        vocab_size=None, d_model=8, num_heads=2, num_layers=1, d_ff=16, max_len=8, pos_emb_type="none"
    )
    vit = VisionTransformer(
        VisionTransformerConfig(transformer=stack, image_size=16, patch_size=4, num_classes=3)
    )
    assert vit(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    with pytest.raises(ValueError, match=r"16 patches \+ \[CLS\] exceed transformer.max_len=8"):
        VisionTransformerConfig(
            transformer=stack.model_copy(update={"pos_emb_type": "sinusoidal"}),
            image_size=16,
            patch_size=4,
            num_classes=3,
        )
