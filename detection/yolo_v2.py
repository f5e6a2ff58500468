"""YOLOv2: batch norm, k-means anchors, direct location prediction, passthrough, multi-scale.

[1] J. Redmon, A. Farhadi. "YOLO9000: Better, Faster, Stronger." CVPR 2017, arXiv:1612.08242.
[2] J. Redmon et al. "You Only Look Once: Unified, Real-Time Object Detection." CVPR 2016,
    arXiv:1506.02640 (YOLOv1: the grid, the confidence Pr(obj) * IoU, the loss weights).

A fully convolutional net maps an image to an S x S grid; each cell holds A anchor boxes,
and each anchor predicts (t_x, t_y, t_w, t_h, t_o) and K class logits: A * (5 + K)
channels. With (c_x, c_y) the cell's offset and (p_w, p_h) the anchor's size:

    b_x = sigmoid(t_x) + c_x,  b_y = sigmoid(t_y) + c_y                     [1] Sec. 2
    b_w = p_w e^{t_w},         b_h = p_h e^{t_h}                            [1] Sec. 2
    Pr(object) * IoU(b, object) = sigmoid(t_o)                              [1] Sec. 2
    anchors: k-means on the training boxes' (w, h), d(box, c) = 1 - IoU(box, c) [1] Sec. 2
    passthrough: the 2S x 2S map -> space-to-depth x2 -> concatenated      [1] Sec. 2
    score(class c) = sigmoid(t_o) * softmax(class logits)_c, then per-class NMS

The sigmoid keeps every centre inside its cell ("direct location prediction"). A ground
truth is assigned to the cell holding its centre and, in it, to the anchor whose shape
(both centred) has the highest IoU with the box. The loss (sum over cells, anchors, mean
over images; [1] does not print it, the weights follow [2] and the calibration run):

    L = l_coord  sum_resp [(sig(t_x) - x^)^2 + (sig(t_y) - y^)^2 + (t_w - log(w/p_w))^2 + (..h)^2]
      + l_obj    sum_resp BCE(t_o, IoU(b, gt))            (target 1 with obj_target="one")
      + l_noobj  sum_{not resp, max_gt IoU(b, gt) <= 0.6} BCE(t_o, 0)
      + l_class  sum_resp CE(softmax(class logits), class)

Multi-scale training [1] draws a new input size every 10 batches from multiples of 32. In
JAX each input shape is a separate program, so `update` holds one `lax.switch` branch per
size: scenes are drawn at `image_size` and resized (bilinear) to the branch's size, boxes
are in units of the image so they carry over, and every branch returns the same gradient
pytree. One compile covers all sizes; under a vmap over seeds the switch becomes a select
that runs every branch (correct, slower: use one seed, or a device per seed, to save it).

Reproduce (CPU, SHAPES-64, tiny backbone):
    python detection/yolo_v2.py --preset quick
    measured (2-core CPU shared with other jobs, so wall-clock is not representative):
    --preset quick --width 0.5 --head-channels 64 --passthrough-channels 8 --batch-size 16
    --total-steps 300 (the test's gate model, ~125 CPU-s of training) reaches mAP@0.5 0.670,
    mAP@[.5:.95] 0.317 on 100 held-out scenes; the catalog's prototype of the full quick
    model (600 x 32 scenes, 185 s on a quiet 2-core CPU) reached 0.924 / 0.524.
Paper scale (GPU; DarkNet-19 at 416 with sizes 320..608, SHAPES-416 on photo backgrounds):
    python detection/yolo_v2.py --preset paper
[1] Table 3: YOLOv2 416 x 416: 76.8 mAP on VOC 2007 at 67 FPS; 544 x 544: 78.6 mAP.

Differences from the paper:
- No ImageNet pre-training of DarkNet-19 and no 448 high-resolution classifier fine-tuning:
  everything trains from scratch on SHAPES (procedural scenes), not VOC/COCO.
- The `quick` preset uses a 3-pool conv-BN-leaky backbone (stride 8, an 8 x 8 grid on
  64 px), Adam, and no multi-scale training; `paper` uses DarkNet-19 (18 convs + 5
  max-pools; the 19th conv, the 1x1 classifier, is replaced by the detection head) and
  SGD with momentum 0.9, weight decay 5e-4 and a step schedule, as [1] Sec. 3.
- The passthrough follows the released cfg (a 1x1 conv to 64 channels, then reorg) rather
  than the text's 26x26x512 -> 13x13x2048; `passthrough_channels=0` gives the text's form.
- Anchors are in units of the image (not grid cells as in darknet), so they serve every
  input size. They are computed by k-means (k-means++ seeding with 1 - IoU and restarts) on
  the boxes of `kmeans_images` training scenes when the config gives none.
- Objectness uses binary cross-entropy on sigmoid(t_o) (target IoU, stop-gradient) and
  classes a softmax cross-entropy; darknet's region layer uses squared errors, a 2 - w*h
  coordinate scale, and an anchor-shape prior loss for the first 12800 images: all omitted.
- No data augmentation (SHAPES scenes are never repeated).
"""

