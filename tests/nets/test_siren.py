"""The SIREN family: packed layout == DWSNets state dict, batched forward == per-model reference module."""

import numpy as np
import torch

from probegen.nets import get_family, num_params
from probegen.nets import siren

ARCH = siren.DWSNETS_ARCH
DWSNETS_KEYS = [("seq.0.weight", (32, 2)), ("seq.0.bias", (32,)), ("seq.1.weight", (32, 32)),
                ("seq.1.bias", (32,)), ("seq.2.weight", (1, 32)), ("seq.2.bias", (1,))]


def random_rows(n, dim, seed=0, scale=0.3):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale


def test_registered_with_the_dwsnets_layout():
    assert get_family("siren") is siren
    assert siren.param_shapes(ARCH) == DWSNETS_KEYS
    assert num_params("siren", ARCH) == 1185
    assert siren.input_shape(ARCH) == (2,) and siren.output_dim(ARCH) == 1


def test_reference_module_state_dict_round_trip():
    row = random_rows(1, 1185)[0]
    ref = siren.reference_module(ARCH, row.numpy())
    assert [(k, tuple(v.shape)) for k, v in ref.state_dict().items()] == DWSNETS_KEYS
    assert torch.equal(torch.nn.utils.parameters_to_vector(ref.parameters()), row)


def test_batched_forward_matches_reference_per_model():
    # Weights at the scale of fitted INRs (the embedded zoo's std is 0.04): with much larger random weights
    # sin(30 x) is chaotic and float rounding alone separates any two correct implementations.
    rows = random_rows(5, 1185 + 7, scale=0.05)  # zero padding beyond num_params must be ignored
    rows[:, 1185:] = 0
    x = siren.grid_coords(28)
    out = siren.forward(ARCH, rows, x)  # (5, 784, 1)
    assert out.shape == (5, 784, 1)
    for i in range(5):
        with torch.no_grad():
            ref = siren.reference_module(ARCH, rows[i].numpy())(x)  # (784, 1)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_forward_per_model_inputs_and_other_widths():
    arch = {"in_dim": 3, "hidden": [8, 16, 4], "out_dim": 2, "w0": 5.0, "out_bias": -1.0}
    dim = num_params("siren", arch)
    rows = random_rows(3, dim, seed=1)
    x = torch.rand(3, 10, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (B, K, in): per-model probes
    out = siren.forward(arch, rows, x)
    for i in range(3):
        with torch.no_grad():
            ref = siren.reference_module(arch, rows[i])(x[i])
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_gradients_to_shared_probes_and_to_weights_match_the_reference_modules():
    # What a probing step backpropagates (to the probes shared by every model) and what a weight-space
    # method would (to the weights), for one output and for two.
    for arch in (ARCH, {"in_dim": 2, "hidden": [8, 8], "out_dim": 2, "w0": 30.0, "out_bias": 0.5}):
        dim = num_params("siren", arch)
        rows = random_rows(4, dim, seed=2, scale=0.05).double().requires_grad_()
        x = torch.rand(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 - 1
        x.requires_grad_()  # (K, 2) probes shared by every model
        weights_out = torch.randn(4, 16, arch["out_dim"], dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(5))  # a loss weighing every output
        (siren.forward(arch, rows, x) * weights_out).sum().backward()
        x_grad = torch.zeros_like(x)
        for i in range(4):
            ref = siren.reference_module(arch, rows[i].detach()).double()
            xi = x.detach().clone().requires_grad_()
            (ref(xi) * weights_out[i]).sum().backward()
            x_grad += xi.grad
            ref_w_grad = torch.cat([p.grad.flatten() for p in ref.parameters()])
            torch.testing.assert_close(rows.grad[i], ref_w_grad, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(x.grad, x_grad, atol=1e-9, rtol=1e-9)


def test_out_bias_is_added():
    rows = torch.zeros(2, 1185)
    out = siren.forward(ARCH, rows, siren.grid_coords(4))
    assert torch.equal(out, torch.full((2, 16, 1), 0.5))


def test_grid_coords_are_row_major_like_dwsnets():
    # DWSNets' make_coordinates: np.meshgrid(linspace(-1, 1, W), linspace(-1, 1, H)) flattened, stacked (x, y).
    lin = np.linspace(-1, 1, 28)
    xs, ys = np.meshgrid(lin, lin)
    expected = torch.from_numpy(np.stack([xs.flatten(), ys.flatten()]).T).float()
    coords = siren.grid_coords(28)
    assert torch.equal(coords, expected)
    assert coords[1].tolist() == [lin[1].astype(np.float32), -1.0]  # x moves first along a row
    assert coords[28].tolist() == [-1.0, lin[1].astype(np.float32)]  # next row: y moves
