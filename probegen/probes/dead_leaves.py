"""Dead-Leaves images (Baradad et al. 2021), rendered procedurally and in batch.

Start from a black canvas; until no background pixel is left (at most `max_shapes` shapes) draw a shape
chosen uniformly from {circle, square, oriented square, rectangle, triangle, quadrilateral} with a uniform
RGB colour, a uniform centre and a radius r with density proportional to r^-3 on [0.03, 1] x resolution
(at least 1 px).

Shapes are laid front to back: each new shape only fills pixels that are still background, i.e. it lies
beneath every earlier one. That is the exact dead-leaves model (the occlusion order of an i.i.d. sequence)
and it means a step only has to look at background pixels, which run out quickly.

All n images advance together. Each step draws SHAPES_PER_STEP shapes into every image and finds, for
each background pixel, the first of them that covers its centre (distance test for circles, four
half-plane tests for the convex polygons). Candidate (pixel, shape) pairs come from whichever is cheaper
this step: the shapes' bounding windows (early, when most pixels are background) or the list of background
pixels against each shape's bounding box (late, when few are left).
"""

import math

import numpy as np
import torch

from probegen.errors import ProbegenError

SHAPES = ("circle", "square", "oriented_square", "rectangle", "triangle", "quadrilateral")
R_MIN, R_MAX, ALPHA = 0.03, 1.0, 3.0  # radius range (fraction of the resolution) and power-law exponent
SHAPES_PER_STEP = 32  # per image and step; the images depend on it (and on the seed)
PAIRS = "auto"  # how a step finds candidate (pixel, shape) pairs: auto | window | list (same images)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L") and torchvision's Grayscale


def render(n, resolution=32, seed=0, channels=3, max_shapes=5000):
    """n Dead-Leaves images -> float32 (n, channels, R, R) in [0, 1]. channels=1 is the luminance."""
    if channels not in (1, 3):
        raise ProbegenError(f"dead_leaves: channels must be 1 or 3, got {channels!r}")
    if min(n, resolution, max_shapes) <= 0:
        raise ProbegenError(f"dead_leaves: n, resolution and max_shapes must be positive, got "
                            f"{n}, {resolution}, {max_shapes}")
    gen = torch.Generator().manual_seed(int(seed))
    R = int(resolution)
    out = torch.zeros(n * R * R, 3)  # flat pixels, index = image * R^2 + row * R + col
    background = torch.ones(n * R * R, dtype=torch.bool)
    todo = torch.arange(n * R * R)  # flat indices of the background pixels
    drawn = 0
    while len(todo) and drawn < max_shapes:
        S = min(SHAPES_PER_STEP, max_shapes - drawn)
        # Drawn for all n images every step (finished ones too), so the pool depends only on (n, seed).
        shapes = _sample_shapes(gen, n, S, R)  # each (n, S, ...)
        first = _first_cover(shapes, todo, background, R)  # (len(todo),) shape index, S = none
        got = first < S
        pix, img = todo[got], todo[got] // (R * R)
        out[pix] = shapes["color"][img, first[got]]
        background[pix] = False
        todo = todo[~got]
        drawn += S
    rgb = out.view(n, R, R, 3).permute(0, 3, 1, 2).contiguous()  # (n, 3, R, R)
    return (to_gray(rgb) if channels == 1 else rgb).numpy()


