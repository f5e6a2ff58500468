"""SSD: Single Shot MultiBox Detector (multi-scale default boxes, hard negative mining).

[1] W. Liu, D. Anguelov, D. Erhan, C. Szegedy, S. Reed, C.-Y. Fu, A. C. Berg. "SSD: Single
    Shot MultiBox Detector." ECCV 2016, arXiv:1512.02325.

Feature maps of decreasing size each carry a 3x3 conv head that predicts, for every cell
and each of its k default boxes, c + 1 class scores (softmax with a background class 0)
and 4 offsets. For m maps (levels l = 1..m) the default boxes are

    s_l = s_min + (s_max - s_min) (l - 1) / (m - 1)                           [1] Eq. 4
    w = s_l sqrt(r), h = s_l / sqrt(r), r in {1, 2, 3, 1/2, 1/3}; for r = 1 also a box
    of side s'_l = sqrt(s_l s_{l+1}); centres ((i + 0.5) / |f_l|, (j + 0.5) / |f_l|)

(k = 4 drops r = 3, 1/3). Matching: each ground truth takes its best-IoU default box, then
every default box with IoU > 0.5 to some ground truth is positive (x_ij = 1). Offsets
g^ = ((g_cx - d_cx) / d_w / v0, (g_cy - d_cy) / d_h / v0, log(g_w / d_w) / v1, ..h) with
variances (v0, v1) = (0.1, 0.2) as the released code. The loss:

    L = (1 / N) (L_conf + alpha L_loc), N = number of positives                [1] Eq. 1
    L_loc = sum_{i in Pos} sum_m x_ij smoothL1(l_i^m - g^_j^m)                  [1] Eq. 2
    L_conf = -sum_{i in Pos} x_ij^p log c^_i^p - sum_{i in Neg} log c^_i^0     [1] Eq. 3
    hard negative mining: Neg = the negatives of highest -log c^_i^0 (confidence loss),
    at most 3 per positive, per image                                          [1] Sec. 2.2

Inference ([1]'s released deploy net): softmax, per class the boxes scoring > 0.01, the top
400 of each class, NMS at 0.45, top 200 per image. Ours keeps a global top `pre_nms_topk`
of (box, class) pairs over all classes, then per-class NMS (see Differences).

Reproduce (CPU, SHAPES-64, small VGG-like base, maps 8x8, 4x4, 2x2):
    python detection/ssd.py --preset quick
    measured on a shared 2-core CPU (one jitted update per step, native convs): mAP@0.5
    0.903, mAP@[.5:.95] 0.523 on 200 held-out scenes after 600 updates of 16 images, ~2 min
    of training (0.764 / 0.340 after 300); predict ~900 images/s (batch 200, CPU).
    Without hard negative mining (all negatives kept): 0.885 / 0.472 at 600 updates.
Paper scale (GPU; VGG-16 SSD300, 6 maps 38..1, 8732 default boxes, SHAPES-300 on photos):
    python detection/ssd.py --preset paper
[1] Table 1 / abstract: SSD300 74.3 mAP on VOC2007 test at 59 FPS (Titan X).

Differences from the paper:
- No ImageNet pre-training of VGG-16 (from scratch, with batch-norm after every base conv
  so that it trains; [1] has no BN) and SHAPES scenes instead of VOC/COCO.
- `quick`: 64 px images, a 3-stage VGG-like base (16, 32, 64 channels, stride 8) and two
  extra stride-2 layers: maps 8x8, 4x4, 2x2 with 4, 6, 6 boxes, s_min = 0.15, s_max =
  0.55, s_{L+1} = 0.75 (objects are 8-28 px of 64); Adam instead of SGD; heads
  initialised by flax's default (lecun_normal) where the paper preset uses the released
  Xavier filler (`head_init`).
- Only the heads follow the released init; the base and extra convs are He-normal (with
  BN), not Xavier.
- The `paper` preset takes its default boxes from the released SSD300 (`box_scales`:
  conv4_3 at 0.1, as [1] Sec. 3.1 says, then 0.2-0.88 in steps of 0.17; `steps` 8, 16,
  32, 64, 100, 300 px between centres) rather than Eq. 4 on all six maps; `quick` uses
  Eq. 4 (`box_scales=()`) and centres at (i + 0.5) / side (`steps=()`).
- Default boxes are not clipped to the image (`clip_default_boxes` off), as [1]'s
  ssd_pascal.py (clip = False); torchvision and ssd.pytorch clip them (the flag on).
- Positives are IoU >= 0.5 (common.boxes.match) where [1] says > 0.5.
- No data augmentation (random IoU crops, zoom-out, photometric distortion, flips in [1]).
- Inference keeps one global top `pre_nms_topk` (400) of (box, class) pairs across all
  classes, drops those <= score_threshold, then runs per-class NMS (common.boxes.topk_nms);
  the released DetectionOutput layer keeps the top 400 of each class. A class crowded out
  of the global top 400 loses candidates the released code would keep.
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

EVAL_SEED = 10_013  # held-out scenes; training keys come from the runner's PRNGKey(seed)
# head kernel inits: Caffe's "xavier" filler is uniform(+-sqrt(3 / fan_in)) (variance 1 / fan_in)
HEAD_INITS = {"xavier": nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
              "lecun_normal": nn.initializers.lecun_normal()}

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """SSD on SHAPES scenes; defaults are [1]'s SSD300 (VGG-16, maps 38..1 with 4, 6, 6, 6,
    4, 4 boxes, s 0.2..0.9, IoU 0.5, neg:pos 3:1, alpha 1, variances 0.1 / 0.2)."""

    image_size: int = 300
    """side of the (square) input images in px"""
    backbone: str = "vgg16"
    """vgg16 (SSD300: conv4_3, fc7 and 4 extra layers) or small (3 VGG stages + 2 extras)"""
    boxes_per_level: tuple[int, ...] = (4, 6, 6, 6, 4, 4)
    """default boxes per cell on each map: 4 = ratios {1, 2, 1/2}, 6 = {1, 2, 3, 1/2, 1/3},
    each plus the extra r = 1 box of side sqrt(s_l s_{l+1})"""
    s_min: float = 0.2
    """scale of the finest map's default boxes (fraction of the image side)"""
    s_max: float = 0.9
    """scale of the coarsest map's default boxes"""
    s_extra: float = 1.05
    """s_{L+1}, used by the last map's extra box sqrt(s_L s_{L+1})"""
    box_scales: tuple[float, ...] = (0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05)
    """explicit s_1..s_L and s_{L+1}, overriding Eq. 4 (s_min, s_max, s_extra) when not
    empty; default: the released SSD300 (conv4_3 at 0.1 as [1] Sec. 3.1 says, then
    ssd_pascal.py's min_ratio 20 to max_ratio 90 in steps of 17 %)"""
    steps: tuple[int, ...] = (8, 16, 32, 64, 100, 300)
    """px between default-box centres on each map, centres at (i + 0.5) step (the released
    prior_box steps, which do not divide 300 evenly); empty: image_size / map side"""
    clip_default_boxes: bool = False
    """clip default boxes to the image (torchvision's and ssd.pytorch's clip=True); [1]'s
    ssd_pascal.py sets clip = False, so boxes such as w = 1.24 at s = 0.88, r = 2 stick out"""
    variances: tuple[float, float] = (0.1, 0.2)
    """offsets are divided by (v0 for x, y; v1 for log w, log h); (1, 1) is the pure Eq. 2"""
    match_iou: float = 0.5
    """default boxes with IoU >= match_iou to a ground truth are positive"""
    neg_pos_ratio: float = 3.0
    """hard negative mining keeps at most this many negatives per positive (per image)"""
    alpha: float = 1.0
    """weight of the localisation loss"""
    optimizer: str = "sgd"
    """sgd ([1]: momentum 0.9, weight decay 5e-4, lr / 10 at 2/3 and 5/6) or adam"""
    lr: float = 1e-3
    """learning rate"""
    weight_decay: float = 5e-4
    """L2 weight decay on kernels, added to the gradient as Caffe does (sgd only)"""
    batch_size: int = 32
    """images per update"""
    total_steps: int = 60_000
    """updates"""
    colours: int = 3
    """SHAPES classes are 3 shapes x colours colours"""
    max_objects: int = 12
    """objects per scene at most"""
    min_object: int = 12
    """smallest object side in px"""
    max_object: int = 200
    """largest object side in px"""
    photo_backgrounds: bool = True
    """paste the objects on crops of scikit-learn's sample photos"""
    eval_images: int = 500
    """held-out scenes for mAP"""
    score_threshold: float = 0.01
    """detections scored <= this are dropped before NMS"""
    pre_nms_topk: int = 400
    """(box, class) candidates kept by score before NMS, one global top-k over all classes"""
    nms_iou: float = 0.45
    """IoU above which NMS suppresses a lower-scored box of the same class"""
    max_detections: int = 200
    """detections per image after NMS"""
    head_init: str = "xavier"
    """kernel init of the 3x3 heads: xavier (the released Caffe filler: uniform, variance
    1 / fan_in, zero bias) or lecun_normal (flax's default, truncated normal)"""
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

    def validate(self):
        if self.backbone not in EXTRAS:
            raise ValueError(f"backbone={self.backbone!r} must be one of {sorted(EXTRAS)}")
        levels = 2 + len(EXTRAS[self.backbone]) if self.backbone == "vgg16" else 1 + len(
            EXTRAS[self.backbone])
        if len(self.boxes_per_level) != levels:
            raise ValueError(f"boxes_per_level={self.boxes_per_level} needs {levels} entries "
                             f"for backbone={self.backbone!r}")
        if any(k not in (4, 6) for k in self.boxes_per_level):
            raise ValueError(f"boxes_per_level={self.boxes_per_level}: each must be 4 or 6")
        if not 0 < self.s_min <= self.s_max <= self.s_extra:
            raise ValueError(f"need 0 < s_min <= s_max <= s_extra, got {self.s_min}, "
                             f"{self.s_max}, {self.s_extra}")
        if self.box_scales and (len(self.box_scales) != levels + 1 or min(self.box_scales) <= 0
                                or list(self.box_scales) != sorted(self.box_scales)):
            raise ValueError(f"box_scales={self.box_scales} must be empty or {levels + 1} "
                             f"increasing positive scales (s_1..s_L, s_L+1)")
        if self.steps and (len(self.steps) != levels or min(self.steps) < 1):
            raise ValueError(f"steps={self.steps} must be empty or {levels} positive px steps")
        if min(self.variances) <= 0 or len(self.variances) != 2:
            raise ValueError(f"variances={self.variances} must be two positive numbers")
        if self.neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio={self.neg_pos_ratio} must be >= 0")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init={self.head_init!r} must be one of {sorted(HEAD_INITS)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if not 0 < self.min_object <= self.max_object < self.image_size:
            raise ValueError(f"need 0 < min_object <= max_object < image_size, got "
                             f"{self.min_object}, {self.max_object}, {self.image_size}")
        for name in ("batch_size", "total_steps", "eval_images", "pre_nms_topk",
                     "max_detections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


PRESETS = {
    # CPU: SHAPES-64, maps 8x8, 4x4, 2x2 (see Differences).
    "quick": dict(image_size=64, backbone="small", boxes_per_level=(4, 6, 6), s_min=0.15,
                  s_max=0.55, s_extra=0.75, optimizer="adam", lr=2e-3, batch_size=16,
                  total_steps=600, colours=1, max_objects=4, min_object=8, max_object=28,
                  photo_backgrounds=False, eval_images=300, pre_nms_topk=200,
                  max_detections=100, head_init="lecun_normal", shift_conv=True,
                  box_scales=(), steps=()),
    "paper": dict(),
}

# --- NETWORKS ---


class ConvBN(nn.Module):
    """Conv + BatchNorm + ReLU (BN added so that VGG trains from scratch)."""

    features: int
    kernel: int = 3
    stride: int = 1
    padding: str = "SAME"
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel, self.stride, self.shift, self.padding,
                 use_bias=False, kernel_init=nn.initializers.he_normal())(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.relu(x)


# VGG stages: ints are 3x3 convs, "M" a 2x2/2 max-pool (ceil, as SSD's pool3), "S" the
# source map after which the first detection map is taken.
BASES = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "S"),
    "small": (16, "M", 32, "M", 64, 64, "M", "S"),
}
# extra layers: (1x1 channels, 3x3 channels, stride, padding) -> one detection map each
EXTRAS = {
    "vgg16": ((256, 512, 2, "SAME"), (128, 256, 2, "SAME"), (128, 256, 1, "VALID"),
              (128, 256, 1, "VALID")),  # conv8_2 10x10, conv9_2 5x5, conv10_2 3x3, conv11_2 1x1
    "small": ((32, 64, 2, "SAME"), (32, 64, 2, "SAME")),
}


