"""YOLOv3: Darknet-53, three detection scales, logistic objectness, multi-label classes.

[1] J. Redmon, A. Farhadi. "YOLOv3: An Incremental Improvement." arXiv:1804.02767, 2018.
[2] J. Redmon, A. Farhadi. "YOLO9000: Better, Faster, Stronger." CVPR 2017, arXiv:1612.08242
    (anchors by k-means on box shapes, direct location prediction).

Darknet-53 ([1] Table 1): a 3x3 conv, then five stages, each a 3x3 stride-2 conv (doubling
the channels, 64..1024) and 1, 2, 8, 8, 4 residual blocks x + conv3x3(conv1x1(x)) (the 1x1
halves the channels); every conv is conv + BN + leaky ReLU 0.1. Detection at three scales
(strides 32, 16, 8; 13, 26, 52 cells at 416 px): on each, a block of 1x1/3x3 convs ends in
a 1x1 conv with 3 (5 + K) channels; the block's last map is 1x1-conv'ed, upsampled x2 and
concatenated with the backbone map of the next finer scale ([1] Sec. 2.3). The 9 anchor
shapes (k-means on training boxes [2]) are sorted by area: the 3 largest go to stride 32,
the 3 smallest to stride 8. With (c_x, c_y) the cell and (p_w, p_h) the anchor:

    b_x = sigmoid(t_x) + c_x,  b_y = sigmoid(t_y) + c_y                   [1] Sec. 2.1
    b_w = p_w e^{t_w},         b_h = p_h e^{t_h}                          [1] Sec. 2.1
    objectness = sigmoid(t_o), class k = sigmoid(t_k) (independent, no softmax) [1] 2.1-2.2
    score(box, k) = sigmoid(t_o) sigmoid(t_k), then per-class NMS

Assignment ([1] Sec. 2.1): each ground truth goes to the ONE anchor (of all 9, hence to one
scale) of best shape IoU, in the cell holding its centre; objectness target 1 there. A
prediction that is not assigned but overlaps some ground truth by IoU > 0.5 is ignored; all
other predictions have objectness target 0 and no box or class loss. The loss (sum over
scales, cells and anchors, mean over images):

    L = l_coord sum_assigned [(sig(t_x) - x^)^2 + (sig(t_y) - y^)^2
                              + (t_w - log(w / p_w))^2 + (t_h - log(h / p_h))^2]
      + l_obj   sum_assigned BCE(t_o, 1) + l_noobj sum_{not assigned, not ignored} BCE(t_o, 0)
      + l_class sum_assigned sum_k BCE(t_k, y_k),  y in {0, 1}^K (multi-label)   [1] Sec. 2.2

Coordinates: [1] says "sum of squared error loss" with gradient t^* - t. We take the x, y
error on the sigmoid offsets (as the released darknet does): the raw-t target
logit(offset) is unbounded at a cell edge, and SHAPES' pixel-aligned boxes put many centres
exactly there (offset 0 on 8/16/32-px cells). coord_loss="t" gives the raw-t form.

Reproduce (CPU, SHAPES-64, narrow and shallow Darknet, two scales: maps 4 x 4 and 8 x 8):
    python detection/yolo_v3.py --preset quick
    measured (800 updates x 16 scenes, seed 0, 2-core CPU): mAP@0.5 0.752, mAP@[.5:.95]
    0.279 on 300 held-out scenes; 15 s compile + 51 s training (252 images/s); predict
    619 images/s (batch 300). With [1]'s three scales at 64 px (maps 2 x 2, 4 x 4, 8 x 8,
    `--num-scales 3 --blocks 1 1 1 1 1` and the nine SHAPES64_ANCHORS) the same model
    reached only 0.277 / 0.077: classes stayed near chance for ~400 updates, the 2 x 2 map
    holding the largest third of the objects. The test gate (600 updates, native convs,
    100 scenes): 0.693 correct, 0.189 with x/y swapped in the targets.
Paper scale (GPU; full Darknet-53 at 416 px with the COCO anchors, SHAPES-416 on photos):
    python detection/yolo_v3.py --preset paper
[1] Table 3: YOLOv3-416 31.0 AP, 55.3 AP50 on COCO test-dev at 29 ms (Titan X).

Differences from the paper:
- No ImageNet pre-training of Darknet-53 and SHAPES scenes instead of COCO: everything
  trains from scratch on procedural scenes; the paper preset keeps [1]'s COCO anchors only
  as the paper's setting (SHAPES-416 boxes are 16-200 px).
- `quick`: 64 px scenes, TWO scales (strides 16 and 8, maps 4 x 4 and 8 x 8; the catalog's
  "YOLOv3-lite") with 6 k-means anchors of SHAPES-64 hard-coded (below), Darknet at width
  1/4 with 4 stages of 1 residual block, 3-conv detection blocks, Adam 5e-3; convs as
  shifted matmuls (same maths; fast on CPU in lax.scan). The paper preset has [1]'s three.
- The ignore rule uses the IoU of the decoded prediction (darknet's yolo layer); [1]'s
  text can also be read as the prior's IoU. Darknet's 2 - w h box weight, multi-scale
  training and data augmentation are not used.
- Loss weights: [1] gives none; darknet's yolo layer uses 1 for every term (the default).
- `paper` trains with SGD, momentum 0.9, weight decay 5e-4, a 1000-update warm-up and
  lr / 10 at 80% and 90% (the released yolov3.cfg); [1] does not give a schedule.
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

EVAL_SEED = 10_019  # held-out scenes; training keys come from the runner's PRNGKey(seed)
COCO_ANCHORS = (10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119, 116, 90, 156, 198, 373, 326)
# k-means with d = 1 - IoU (k-means++ seeding, 10 restarts; detection/yolo_v2.py's
# kmeans_iou) on the 4967 boxes of 2000 SHAPES-64 training scenes (seed 20011), in px,
# sorted by area; mean best IoU 0.818 (3 anchors: 0.712).
SHAPES64_ANCHORS = (9.8, 11.8, 15.3, 9.7, 23.4, 9.0, 10.0, 22.2, 14.6, 16.5, 22.7, 12.9,
                    15.9, 24.2, 23.3, 18.0, 24.2, 24.6)
# the same with k = 6 for two scales (mean best IoU 0.785)
SHAPES64_ANCHORS_6 = (11.4, 11.7, 20.8, 9.9, 10.1, 21.9, 16.0, 21.4, 23.4, 15.3, 24.1, 23.9)

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """YOLOv3 on SHAPES scenes; defaults are [1]'s where they apply (Darknet-53, 416 px,
    9 COCO anchors, 3 scales, ignore IoU 0.5, logistic objectness and classes)."""

    image_size: int = 416
    """side of the (square) input scenes in px; a multiple of 32"""
    width: float = 1.0
    """multiplier of every channel count (Darknet-53: 32, 64..1024)"""
    blocks: tuple[int, ...] = (1, 2, 8, 8, 4)
    """residual blocks in each Darknet stage (5 stages: strides 2..32)"""
    num_scales: int = 3
    """detection scales, from the finest (stride 8) up: 3 = strides 32, 16, 8 as [1]; 2 =
    strides 16, 8 (the 'YOLOv3-lite' for small images; the backbone then needs 4 stages)"""
    head_depth: int = 5
    """alternating 1x1 / 3x3 convs of each scale's detection block (odd; [1]: 5)"""
    anchors: tuple[float, ...] = COCO_ANCHORS
    """3 x num_scales flat (w, h) pairs in px of the input, sorted by area (3 per scale,
    fine to coarse)"""
    ignore_iou: float = 0.5
    """unassigned predictions overlapping a ground truth by more get no objectness loss"""
    coord_loss: str = "offset"
    """x, y error on sigmoid offsets ("offset", darknet) or on raw t with logit targets ("t")"""
    lambda_coord: float = 1.0
    """weight of the box terms"""
    lambda_obj: float = 1.0
    """weight of the objectness term of assigned anchors"""
    lambda_noobj: float = 1.0
    """weight of the no-object term"""
    lambda_class: float = 1.0
    """weight of the (multi-label, sigmoid) class term"""
    optimizer: str = "sgd"
    """sgd (momentum 0.9, weight decay, warm-up, lr / 10 at 80% and 90%) or adam"""
    lr: float = 1e-3
    """learning rate"""
    weight_decay: float = 5e-4
    """L2 weight decay on kernels, added to the gradient as darknet does (sgd only)"""
    warmup_steps: int = 1000
    """updates of (lr * (t / warmup)^4) warm-up, darknet's burn_in (sgd only)"""
    batch_size: int = 64
    """images per update"""
    total_steps: int = 500_200
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
    """detections scored <= this are dropped before NMS"""
    nms_iou: float = 0.45
    """IoU above which NMS suppresses a lower-scored box of the same class"""
    pre_nms_topk: int = 1000
    """(box, class) candidates kept by score before NMS"""
    max_detections: int = 100
    """detections per image after NMS"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients in lax.scan on CPU"""

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
    def grid_sizes(self) -> tuple[int, ...]:
        """cells per side of the scales, coarse to fine (strides ..., 32, 16, 8)"""
        return tuple(self.image_size // (8 << i) for i in reversed(range(self.num_scales)))

    def validate(self):
        if self.image_size % 32:
            raise ValueError(f"image_size={self.image_size} must be a multiple of 32")
        if len(self.blocks) != self.num_scales + 2 or min(self.blocks) < 0:
            raise ValueError(f"blocks={self.blocks} must be num_scales + 2 = "
                             f"{self.num_scales + 2} non-negative counts (stride 8 is stage 3)")
        if self.num_scales not in (2, 3):
            raise ValueError(f"num_scales={self.num_scales} must be 2 or 3")
        if self.head_depth < 1 or self.head_depth % 2 == 0:
            raise ValueError(f"head_depth={self.head_depth} must be odd and >= 1")
        a = np.asarray(self.anchors, float)
        if a.size != 6 * self.num_scales or (a <= 0).any():
            raise ValueError(f"anchors has {a.size} numbers; need {3 * self.num_scales} "
                             "positive (w, h) pairs (3 per scale)")
        if (np.diff(a.reshape(-1, 2).prod(1)) < 0).any():
            raise ValueError(f"anchors={self.anchors} must be sorted by area (w * h)")
        if self.coord_loss not in ("offset", "t"):
            raise ValueError(f"coord_loss={self.coord_loss!r} must be 'offset' or 't'")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if not 0 < self.min_object <= self.max_object < self.image_size:
            raise ValueError(f"need 0 < min_object <= max_object < image_size, got "
                             f"{self.min_object}, {self.max_object}, {self.image_size}")
        if not 0.0 <= self.ignore_iou <= 1.0:
            raise ValueError(f"ignore_iou={self.ignore_iou} must be in [0, 1]")
        for name in ("width", "batch_size", "total_steps", "eval_images", "pre_nms_topk",
                     "max_detections", "colours"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


PRESETS = {
    # CPU: SHAPES-64 (1-4 shapes, 8-28 px, 3 classes), two scales: maps 4x4 and 8x8.
    "quick": dict(image_size=64, width=0.25, blocks=(1, 1, 1, 1), num_scales=2, head_depth=3,
                  anchors=SHAPES64_ANCHORS_6, optimizer="adam", lr=5e-3, batch_size=16,
                  total_steps=800, colours=1, max_objects=4, min_object=8, max_object=28,
                  photo_backgrounds=False, eval_images=300, pre_nms_topk=300,
                  shift_conv=True),
    "paper": dict(),
}

# --- NETWORKS ---


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + leaky ReLU 0.1: every conv of Darknet-53 ([1] Table 1)."""

    features: int
    kernel: int = 3
    stride: int = 1
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel, self.stride, self.shift, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.leaky_relu(x, 0.1)


class Residual(nn.Module):
    """x + conv3x3(conv1x1(x)), the 1x1 at half the channels ([1] Table 1)."""

    features: int
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        y = ConvBN(self.features // 2, 1, shift=self.shift)(x, train)
        return x + ConvBN(self.features, 3, shift=self.shift)(y, train)


class Darknet53(nn.Module):
    """[1] Table 1 without the classifier: returns every stage's map (strides 2, 4, ...)."""

    width: float = 1.0
    blocks: tuple[int, ...] = (1, 2, 8, 8, 4)
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        ch = lambda c: max(4, int(c * self.width))
        x = ConvBN(ch(32), 3, shift=self.shift)(x, train)
        maps = []
        for i, n in enumerate(self.blocks):
            c = ch(64 * 2**i)
            x = ConvBN(c, 3, 2, shift=self.shift)(x, train)  # downsample x2
            for _ in range(n):
                x = Residual(c, self.shift)(x, train)
            maps.append(x)
        return maps


def upsample2(x):
    """Nearest-neighbour x2 upsampling: (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class YOLOv3(nn.Module):
    """Darknet-53 + the three-scale head. uint8 (B, H, W, 3) -> [(B, S, S, 3, 5 + K)] for
    S = H/32, H/16, H/8 (coarse to fine), last axis (t_x, t_y, t_w, t_h, t_o, class logits)."""

    num_classes: int
    width: float = 1.0
    blocks: tuple[int, ...] = (1, 2, 8, 8, 4)
    head_depth: int = 5
    shift: bool = False
    num_scales: int = 3

    @nn.compact
    def __call__(self, images, train: bool = False):
        s = self.shift
        ch = lambda c: max(4, int(c * self.width))
        x = images.astype(jnp.float32) / 255.0
        maps = Darknet53(self.width, self.blocks, s)(x, train)[2:][::-1]  # coarse to fine
        outs, x = [], maps[0]
        for i, fine in enumerate([None, *maps[1:]]):
            c = ch(64 << (len(maps) - i))  # 1x1 width of the block: 512, 256, 128 ([1])
            if fine is not None:  # [1] Sec. 2.3: 1x1 conv, upsample x2, concatenate
                x = upsample2(ConvBN(c, 1, shift=s)(x, train))
                x = jnp.concatenate([x, fine], -1)
            for j in range(self.head_depth):  # 1x1 c, 3x3 2c, 1x1 c, ...
                x = ConvBN(c if j % 2 == 0 else 2 * c, 1 if j % 2 == 0 else 3, shift=s)(x, train)
            y = ConvBN(2 * c, 3, shift=s)(x, train)
            y = Conv(3 * (5 + self.num_classes), 1, shift=s)(y)
            b, g = y.shape[0], y.shape[1]
            outs.append(y.reshape(b, g, g, 3, 5 + self.num_classes))  # (B, S, S, 3, 5+K)
        return outs


def make_model(cfg: Config) -> YOLOv3:
    return YOLOv3(cfg.num_classes, cfg.width, cfg.blocks, cfg.head_depth, cfg.shift_conv,
                  cfg.num_scales)


def anchor_shapes(cfg: Config) -> jax.Array:
    """(3 num_scales, 2) anchor (w, h) in units of the image, sorted by area."""
    return jnp.asarray(cfg.anchors, jnp.float32).reshape(-1, 2) / cfg.image_size


def scale_anchors(anchors, scale: int):
    """The 3 anchors of scale `scale` (0 = the coarsest, holding the largest anchors)."""
    n = len(anchors) // 3 - 1 - scale
    return anchors[3 * n:3 * n + 3]


# --- LOSS ---


decode = bx.decode_grid  # [1] Sec. 2.1: direct location prediction (common/boxes)


def multi_hot(labels, k: int):
    """Class targets (M, K) in {0, 1} and validity (M,) from int labels (M,) (-1 padding)
    or multi-hot rows (M, K) (all-zero rows are padding): several classes may be 1."""
    if labels.ndim == 1:
        return jax.nn.one_hot(labels, k), labels >= 0  # one_hot(-1) is all zeros
    return labels.astype(jnp.float32), labels.sum(-1) > 0


def shape_iou(wh, anchors):
    """IoU of (M, 2) box shapes with (A, 2) anchor shapes, both centred: (M, A)."""
    inter = (jnp.minimum(wh[:, None, 0], anchors[None, :, 0])
             * jnp.minimum(wh[:, None, 1], anchors[None, :, 1]))
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def build_targets(gt_boxes, gt_labels, anchors, sizes, k: int):
    """Targets of one image: gt_boxes (M, 4) cxcywh in units of the image, gt_labels (M,)
    ints or (M, K) multi-hot, anchors (3 scales, 2), sizes = cells per side coarse to fine.
    [1] Sec. 2.1: each box goes to the one anchor of all 9 with best shape IoU, on that
    anchor's scale, in the cell of its centre. Returns per scale a dict of (S, S, 3, ...)
    arrays: resp (bool), xy (centre offset in the cell), twh (log(g_w / p_w), ..h),
    cls (K multi-hot), box (cxcywh)."""
    cls, valid = multi_hot(gt_labels, k)
    best = jnp.argmax(shape_iou(gt_boxes[:, 2:], anchors), axis=1)  # (M,) in 0..8
    scale, a = len(sizes) - 1 - best // 3, best % 3  # scale 0 (coarsest): the 3 largest
    twh = jnp.log(jnp.maximum(gt_boxes[:, 2:], 1e-6) / anchors[best])
    out = []
    for l, s in enumerate(sizes):
        col = jnp.clip(jnp.floor(gt_boxes[:, 0] * s), 0, s - 1).astype(jnp.int32)
        row = jnp.clip(jnp.floor(gt_boxes[:, 1] * s), 0, s - 1).astype(jnp.int32)
        mine = valid & (scale == l)
        idx = (jnp.where(mine, row, s), col, a)  # other boxes scatter out of range: dropped
        _, put = bx.cell_owner(idx, mine, (s, s, 3))  # one box per anchor: the last one
        xy = gt_boxes[:, :2] * s - jnp.stack([col, row], -1)
        out.append(dict(resp=put(mine), xy=put(xy), twh=put(twh), cls=put(cls),
                        box=put(gt_boxes)))
    return out


def yolo_v3_loss(outs, gt_boxes, gt_labels, anchors, cfg: Config):
    """[1] Sec. 2.1-2.2 loss of the raw outputs [(B, S, S, 3, 5+K)] (coarse to fine) against
    ground truth (B, M, 4) cxcywh in units of the image, labels (B, M) or (B, M, K).
    Returns (total, parts), sums over scales, cells and anchors, mean over images."""
    sizes = tuple(o.shape[1] for o in outs)
    k = outs[0].shape[-1] - 5
    tgts = jax.vmap(lambda g, l: build_targets(g, l, anchors, sizes, k))(gt_boxes, gt_labels)
    gt_valid = jax.vmap(lambda l: multi_hot(l, k)[1])(gt_labels)  # (B, M)
    gt_xyxy = bx.cxcywh_to_xyxy(gt_boxes)
    bce = optax.sigmoid_binary_cross_entropy
    parts = {"coord": 0.0, "obj": 0.0, "noobj": 0.0, "class": 0.0}
    for l, (out, tgt) in enumerate(zip(outs, tgts, strict=True)):
        resp = tgt["resp"].astype(jnp.float32)  # (B, S, S, 3)
        pred = jax.lax.stop_gradient(bx.cxcywh_to_xyxy(decode(out[..., :4],
                                                              scale_anchors(anchors, l))))
        # ignore rule: unassigned predictions with IoU > ignore_iou to any ground truth
        ious = jax.vmap(lambda p, g: bx.iou(p.reshape(-1, 4), g))(pred, gt_xyxy)  # (B, N, M)
        ious = jnp.where(gt_valid[:, None, :], ious, 0.0).max(-1).reshape(resp.shape)
        noobj = (1.0 - resp) * (ious <= cfg.ignore_iou)
        # box: squared error on (sig(t_x), sig(t_y)) or raw (t_x, t_y), and on (t_w, t_h)
        if cfg.coord_loss == "offset":
            d_xy = jnp.square(jax.nn.sigmoid(out[..., :2]) - tgt["xy"]).sum(-1)
        else:
            off = jnp.clip(tgt["xy"], 1e-4, 1 - 1e-4)
            d_xy = jnp.square(out[..., :2] - (jnp.log(off) - jnp.log1p(-off))).sum(-1)
        d_wh = jnp.square(out[..., 2:4] - tgt["twh"]).sum(-1)
        parts["coord"] += cfg.lambda_coord * (resp * (d_xy + d_wh)).sum((1, 2, 3))
        # objectness: logistic regression, target 1 for the assigned anchor ([1] Sec. 2.1)
        one, zero = jnp.ones_like(resp), jnp.zeros_like(resp)
        parts["obj"] += cfg.lambda_obj * (resp * bce(out[..., 4], one)).sum((1, 2, 3))
        parts["noobj"] += cfg.lambda_noobj * (noobj * bce(out[..., 4], zero)).sum((1, 2, 3))
        # classes: independent logistic classifiers, BCE per class ([1] Sec. 2.2)
        ce = bce(out[..., 5:], tgt["cls"]).sum(-1)
        parts["class"] += cfg.lambda_class * (resp * ce).sum((1, 2, 3))
    parts = {n: v.mean() for n, v in parts.items()}
    return sum(parts.values()), parts


# --- UPDATE ---


@struct.dataclass
class State:
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array


def make_optimizer(cfg: Config):
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr)
    # yolov3.cfg: burn_in (lr * (t / 1000)^4), steps at 400k and 450k of 500.2k, scales .1
    n, w = cfg.total_steps, max(cfg.warmup_steps, 1)

    def sched(t):
        decay = jnp.where(t >= 4 * n // 5, 0.1, 1.0) * jnp.where(t >= 9 * n // 10, 0.1, 1.0)
        return cfg.lr * jnp.minimum((t + 1.0) / w, 1.0) ** 4 * decay

    return optax.chain(bx.kernel_weight_decay(cfg.weight_decay),
                       optax.sgd(sched, momentum=0.9))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    variables = make_model(cfg).init(k_net, x, train=False)
    params = variables["params"]
    return State(params, variables["batch_stats"], make_optimizer(cfg).init(params), key,
                 jnp.zeros((), jnp.int32))


def draw_batch(key, cfg: Config, batch: int):
    """SHAPES scenes: uint8 images, cxcywh boxes in units of the image, labels (-1 padding)."""
    photos = jnp.asarray(data.sample_photos(cfg.image_size)) if cfg.photo_backgrounds else None
    images, boxes, labels = data.shapes_batch(
        key, batch, cfg.image_size, cfg.max_objects, cfg.min_object, cfg.max_object,
        cfg.colours, photos=photos)
    return images, bx.xyxy_to_cxcywh(boxes / cfg.image_size), labels


def update(state: State, cfg: Config):
    key, k_data = jax.random.split(state.key)
    images, gt, labels = draw_batch(k_data, cfg, cfg.batch_size)
    anchors = anchor_shapes(cfg)

    def loss_fn(params):
        outs, new = make_model(cfg).apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"])
        loss, parts = yolo_v3_loss(outs, gt, labels, anchors, cfg)
        return loss, (parts, new["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {"losses/total": loss, **{f"losses/{k}": v for k, v in parts.items()},
               "charts/l2_grads": optax.tree.norm(grads)}
    return State(params, batch_stats, opt_state, key, state.step + 1), metrics


# --- PREDICT / EVALUATE ---


def boxes_and_scores(outs, anchors):
    """All scales' decoded boxes (B, N, 4) cxcywh in units of the image and class scores
    (B, N, K) = sigmoid(t_o) * sigmoid(t_k) (multi-label: several may be near 1)."""
    b = outs[0].shape[0]
    boxes = [decode(o[..., :4], scale_anchors(anchors, l)).reshape(b, -1, 4)
             for l, o in enumerate(outs)]
    scores = [(jax.nn.sigmoid(o[..., 4:5]) * jax.nn.sigmoid(o[..., 5:])).reshape(
        b, -1, o.shape[-1] - 5) for o in outs]
    return jnp.concatenate(boxes, 1), jnp.concatenate(scores, 1)


@functools.partial(jax.jit, static_argnames="cfg")
def predict(params, batch_stats, images, cfg: Config):
    """Forward, decode, scores, the top `pre_nms_topk` (box, class) pairs, per-class NMS.
    Returns xyxy boxes in px (B, D, 4), scores (B, D), classes (B, D), valid (B, D)."""
    outs = make_model(cfg).apply({"params": params, "batch_stats": batch_stats}, images)
    boxes, scores = boxes_and_scores(outs, anchor_shapes(cfg))
    boxes = bx.cxcywh_to_xyxy(boxes) * images.shape[1]
    boxes = bx.clip_to_image(boxes, images.shape[1], images.shape[1])  # darknet, before NMS
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
                    "YOLOv3 predictions on held-out SHAPES scenes", min_score)


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["mAP50", "mAP", "images_per_s", "losses/total"])


if __name__ == "__main__":
    main()
