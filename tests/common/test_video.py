"""Tests of common/video.py: shapes and dtypes, determinism per key, energy (falls under
gravity with lossy bounces, constant for constant velocity), masks against the pixels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import video as vid
from tests.common.compiled import compiled

SPEC = vid.VideoSpec(size=16, num_frames=24, num_sprites=2, radius=(2.0, 3.0),
                     speed=(0.5, 1.5))
N = 16  # videos of each kind
G, E = 0.3, 0.6  # gravity (px / frame^2) and restitution of the gravity clips


@pytest.fixture(scope="module")
def videos():
    """N videos of each kind from the same keys, one compiled program: gravity with lossy
    bounces, constant velocity with elastic bounces, constant velocity wrapping around,
    the first key again (determinism), a noisy colour video, gravity with elastic bounces,
    big sprites (r > S / 4) under gravity and the colour video without noise."""
    wrap = dataclasses.replace(SPEC, wrap=True)
    colour = dataclasses.replace(SPEC, channels=3, noise_std=0.05)
    big = vid.VideoSpec(size=16, radius=(5.0, 6.0))

    def all_kinds(keys):
        many = lambda spec, g, e: jax.vmap(lambda k: vid.make_video(k, spec, g, e))(keys)
        return (many(SPEC, G, E), many(SPEC, 0.0, 1.0), many(wrap, 0.0, 1.0),
                vid.make_video(keys[0], SPEC, G, E), vid.make_video(keys[0], colour),
                many(SPEC, G, 1.0), vid.make_video(keys[0], big, G, E).pos,
                vid.make_video(keys[0], dataclasses.replace(colour, noise_std=0.0)))

    return compiled(all_kinds, jax.random.split(jax.random.PRNGKey(0), N))


def test_shapes_dtypes_and_determinism(videos):
    """frames (T, H, W, C) float32 in [0, 1] without noise; masks (T, K, H, W) bool; ids
    (T, H, W) int32 in [-1, K); pos, vel (T, K, 2); the same key gives the same video,
    other keys other videos; C = 3 gives per-sprite colours on a grey background (equal
    channels) and fresh noise per frame; r > S / 4 under gravity gives finite positions;
    wrap with gravity fails with a clear message."""
    g, _, _, again, colour = videos[:5]
    T, S, K = SPEC.num_frames, SPEC.size, SPEC.num_sprites
    assert g.frames.shape == (N, T, S, S, 1) and g.frames.dtype == jnp.float32
    assert g.masks.shape == (N, T, K, S, S) and g.masks.dtype == jnp.bool_
    assert g.ids.shape == (N, T, S, S) and g.ids.dtype == jnp.int32
    assert g.pos.shape == g.vel.shape == (N, T, K, 2) and g.radius.shape == (N, K)
    assert 0 <= float(g.frames.min()) and float(g.frames.max()) <= 1
    assert set(np.unique(g.ids)) <= set(range(-1, K))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda a: a[0], g), again)
    assert not np.array_equal(g.frames[0], g.frames[1])
    assert colour.frames.shape == (T, S, S, 3)
    still = colour.ids[0] == -1  # background pixels of frame 0 and 1: noise differs
    assert not np.allclose(colour.frames[0][still & (colour.ids[1] == -1)],
                           colour.frames[1][still & (colour.ids[1] == -1)])
    clean = videos[7]  # the colour video without noise
    assert np.ptp(np.asarray(clean.frames)[clean.ids == -1], axis=-1).max() == 0
    assert np.ptp(np.asarray(clean.frames)[clean.ids >= 0], axis=-1).max() > 0.05
    assert np.isfinite(np.asarray(videos[6])).all()
    with pytest.raises(ValueError, match="wrap=True needs gravity 0"):
        vid.make_video(jax.random.PRNGKey(0), dataclasses.replace(SPEC, wrap=True), 0.3)


def test_energy_falls_under_gravity_and_is_constant_at_constant_velocity(videos):
    """energy = |v|^2 / 2 + g (floor - y): under gravity with restitution 0.6 it never
    rises (to 1e-4), is constant in flight (exact parabolas, to 1e-3) and falls by over
    10% in every clip (every sprite of these 24-frame
    clips meets a wall); under gravity with restitution 1 it is constant to 1e-3 over the
    whole clip, floor bounces included; with gravity 0 and elastic bounces or wrap-around
    it is constant to 1e-5; sprites stay inside the frame (bounces) or inside [0, S) (wrap)."""
    g, c, w, _, _, el = videos[:6]
    e_g = np.asarray(jax.vmap(lambda v: vid.energy(v, SPEC.size, G))(g))  # (N, T, K)
    e_el = np.asarray(jax.vmap(lambda v: vid.energy(v, SPEC.size, G))(el))
    np.testing.assert_allclose(e_el, np.broadcast_to(e_el[:, :1], e_el.shape), atol=1e-3)
    floor = np.diff(np.sign(np.asarray(el.vel[..., 0])), axis=1) < 0  # v_y: down -> up
    assert floor.sum() > N  # floor bounces happened
    assert np.diff(e_g, axis=1).max() < 1e-4
    dv = np.diff(np.asarray(g.vel), axis=1)  # (N, T - 1, K, 2)
    flight = (np.abs(dv[..., 1]) < 1e-6) & (np.abs(dv[..., 0] - G) < 1e-5)  # no wall met
    assert flight.mean() > 0.3 and np.abs(np.diff(e_g, axis=1)[flight]).max() < 1e-3
    assert (e_g[:, -1].sum(-1) < 0.9 * e_g[:, 0].sum(-1)).all()
    for v in (c, w):
        e = np.asarray(jax.vmap(lambda v: vid.energy(v, SPEC.size, 0.0))(v))
        np.testing.assert_allclose(e, np.broadcast_to(e[:, :1], e.shape), atol=1e-5)
    r = np.asarray(c.radius)[:, None, :, None]
    assert (c.pos >= r - 1e-4).all() and (c.pos <= SPEC.size - r + 1e-4).all()
    assert (w.pos >= 0).all() and (w.pos < SPEC.size).all()
    assert np.abs(np.diff(np.asarray(c.vel), axis=1)).max() > 0  # bounces happened


def test_masks_match_the_rendered_sprites(videos):
    """Without noise: a pixel with id k has sprite k's colour, and its mask covers it, with
    no later sprite's; a background pixel (id -1) has no mask and differs from every
    sprite colour; the masks' centres of mass lie near the positions (unoccluded disks or
    squares, away from the wrap seam)."""
    g, _, w = videos[:3]
    for v in (g, w):
        frames, masks, ids = np.asarray(v.frames[..., 0]), np.asarray(v.masks), np.asarray(v.ids)
        for k in range(SPEC.num_sprites):
            on = ids == k
            assert on.any()
            assert masks[:, :, k][on].all()
            colour_k = frames[on].reshape(-1)
            per_video = [np.unique(frames[i][on[i]]) for i in range(N) if on[i].any()]
            assert all(len(u) == 1 for u in per_video)  # one flat colour per sprite
            assert colour_k.min() >= 0.6
            if k + 1 < SPEC.num_sprites:
                assert not masks[:, :, k + 1][on].any()
        bg = ids == -1
        assert not masks.any(2)[bg].any() and frames[bg].max() <= SPEC.texture < 0.6
    m = np.asarray(g.masks, np.float32)  # (N, T, K, S, S)
    grid = np.arange(SPEC.size) + 0.5
    cy = (m.sum(-1) * grid).sum(-1) / m.sum((-1, -2))
    cx = (m.sum(-2) * grid).sum(-1) / m.sum((-1, -2))
    np.testing.assert_allclose(np.stack([cy, cx], -1), g.pos, atol=0.75)