class SSD(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, images, train: bool = False):
        """uint8 (B, H, W, 3) -> class logits (B, N, K + 1) (0 = background) and offsets
        (B, N, 4) over the N default boxes (map, row, column, box order)."""
        cfg, s = self.cfg, self.cfg.shift_conv
        x = images.astype(jnp.float32) / 255.0 - 0.5
        maps = []
        for layer in BASES[cfg.backbone]:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
            elif layer == "S":
                maps.append(x)
            else:
                x = ConvBN(layer, shift=s)(x, train)
        if cfg.backbone == "vgg16":
            # conv4_3 is L2-normalised with a learned per-channel scale initialised at 20
            scale = self.param("conv4_3_scale", nn.initializers.constant(20.0), (512,))
            maps[0] = maps[0] / (jnp.linalg.norm(maps[0], axis=-1, keepdims=True) + 1e-10)
            maps[0] = maps[0] * scale
            x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")  # pool4 -> 19x19
            x = ConvBN(512)(ConvBN(512)(ConvBN(512)(x, train), train), train)  # conv5
            x = nn.max_pool(x, (3, 3), (1, 1), padding="SAME")  # pool5 3x3/1
            x = nn.relu(nn.Conv(1024, (3, 3), kernel_dilation=(6, 6))(x))  # fc6, atrous
            x = nn.relu(nn.Conv(1024, (1, 1))(x))  # fc7
            maps.append(x)
        for c1, c3, stride, pad in EXTRAS[cfg.backbone]:
            x = ConvBN(c1, 1, shift=s)(x, train)
            x = ConvBN(c3, 3, stride, pad, shift=s)(x, train)
            maps.append(x)
        k1, b = cfg.num_classes + 1, images.shape[0]
        head = functools.partial(Conv, kernel=3, shift=s, kernel_init=HEAD_INITS[cfg.head_init])
        logits, deltas = [], []
        for f, k in zip(maps, cfg.boxes_per_level, strict=True):  # a 3x3 head per map
            logits.append(head(k * k1)(f).reshape(b, -1, k1))  # (B, H*W*k, K+1)
            deltas.append(head(k * 4)(f).reshape(b, -1, 4))  # (B, H*W*k, 4)
        return jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1)