def _sample_shapes(gen, n, S, R):
    """S shapes per image, each polygon as 4 vertex angles on its circumcircle (radius r)."""
    def u(*shape):
        return torch.rand(*shape, generator=gen)

    kind = torch.randint(len(SHAPES), (n, S), generator=gen)
    color = u(n, S, 3)
    center = u(n, S, 2) * R  # (x, y) in pixel units; pixel (row i, col j) has its centre at (j + .5, i + .5)
    # Inverse CDF of p(r) ~ r^-3 on [R_MIN, R_MAX]: r = (a - v (a - b))^(1 / (1 - ALPHA)), a = R_MIN^(1 - ALPHA).
    a, b = R_MIN ** (1 - ALPHA), R_MAX ** (1 - ALPHA)
    radius = ((a - u(n, S) * (a - b)) ** (1 / (1 - ALPHA)) * R).clamp(min=1.0)
    theta = u(n, S) * 2 * math.pi  # orientation of an oriented square
    half = u(n, S) * math.pi / 2  # a rectangle's corners sit at +-half and pi +- half
    free = torch.sort(u(n, S, 4) * 2 * math.pi, dim=-1).values  # triangle / quadrilateral vertices

    square = torch.tensor([0.25, 0.75, 1.25, 1.75]) * math.pi  # axis-aligned, side r * sqrt(2)
    rect = torch.stack([half, math.pi - half, math.pi + half, 2 * math.pi - half], -1)
    tri = torch.cat([free[..., :3], free[..., 2:3]], -1)  # the last vertex twice: a zero-length edge
    by_kind = [square.expand(n, S, 4), square.expand(n, S, 4), square + theta.unsqueeze(-1), rect, tri, free]
    angles = torch.stack(by_kind, 0).gather(0, kind.view(1, n, S, 1).expand(1, n, S, 4))[0]  # (n, S, 4)
    return {"kind": kind, "color": color, "center": center, "radius": radius, "angles": angles,
            "edges": _edges(angles, radius)}


def _edges(angles, radius):
    """Half-planes of the polygon with these vertex angles: (n, S, 4, 3) rows (a, b, c), inside when
    a dx + b dy + c >= 0 for all four, (dx, dy) relative to the centre.

    Vertices in increasing angle form a convex counter-clockwise polygon, so the inside is left of every
    edge v_k -> v_k+1: cross(e, d - v) = e_x (dy - v_y) - e_y (dx - v_x) >= 0. A repeated vertex gives a
    zero edge (0, 0, 0) whose test always passes.
    """
    vx, vy = radius.unsqueeze(-1) * torch.cos(angles), radius.unsqueeze(-1) * torch.sin(angles)
    ex, ey = vx.roll(-1, -1) - vx, vy.roll(-1, -1) - vy
    return torch.stack([-ey, ex, ey * vx - ex * vy], -1)


