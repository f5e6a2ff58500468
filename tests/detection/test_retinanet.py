"""Tests of detection/retinanet.py: focal loss, pyramid and anchors, assignment, prior init,
the loss normaliser, the paper preset's trace, purity, CLI, a short behaviour test, anchor
coverage and (slow tier) the mAP gate on SHAPES-64."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import boxes as bx
from detection import retinanet as rn
from tests.common.compiled import compiled, jit0
from tests.common.config_fields import unread_fields
from tests.detection import tiny_run as tiny_run_module

QUICK = rn.Config(**rn.PRESETS["quick"])
PAPER = rn.Config(**rn.PRESETS["paper"])
# the one config of the CLI, purity and short behaviour tests (run once, 2 seeds); XLA's
# native convs: the same maths as the quick preset's shifted matmuls (common.nets.Conv),
# a third less to compile (74 -> 55 CPU-s for the whole run), slower steps (40 of them).
# At --fast-compile native convs run very slowly (> 150 CPU-s for the module) and shifted
# ones gain nothing (78.5 CPU-s for the module vs 78.2 here, loaded 2-core)
TINY = dataclasses.replace(QUICK, batch_size=8, total_steps=40, fpn_width=16, head_convs=1,
                           warmup_steps=5, eval_images=16, shift_conv=False)
GATE_SHORT = 0.03

# the equation tests call these jitted (one compile per shape, not one per eager op), at
# XLA's lowest optimisation level (programs run once or twice on small inputs)
assign = jit0(rn.assign, 3)
retinanet_loss = jit0(rn.retinanet_loss, 5)


@functools.cache
def shapes_256():
    """256 SHAPES-64 training scenes of the quick preset (one compile at XLA's lowest
    optimisation level, shared)."""
    return compiled(lambda k: rn.draw_batch(k, QUICK, 256), jax.random.PRNGKey(1))


@functools.cache
def _focal_losses():
    """Logits x, 0/1 targets y (64, 5), and (one program at XLA's lowest level, not one
    compile per eager op) FL(gamma 0, no alpha), CE, FL(gamma 2, no alpha), FL(.25, 2) and
    optax's sigmoid_focal_loss(.25, 2) of them."""
    @jit0
    def losses(key):
        k1, k2 = jax.random.split(key)
        x = 4.0 * jax.random.normal(k1, (64, 5))
        y = jax.random.bernoulli(k2, 0.3, (64, 5)).astype(jnp.float32)
        return x, y, {"fl0": rn.focal_loss(x, y, alpha=None, gamma=0.0),
                      "ce": optax.sigmoid_binary_cross_entropy(x, y),
                      "fl2": rn.focal_loss(x, y, None, 2.0),
                      "fl": rn.focal_loss(x, y, alpha=0.25, gamma=2.0),
                      "optax": optax.losses.sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0)}

    return jax.device_get(losses(jax.random.PRNGKey(0)))


def test_focal_gamma0_without_alpha_is_bce_exactly():
    _, _, fl = _focal_losses()
    np.testing.assert_array_equal(fl["fl0"], fl["ce"])
    assert (fl["fl2"] <= fl["ce"]).all()  # FL <= CE elementwise for gamma > 0 ([1] Sec. 3.2)


def test_focal_matches_optax_and_the_formula():
    """[1] Eq. 5 with alpha = 0.25, gamma = 2 against optax (whose default is alpha=None)
    and against -alpha_t (1 - p_t)^gamma log p_t written out in numpy (float64)."""
    x, y, fl = _focal_losses()
    ours, ref = fl["fl"], fl["optax"]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    p = 1 / (1 + np.exp(-xn))
    p_t = np.where(yn == 1, p, 1 - p)
    alpha_t = np.where(yn == 1, 0.25, 0.75)
    np.testing.assert_allclose(ours, -alpha_t * (1 - p_t) ** 2 * np.log(p_t), rtol=1e-4,
                               atol=1e-7)


def test_easy_negative_is_down_weighted():
    """p = 0.01 on a negative: FL / CE = alpha_t (1 - p_t)^gamma = 0.75 * 0.01^2 = 7.5e-5."""
    logit = jnp.log(0.01 / 0.99)[None]
    ratio = rn.focal_loss(logit, jnp.zeros(1)) / optax.sigmoid_binary_cross_entropy(
        logit, jnp.zeros(1))
    np.testing.assert_allclose(ratio, 0.75 * 0.01 ** 2, rtol=1e-4)