# --- DEFAULT BOXES ---


def scales(cfg: Config) -> np.ndarray:
    """s_l for l = 1..L, followed by s_{L+1}: cfg.box_scales if given, else [1] Eq. 4 with
    s_{L+1} = cfg.s_extra."""
    if cfg.box_scales:
        return np.array(cfg.box_scales)
    m = len(cfg.boxes_per_level)
    s = [cfg.s_min + (cfg.s_max - cfg.s_min) * (l - 1) / max(m - 1, 1) for l in range(1, m + 1)]
    return np.array([*s, cfg.s_extra])


def map_sizes(cfg: Config) -> tuple[int, ...]:
    """Sides of the detection maps: the base's pools round up (SAME, as SSD's ceil-mode
    pool3), the extra layers' stride-2 convs round up, their VALID 3x3 convs shrink by 2."""
    side, sides = cfg.image_size, []
    for layer in BASES[cfg.backbone]:
        if layer == "M":
            side = -(-side // 2)
        elif layer == "S":
            sides.append(side)
    if cfg.backbone == "vgg16":
        side = -(-side // 2)
        sides.append(side)
    for _, _, stride, pad in EXTRAS[cfg.backbone]:
        side = -(-side // stride) if pad == "SAME" else (side - 3) // stride + 1
        sides.append(side)
    return tuple(sides)


def level_boxes(cfg: Config, level: int) -> np.ndarray:
    """(k, 2) default box (w, h) in units of the image on map `level` (0-based): r = 1 at
    s_l, the extra r = 1 box at sqrt(s_l s_{l+1}), then r = 2, 1/2 (and 3, 1/3 when k = 6)."""
    s = scales(cfg)
    sl, k = s[level], cfg.boxes_per_level[level]
    ratios = (2.0, 0.5) if k == 4 else (2.0, 0.5, 3.0, 1 / 3)
    wh = [(sl, sl), (np.sqrt(sl * s[level + 1]),) * 2]
    wh += [(sl * np.sqrt(r), sl / np.sqrt(r)) for r in ratios]
    return np.array(wh, np.float32)


def default_boxes(cfg: Config) -> jax.Array:
    """All default boxes, cxcywh in units of the image, (N, 4), N = sum_l side_l^2 k_l;
    with `clip_default_boxes` their corners are clipped to [0, 1] (cxcywh recomputed)."""
    levels = []
    for l, side in enumerate(map_sizes(cfg)):
        d = bx.grid_anchors(side, side, level_boxes(cfg, l))  # centres (i + .5) / side
        if cfg.steps:  # the released prior_box: centres (i + .5) step / image_size
            d = d.at[:, :2].multiply(side * cfg.steps[l] / cfg.image_size)
        levels.append(d)
    d = jnp.concatenate(levels)
    if cfg.clip_default_boxes:
        d = bx.xyxy_to_cxcywh(bx.clip_to_image(bx.cxcywh_to_xyxy(d), 1.0, 1.0))
    return d


# --- LOSS ---


def smooth_l1(x):
    """0.5 x^2 if |x| < 1 else |x| - 0.5 ([1] Eq. 2; the post's extra square is a typo)."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def box_targets(gt_cxcywh, defaults, variances):
    """[1] Eq. 2's g^: R-CNN offsets of matched boxes w.r.t. the default boxes / variances."""
    return bx.encode(gt_cxcywh, defaults, variances)


def match(defaults, gt_boxes, gt_labels, cfg: Config):
    """Targets of one image: defaults (N, 4) cxcywh, gt_boxes (M, 4) xyxy in units of the
    image, gt_labels (M,) (-1 padding). Each ground truth takes its best default box, and
    every default box with IoU >= match_iou is positive ([1] Sec. 2.2). Returns positive
    (N,) bool, class targets (N,) (0 background, 1 + label otherwise), offsets (N, 4)."""
    valid = gt_labels >= 0
    d_xyxy = bx.cxcywh_to_xyxy(defaults)
    idx, state = bx.match(d_xyxy, gt_boxes, valid, cfg.match_iou, cfg.match_iou,
                          force_best=True)  # each valid box also claims its best default box
    pos = (state == 1) & valid.any()
    cls = jnp.where(pos, gt_labels[idx] + 1, 0)
    gt = jnp.where(pos[:, None], bx.xyxy_to_cxcywh(gt_boxes[idx]), defaults)
    return pos, cls, box_targets(gt, defaults, cfg.variances)


def hard_negative_mask(neg_loss, pos, ratio: float):
    """[1] Sec. 2.2 hard negative mining for one image: among the negatives (~pos), keep the
    min(ratio * #pos, #neg) of highest confidence loss -log c^_i^0. Jittable: a descending
    argsort, its inverse permutation as the rank, and a rank mask."""
    neg = ~pos
    loss = jnp.where(neg, neg_loss, -jnp.inf)
    order = jnp.argsort(-loss, stable=True)  # hardest first
    rank = jnp.argsort(order)  # rank of each default box in that order
    num_neg = jnp.minimum(jnp.floor(ratio * pos.sum()), neg.sum())
    return neg & (rank < num_neg)


def ssd_loss(logits, deltas, defaults, gt_boxes, gt_labels, cfg: Config):
    """[1] Eq. 1: (1 / N) (L_conf + alpha L_loc), N = positives in the batch."""
    pos, cls, tgt = jax.vmap(lambda g, l: match(defaults, g, l, cfg))(gt_boxes, gt_labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, cls)  # (B, N)
    # negatives are ranked by their confidence loss (not by score as the post says)
    hard = jax.vmap(hard_negative_mask, (0, 0, None))(jax.lax.stop_gradient(ce), pos,
                                                       cfg.neg_pos_ratio)
    n = jnp.maximum(pos.sum(), 1)
    conf = (ce * (pos | hard)).sum() / n  # Eq. 3
    loc = (smooth_l1(deltas - tgt).sum(-1) * pos).sum() / n  # Eq. 2
    return conf + cfg.alpha * loc, {"conf": conf, "loc": loc, "num_pos": pos.sum(1).mean(),
                                    "num_neg": hard.sum(1).mean()}


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
    # [1] Sec. 3: SGD, momentum 0.9, weight decay 5e-4, lr 1e-3 then 1e-4, 1e-5
    n = cfg.total_steps
    sched = optax.piecewise_constant_schedule(cfg.lr, {2 * n // 3: 0.1, 5 * n // 6: 0.1})
    return optax.chain(bx.kernel_weight_decay(cfg.weight_decay),
                       optax.sgd(sched, momentum=0.9))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    variables = SSD(cfg).init(k_net, x, train=False)
    params = variables["params"]
    return State(params, variables["batch_stats"], make_optimizer(cfg).init(params), key,
                 jnp.zeros((), jnp.int32))


def draw_batch(key, cfg: Config, batch: int):
    """SHAPES scenes: uint8 images, xyxy boxes in units of the image, labels (-1 padding)."""
    photos = jnp.asarray(data.sample_photos(cfg.image_size)) if cfg.photo_backgrounds else None
    images, boxes, labels = data.shapes_batch(
        key, batch, cfg.image_size, cfg.max_objects, cfg.min_object, cfg.max_object,
        cfg.colours, photos=photos)
    return images, boxes / cfg.image_size, labels


def update(state: State, cfg: Config):
    key, k_data = jax.random.split(state.key)
    images, gt, labels = draw_batch(k_data, cfg, cfg.batch_size)
    defaults = default_boxes(cfg)

    def loss_fn(params):
        (logits, deltas), new = SSD(cfg).apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"])
        loss, parts = ssd_loss(logits, deltas, defaults, gt, labels, cfg)
        return loss, (parts, new["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {"losses/total": loss, "losses/conf": parts["conf"], "losses/loc": parts["loc"],
               "charts/positives": parts["num_pos"], "charts/hard_negatives": parts["num_neg"],
               "charts/l2_grads": optax.tree.norm(grads)}
    return State(params, batch_stats, opt_state, key, state.step + 1), metrics


# --- PREDICT / EVALUATE ---


@functools.partial(jax.jit, static_argnames="cfg")
def predict(params, batch_stats, images, cfg: Config):
    """Forward, softmax, the top `pre_nms_topk` (box, class) scores (background excluded),
    class-wise NMS. Returns xyxy boxes in px (B, D, 4), scores, classes, valid (B, D)."""
    logits, deltas = SSD(cfg).apply({"params": params, "batch_stats": batch_stats}, images)
    defaults = default_boxes(cfg)
    boxes = bx.cxcywh_to_xyxy(bx.decode(deltas, defaults, cfg.variances)) * cfg.image_size
    boxes = bx.clip_to_image(boxes, cfg.image_size, cfg.image_size)  # as the released SSD
    scores = jax.nn.softmax(logits, -1)[..., 1:]  # (B, N, K)
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
                    "SSD predictions on held-out SHAPES scenes", min_score)


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["mAP50", "mAP", "images_per_s", "losses/total"])


if __name__ == "__main__":
    main()
