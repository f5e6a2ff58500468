"""Tests of common/scenes.py: shapes and dtypes, determinism per key, every randomized field
changes the image, the target's mask lies at its reported position, the label map and the draw
order, distractors shown by count, restyle, soft edges' gradients, range validation, the
sampler stays in its ranges and the "real" style lies outside them."""

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
    img, xy, mask, labels, _ = renders[1]
    assert img.shape == (N, *HW, 3) and img.dtype == np.float32
    assert xy.shape == (N, 2) and mask.shape == (N, *HW) and mask.dtype == np.bool_
    assert labels.shape == (N, *HW) and labels.dtype == np.int32
    np.testing.assert_array_equal(img[0], again[0])
    assert not np.array_equal(img[0], img[1])
    canon, _, cmask, _, _ = renders[0]
    for i in range(N):
        assert np.ptp(np.asarray(canon[i])[~np.asarray(cmask[i])], axis=0).max() == 0


def test_target_mask_is_at_its_reported_position(batch):
    """In every style (camera shifted, zoomed and rotated under RANDOM), the mean table
    coordinate of the mask's pixels is the reported (x, y) to within 0.04 (a pixel is 0.06
    of the table), and the mask covers at least 10 pixels."""
    for _, xy, mask, _, p in batch[1]:
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


@pytest.fixture(scope="module")
def canonical_variants(batch):
    """The N canonical scenes with all K distractors shown, with none, with 0.5 shown (floored:
    none) in colour 0.1, and the RANDOM scenes restyled to CANONICAL, rendered in one program;
    and the restyled scenes."""
    canon = jax.tree.map(np.asarray, batch[0][0])
    ones = np.ones((N, K, 3), np.float32)
    full = lambda v: np.full(N, v, np.float32)
    variants = [dataclasses.replace(canon, num_distractors=full(K + 0.5)),
                dataclasses.replace(canon, num_distractors=full(0.0)),
                dataclasses.replace(canon, num_distractors=full(0.5), distractor_colour=0.1 * ones)]

    def go(variants, rand):
        restyled = sc.restyle(rand, sc.CANONICAL)
        return [_render_many(v) for v in variants], restyled

    return compiled(go, variants, jax.tree.map(np.asarray, batch[0][1]))


def test_label_map_and_draw_order(canonical_variants):
    """All K canonical distractors shown: labels == 1 exactly on the target's mask, the
    target's pixels have the target's colour (drawn last, on top), a distractor's labelled
    pixels have its colour (dark grey 0.2, not the table's 0.5), and labels cover
    {0, 1, 2 .. K + 1} across the batch."""
    img, _, mask, labels, _ = (np.asarray(a) for a in canonical_variants[0][0])
    colour = np.asarray(sc.CANONICAL["target_colour"], np.float32)
    np.testing.assert_array_equal(labels == 1, mask)
    np.testing.assert_array_equal(img[mask], np.broadcast_to(colour, img[mask].shape))
    for j in range(K):
        np.testing.assert_allclose(img[labels == 2 + j], 0.2)
    np.testing.assert_allclose(img[labels == 0], 0.5)
    assert set(np.unique(labels).tolist()) == set(range(K + 2))


def test_distractors_are_shown_by_their_floored_count(canonical_variants):
    """Canonical style: all K distractors shown change the image in most scenes (their colour
    differs from the table's); 0.5 distractors (floored: none), coloured 0.1, render as
    none."""
    (shown, none, half), _ = canonical_variants
    changed = [not np.array_equal(shown[0][i], none[0][i]) for i in range(N)]
    assert sum(changed) >= N // 2, changed
    np.testing.assert_array_equal(half[0], none[0])
    np.testing.assert_array_equal(half[3], none[3])


def test_restyle_keeps_geometry_and_sets_every_aspect(batch, canonical_variants):
    """RANDOM scenes restyled to CANONICAL (every aspect) equal, field by field, the CANONICAL
    scenes drawn from the same keys (the styles share the geometry's ranges, so the same
    uniforms give the same positions); restyle with no aspect changes nothing."""
    restyled = jax.tree.map(np.asarray, canonical_variants[1])
    canon = jax.tree.map(np.asarray, batch[0][0])
    for f in dataclasses.fields(sc.Scene):
        np.testing.assert_array_equal(getattr(restyled, f.name), getattr(canon, f.name),
                                      err_msg=f.name)
    rand = jax.tree.map(np.asarray, batch[0][1])
    same = sc.restyle(rand, sc.CANONICAL, ())
    jax.tree.map(np.testing.assert_array_equal, same, rand)


def test_soft_edges_give_position_and_size_gradients(batch):
    """d(a fixed random weighting of the image)/d(target xy, size): nonzero with edge 0.03,
    exactly zero with hard masks (edge 0); the soft image stays within 0.6 of the hard one
    (only border pixels blend)."""
    s = jax.tree.map(lambda a: a[0], batch[0][0])

    w = jax.random.uniform(jax.random.PRNGKey(0), (*HW, 3))

    def grads(s):
        out = []
        for edge in (0.03, 0.0):
            f = lambda xy, size, edge=edge: sc.render(
                s.replace(target_xy=xy, target_size=size), HW, edge)[0].ravel() @ w.ravel()
            out.append(jax.grad(f, (0, 1))(s.target_xy, s.target_size))
        diff = jax.numpy.abs(sc.render(s, HW, 0.03)[0] - sc.render(s, HW)[0]).max()
        return out, diff

    (soft, hard), diff = compiled(grads, s)
    assert np.abs(soft[0]).min() > 0 and np.abs(soft[1]) > 0, soft
    assert np.abs(hard[0]).max() == 0 and hard[1] == 0, hard
    assert diff < 0.6


def test_make_ranges_rejects_a_reversed_range():
    """A tuple is a range: light_grad=(0.45, 0.35) would silently be [0.45, 0.35]; it
    raises and names the field. ASPECTS cover every field RANDOM varies except the geometry
    (positions, target size, noise pattern)."""
    with pytest.raises(ValueError, match="light_grad=\\(0.45, 0.35\\)"):
        sc.make_ranges(dict(sc.CANONICAL, light_grad=(0.45, 0.35)), K)
    varied = {f.name for f in dataclasses.fields(sc.Scene)
              if np.any(np.asarray(getattr(RANDOM, f.name))[0]
                        < np.asarray(getattr(RANDOM, f.name))[1])}
    in_aspects = {f for fields in sc.ASPECTS.values() for f in fields}
    assert varied - in_aspects == {"target_xy", "target_size", "distractor_xy", "noise_seed",
                                   "tex_grid"}, varied - in_aspects
