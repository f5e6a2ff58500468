"""Tests of common/scenes.py: shapes and dtypes, determinism per key, every randomized field
changes the image, the target's mask lies at its reported position, the sampler stays in its
ranges and the "real" style lies outside them."""

import dataclasses

import jax
import numpy as np
import pytest

from common import scenes as sc
from tests.common.compiled import compiled

K, HW, N = 3, (24, 32), 8  # distractors, image size, scenes per batch
RANDOM = sc.make_ranges(sc.RANDOM, K)


def _render_many(scenes):
    return jax.vmap(lambda s: sc.render(s, HW) + (sc.table_coords(s, HW),))(scenes)


@pytest.fixture(scope="module")
def batch():
    """N scenes of each style from the same keys, the first key again, and 512 draws of the
    randomized ranges (for the sampler's bounds), in one compiled program."""

    def all_styles(keys):
        many = lambda style: jax.vmap(lambda k: sc.sample_params(k, sc.make_ranges(style, K)))(
            keys)
        scenes = [many(s) for s in (sc.CANONICAL, sc.RANDOM, sc.REAL)]
        wide = jax.vmap(lambda k: sc.sample_params(k, RANDOM))(
            jax.random.split(jax.random.PRNGKey(1), 512))
        again = sc.render(sc.sample_params(keys[0], RANDOM), HW)
        return scenes, [_render_many(s) for s in scenes], again, wide

    return compiled(all_styles, jax.random.split(jax.random.PRNGKey(0), N))


def test_shapes_dtypes_and_determinism(batch):
    """image (H, W, 3) float32, target (2,), mask (H, W) bool; the same key renders the same
    image, other keys other images; the canonical table is plain (one colour off the target)."""
    _, renders, again, _ = batch
    img, xy, mask, _ = renders[1]
    assert img.shape == (N, *HW, 3) and img.dtype == np.float32
    assert xy.shape == (N, 2) and mask.shape == (N, *HW) and mask.dtype == np.bool_
    np.testing.assert_array_equal(img[0], again[0])
    assert not np.array_equal(img[0], img[1])
    canon, _, cmask, _ = renders[0]
    for i in range(N):
        assert np.ptp(np.asarray(canon[i])[~np.asarray(cmask[i])], axis=0).max() == 0


def test_target_mask_is_at_its_reported_position(batch):
    """In every style (camera shifted, zoomed and rotated under RANDOM), the mean table
    coordinate of the mask's pixels is the reported (x, y) to within 0.04 (a pixel is 0.06
    of the table), and the mask covers at least 10 pixels."""
    for _, xy, mask, p in batch[1]:
        for i in range(N):
            m = np.asarray(mask[i])
            assert m.sum() >= 10
            np.testing.assert_allclose(np.asarray(p[i])[m].mean(0), xy[i], atol=0.04)


def test_every_randomized_field_changes_the_image(batch):
    """For every field whose RANDOM range is not a point, N base scenes (all K distractors
    shown, noise on, two of each training texture family) with that one field taken from
    another draw: the image changes in at least half of them (a distractor may hide behind
    the target), except tex_grid, read by the `noise` family only (both of its scenes).
    The catalogue's "randomization must really change" rule."""
    scenes = jax.tree.map(np.asarray, batch[0][1])
    base = dataclasses.replace(scenes, num_distractors=np.full(N, K + 0.5, np.float32),
                               noise_std=np.full(N, 0.05, np.float32),
                               texture=np.arange(N, dtype=np.float32) % 4 + 0.5)
    other = jax.tree.map(lambda a: np.roll(a, 1, axis=0), base)
    other = dataclasses.replace(other, num_distractors=np.zeros(N, np.float32),
                                noise_std=np.zeros(N, np.float32))
    fields = [f.name for f in dataclasses.fields(sc.Scene)
              if np.any(np.asarray(getattr(RANDOM, f.name))[0]
                        < np.asarray(getattr(RANDOM, f.name))[1])]
    assert {"texture", "light_grad", "cam_angle", "distractor_shape", "noise_std"} <= set(fields)
    variants = [dataclasses.replace(base, **{f: getattr(other, f)}) for f in fields]
    stacked = jax.tree.map(lambda *a: np.concatenate(a), base, *variants)
    imgs = np.asarray(compiled(lambda s: _render_many(s)[0], stacked)).reshape(
        len(fields) + 1, N, -1)
    changed = np.abs(imgs[1:] - imgs[:1]).max(-1) > 1e-3  # (fields, N)
    counts = dict(zip(fields, changed.sum(1).tolist(), strict=True))
    assert counts.pop("tex_grid") == 2 and min(counts.values()) >= N // 2, counts


def test_sampler_within_ranges_and_real_style_outside(batch):
    """512 RANDOM draws lie in [low, high] field by field and use all 4 training texture
    families; REAL's texture family (rings) and its light gradient lie outside RANDOM."""
    wide = jax.tree.map(np.asarray, batch[3])
    for f in dataclasses.fields(sc.Scene):
        lo, hi = np.asarray(getattr(RANDOM, f.name))
        v = getattr(wide, f.name)
        assert (v >= lo - 1e-6).all() and (v <= hi + 1e-6).all(), f.name
    assert set(np.floor(wide.texture).astype(int).tolist()) == {0, 1, 2, 3}
    real = sc.make_ranges(sc.REAL, K)
    assert sc.TEXTURES[int(real.texture[0])] == "rings"
    assert float(real.texture[0]) >= float(RANDOM.texture[1])
    assert (np.abs(np.asarray(real.light_grad[0])) > np.asarray(RANDOM.light_grad[1])).all()