def test_pyramid_strides_and_anchor_count_at_640_and_paper_preset_traces():
    """P3-P7 at 640 px: maps 80, 40, 20, 10, 5 (strides 8..128) and (80^2 + 40^2 + 20^2 +
    10^2 + 5^2) * 9 = 76725 anchors; the ResNet-50-FPN's outputs have that many rows, and
    init and update of the paper preset trace (shapes only)."""
    sides = rn.level_shapes(PAPER)
    assert [640 // s for s in sides] == [8, 16, 32, 64, 128]
    assert rn.pyramid_anchors(PAPER).shape == (76725, 4)
    state = jax.eval_shape(lambda: rn.init(jax.random.PRNGKey(0), PAPER))
    x = jnp.zeros((1, 640, 640, 3), jnp.uint8)
    out = jax.eval_shape(lambda s: rn.RetinaNet(PAPER).apply(
        {"params": s.params, "batch_stats": s.batch_stats}, x), state)
    assert out[0].shape == (1, 76725, 9) and out[1].shape == (1, 76725, 4)
    new_state, metrics = jax.eval_shape(lambda s: rn.update(s, PAPER), state)
    assert jax.tree.map(lambda a: a.shape, new_state) == jax.tree.map(lambda a: a.shape, state)
    assert metrics["losses/total"].shape == ()
    # the quick preset: P3-P5 of 64 px images, 8x8, 4x4, 2x2
    assert rn.level_shapes(QUICK) == [8, 4, 2]


def test_anchor_areas_per_level():
    """Level l: areas 32^2 4^(l-3) {1, 2^(2/3), 2^(4/3)}, each at ratios h/w of 1/2, 1, 2."""
    for level in PAPER.levels:
        wh = rn.anchor_sizes(PAPER, level)
        base = 32.0 ** 2 * 4.0 ** (level - 3)
        expect = np.repeat([base, base * 2 ** (2 / 3), base * 2 ** (4 / 3)], 3)
        np.testing.assert_allclose(wh.prod(1), expect, rtol=1e-5)
        np.testing.assert_allclose(wh[:, 1] / wh[:, 0], np.tile([0.5, 1.0, 2.0], 3), rtol=1e-5)
    # anchors sit at cell centres of stride 8 on P3
    a = np.asarray(rn.pyramid_anchors(PAPER)[:9]) * 640
    np.testing.assert_allclose(a[:, :2], 4.0)


def test_quick_anchors_cover_shapes_boxes():
    """The quick preset's anchors (A0 = 12 px on P3 of 64 px images) reach IoU >= 0.5 with
    >= 80% of SHAPES boxes (measured 85%, 3.5 positives per box); A0 = 8 px (the paper's
    32 px scaled with the image) reaches only ~65%."""
    _, gt, labels = shapes_256()
    boxes = gt[labels >= 0]

    def covered(cfg):  # one program per anchor set, not one per eager op
        ious = compiled(lambda b: bx.iou(bx.cxcywh_to_xyxy(rn.pyramid_anchors(cfg)), b), boxes)
        return float((ious.max(0) >= 0.5).mean())

    assert covered(QUICK) >= 0.8, covered(QUICK)
    assert covered(dataclasses.replace(QUICK, anchor_size=8.0)) < 0.7


def test_assignment_ignore_band():
    """IoU >= 0.5 positive, < 0.4 negative, [0.4, 0.5) ignored ([1] Sec. 4)."""
    cfg = dataclasses.replace(QUICK, match_best_anchor=False)
    gt = jnp.array([[0.0, 0.0, 0.4, 0.4], [0, 0, 0, 0]])  # xyxy, units of the image
    labels = jnp.array([2, -1])
    # anchors (cxcywh) overlapping the box by IoU 0.6, 0.45, 0.3, 0.0 (shifted along x)
    ious = np.array([0.6, 0.45, 0.3, 0.0])
    dx = 0.4 * (1 - ious) / (1 + ious)  # IoU of two equal squares shifted by dx along x
    anchors = jnp.stack([jnp.asarray(0.2 + dx), jnp.full(4, 0.2), jnp.full(4, 0.4),
                         jnp.full(4, 0.4)], -1)
    np.testing.assert_allclose(bx.iou(bx.cxcywh_to_xyxy(anchors), gt[:1])[:, 0], ious,
                               atol=1e-6)
    state, onehot, tgt = assign(anchors, gt, labels, cfg)
    np.testing.assert_array_equal(state, [1, -1, 0, 0])
    np.testing.assert_array_equal(onehot[0], [0, 0, 1])
    np.testing.assert_array_equal(onehot[1:], 0)
    np.testing.assert_allclose(tgt[0], [-dx[0] / 0.4, 0, 0, 0], atol=1e-6)
    # with match_best_anchor, a box whose best IoU is in the band still gets its best anchor
    state, _, _ = assign(anchors[1:], gt, labels, QUICK)
    np.testing.assert_array_equal(state, [1, 0, 0])


def test_matching_uses_the_shared_forced_best_anchor_step(monkeypatch):
    """The best-anchor claim is common.boxes.match's force_best (tested there with padding
    rows), not a copy: a spy records the flag of the call rn.assign makes (match_best_anchor
    on and off)."""
    seen = []
    orig = bx.match
    monkeypatch.setattr(bx, "match", lambda *a, **k: seen.append(k.get("force_best")) or
                        orig(*a, **k))
    anchors = jnp.array([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]])
    gt, labels = jnp.array([[0.0, 0.0, 0.2, 0.2], [0, 0, 0, 0]]), jnp.array([0, -1])
    for best in (True, False):
        state, _, _ = rn.assign(anchors, gt, labels,
                                dataclasses.replace(QUICK, match_best_anchor=best))
        assert state.tolist() == ([1, 0] if best else [0, 0])  # IoU 0.16 < neg_iou
    assert seen == [True, False]