def _first_cover(shapes, todo, background, R):
    """For each background pixel in `todo`, the first shape of the step covering it (S if none)."""
    n, S = shapes["kind"].shape
    alive = torch.zeros(n, dtype=torch.bool)
    alive[todo // (R * R)] = True  # images that still have background
    sides = _window_sizes(shapes["radius"], R)  # (n, S)
    window_cost = sides[alive].pow(2).sum().item()
    list_cost = 3 * len(todo) * S  # the list path touches ~3x more memory per pair
    if PAIRS == "window" or PAIRS == "auto" and window_cost < list_cost:
        pix, img, s = _window_pairs(shapes, sides, alive, background, R)
    else:
        pix, img, s = _list_pairs(shapes, todo, R)
    inside = _inside(shapes, pix, img, s, R)
    first = torch.full((background.numel(),), S, dtype=torch.long)
    first.scatter_reduce_(0, pix[inside], s[inside], "amin")
    return first[todo]


def _window_sizes(radius, R):
    """Side of a square window holding every pixel centre within r of the centre: the smallest of
    3, 4, 6, 8, 12, 16, ... (or the whole canvas) that is at least floor(2r) + 1. Few distinct sides keep
    the windows batched; the 1.5x steps keep the padding small."""
    sides = sorted({min(int(m * 2 ** e), R) for e in range(R.bit_length() + 1) for m in (3, 4)})
    need = torch.floor(2 * radius) + 1
    table = torch.tensor(sides, dtype=torch.float32)
    return torch.tensor(sides)[torch.bucketize(need, table).clamp(max=len(sides) - 1)]


def _window_pairs(shapes, sides, alive, background, R):
    """(pixel, image, shape) for every background pixel in the bounding window of each shape of a live
    image."""
    n, S = shapes["kind"].shape
    sides = torch.where(alive[:, None], sides, 0).view(-1)  # (n * S,), 0 = skip
    center, radius = shapes["center"].view(-1, 2), shapes["radius"].view(-1)
    pairs = []
    for W in torch.unique(sides[sides > 0]).tolist():
        idx = torch.nonzero(sides == W).squeeze(1)  # shapes (flat n * S index) of this window size
        # Leftmost covered column is ceil(c - r - .5); clamping keeps the window on the canvas and still
        # holding the shape (it spans at most floor(2r) + 1 <= W columns).
        lo = torch.ceil(center[idx] - radius[idx, None] - 0.5).long().clamp(0, R - W)  # (m, 2) = (x0, y0)
        offs = torch.arange(W)
        cols = lo[:, 0, None, None] + offs.view(1, 1, W)  # (m, 1, W)
        rows = lo[:, 1, None, None] + offs.view(1, W, 1)  # (m, W, 1)
        img = idx // S
        pix = (img.view(-1, 1, 1) * R * R + rows * R + cols).view(len(idx), -1)  # (m, W * W)
        k, j = torch.nonzero(background[pix], as_tuple=True)
        pairs.append((pix[k, j], img[k], idx[k] % S))
    return tuple(torch.cat(parts) for parts in zip(*pairs))


def _list_pairs(shapes, todo, R):
    """(pixel, image, shape) for every background pixel inside each shape's bounding box."""
    img = todo // (R * R)
    x = (todo % R).float() + 0.5
    y = (todo // R % R).float() + 0.5
    center, radius = shapes["center"][img], shapes["radius"][img]  # (U, S, 2), (U, S)
    near = ((x[:, None] - center[..., 0]).abs() <= radius) & ((y[:, None] - center[..., 1]).abs() <= radius)
    u, s = torch.nonzero(near, as_tuple=True)
    return todo[u], img[u], s


def _inside(shapes, pix, img, s, R):
    """Whether pixel `pix`'s centre lies in shape (img, s), for C candidate pairs -> (C,) bool."""
    S = shapes["kind"].shape[1]
    k = img * S + s  # flat shape index
    cx, cy = shapes["center"].view(-1, 2)[k].unbind(-1)
    r, kind = shapes["radius"].view(-1)[k], shapes["kind"].view(-1)[k]
    dx = (pix % R).float() + 0.5 - cx
    dy = (pix // R % R).float() + 0.5 - cy
    circle = dx * dx + dy * dy <= r * r
    a, b, c = shapes["edges"].view(-1, 4, 3)[k].unbind(-1)  # (C, 4) each
    polygon = (a * dx[:, None] + b * dy[:, None] + c >= 0).all(1)
    return torch.where(kind == 0, circle, polygon)


def to_gray(images):
    """Luminance: (..., 3, H, W) -> (..., 1, H, W); numpy or torch in, same kind out."""
    w = LUMA
    gray = w[0] * images[..., 0:1, :, :] + w[1] * images[..., 1:2, :, :] + w[2] * images[..., 2:3, :, :]
    return gray.astype(np.float32) if isinstance(gray, np.ndarray) else gray


def to_input_range(images, input_shape):
    """RGB pool in [0, 1] (P, 3, R, R) -> what a zoo with this input_shape sees.

    1 channel (Small CNN Zoo): luminance scaled to [-1, 1]. 3 channels (Wild Park): normalised with the
    CIFAR-10 mean and std the Wild Park zoo was trained with (probegen.nets.wild_park.normalize).
    """
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ProbegenError(f"dead_leaves: image probes need an input of shape (1 or 3, H, W), got {tuple(input_shape)}")
    if tuple(images.shape[-3:]) != (3, *input_shape[1:]):
        raise ProbegenError(f"dead_leaves: pool images {tuple(images.shape[-3:])} do not match the zoo input "
                            f"{tuple(input_shape)}; render the pool at resolution {input_shape[-1]}")
    if input_shape[0] == 1:
        return to_gray(images) * 2 - 1
    from probegen.nets.wild_park import normalize  # the Wild Park zoo's own CIFAR-10 constants: one source

    return normalize(torch.as_tensor(images))
