import numpy as np
import pytest
import torch

from probegen.errors import ProbegenError
from probegen.nets import forward_zoo, get_family, num_params, small_cnn

RELU, TANH = small_cnn.zoo_arch("relu"), small_cnn.zoo_arch("tanh")


def random_rows(B, seed=0, scale=0.3):
    return torch.randn(B, 4970, generator=torch.Generator().manual_seed(seed)) * scale


def test_registered_and_4970_params_in_state_dict_order():
    assert get_family("small_cnn") is small_cnn
    assert num_params("small_cnn", RELU) == 4970
    sd = small_cnn.SmallCNN(RELU).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == small_cnn.param_shapes(RELU)
    assert list(sd) == ["convs.0.weight", "convs.0.bias", "convs.1.weight", "convs.1.bias",
                        "convs.2.weight", "convs.2.bias", "fc.weight", "fc.bias"]
    assert small_cnn.input_shape(RELU) == (1, 32, 32) and small_cnn.output_dim(RELU) == 10


def test_valid_padding_feature_maps_32_15_7_3():
    module = small_cnn.SmallCNN(RELU)
    seen = []
    for conv in module.convs:
        conv.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    module(torch.zeros(2, 1, 32, 32))
    assert seen == [(2, 16, 15, 15), (2, 16, 7, 7), (2, 16, 3, 3)]
    assert small_cnn.feature_sizes(RELU) == [32, 15, 7, 3]


@pytest.mark.parametrize("arch", [RELU, TANH], ids=["relu", "tanh"])
def test_batched_forward_matches_reference_per_model(arch):
    w, x = random_rows(6), torch.randn(9, 1, 32, 32)
    y = small_cnn.forward(arch, w, x)  # (6, 9, 10)
    assert y.shape == (6, 9, 10)
    for b in range(6):
        ref = small_cnn.reference_module(arch, w[b].numpy())(x)
        torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=0)


def test_per_model_inputs_match_reference():
    w, x = random_rows(4, seed=1), torch.randn(4, 5, 1, 32, 32)
    y = small_cnn.forward(TANH, w, x)  # (4, 5, 10)
    for b in range(4):
        torch.testing.assert_close(y[b], small_cnn.reference_module(TANH, w[b])(x[b]), atol=1e-5, rtol=0)


def test_models_do_not_interact_and_padding_is_ignored():
    # A model's logits depend only on its own row; zeros beyond 4,970 (heterogeneous zoos) are ignored.
    w, x = random_rows(3, seed=2), torch.randn(4, 1, 32, 32)
    padded = torch.cat([w, torch.randn(3, 30)], dim=1)
    changed = padded.clone()
    changed[1, :4970] = random_rows(1, seed=3)[0]
    a, b = small_cnn.forward(RELU, padded, x), small_cnn.forward(RELU, changed, x)
    torch.testing.assert_close(a, small_cnn.forward(RELU, w, x))
    assert torch.equal(a[[0, 2]], b[[0, 2]]) and not torch.allclose(a[1], b[1])


def test_forward_zoo_mixes_relu_and_tanh_models():
    archs, ids = [RELU, TANH], torch.tensor([1, 0, 0, 1, 0])
    w, x = random_rows(5, seed=4), torch.randn(3, 1, 32, 32)
    y = forward_zoo("small_cnn", archs, ids, w, x)
    for b in range(5):
        ref = small_cnn.reference_module(archs[ids[b]], w[b])(x)
        torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=0)


def test_per_run_dropout():
    w, x = random_rows(2, seed=5), torch.randn(8, 1, 32, 32)
    layers = small_cnn.unflatten(RELU, w)
    plain = small_cnn.apply(RELU, layers, x)
    gen = torch.Generator().manual_seed(0)
    dropped = small_cnn.apply(RELU, layers, x, keep=torch.tensor([1.0, 0.5]), generator=gen)
    torch.testing.assert_close(dropped[0], plain[0])  # keep = 1: no dropout for run 0
    assert not torch.allclose(dropped[1], plain[1])


def test_dropout_rate_and_scale_per_run():
    h = torch.ones(50, 3 * 16, 15, 15)  # (K, B*c, h, w), B = 3
    keep = torch.tensor([1.0, 0.7, 0.3])
    out = small_cnn._dropout(h, keep, torch.Generator().manual_seed(0)).view(50, 3, -1)
    kept = (out > 0).float().mean((0, 2))
    torch.testing.assert_close(kept, keep, atol=0.01, rtol=0)
    torch.testing.assert_close(out.mean((0, 2)), torch.ones(3), atol=0.02, rtol=0)  # E[out] = h
    assert torch.equal(out[:, 0], torch.ones(50, 16 * 15 * 15))


def test_gradients_flow_to_every_run():
    w = random_rows(3, seed=6).requires_grad_()
    small_cnn.forward(TANH, w, torch.randn(2, 1, 32, 32)).square().sum().backward()
    assert (w.grad.abs().sum(1) > 0).all()


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ProbegenError, match="activation 'selu'"):
        small_cnn.forward({**RELU, "activation": "selu"}, random_rows(1), torch.zeros(1, 1, 32, 32))


def test_reference_module_accepts_numpy_rows():
    row = np.arange(4970, dtype=np.float32) / 4970
    module = small_cnn.reference_module(RELU, row)
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert torch.equal(flat, torch.from_numpy(row))
