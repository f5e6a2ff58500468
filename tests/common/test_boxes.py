"""Tests of common/boxes.py and the detection data in common/data.py: IoU and NMS against
numpy references, the box encoding, anchors, matching, and COCO AP against pycocotools."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import boxes as bx
from common import data


def random_boxes(rng, n, size=64.0):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(1, size * 0.4, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_iou_matches_brute_force_and_basic_properties():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    m = np.asarray(bx.iou(jnp.asarray(a), jnp.asarray(b)))
    for i in range(7):
        for j in range(5):
            w = max(0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            h = max(0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            ar = lambda x: (x[2] - x[0]) * (x[3] - x[1])
            assert m[i, j] == pytest.approx(w * h / (ar(a[i]) + ar(b[j]) - w * h), abs=1e-6)
    np.testing.assert_allclose(bx.iou(jnp.asarray(b), jnp.asarray(a)), m.T, atol=1e-7)
    np.testing.assert_allclose(np.diag(bx.iou(jnp.asarray(a), jnp.asarray(a))), 1.0, atol=1e-6)
    far = jnp.array([[100.0, 100, 110, 110]])
    assert float(bx.iou(far, jnp.asarray(a)).max()) == 0.0


def test_format_and_encoding_round_trips():
    rng = np.random.default_rng(1)
    b = jnp.asarray(random_boxes(rng, 20))
    np.testing.assert_allclose(bx.cxcywh_to_xyxy(bx.xyxy_to_cxcywh(b)), b, atol=1e-5)
    anchors = bx.xyxy_to_cxcywh(jnp.asarray(random_boxes(rng, 20)))
    g = bx.xyxy_to_cxcywh(b)
    for var in [(1.0, 1.0), (0.1, 0.2)]:
        t = bx.encode(g, anchors, var)
        np.testing.assert_allclose(bx.decode(t, anchors, var), g, rtol=1e-5, atol=1e-4)
    # the plain formula on a hand case: t = ((10-8)/4, (5-5)/2, log(8/4), log(1/2))
    t = bx.encode(jnp.array([10.0, 5, 8, 1]), jnp.array([8.0, 5, 4, 2]))
    np.testing.assert_allclose(t, [0.5, 0.0, np.log(2), np.log(0.5)], rtol=1e-6)


def test_grid_anchors_layout():
    a = bx.grid_anchors(2, 3, [(0.1, 0.2), (0.3, 0.3)])
    assert a.shape == (2 * 3 * 2, 4)
    # row-major cells, anchors innermost: cell (row 1, col 2) is cell 5
    np.testing.assert_allclose(a[10], [2.5 / 3, 1.5 / 2, 0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(a[11], [2.5 / 3, 1.5 / 2, 0.3, 0.3], rtol=1e-6)


def test_match_thresholds_ignore_band_and_forced_best():
    anchors = jnp.array([[0.0, 0, 10, 10], [0, 0, 10, 7], [0, 0, 10, 4.5], [50, 50, 60, 60],
                         [20, 20, 30, 30]])
    gt = jnp.array([[0.0, 0, 10, 10], [21, 21, 40, 40], [0, 0, 1, 1]])
    idx, label = bx.match(anchors, gt, jnp.array([True, True, False]), 0.5, 0.4)
    # IoUs with gt 0: 1, .7, .45 -> pos, pos, ignore; anchor 3 overlaps nothing -> neg;
    # anchor 4 has IoU 81/(100+361-81) = .21 with gt 1 but is its best anchor -> forced pos
    np.testing.assert_array_equal(label, [1, 1, -1, 0, 1])
    np.testing.assert_array_equal(np.asarray(idx)[[0, 1, 4]], [0, 0, 1])
    _, label = bx.match(anchors, gt, jnp.array([True, True, False]), 0.5, 0.4,
                        force_best=False)
    assert int(label[4]) == 0
    # a real box whose best anchor is anchor 0 keeps it although padding rows (whose
    # argmax is also 0) follow it
    small = jnp.array([[0.0, 0, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]])
    far = jnp.array([[0.0, 0, 4, 4], [50, 50, 60, 60]])
    idx, label = bx.match(far, small, jnp.array([True, False, False]), 0.7, 0.6)
    assert label.tolist() == [1, 0] and int(idx[0]) == 0


def test_cell_owner_keeps_one_object_per_cell_the_last_one():
    """Two objects land in cell (1, 2) and padding points out of range: the cell takes every
    field from the object of highest index (darknet's overwrite order), never a mix; empty
    cells are zero. Fails with `.min` instead of `.max` (the first object wins) or with the
    padding not dropped."""
    idx = (jnp.array([1, 0, 1, 3]), jnp.array([2, 0, 2, 0]))  # row 3: out of range (2 x 3)
    valid = jnp.array([True, True, True, False])
    v = jnp.array([[1.0, 10], [2, 20], [3, 30], [4, 40]])
    owner, put = bx.cell_owner(idx, valid, (2, 3))
    np.testing.assert_array_equal(owner, [[1, -1, -1], [-1, -1, 2]])
    np.testing.assert_array_equal(put(v)[1, 2], [3, 30])
    np.testing.assert_array_equal(put(v)[0, 0], [2, 20])
    assert float(jnp.abs(put(v)).sum()) == 3 + 30 + 2 + 20
    assert put(valid).dtype == bool and int(put(valid).sum()) == 2
    # match's forced-best step: two boxes whose best anchor is anchor 0 -> the later keeps it
    anchors = jnp.array([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    gt = jnp.array([[0.0, 0, 9, 9], [0, 0, 8, 8]])
    idx, label = bx.match(anchors, gt, jnp.array([True, True]), 0.95, 0.9)
    assert int(idx[0]) == 1 and label.tolist() == [1, 0]


def test_jitted_nms_equals_numpy_reference_on_random_sets():
    rng = np.random.default_rng(2)
    n, sets = 40, 300
    b = np.stack([random_boxes(rng, n, 40.0) for _ in range(sets)])
    s = rng.uniform(0, 1, (sets, n)).astype(np.float32)
    s[:, :5] = s[:, 5:10]  # some exact score ties: the order must stay stable
    idx, valid = jax.jit(jax.vmap(lambda b, s: bx.nms(b, s, 0.5, max_out=n)))(b, s)
    for k in range(sets):
        got = np.asarray(idx[k])[np.asarray(valid[k])].tolist()
        assert got == bx.nms_numpy(b[k], s[k], 0.5), k
    # a broken reference (no suppression) disagrees: the test can fail
    assert any(int(valid[k].sum()) < n for k in range(sets))


def test_nms_edge_cases_and_batched():
    same = jnp.tile(jnp.array([[1.0, 1, 5, 5]]), (6, 1))
    idx, valid = bx.nms(same, jnp.arange(6.0), 0.5, max_out=4)
    assert valid.tolist() == [True, False, False, False] and int(idx[0]) == 5
    apart = jnp.array([[0.0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]])
    idx, valid = bx.nms(apart, jnp.array([0.1, 0.3, 0.2]), 0.5, max_out=5)
    assert idx[valid].tolist() == [1, 2, 0] and valid.sum() == 3
    idx, valid = bx.nms(apart, jnp.array([0.1, 0.3, 0.2]), 0.5, score_threshold=0.15)
    assert idx[valid].tolist() == [1, 2]
    idx, valid = bx.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, max_out=3)
    assert not valid.any()
    # batched: the same box in two classes survives twice, within a class once
    b = jnp.array([[0.0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 4, 4]])
    idx, valid = bx.batched_nms(b, jnp.array([0.9, 0.8, 0.7]), jnp.array([0, 0, 1]))
    assert idx[valid].tolist() == [0, 2]


def test_voc_ap_hand_example():
    """One class, two objects, three detections by score: TP, FP, TP. Recall .5, .5, 1;
    precision 1, .5, 2/3. All-point AP = .5 * 1 + .5 * 2/3; 11-point AP = (6 * 1 + 5 *
    2/3) / 11; COCO's 101 points: 51 recall points at precision 1, 50 at 2/3."""
    tp, scores = [True, False, True], [0.9, 0.8, 0.7]
    assert bx.average_precision(tp, scores, 2, "voc") == pytest.approx(0.5 + 1 / 3)
    assert bx.average_precision(tp, scores, 2, "voc07") == pytest.approx((6 + 10 / 3) / 11)
    assert bx.average_precision(tp, scores, 2, "coco") == pytest.approx((51 + 100 / 3) / 101)
    assert np.isnan(bx.average_precision([], [], 0))


def test_map_equals_pycocotools_on_random_detections():
    """Perturbed and spurious detections on SHAPES ground truth; our COCO AP equals
    pycocotools' COCOeval (stats[0] mAP@[.5:.95], stats[1] mAP@.5) to 1e-4. Five images
    also carry 150 junk boxes of one class, more than COCO's 100 detections per image and
    class, scored above that image's true ones, so the truncation to max_dets decides which
    true positives count: without it our mAP differs (checked here; deleting the
    truncation in common/boxes.py fails the test)."""
    pytest.importorskip("pycocotools")
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(3)
    d = data.shapes(40, max_objects=4, seed=4)
    dets, gts, det_boxes, det_scores, det_labels = [], [], [], [], []
    for n in range(40):
        ok = d["labels"][n] >= 0
        g, gl = d["boxes"][n][ok], d["labels"][n][ok]
        gts.append((g, gl))
        b = np.concatenate([g + rng.normal(0, 3, g.shape), random_boxes(rng, 3)]).clip(0, 64)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        lab = np.concatenate([np.where(rng.uniform(size=len(gl)) < 0.85, gl, (gl + 1) % 3),
                              rng.integers(0, 3, 3)])
        sc = rng.uniform(0, 1, len(b))
        if n < 5:  # > max_dets detections of class gl[0], the true ones ranked past 100
            b = np.concatenate([b, random_boxes(rng, 150, 16.0) + 48])
            lab = np.concatenate([lab, np.full(150, gl[0])])
            sc = np.concatenate([0.1 * sc, rng.uniform(0.1, 0.2, 150)])
        dets.append((b, sc, lab))
        det_boxes.append(b), det_scores.append(sc), det_labels.append(lab)
    ours50, _ = bx.mean_average_precision(dets, gts, 3, (0.5,))
    ours, _ = bx.mean_average_precision(dets, gts, 3, np.linspace(0.5, 0.95, 10))
    untruncated, _ = bx.mean_average_precision(dets, gts, 3, (0.5,), max_dets=10**6)

    gt_json = data.to_coco(d["boxes"], d["labels"], d["class_names"], (64, 64))
    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt_json))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        res = coco.loadRes(data.to_coco(det_boxes, det_labels, d["class_names"], (64, 64),
                                        scores=det_scores))
        ev = COCOeval(coco, res, "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ours == pytest.approx(ev.stats[0], abs=1e-4)
    assert ours50 == pytest.approx(ev.stats[1], abs=1e-4)
    assert 0.1 < ours50 < 0.95  # a non-trivial case: neither all right nor all wrong
    assert abs(untruncated - ev.stats[1]) > 1e-3  # the truncation to 100 matters here


def _colour_regions(image):
    """{rgb: xyxy bounding box} of each colour other than black in an (H, W, 3) image."""
    flat = image.reshape(-1, 3)
    out = {}
    for rgb in {tuple(p) for p in flat[flat.any(1)]}:
        ys, xs = np.nonzero((image == rgb).all(-1))
        out[rgb] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def test_shapes_boxes_are_tight_and_labels_valid():
    """SHAPES on a black background (a `photos` array of zeros): every object is one flat
    colour, so each colour's pixels are what one object shows. With max_iou = 0 objects
    cannot overlap: the colours' bounding boxes are exactly the labelled boxes (tight, none
    missing, none extra) and labelled boxes are pairwise disjoint. In crowded scenes
    (max_iou 0.5, 4..40 px objects) later shapes hide parts of earlier ones: every labelled
    object still shows pixels (as many colours as labels), every shown pixel lies in a
    labelled box, and every box edge touches a drawn pixel. Breakages it catches (tried):
    boxes padded by 1 px, max_iou ignored, fully hidden objects kept."""
    make = jax.jit(data.shapes_batch, static_argnums=range(1, 8))
    black = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    # 6 objects of 8..28 px, colour-coded classes (3 shapes x 3 palette colours)
    images, boxes, labels = jax.device_get(
        make(jax.random.PRNGKey(0), 60, 64, 6, 8, 28, 3, 0.0, black))
    assert images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    ok = labels >= 0
    assert ok.any(1).all() and ok.sum() > 3 * 60  # crowded enough to test the placement
    assert set(np.unique(labels[ok])) == set(range(9)) and (labels[~ok] == -1).all()
    assert (boxes[~ok] == 0).all()
    wh = boxes[ok][:, 2:] - boxes[ok][:, :2]
    assert (boxes >= 0).all() and (boxes <= 64).all() and (wh >= 1).all() and (wh <= 28).all()
    for im, bo, la in zip(images, boxes, labels, strict=True):
        bo = bo[la >= 0]
        assert (bo == np.round(bo)).all()
        assert sorted(_colour_regions(im).values()) == sorted(map(tuple, bo.astype(int)))
        lt = np.maximum(bo[:, None, :2], bo[None, :, :2])
        rb = np.minimum(bo[:, None, 2:], bo[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(-1) * (1 - np.eye(len(bo)))
        assert inter.max() == 0.0, inter
    # crowded: 8 objects of 4..40 px, overlaps up to IoU 0.5, random colours
    images, boxes, labels = jax.device_get(
        make(jax.random.PRNGKey(1), 150, 64, 8, 4, 40, 1, 0.5, black))
    occluded = 0
    for im, bo, la in zip(images, boxes, labels, strict=True):
        bo = bo[la >= 0].astype(int)
        regions = _colour_regions(im)
        assert len(regions) == len(bo)  # each labelled object is visible, nothing else drawn
        occluded += sorted(regions.values()) != sorted(map(tuple, bo))
        drawn = im.any(-1)
        inside = np.zeros_like(drawn)
        for x1, y1, x2, y2 in bo:
            inside[y1:y2, x1:x2] = True
            assert drawn[y1, x1:x2].any() and drawn[y2 - 1, x1:x2].any()
            assert drawn[y1:y2, x1].any() and drawn[y1:y2, x2 - 1].any()
        assert not (drawn & ~inside).any()
    assert occluded > 10, occluded  # the crowded case does have occlusions
    assert len(data.class_names(3)) == 9
    with pytest.raises(ValueError, match="colours"):
        data.shapes(2, colours=0)


def test_coco_loader_reads_the_written_fixture(tmp_path):
    d = data.shapes(6, size=32, max_objects=3, min_size=6, max_size=14, seed=5)
    data.write_coco(tmp_path, "val2017", d)
    got = data.load_coco(tmp_path, "val2017", size=32, max_objects=3)
    np.testing.assert_array_equal(got["images"], d["images"])
    np.testing.assert_allclose(got["boxes"], d["boxes"])
    np.testing.assert_array_equal(got["labels"], d["labels"])
    assert got["class_names"] == d["class_names"]
    half = data.load_coco(tmp_path, "val2017", size=16, max_objects=3)
    np.testing.assert_allclose(half["boxes"], d["boxes"] / 2)
    with pytest.raises(FileNotFoundError, match="COCO layout"):
        data.load_coco(tmp_path, "train2017", size=32)


def test_detection_map_of_padded_outputs_and_plot(tmp_path):
    """Perfect padded detections score 1.0; dropping them all scores 0; the plot writes."""
    from common import plot

    d = data.shapes(6, seed=7)
    valid = d["labels"] >= 0
    dets = (d["boxes"], np.where(valid, 0.9, 0.0), np.maximum(d["labels"], 0), valid)
    assert bx.detection_map(dets, d["boxes"], d["labels"], 3) == {"mAP50": 1.0, "mAP": 1.0}
    none = (*dets[:3], np.zeros_like(valid))
    assert bx.detection_map(none, d["boxes"], d["labels"], 3)["mAP50"] == 0.0
    plot.detections(d["images"][:2], tuple(x[:2] for x in dets), d["class_names"],
                    tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_evaluate_detector_scores_a_predict_function():
    """An oracle predict scores mAP 1 (and reports a positive images/s); one whose boxes
    are shifted by half their width scores 0 at IoU 0.5. The oracle finds each image's
    truth by the image's mean, so it is right only if the chunks of 4 (the last one padded)
    reach it in order and the padding is cut off again."""
    d = data.shapes(6, seed=7)
    valid = jnp.asarray(d["labels"] >= 0)
    truth, labels = jnp.asarray(d["boxes"]), jnp.maximum(jnp.asarray(d["labels"]), 0)
    means = jnp.asarray(d["images"], jnp.float32).mean((1, 2, 3))
    assert len(np.unique(np.asarray(means))) == 6

    def oracle(shift):
        def predict(images):
            i = jnp.argmin(jnp.abs(images.astype(jnp.float32).mean((1, 2, 3))[:, None]
                                   - means[None]), axis=1)
            w = truth[i, :, 2:3] - truth[i, :, 0:1]
            boxes = truth[i] + shift * jnp.concatenate([w, 0 * w, w, 0 * w], -1)
            return boxes, jnp.where(valid[i], 0.9, 0.0), labels[i], valid[i]
        return jax.jit(predict)

    good = bx.evaluate_detector(oracle(0.0), d, 3, batch=4)
    assert good["mAP50"] == 1.0 and good["images_per_s"] > 0
    assert bx.evaluate_detector(oracle(0.5), d, 3, batch=4)["mAP50"] == 0.0


def test_nms_walks_only_until_max_out_and_holds_no_n_by_n_matrix():
    """NMS on 5,000 candidates (RetinaNet's eval) compares each with the kept boxes only:
    its compiled temporaries stay below 4 MiB (measured 0.12 MiB; the n x n overlap matrix
    of the previous version took 24 MiB), and the result equals the reference's first
    max_out boxes."""
    rng = np.random.default_rng(0)
    n = 5000
    b = jnp.asarray(random_boxes(rng, n, 400.0))
    s = jnp.asarray(rng.uniform(0, 1, n).astype(np.float32))
    f = jax.jit(lambda b, s: bx.nms(b, s, 0.5, max_out=100))
    mem = f.lower(b, s).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 4 * 2**20, mem.temp_size_in_bytes
    idx, valid = f(b, s)
    assert bool(valid.all())
    assert idx.tolist() == bx.nms_numpy(b, s, 0.5)[:100]


def test_decode_clamps_diverging_sizes_and_batched_nms_survives_an_inf_box():
    """A size offset of 50 decodes to at most exp(log(1000/16)) = 62.5 anchor widths, not
    inf; an inf box in class 1 neither breaks the per-class shift nor the other class's
    NMS; boxes clip to the image."""
    anchors = jnp.array([[0.5, 0.5, 0.1, 0.1]])
    out = bx.decode(jnp.array([[0.0, 0.0, 50.0, 0.0]]), anchors)
    np.testing.assert_allclose(out[0, 2:], [6.25, 0.1], rtol=1e-5)
    b = jnp.array([[0.0, 0, 4, 4], [1, 1, 4, 4], [0, 0, jnp.inf, jnp.inf]])
    idx, valid = bx.batched_nms(b, jnp.array([0.9, 0.8, 0.7]), jnp.array([0, 0, 1]))
    assert idx[valid].tolist()[:1] == [0] and 1 not in idx[valid].tolist()
    np.testing.assert_array_equal(bx.clip_to_image(jnp.array([[-3.0, 2, 70, 90]]), 64, 80),
                                  [[0, 2, 70, 64]])


def test_topk_nms_keeps_the_best_pairs_then_suppresses_per_class():
    """Equals the explicit form: every box repeated once per class, the top-k pairs by
    score, greedy NMS within each class (numpy reference), and each kept pair carries its
    own box."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 20, (30, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, (30, 3)).astype(np.float32)
    b, s, c, v = jax.jit(lambda bo, sc: bx.topk_nms(bo, sc, 40, 0.5, 100))(boxes, scores)
    b, s, c = np.asarray(b)[v], np.asarray(s)[v], np.asarray(c)[v]
    flat = scores.reshape(-1)
    top = np.argsort(-flat, kind="stable")[:40]
    want = set()
    for k in range(3):
        idx = top[top % 3 == k]
        for j in bx.nms_numpy(boxes[idx // 3], flat[idx], 0.5):
            want.add((k, float(flat[idx][j])))
    assert {(int(k), float(x)) for k, x in zip(c, s, strict=True)} == want
    rows = {float(x): i for i, x in enumerate(flat)}  # scores are distinct: find each pair
    np.testing.assert_array_equal(b, boxes[[rows[float(x)] // 3 for x in s]])
