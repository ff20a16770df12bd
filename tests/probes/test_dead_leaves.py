import math

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolyPath

import probegen.probes.dead_leaves as dl
from probegen.errors import ProbegenError


def test_shapes_range_and_full_coverage():
    x = dl.render(6, resolution=24, seed=0)
    assert x.shape == (6, 3, 24, 24) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1
    # Colours are uniform in (0, 1)^3, so an all-zero pixel is untouched black background.
    assert not (x.sum(1) == 0).any()


def test_the_background_sentinel_sees_uncovered_pixels():
    x = dl.render(4, resolution=32, seed=0, max_shapes=3)  # 3 shapes cannot cover a 32x32 canvas
    assert (x.sum(1) == 0).any()


def test_deterministic_for_a_seed():
    a, b, c = dl.render(3, 16, seed=5), dl.render(3, 16, seed=5), dl.render(3, 16, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_window_and_list_paths_render_the_same_images(monkeypatch):
    out = {}
    for mode in ("window", "list"):
        monkeypatch.setattr(dl, "PAIRS", mode)
        out[mode] = dl.render(4, 20, seed=2)
    assert np.array_equal(out["window"], out["list"])


def test_gray_is_the_luminance_of_the_rgb_render():
    rgb, gray = dl.render(2, 16, seed=1), dl.render(2, 16, seed=1, channels=1)
    assert gray.shape == (2, 1, 16, 16)
    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    np.testing.assert_allclose(gray[:, 0], expected, atol=1e-6)


def test_radius_follows_the_power_law_and_shapes_are_uniform():
    R = 200  # R_MIN * R = 6 px, so the 1 px floor never applies
    p = dl._sample_shapes(torch.Generator().manual_seed(0), 2000, 32, R)
    r = p["radius"].flatten().numpy() / R
    assert r.min() >= dl.R_MIN and r.max() <= dl.R_MAX
    cdf = lambda t: (dl.R_MIN ** -2 - t ** -2) / (dl.R_MIN ** -2 - dl.R_MAX ** -2)  # noqa: E731
    for t in (0.04, 0.06, 0.1, 0.3):
        assert abs((r <= t).mean() - cdf(t)) < 0.01
    freq = np.bincount(p["kind"].flatten().numpy(), minlength=6) / p["kind"].numel()
    assert np.abs(freq - 1 / 6).max() < 0.01


def test_polygon_coverage_matches_a_point_in_polygon_reference():
    gen = torch.Generator().manual_seed(3)
    R, n, S = 16, 8, 32
    p = dl._sample_shapes(gen, n, S, R)
    img, s = torch.meshgrid(torch.arange(n), torch.arange(S), indexing="ij")
    img, s = img.flatten().repeat_interleave(R * R), s.flatten().repeat_interleave(R * R)
    pix = img * R * R + torch.arange(R * R).repeat(n * S)
    inside = dl._inside(p, pix, img, s, R).view(n, S, R * R).numpy()
    centres = np.stack(np.meshgrid(np.arange(R) + 0.5, np.arange(R) + 0.5), -1).reshape(-1, 2)  # (x, y)
    for i in range(n):
        for j in range(S):
            c, r, kind = p["center"][i, j].numpy(), p["radius"][i, j].item(), p["kind"][i, j].item()
            if kind == 0:
                expected = ((centres - c) ** 2).sum(1) <= r * r
            else:
                angles = p["angles"][i, j].numpy()
                verts = c + r * np.stack([np.cos(angles), np.sin(angles)], 1)
                expected = PolyPath(verts).contains_points(centres)
            assert np.array_equal(inside[i, j], expected), (i, j, dl.SHAPES[kind])


def test_square_covers_exactly_its_pixels():
    # One axis-aligned square (side r sqrt 2) centred at (8, 8) on a 16x16 canvas.
    r = 3 * math.sqrt(2)  # side 6: pixel centres 5.5 .. 10.5 in x and y -> 6 x 6 pixels
    p = {"kind": torch.tensor([[1]]), "center": torch.tensor([[[8.0, 8.0]]]), "radius": torch.tensor([[r]]),
         "edges": dl._edges(torch.tensor([[[0.25, 0.75, 1.25, 1.75]]]) * math.pi, torch.tensor([[r]]))}
    pix = torch.arange(256)
    inside = dl._inside(p, pix, torch.zeros(256, dtype=torch.long), torch.zeros(256, dtype=torch.long), 16)
    grid = inside.view(16, 16)
    assert grid.sum() == 36 and grid[5:11, 5:11].all()


def test_input_range_conversion():
    pool = dl.render(3, 32, seed=0)
    gray = dl.to_input_range(torch.from_numpy(pool), (1, 32, 32))
    assert gray.shape == (3, 1, 32, 32) and gray.min() >= -1 and gray.max() <= 1
    np.testing.assert_allclose(gray.numpy(), dl.to_gray(pool) * 2 - 1, atol=1e-6)
    rgb = dl.to_input_range(pool, (3, 32, 32))
    from probegen.nets import wild_park as wp  # the one source of the CIFAR-10 constants: the zoo's own
    mean, std = np.array(wp.CIFAR10_MEAN), np.array(wp.CIFAR10_STD)
    np.testing.assert_allclose(rgb.numpy(), (pool - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)
    with pytest.raises(ProbegenError, match="resolution 16"):
        dl.to_input_range(pool, (1, 16, 16))
    with pytest.raises(ProbegenError):
        dl.to_input_range(pool, (2,))


def test_bad_arguments():
    with pytest.raises(ProbegenError):
        dl.render(2, 16, channels=2)
    with pytest.raises(ProbegenError):
        dl.render(0, 16)