def test_prior_bias_init_gives_initial_sigmoid_of_pi(tiny_run):
    """b = -log((1 - pi) / pi) with pi = 0.01: mean initial class probability 0.01, and the
    initial focal loss is that of predicting 0.01 everywhere. On the initial states of the
    tiny CLI run (seed 0)."""
    state = jax.tree.map(lambda a: a[0], tiny_run_module.initial_states(rn, TINY))
    images, _, _ = shapes_256()
    logits, _ = compiled(rn.RetinaNet(TINY).apply,
                         {"params": state.params, "batch_stats": state.batch_stats}, images[:8])
    p = jax.nn.sigmoid(logits)
    assert abs(float(p.mean()) - 0.01) < 5e-4, float(p.mean())
    bias = state.params["class_subnet"][f"Conv_{TINY.head_convs}"]["bias"]
    np.testing.assert_allclose(bias, -np.log(99.0), rtol=1e-6)


def test_loss_normalised_by_positive_anchors():
    """3 images, 5 anchors, 4 positive anchors (two boxes in image 0, two in image 1, none
    in image 2): loss * 4 equals the hand sum of the focal loss over all (anchor, class)
    pairs plus smooth-L1 over the positives, in float64. Dividing by the number of
    anchors, of images or of anchors x images instead fails. The box loss is zero at the
    exact offsets."""
    cfg = QUICK
    anchors = jnp.array([[0.1 + 0.2 * i, 0.5, 0.12, 0.12] for i in range(5)])
    a_xyxy = np.asarray(bx.cxcywh_to_xyxy(anchors))
    gt = np.zeros((3, 2, 4), np.float32)
    gt[0], gt[1] = a_xyxy[[0, 3]], a_xyxy[[1, 4]]
    labels = jnp.array([[2, 0], [1, 1], [-1, -1]])
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    logits = 2.0 * jax.random.normal(k1, (3, 5, 3))
    deltas = 0.3 * jax.random.normal(k2, (3, 5, 4))
    loss, parts = retinanet_loss(logits, deltas, anchors, jnp.asarray(gt), labels, cfg)
    assert float(parts["num_pos"]) == pytest.approx(4 / 3)  # mean positives per image
    x = np.asarray(logits, np.float64)
    y = np.zeros((3, 5, 3))
    for img, anchor, cls in [(0, 0, 2), (0, 3, 0), (1, 1, 1), (1, 4, 1)]:
        y[img, anchor, cls] = 1.0
    p = 1 / (1 + np.exp(-x))
    p_t = np.where(y == 1, p, 1 - p)
    focal = np.sum(-np.where(y == 1, 0.25, 0.75) * (1 - p_t) ** 2 * np.log(p_t))
    d = np.abs(np.asarray(deltas, np.float64)[y.any(-1)])  # targets are 0: exact boxes
    box = np.sum(np.where(d < cfg.box_beta, 0.5 * d * d / cfg.box_beta, d - 0.5 * cfg.box_beta))
    np.testing.assert_allclose(float(parts["focal"]) * 4, focal, rtol=1e-5)
    np.testing.assert_allclose(float(parts["box"]) * 4, box, rtol=1e-5)
    np.testing.assert_allclose(float(loss) * 4, focal + box, rtol=1e-5)
    _, parts = retinanet_loss(logits, jnp.zeros_like(deltas), anchors, jnp.asarray(gt),
                                 labels, cfg)
    assert float(parts["box"]) < 1e-10


def test_sgd_schedule_decays_at_60k_and_80k_of_90k():
    """[1] Sec. 4.1: warm-up from lr / 3 over 500 updates, lr / 10 at 60k and 80k of 90k
    counted from step 0 (not from the warm-up's end: 60.5k / 80.5k before the fix)."""
    n = PAPER.total_steps
    lr = np.asarray(jit0(rn.lr_schedule(PAPER))(jnp.arange(n)))
    np.testing.assert_array_equal(np.flatnonzero(lr[1:] < 0.5 * lr[:-1]) + 1, [60_000, 80_000])
    np.testing.assert_allclose(lr[[0, PAPER.warmup_steps, 59_999, 60_000, 80_000]],
                               [PAPER.lr / 3, PAPER.lr, PAPER.lr, PAPER.lr / 10,
                                PAPER.lr / 100], rtol=1e-6)


