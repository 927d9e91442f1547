"""FeatureNetwork: tap indices, truncation, pooling/normalisation, strided vs separate sequences."""

import pytest
import torch

from ebft.models.features import FeatureNetwork, tap_layers
from ebft.models.loading import build_tiny_model
from ebft.core.layout import StridedLayout

VOCAB = 256


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_tiny_model(vocab_size=VOCAB, num_layers=4, hidden=64, seed=0,
                            attn_implementation=request.param).eval()


def reference_features(model, ids, taps, pooling, normalisation, start):
    """Slow obvious features of ONE unpadded sequence ``ids`` (L,), pooling over ids[start:]:
    pre-norm hidden states from the full model (hooks on its decoder layers)."""
    captured = {}
    hooks = [model.model.layers[i - 1].register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in taps]
    with torch.no_grad():
        model(ids[None])
    for hook in hooks:
        hook.remove()
    def nrm(hs):                                  # hs: one (H,) state per tap -> unit-norm features
        if normalisation == "joint":
            cat = torch.cat(hs)
            return cat / cat.norm()
        return torch.cat([h / h.norm() for h in hs]) / len(hs) ** 0.5

    states = [captured[i][0, start:] for i in taps]   # (tokens, H) per tap
    if pooling == "last_token":
        return nrm([h[-1] for h in states])
    if pooling == "mean_raw":
        return nrm([h.mean(dim=0) for h in states])
    # mean (the authors' order): normalise every token's taps, then average, no renormalisation
    return torch.stack([nrm([h[t] for h in states]) for t in range(len(states[0]))]).mean(dim=0)


def test_tap_indices():
    assert tap_layers(28, (0.25, 0.5, 0.75)) == (7, 14, 21)
    assert tap_layers(16, (0.25, 0.5, 0.75)) == (4, 8, 12)
    assert tap_layers(4, (0.25, 0.5, 0.75)) == (1, 2, 3)
    assert tap_layers(30, (0.25, 0.5, 0.75)) == (7, 15, 22)
    assert tap_layers(4, (0.01, 1.0)) == (1, 4)


@pytest.mark.parametrize("kwargs, word", [({"pooling": "max"}, "pooling='max'"),
                                          ({"normalisation": "l2"}, "normalisation='l2'"),
                                          ({"layers": (0.0, 0.5)}, "0.0"), ({"layers": (0.5, 1.5)}, "1.5"),
                                          ({"layers": ()}, "taps nothing")])
def test_config_errors(tiny_model, kwargs, word):
    with pytest.raises(ValueError, match=word):
        FeatureNetwork(tiny_model, **kwargs)


def test_truncated_taps_equal_full_model_hidden_states(tiny_model):
    net = FeatureNetwork(tiny_model, layers=(0.25, 0.5))
    assert net.taps == (1, 2) and len(net.backbone.layers) == 2
    assert isinstance(net.backbone.norm, torch.nn.Identity) and not hasattr(net, "lm_head")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = tiny_model(ids, output_hidden_states=True).hidden_states
    states = net.tap_states(ids, torch.arange(9))
    for tap, state in zip(net.taps, states):
        torch.testing.assert_close(state, full[tap], atol=1e-6, rtol=0)

    deepest = FeatureNetwork(tiny_model, layers=(1.0,))          # tap L: pre-norm, unlike HF's last hidden_state
    (state,) = deepest.tap_states(ids, torch.arange(9))
    ref = reference_features(tiny_model, ids[0], (4,), "last_token", "joint", 0)
    torch.testing.assert_close(torch.nn.functional.normalize(state[0, -1], dim=0), ref, atol=1e-6, rtol=0)
    assert not torch.allclose(state, full[4], atol=1e-2)


@pytest.mark.parametrize("pooling", ["last_token", "mean", "mean_raw"])
@pytest.mark.parametrize("normalisation", ["joint", "per_layer"])
def test_strided_features_equal_separate_sequences(model, pooling, normalisation):
    net = FeatureNetwork(model, pooling=pooling, normalisation=normalisation)
    layout = StridedLayout(13, 3, 2, 3, 2)
    chunk = torch.randint(0, VOCAB, (2, 13))
    generated = torch.randint(0, VOCAB, (2, 2, layout.num_blocks, 3))
    gen, gt = net.strided_features(layout.scatter_generated(chunk, generated), layout)
    assert gen.shape == (2, layout.num_blocks, 2, 3 * 64) and gt.shape == (2, layout.num_blocks, 3 * 64)
    for b in range(2):
        for k in range(layout.num_blocks):
            c = int(layout.context_end[k])
            ref = reference_features(model, chunk[b, : c + 3], net.taps, pooling, normalisation, c)
            torch.testing.assert_close(gt[b, k], ref, atol=1e-5, rtol=0)
            for j in range(2):
                seq = torch.cat([chunk[b, :c], generated[b, j, k]])
                ref = reference_features(model, seq, net.taps, pooling, normalisation, c)
                torch.testing.assert_close(gen[b, k, j], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["last_token", "mean", "mean_raw"])
def test_sequence_features_padding_either_side(model, pooling):
    net = FeatureNetwork(model, pooling=pooling)
    short, long = torch.randint(3, VOCAB, (5,)), torch.randint(3, VOCAB, (8,))
    pad = torch.full((3,), 2)
    left = net.sequence_features(torch.stack([torch.cat([pad, short]), long]),
                                 torch.tensor([[0] * 3 + [1] * 5, [1] * 8]))
    right = net.sequence_features(torch.stack([torch.cat([short, pad]), long]),
                                  torch.tensor([[1] * 5 + [0] * 3, [1] * 8]))
    for out in (left, right):
        torch.testing.assert_close(out[0], reference_features(model, short, net.taps, pooling, "joint", 0),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], reference_features(model, long, net.taps, pooling, "joint", 0),
                                   atol=1e-5, rtol=0)
    pool = torch.tensor([[0] * 6 + [1] * 2])                      # pool over the last two tokens only
    torch.testing.assert_close(net.sequence_features(long[None], torch.ones(1, 8, dtype=torch.long), pool)[0],
                               reference_features(model, long, net.taps, pooling, "joint", 6), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no token to pool"):
        net.sequence_features(long[None], torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 8))


def test_frozen_unit_norm_and_untouched(tiny_model):
    generator_before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    net = FeatureNetwork(tiny_model, normalisation="per_layer")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    layout = StridedLayout(12, 4, 4, 4, 2)
    row = layout.scatter_generated(torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 2, 2, 4)))
    gen, gt = net.strided_features(row, layout)
    assert not gen.requires_grad and gen.dtype == torch.float32
    torch.testing.assert_close(gen.norm(dim=-1), torch.ones(2, 2, 2))
    torch.testing.assert_close(gt.norm(dim=-1), torch.ones(2, 2))
    torch.testing.assert_close(gt.view(2, 2, 3, 64).norm(dim=-1), torch.full((2, 2, 3), 3 ** -0.5))
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(tiny_model.model.layers) == 4 and tiny_model.config.num_hidden_layers == 4
    assert not isinstance(tiny_model.model.norm, torch.nn.Identity)
    assert all(torch.equal(generator_before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_from_name_tiny():
    net = FeatureNetwork.from_name("tiny", layers=(0.5,), pooling="mean")
    assert net.taps == (2,) and len(net.backbone.layers) == 2 and net.feature_dim == 64
    with pytest.raises(ValueError, match="row has shape"):
        net.strided_features(torch.zeros(1, 5, dtype=torch.long), StridedLayout(12, 4, 4, 4, 1))
