"""The CUDA subset: run on a machine with a GPU (`python -m pytest tests/test_cuda.py`); skipped elsewhere.

The probed networks must compute the same functions on the GPU as on the CPU, ragged rows must gather the
same on the device, and training must work end to end on CUDA (bf16 autocast on the classifier only).
"""

import numpy as np
import pytest
import torch

from fake_zoo import make_zoo, register_tiny, split_of
from probegen.methods import build_method
from probegen.nets import forward_zoo
from probegen.nets.siren import DWSNETS_ARCH
from probegen.nets.small_cnn import zoo_arch
from probegen.scale import synthetic_zoo, wild_park_archs
from probegen.training import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def float32_convolutions():
    # cuDNN uses TF32 for float32 convolutions by default; compare the exact float32 function here.
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("family, archs, probe_shape", [
    ("siren", [DWSNETS_ARCH], (64, 2)),
    ("small_cnn", [zoo_arch("relu"), zoo_arch("tanh")], (8, 1, 32, 32)),
    ("wild_park", wild_park_archs(6, seed=3), (8, 3, 32, 32)),
])
def test_batched_forward_on_cuda_equals_cpu(family, archs, probe_shape):
    x = torch.rand(probe_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    arch_ids = np.arange(24) % len(archs)
    zoo = synthetic_zoo(family, archs, arch_ids, "regression")
    w, a = zoo.weights[:], torch.as_tensor(arch_ids)
    with torch.no_grad():
        cpu = forward_zoo(family, archs, a, w, x)
        gpu = forward_zoo(family, archs, a.to(CUDA), w.to(CUDA), x.to(CUDA)).cpu()
    # Summation order differs between devices; a SIREN's sin(30 x) amplifies that 30-fold per layer.
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_ragged_rows_gather_the_same_on_cuda():
    zoo = synthetic_zoo("wild_park", wild_park_archs(5, seed=1), np.arange(30) % 5, "regression")
    idx = torch.randperm(30)[:12]
    on_device = zoo.weights.select(idx).to(CUDA)
    assert torch.equal(on_device[torch.arange(12, device=CUDA)].cpu(), zoo.weights[idx])


@pytest.mark.parametrize("name", ["probegen", "statnn"])
def test_training_runs_on_cuda(monkeypatch, name):
    register_tiny(monkeypatch)
    zoo = make_zoo("tiny_mlp", [{"in": 2, "hidden": 6, "out": 1}], 200, num_classes=3, signal=3.0)
    method = build_method(name, zoo, {"hidden": 32, "layers": 3}, num_probes=8, seed=0)
    res = train(method, zoo, split_of(200), epochs=6, batch_size=16, lr=1e-2, eval_every=10, device="cuda",
                progress=False)
    assert res.metrics["device"] == "cuda" and res.metrics["test"] > 0.6  # chance is 1/3
    assert all(t.device.type == "cpu" for t in res.state_dict.values())  # the saved state is portable