def test_sgd_weight_decay_spares_biases_and_batch_norm():
    """L2 decay on kernels only (darknet / Caffe): biases and BN scales and offsets keep."""
    tiny_run_module.assert_decay_spares_vectors(rn, dataclasses.replace(TINY, optimizer="sgd"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the command line: 40 updates of 8 scenes, 2 seeds."""
    return tiny_run_cli(tmp_path_factory.mktemp("run"))


def tiny_run_cli(run_dir):
    return tiny_run_module.run_cli(rn, TINY, QUICK, run_dir)


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's jitted, vmapped training of 2 seeds: its first chunk, rerun from the same
    initial states, gives the same metrics bit for bit; the two seeds differ."""
    tiny_run_module.assert_pure(rn, TINY, tiny_run)
    assert tiny_run.history["losses/total"].shape == (2, TINY.total_steps)


def test_cli_runs_and_documents_every_field(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rn.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(rn.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    assert tiny_run.history["losses/focal"].shape == (2, TINY.total_steps)
    assert ((0.0 <= tiny_run.final["mAP50"]) & (tiny_run.final["mAP50"] <= 1.0)).all()
    with pytest.raises(ValueError, match="max_level=4"):
        rn.main(["--max-level", "4", "--run-dir", str(tmp_path)])


def test_short_training_beats_untrained(tiny_run):
    """Behaviour (default tier): TINY after 40 updates of 8 scenes vs the same 2 seeds
    untrained, mAP@0.5 on 16 held-out scenes. Measured (2 seeds): trained 0.070 / 0.058
    (shifted-matmul convs: 0.070 / 0.054), untrained 0.000 / 0.000. The calibrated gate is
    test_gate_detects_shapes_and_xy_swap_fails (slow)."""
    trained = tiny_run.final["mAP50"]
    untrained = tiny_run_module.untrained(rn, TINY)["mAP50"]
    print("mAP@0.5 trained", trained, "untrained", untrained)
    assert trained.mean() >= GATE_SHORT > untrained.max(), (trained, untrained)


def test_every_config_field_is_read():
    assert unread_fields(rn) == []


def _train_map50(cfg, steps):
    """mAP@0.5 after `steps` updates, one jitted update per step in a Python loop (native
    convs: outside a lax.scan XLA:CPU's conv weight gradients are fast)."""
    state = compiled(lambda k_: rn.init(k_, cfg), jax.random.PRNGKey(0))
    step = jax.jit(lambda s: rn.update(s, cfg))
    for _ in range(steps):
        state, _ = step(state)
    return rn.evaluate(state, cfg)["mAP50"]


@pytest.mark.slow
def test_gate_detects_shapes_and_xy_swap_fails(monkeypatch):
    """Behaviour gate on SHAPES-64 (quick preset, 400 updates of 16 images, 200 held-out
    scenes): the correct RetinaNet reaches mAP@0.5 >= 0.45; the named bug, box targets with
    x/y (and w/h) swapped, fails it. Measured on a shared 2-core CPU (108 CPU-s for the
    whole test; before SHAPES drew from one RNG call): correct 0.687, x/y swap 0.257. On a
    GPU (float32), not gated: correct
    0.567 (seed 0) / 0.514 (seed 1) at 300 updates, 0.658 (seed 1) at 400, 0.787 (seed 0)
    at 500; x/y swap 0.228 at 300, 0.255 at 400; without GroupNorm in the subnets (d = 64,
    lr 2e-3, A0 = 8 or 12) 0.24-0.28 at 500."""
    cfg = dataclasses.replace(QUICK, shift_conv=False, eval_images=200)
    good = _train_map50(cfg, 400)
    orig = rn.box_targets
    monkeypatch.setattr(rn, "box_targets", lambda g, a: orig(g, a)[..., jnp.array([1, 0, 3, 2])])
    bad = _train_map50(cfg, 400)
    print(f"mAP@0.5 correct {good:.3f}, x/y swapped {bad:.3f}")
    assert good >= 0.45, good
    assert bad < 0.45, bad


def test_predict_clips_boxes_to_the_image_before_nms(monkeypatch):
    """Raw outputs of 5 everywhere decode to boxes far larger than the image; predict clips
    them to [0, size] before NMS (issue 12), so no detection leaves the image."""
    boxes, valid = tiny_run_module.predict_with_constant_outputs(rn, "RetinaNet", TINY, 5.0,
                                                                 monkeypatch)
    assert valid.any()
    kept = boxes[valid]
    assert (kept >= 0).all() and (kept <= TINY.image_size).all(), kept