import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import boxes as bx
from common import data, plot, run
from common.nets import Conv

EVAL_SEED = 10_007  # held-out scenes; training keys come from the runner's PRNGKey(seed)
KMEANS_SEED = 20_011  # scenes whose boxes the anchors are clustered from

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """YOLOv2 on SHAPES scenes; defaults are [1]'s where they apply (5 anchors, 416 px,
    DarkNet-19, 0.6 no-object threshold, multi-scale every 10 batches)."""

    image_size: int = 416
    """side of the scenes (and of the input at evaluation)"""
    multiscale_sizes: tuple[int, ...] = tuple(range(320, 609, 32))
    """training input sizes, a new one every `multiscale_every` batches (empty: off)"""
    multiscale_every: int = 10
    """batches between input-size draws"""
    backbone: str = "darknet19"
    """darknet19 (the paper's) or tiny (3 x conv-BN-leaky + max-pool, stride 8)"""
    width: float = 1.0
    """multiplier of every backbone channel count"""
    head_convs: int = 2
    """3x3 convs of `head_channels` after the backbone, before the passthrough"""
    head_channels: int = 1024
    """channels of the head's 3x3 convs"""
    passthrough_channels: int = 64
    """1x1 conv width on the fine map before space-to-depth (0: raw features; -1: off)"""
    num_anchors: int = 5
    """anchors per cell (k of the k-means)"""
    anchors: tuple[float, ...] = ()
    """flat (w, h) pairs in units of the image; empty: k-means on training boxes"""
    kmeans_images: int = 1000
    """scenes whose boxes the anchors are clustered from"""
    lambda_coord: float = 5.0
    """weight of the box terms"""
    lambda_obj: float = 1.0
    """weight of the objectness term of responsible anchors"""
    lambda_noobj: float = 0.5
    """weight of the no-object term"""
    lambda_class: float = 1.0
    """weight of the class term"""
    ignore_iou: float = 0.6
    """no no-object penalty for predictions overlapping some ground truth by more"""
    obj_target: str = "iou"
    """objectness target of responsible anchors: iou (Pr(obj) * IoU) or one"""
    optimizer: str = "sgd"
    """sgd (momentum 0.9, weight decay, step schedule / 10 at 3/8 and 9/16 of training) or adam"""
    lr: float = 1e-3
    """learning rate"""
    weight_decay: float = 5e-4
    """L2 weight decay on kernels, added to the gradient as darknet does (sgd only)"""
    batch_size: int = 64
    """images per update"""
    total_steps: int = 40_000
    """updates"""
    colours: int = 3
    """SHAPES classes are 3 shapes x colours colours"""
    max_objects: int = 12
    """objects per scene at most"""
    min_object: int = 16
    """smallest object side in px"""
    max_object: int = 200
    """largest object side in px"""
    photo_backgrounds: bool = True
    """paste the objects on crops of scikit-learn's sample photos"""
    eval_images: int = 500
    """held-out scenes for mAP"""
    score_threshold: float = 0.005
    """detections below this score are dropped before NMS"""
    nms_iou: float = 0.45
    """IoU above which NMS suppresses a lower-scored box of the same class"""
    pre_nms_topk: int = 300
    """candidates (box, class) kept by score before NMS"""
    max_detections: int = 100
    """detections per image after NMS"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls (common.nets): same maths, fast weight gradients
    inside the runner's lax.scan on XLA:CPU"""

    @property
    def num_classes(self) -> int:
        return 3 * self.colours

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    @property
    def stride(self) -> int:
        return 2 ** BACKBONES[self.backbone].count("M")

    @property
    def train_sizes(self) -> tuple[int, ...]:
        return self.multiscale_sizes or (self.image_size,)

    def validate(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} must be one of {sorted(BACKBONES)}")
        for s in (self.image_size, *self.multiscale_sizes):
            if s % self.stride:
                raise ValueError(f"input size {s} (image_size / multiscale_sizes) must be a "
                                 f"multiple of the backbone stride {self.stride}")
        if self.anchors and len(self.anchors) != 2 * self.num_anchors:
            raise ValueError(f"anchors has {len(self.anchors)} numbers; need 2 * num_anchors "
                             f"= {2 * self.num_anchors}")
        if self.obj_target not in ("iou", "one"):
            raise ValueError(f"obj_target={self.obj_target!r} must be 'iou' or 'one'")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if not 0 < self.min_object <= self.max_object < self.image_size:
            raise ValueError(f"need 0 < min_object <= max_object < image_size, got "
                             f"{self.min_object}, {self.max_object}, {self.image_size}")
        for name in ("batch_size", "total_steps", "multiscale_every", "num_anchors",
                     "eval_images", "kmeans_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


PRESETS = {
    # CPU: SHAPES-64, 8 x 8 grid, the catalog's calibration model (0.924 mAP@0.5 at 600).
    "quick": dict(image_size=64, multiscale_sizes=(), backbone="tiny", head_convs=0,
                  head_channels=128, passthrough_channels=16, num_anchors=3, optimizer="adam",
                  lr=2e-3, batch_size=32, total_steps=600, colours=1, max_objects=4,
                  min_object=8, max_object=28, photo_backgrounds=False, eval_images=300,
                  shift_conv=True),
    "paper": dict(),
}

# --- NETWORKS ---

# ints: 3x3 conv-BN-leaky of that width; (c, 1): 1x1 conv; "M": 2x2 max-pool; "P": the
# passthrough source (the last map at twice the output resolution).
BACKBONES = {
    "darknet19": (32, "M", 64, "M", 128, (64, 1), 128, "M", 256, (128, 1), 256, "M",
                  512, (256, 1), 512, (256, 1), 512, "P", "M",
                  1024, (512, 1), 1024, (512, 1), 1024),  # [1] Table 6 without the classifier
    "tiny": (16, "M", 32, "M", 64, "P", "M", 128),
}


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + leaky ReLU 0.1: every conv of [1] has BN (Sec. 2)."""

    features: int
    kernel: int = 3
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel, shift=self.shift, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.leaky_relu(x, 0.1)


def space_to_depth(x, r: int = 2):
    """(B, H, W, C) -> (B, H/r, W/r, r*r*C): each r x r block becomes channels."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c)  # (B, H/r, r, W/r, r, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // r, w // r, r * r * c)


def depth_to_space(x, r: int = 2):
    """Inverse of `space_to_depth`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, r, r, c // (r * r)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * r, w * r, c // (r * r))


class YOLOv2(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, images, train: bool = False):
        cfg = self.cfg
        x, fine = images.astype(jnp.float32) / 255.0, None
        for layer in BACKBONES[cfg.backbone]:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            elif layer == "P":
                fine = x
            else:
                c, k = layer if isinstance(layer, tuple) else (layer, 3)
                x = ConvBN(max(8, int(c * cfg.width)), k, cfg.shift_conv)(x, train)
        for _ in range(cfg.head_convs):
            x = ConvBN(cfg.head_channels, shift=cfg.shift_conv)(x, train)
        if cfg.passthrough_channels >= 0:  # passthrough: 2S x 2S x C -> S x S x 4C
            if cfg.passthrough_channels > 0:
                fine = ConvBN(cfg.passthrough_channels, 1, cfg.shift_conv)(fine, train)
            x = jnp.concatenate([space_to_depth(fine, 2), x], -1)
        x = ConvBN(cfg.head_channels, shift=cfg.shift_conv)(x, train)
        out = Conv(cfg.num_anchors * (5 + cfg.num_classes), 1, shift=cfg.shift_conv)(x)
        b, s = out.shape[0], out.shape[1]
        return out.reshape(b, s, s, cfg.num_anchors, 5 + cfg.num_classes)  # (B, S, S, A, 5+K)


# --- ANCHORS: k-means with d = 1 - IoU ---


def shape_iou(wh, centres):
    """IoU of (N, 2) box shapes with (k, 2) centroid shapes, both centred: (N, k)."""
    inter = (np.minimum(wh[:, None, 0], centres[None, :, 0])
             * np.minimum(wh[:, None, 1], centres[None, :, 1]))
    union = (wh[:, 0] * wh[:, 1])[:, None] + (centres[:, 0] * centres[:, 1])[None] - inter
    return inter / union


def kmeans_iou(wh, k: int, restarts: int = 10, iters: int = 100, seed: int = 0,
               distance: str = "iou"):
    """k-means of box shapes (N, 2) with d = 1 - IoU ([1] Sec. 2; distance="euclidean" is
    the plain k-means it replaces). Each restart seeds with k-means++ under the same
    distance, iterates assign / mean-update, and the restart with the highest mean IoU of
    boxes with their nearest centroid wins. Returns (centroids (k, 2) sorted by area,
    mean IoU)."""
    wh = np.asarray(wh, np.float64)
    rng = np.random.default_rng(seed)

    def dist(c):
        if distance == "iou":
            return 1.0 - shape_iou(wh, c)
        return np.sqrt(((wh[:, None] - c[None]) ** 2).sum(-1))

    best = (None, -1.0)
    for _ in range(restarts):
        c = wh[rng.integers(len(wh))][None]
        while len(c) < k:  # k-means++: next centre with probability ~ d(x, nearest)^2
            d2 = dist(c).min(1) ** 2
            c = np.concatenate([c, wh[rng.choice(len(wh), p=d2 / d2.sum())][None]])
        for _ in range(iters):
            assign = dist(c).argmin(1)
            new = np.stack([wh[assign == j].mean(0) if (assign == j).any() else c[j]
                            for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        miou = float(shape_iou(wh, c).max(1).mean())
        if miou > best[1]:
            best = (c[np.argsort(c.prod(1))], miou)
    return best


def kmeans_elbow(wh, ks=range(1, 10), **kw) -> dict[int, float]:
    """Mean IoU of the k-means anchors for each k ([1] Fig. 2): pick k at the elbow."""
    return {k: kmeans_iou(wh, k, **kw)[1] for k in ks}


def training_box_shapes(cfg: Config) -> np.ndarray:
    """(w, h) in units of the image of the boxes in `kmeans_images` training scenes."""
    with jax.ensure_compile_time_eval():  # concrete even when called inside a trace
        d = data.shapes(cfg.kmeans_images, cfg.image_size, cfg.max_objects, cfg.min_object,
                        cfg.max_object, cfg.colours, photo_backgrounds=cfg.photo_backgrounds,
                        seed=KMEANS_SEED)
    b = d["boxes"][d["labels"] >= 0]
    return (b[:, 2:] - b[:, :2]) / cfg.image_size


def anchor_shapes(cfg: Config) -> np.ndarray:
    """(A, 2) anchor (w, h) in units of the image: cfg.anchors, or k-means on training boxes
    (host side, once per data setting; called at trace time of init / update / predict)."""
    if cfg.anchors:
        return np.asarray(cfg.anchors, np.float32).reshape(-1, 2)
    return _kmeans_anchors(cfg.image_size, cfg.max_objects, cfg.min_object, cfg.max_object,
                           cfg.colours, cfg.photo_backgrounds, cfg.kmeans_images,
                           cfg.num_anchors)


@functools.lru_cache(maxsize=16)
def _kmeans_anchors(image_size, max_objects, min_object, max_object, colours, photos, n, k):
    cfg = Config(image_size=image_size, max_objects=max_objects, min_object=min_object,
                 max_object=max_object, colours=colours, photo_backgrounds=photos,
                 kmeans_images=n)
    return kmeans_iou(training_box_shapes(cfg), k)[0].astype(np.float32)


# --- LOSS ---


decode = bx.decode_grid  # [1] Sec. 2: direct location prediction (common/boxes)


def encode(g, anchor, s: int):
    """Inverse of `decode` for boxes g (..., 4) cxcywh in units of the image with their
    anchors (..., 2) on an S x S grid: the cell (col, row) holding the centre and raw
    (t_x, t_y, t_w, t_h) = (logit(offset_x), logit(offset_y), log(g_w/p_w), log(g_h/p_h))."""
    col, row = jnp.floor(g[..., 0] * s), jnp.floor(g[..., 1] * s)
    off = jnp.clip(g[..., :2] * s - jnp.stack([col, row], -1), 1e-6, 1 - 1e-6)
    t = jnp.concatenate([jnp.log(off) - jnp.log1p(-off), jnp.log(g[..., 2:] / anchor)], -1)
    return col.astype(jnp.int32), row.astype(jnp.int32), t


def build_targets(gt_boxes, gt_labels, anchors, s: int):
    """Targets of one image. gt_boxes (M, 4) cxcywh in units of the image, gt_labels (M,)
    (-1 padding), anchors (A, 2). Each box goes to the cell of its centre and the anchor of
    best shape IoU ([1] Sec. 2). Returns arrays over (S, S, A): resp (bool), xy (fractional
    centre offset in the cell, 2), twh (log(g_w / p_w), log(g_h / p_h)), cls, box (cxcywh)."""
    a = anchors.shape[0]
    valid = gt_labels >= 0
    col = jnp.clip(jnp.floor(gt_boxes[:, 0] * s), 0, s - 1).astype(jnp.int32)
    row = jnp.clip(jnp.floor(gt_boxes[:, 1] * s), 0, s - 1).astype(jnp.int32)
    inter = (jnp.minimum(gt_boxes[:, None, 2], anchors[None, :, 0])
             * jnp.minimum(gt_boxes[:, None, 3], anchors[None, :, 1]))
    union = (gt_boxes[:, 2] * gt_boxes[:, 3])[:, None] + anchors.prod(-1)[None] - inter
    best = jnp.argmax(inter / union, axis=1)  # (M,) anchor of best shape IoU
    row = jnp.where(valid, row, s)  # padding rows scatter out of range and are dropped
    idx = (row, col, best)
    _, put = bx.cell_owner(idx, valid, (s, s, a))  # two boxes on one anchor: the last one
    xy = gt_boxes[:, :2] * s - jnp.stack([col, jnp.minimum(row, s - 1)], -1)
    twh = jnp.log(jnp.maximum(gt_boxes[:, 2:], 1e-6) / anchors[best])
    return dict(resp=put(valid), xy=put(xy), twh=put(twh),
                cls=put(jnp.maximum(gt_labels, 0)), box=put(gt_boxes))


def yolo_loss(out, gt_boxes, gt_labels, anchors, cfg: Config):
    """YOLOv2 loss of raw outputs (B, S, S, A, 5+K) against ground truth (B, M, 4) cxcywh in
    units of the image. Returns (total, parts) with the mean over images of the sums."""
    s = out.shape[1]
    tgt = jax.vmap(lambda g, l: build_targets(g, l, anchors, s))(gt_boxes, gt_labels)
    resp = tgt["resp"].astype(jnp.float32)  # (B, S, S, A)
    pred = decode(out[..., :4], anchors)  # (B, S, S, A, 4) cxcywh
    pred_xyxy = jax.lax.stop_gradient(bx.cxcywh_to_xyxy(pred))
    gt_xyxy = bx.cxcywh_to_xyxy(gt_boxes)
    # no-object mask: predictions overlapping any ground truth by > ignore_iou are spared
    ious = jax.vmap(lambda p, g: bx.iou(p.reshape(-1, 4), g))(pred_xyxy, gt_xyxy)
    ious = jnp.where(gt_labels[:, None, :] >= 0, ious, 0.0).max(-1).reshape(resp.shape)
    noobj = (1.0 - resp) * (ious <= cfg.ignore_iou)
    # coordinates: sigmoid offsets and log-space sizes ([1] Sec. 2)
    d_xy = jnp.square(jax.nn.sigmoid(out[..., :2]) - tgt["xy"]).sum(-1)
    d_wh = jnp.square(out[..., 2:4] - tgt["twh"]).sum(-1)
    coord = cfg.lambda_coord * (resp * (d_xy + d_wh)).sum((1, 2, 3))
    # objectness: sigmoid(t_o) = Pr(obj) * IoU(b, truth) ([1] Sec. 2, [2] Sec. 2)
    iou_gt = jax.lax.stop_gradient(bx.iou_aligned(pred_xyxy, bx.cxcywh_to_xyxy(tgt["box"])))
    target_o = iou_gt if cfg.obj_target == "iou" else jnp.ones_like(iou_gt)
    bce = optax.sigmoid_binary_cross_entropy
    obj = cfg.lambda_obj * (resp * bce(out[..., 4], target_o)).sum((1, 2, 3))
    no = cfg.lambda_noobj * (noobj * bce(out[..., 4], jnp.zeros_like(iou_gt))).sum((1, 2, 3))
    ce = optax.softmax_cross_entropy_with_integer_labels(out[..., 5:], tgt["cls"])
    cls = cfg.lambda_class * (resp * ce).sum((1, 2, 3))
    parts = {"coord": coord.mean(), "obj": obj.mean(), "noobj": no.mean(), "class": cls.mean()}
    return sum(parts.values()), parts


# --- UPDATE ---


@struct.dataclass
class State:
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array
    size_index: jax.Array
    """index into cfg.train_sizes of the current input size (redrawn every few batches)"""


def make_optimizer(cfg: Config):
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr)
    # [1] Sec. 3: SGD, momentum 0.9, weight decay 5e-4, lr / 10 at epochs 60 and 90 of 160
    n = cfg.total_steps
    sched = optax.piecewise_constant_schedule(cfg.lr, {3 * n // 8: 0.1, 9 * n // 16: 0.1})
    return optax.chain(bx.kernel_weight_decay(cfg.weight_decay),
                       optax.sgd(sched, momentum=0.9))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    anchor_shapes(cfg)  # k-means once, host side, before the step is traced
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    variables = YOLOv2(cfg).init(k_net, x, train=False)
    params = variables["params"]
    return State(params, variables["batch_stats"], make_optimizer(cfg).init(params), key,
                 jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def draw_batch(key, cfg: Config):
    """SHAPES scenes at image_size: uint8 images, cxcywh boxes in units of the image, labels."""
    photos = jnp.asarray(data.sample_photos(cfg.image_size)) if cfg.photo_backgrounds else None
    images, boxes, labels = data.shapes_batch(
        key, cfg.batch_size, cfg.image_size, cfg.max_objects, cfg.min_object, cfg.max_object,
        cfg.colours, photos=photos)
    return images, bx.xyxy_to_cxcywh(boxes / cfg.image_size), labels


def draw_size_index(key, step, size_index, cfg: Config):
    """Multi-scale training [1] Sec. 2: the index into cfg.train_sizes of this batch's input
    size, drawn uniformly at every `multiscale_every`-th step, else kept."""
    redraw = step % cfg.multiscale_every == 0
    return jnp.where(redraw, jax.random.randint(key, (), 0, len(cfg.train_sizes)), size_index)


def update(state: State, cfg: Config):
    key, k_data, k_size = jax.random.split(state.key, 3)
    images, gt, labels = draw_batch(k_data, cfg)
    anchors = jnp.asarray(anchor_shapes(cfg))
    model = YOLOv2(cfg)

    def loss_at(size, params):
        x = images if size == cfg.image_size else jax.image.resize(
            images.astype(jnp.float32), (cfg.batch_size, size, size, 3), "bilinear")
        out, new = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                               train=True, mutable=["batch_stats"])
        loss, parts = yolo_loss(out, gt, labels, anchors, cfg)
        return loss, (parts, new["batch_stats"])

    # multi-scale training [1] Sec. 2: one branch (one compiled program part) per size
    branches = [jax.value_and_grad(functools.partial(loss_at, s), has_aux=True)
                for s in cfg.train_sizes]
    size_index = draw_size_index(k_size, state.step, state.size_index, cfg)
    if len(branches) == 1:
        (loss, (parts, batch_stats)), grads = branches[0](state.params)
    else:
        (loss, (parts, batch_stats)), grads = jax.lax.switch(size_index, branches, state.params)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {"losses/total": loss, **{f"losses/{k}": v for k, v in parts.items()},
               "charts/input_size": jnp.asarray(cfg.train_sizes)[size_index],
               "charts/l2_grads": optax.tree.norm(grads)}
    return State(params, batch_stats, opt_state, key, state.step + 1, size_index), metrics


# --- PREDICT / EVALUATE ---


@functools.partial(jax.jit, static_argnames="cfg")
def predict(params, batch_stats, images, cfg: Config):
    """Forward pass, decode, class scores sigmoid(t_o) * Pr(class | obj) for every (box,
    class) pair, top-k, per-class NMS. Returns xyxy boxes in pixels of the input (B, D, 4),
    scores (B, D), classes (B, D), valid (B, D) with D = max_detections."""
    out = YOLOv2(cfg).apply({"params": params, "batch_stats": batch_stats}, images)
    b, size = out.shape[0], images.shape[1]
    boxes = bx.cxcywh_to_xyxy(decode(out[..., :4], jnp.asarray(anchor_shapes(cfg)))) * size
    boxes = bx.clip_to_image(boxes, size, size)  # as darknet's output, before NMS
    scores = jax.nn.sigmoid(out[..., 4:5]) * jax.nn.softmax(out[..., 5:], -1)
    boxes, scores = boxes.reshape(b, -1, 4), scores.reshape(b, -1, cfg.num_classes)
    return jax.vmap(lambda bo, sc: bx.topk_nms(bo, sc, cfg.pre_nms_topk, cfg.nms_iou,
                                               cfg.max_detections, cfg.score_threshold))(
        boxes, scores)


def eval_set(cfg: Config) -> dict:
    return data.shapes(cfg.eval_images, cfg.image_size, cfg.max_objects, cfg.min_object,
                       cfg.max_object, cfg.colours, photo_backgrounds=cfg.photo_backgrounds,
                       seed=EVAL_SEED)


@run.host_evaluate
def evaluate(state: State, cfg: Config) -> dict:
    """mAP@0.5 and mAP@[.5:.95] (COCO 101-point) on held-out scenes, and images/s of the
    jitted predict (measured after a warm-up call)."""
    return bx.evaluate_detector(lambda im: predict(state.params, state.batch_stats, im, cfg),
                                eval_set(cfg), cfg.num_classes)


def plot_predictions(state: State, cfg: Config, path, n: int = 8, min_score: float = 0.3):
    """Save a PNG of predicted boxes (class and score) on n held-out scenes."""
    d = eval_set(cfg)
    out = predict(state.params, state.batch_stats, jnp.asarray(d["images"][:n]), cfg)
    plot.detections(d["images"][:n], jax.device_get(out), d["class_names"], path,
                    "YOLOv2 predictions on held-out SHAPES scenes", min_score)


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["mAP50", "mAP", "images_per_s", "losses/total"])


if __name__ == "__main__":
    main()
