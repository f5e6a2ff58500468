"""RetinaNet: focal loss, a feature pyramid on a ResNet, 9 anchors per level.

[1] T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollar. "Focal Loss for Dense Object
    Detection." ICCV 2017, arXiv:1708.02002.
[2] T.-Y. Lin, P. Dollar, R. Girshick, K. He, B. Hariharan, S. Belongie. "Feature Pyramid
    Networks for Object Detection." CVPR 2017, arXiv:1612.03144.

A one-stage detector: every anchor of every pyramid level is classified (K independent
sigmoids) and regressed (4 R-CNN offsets). Training sees ~10^4-10^5 anchors per image of
which a handful are objects; the focal loss keeps the easy negatives from swamping it:

    CE(p, y) = -y log p - (1 - y) log(1 - p)                                 [1] Eq. 1
    p_t = p if y = 1 else 1 - p;  alpha_t = alpha if y = 1 else 1 - alpha     [1] Eq. 2
    FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t),  alpha = 0.25, gamma = 2     [1] Eq. 5
    prior init of the class logits' bias: b = -log((1 - pi) / pi), pi = 0.01  [1] Sec. 4.1
    L = (1 / N_pos) [sum_{anchors not ignored, classes} FL + sum_{pos} smoothL1(t - t*)]

Pyramid ([2] Sec. 3, [1] Sec. 4): C3..C5 are the ResNet stage outputs (stride 8, 16, 32);
P5 = 1x1(C5); P4 = 1x1(C4) + up2(P5); P3 = 1x1(C3) + up2(P4) (nearest upsampling), each
followed by a 3x3 conv; P6 = 3x3/2 conv on C5; P7 = 3x3/2 conv on ReLU(P6); all of width
d. Level l has stride 2^l and anchors of area (A0 2^(l-3))^2 (A0 = 32 px), times the scales
{2^0, 2^(1/3), 2^(2/3)}, with aspect ratios {1/2, 1, 2}: A = 9 per cell. An anchor is
positive for the ground truth of IoU >= 0.5, negative when its best IoU is < 0.4, and
ignored in between. Targets t* = ((g_x - a_x) / a_w, (g_y - a_y) / a_h, log(g_w / a_w),
log(g_h / a_h)). The class subnet is 4 x (3x3 conv d, ReLU) + a 3x3 conv with K A sigmoid
outputs; the box subnet is the same with 4 A outputs; both are shared by all levels.
Inference: per level the top 1000 (anchor, class) scores above 0.05, merged, NMS at 0.5,
top 100 per image.

Reproduce (CPU, SHAPES-64, small ResNet, P3-P5):
    python detection/retinanet.py --preset quick
    measured on a shared 2-core CPU (load ~8): mAP@0.5 0.794 / mAP@[.5:.95] 0.469 on 300
    held-out scenes after 600 updates of 16 images, 236 s wall (122 CPU-s, compile and
    evaluation included); predict ~145 images/s (batch 300, loaded CPU). Class-agnostic
    mAP@0.5 is 0.83: localisation, not classification, limits it. 400 updates (the test's
    gate, native convs in a Python loop): 0.687 on 200 scenes.
Paper scale (GPU; ResNet-50-FPN P3-P7, 640 px, SHAPES-640 with photo backgrounds):
    python detection/retinanet.py --preset paper
[1] Table 1e / Table 2: ResNet-50-FPN at 600 px: 32.5 AP (COCO minival); ResNet-101-FPN at
800 px: 39.1 AP on COCO test-dev.

Differences from the paper:
- No ImageNet pre-training: the ResNet trains from scratch with batch-norm in training
  mode (the paper freezes pre-trained BN statistics); data are SHAPES scenes, not COCO.
- `quick` uses 64 px images, a 4-stage ResNet with one basic block per stage (16..128
  channels), d = 32, 2 instead of 4 convs per subnet, and only P3-P5 (8x8, 4x4, 2x2
  maps): P6/P7 would be 1x1 maps of 64 px images. Its anchors are scaled to the 8-28 px
  objects: A0 = 12 px on P3 (sides 12..19, 24..38, 48..76 px on P3-P5) instead of 32 px;
  with A0 = 8 px only 65% of SHAPES boxes reach IoU >= 0.5 with some anchor (1.8
  positives per object), with A0 = 12 px 85% (3.5 per object).
- `quick` puts GroupNorm after every hidden subnet conv (`head_norm`, as later
  from-scratch detectors, e.g. FCOS): without it the N(0, 0.01) subnets learn slowly from
  scratch (mAP@0.5 after 500 updates, d = 64, Adam 2e-3: 0.24 without / 0.38 with GN at
  A0 = 8, 0.28 / 0.68 at A0 = 12). It uses Adam (lr 5e-3, linear warm-up from 0 over 50
  updates) instead of SGD; without GroupNorm that lr failed (mAP@0.5 0.000 at 500).
  Convs are computed by `common.nets.Conv(shift=True)` (same maths) because XLA:CPU's
  native conv weight gradients are ~100x slower inside the runner's lax.scan
  (jax-ml/jax#12868); `paper` uses the native convs.
- Each ground truth also claims its best-IoU anchor (`match_best_anchor`, as Detectron's
  and torchvision's RetinaNet), so small objects that reach IoU 0.5 with no anchor still
  have a positive one; the paper's text states only the 0.5 / 0.4 thresholds.
- The box loss is smooth-L1 with beta = 0.11 on unit-variance offsets (Detectron's
  setting); the paper says only "smooth L1" ([1] Sec. 4).
- No augmentation (horizontal flips in [1]); SHAPES scenes never repeat.
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

EVAL_SEED = 10_009  # held-out scenes; training keys come from the runner's PRNGKey(seed)

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """RetinaNet on SHAPES scenes; defaults are [1]'s (ResNet-50-FPN, P3-P7, d = 256, 9
    anchors from 32^2 px, focal alpha 0.25 / gamma 2, pi = 0.01, IoU 0.5 / 0.4)."""

    image_size: int = 640
    """side of the (square) input images in px"""
    backbone: str = "resnet50"
    """resnet50 (bottleneck 3-4-6-3), resnet18 (basic 2-2-2-2) or small (basic 1-1-1-1)"""
    fpn_width: int = 256
    """channels d of every pyramid level and of the subnets"""
    max_level: int = 7
    """coarsest pyramid level (P3..P_max); 7 in [1], 5 at 64 px"""
    head_convs: int = 4
    """3x3 conv + ReLU layers of each subnet before its output conv"""
    head_norm: bool = False
    """GroupNorm after each subnet conv (later from-scratch detectors; [1] has none)"""
    anchor_size: float = 32.0
    """anchor side in px at P3 (doubles per level); areas 32^2..512^2 on P3..P7"""
    anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    """anchor side multipliers per level"""
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """anchor aspect ratios h / w"""
    pos_iou: float = 0.5
    """anchors with IoU >= pos_iou to a ground truth are positive"""
    neg_iou: float = 0.4
    """anchors whose best IoU is < neg_iou are negative; the band in between is ignored"""
    match_best_anchor: bool = True
    """every ground truth also claims its best-IoU anchor (Detectron / torchvision)"""
    focal_alpha: float = 0.25
    """alpha-balancing weight of positives (negatives get 1 - alpha); < 0: no balancing"""
    focal_gamma: float = 2.0
    """focusing parameter gamma (0 with alpha < 0 is binary cross-entropy)"""
    prior_prob: float = 0.01
    """pi of the class-bias init b = -log((1 - pi) / pi)"""
    box_beta: float = 0.11
    """smooth-L1 transition point of the box loss (Detectron: 0.11)"""
    box_weight: float = 1.0
    """weight of the box loss"""
    optimizer: str = "sgd"
    """sgd ([1]: momentum 0.9, weight decay 1e-4, warm-up, lr / 10 at 2/3 and 8/9) or adam"""
    lr: float = 0.01
    """learning rate"""
    weight_decay: float = 1e-4
    """L2 weight decay on kernels, added to the gradient (sgd only)"""
    warmup_steps: int = 500
    """linear learning-rate warm-up from lr / 3 (sgd) or 0 (adam)"""
    batch_size: int = 16
    """images per update"""
    total_steps: int = 90_000
    """updates"""
    colours: int = 3
    """SHAPES classes are 3 shapes x colours colours"""
    max_objects: int = 12
    """objects per scene at most"""
    min_object: int = 16
    """smallest object side in px"""
    max_object: int = 320
    """largest object side in px"""
    photo_backgrounds: bool = True
    """paste the objects on crops of scikit-learn's sample photos"""
    eval_images: int = 500
    """held-out scenes for mAP"""
    score_threshold: float = 0.05
    """detections scored <= this are dropped before NMS"""
    pre_nms_topk: int = 1000
    """(anchor, class) candidates kept per level before NMS"""
    nms_iou: float = 0.5
    """IoU above which NMS suppresses a lower-scored box of the same class"""
    max_detections: int = 100
    """detections per image after NMS"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients in lax.scan on CPU"""

    @property
    def num_classes(self) -> int:
        return 3 * self.colours

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(3, self.max_level + 1))

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} must be one of {sorted(BACKBONES)}")
        if self.image_size % 32:
            raise ValueError(f"image_size={self.image_size} must be a multiple of 32 (C5)")
        if not 5 <= self.max_level <= 7:
            raise ValueError(f"max_level={self.max_level} must be 5, 6 or 7")
        if not 0 <= self.neg_iou <= self.pos_iou <= 1:
            raise ValueError(f"need 0 <= neg_iou <= pos_iou <= 1, got {self.neg_iou}, "
                             f"{self.pos_iou}")
        if not 0 < self.prior_prob < 1:
            raise ValueError(f"prior_prob={self.prior_prob} must be in (0, 1)")
        if self.focal_alpha >= 1 or self.focal_gamma < 0:
            raise ValueError(f"need focal_alpha < 1 and focal_gamma >= 0, got "
                             f"{self.focal_alpha}, {self.focal_gamma}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if not 0 < self.min_object <= self.max_object < self.image_size:
            raise ValueError(f"need 0 < min_object <= max_object < image_size, got "
                             f"{self.min_object}, {self.max_object}, {self.image_size}")
        for name in ("batch_size", "total_steps", "eval_images", "head_convs", "fpn_width",
                     "pre_nms_topk", "max_detections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


PRESETS = {
    # CPU: SHAPES-64, small ResNet, P3-P5, anchors from 12 px, GroupNorm subnets (Differences).
    "quick": dict(image_size=64, backbone="small", fpn_width=32, max_level=5, head_convs=2,
                  head_norm=True, anchor_size=12.0, optimizer="adam", lr=5e-3, warmup_steps=50,
                  batch_size=16, total_steps=600, colours=1, max_objects=4, min_object=8,
                  max_object=28, photo_backgrounds=False, eval_images=300, pre_nms_topk=200,
                  shift_conv=True),
    "paper": dict(),
}

# --- NETWORKS ---

# block type, blocks per stage (C2..C5), stage widths, stem (7x7/2 + max-pool, or 3x3/2)
BACKBONES = {
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512), "imagenet"),
    "small": ("basic", (1, 1, 1, 1), (16, 32, 64, 128), "small"),
}


class ConvBN(nn.Module):
    features: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel, self.stride, self.shift, use_bias=False,
                 kernel_init=nn.initializers.he_normal())(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.relu(x) if self.relu else x


class Block(nn.Module):
    """ResNet v1 residual block: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4)."""

    features: int
    stride: int
    kind: str
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        f, s = self.features, self.shift
        if self.kind == "basic":
            out_ch = f
            y = ConvBN(f, 3, self.stride, shift=s)(x, train)
            y = ConvBN(f, 3, relu=False, shift=s)(y, train)
        else:
            out_ch = 4 * f
            y = ConvBN(f, 1, shift=s)(x, train)
            y = ConvBN(f, 3, self.stride, shift=s)(y, train)
            y = ConvBN(out_ch, 1, relu=False, shift=s)(y, train)
        if x.shape[-1] != out_ch or self.stride != 1:
            x = ConvBN(out_ch, 1, self.stride, relu=False, shift=s)(x, train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Returns C3, C4, C5 (strides 8, 16, 32)."""

    arch: str
    shift: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        kind, depths, widths, stem = BACKBONES[self.arch]
        if stem == "imagenet":  # 7x7/2 conv + 3x3/2 max-pool: C2 at stride 4
            x = ConvBN(widths[0], 7, 2, shift=self.shift)(x, train)
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
            strides = (1, 2, 2, 2)
        else:  # small: 3x3/2 conv, every stage halves
            x = ConvBN(widths[0], 3, 2, shift=self.shift)(x, train)
            strides = (2, 2, 2, 2)
        feats = []
        for depth, width, stride in zip(depths, widths, strides, strict=True):
            for i in range(depth):
                x = Block(width, stride if i == 0 else 1, kind, self.shift)(x, train)
            feats.append(x)
        return feats[1:]  # C3, C4, C5


def upsample2(x):
    """Nearest-neighbour 2x upsampling ([2] Sec. 3): (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
    """[2] Sec. 3 with RetinaNet's P6/P7 ([1] Sec. 4): returns [P3, ..., P_max]."""

    width: int
    max_level: int
    shift: bool = False

    @nn.compact
    def __call__(self, c3, c4, c5):
        d, s = self.width, self.shift
        lat = [Conv(d, 1, shift=s, name=f"lateral{i}")(c) for i, c in ((3, c3), (4, c4), (5, c5))]
        p5 = lat[2]
        p4 = lat[1] + upsample2(p5)  # top-down pathway: upsample + lateral, element-wise add
        p3 = lat[0] + upsample2(p4)
        ps = [Conv(d, 3, shift=s, name=f"smooth{i}")(p) for i, p in ((3, p3), (4, p4), (5, p5))]
        if self.max_level >= 6:
            ps.append(Conv(d, 3, 2, s, name="p6")(c5))  # P6 from C5, not P5
        if self.max_level >= 7:
            ps.append(Conv(d, 3, 2, s, name="p7")(nn.relu(ps[-1])))
        return ps


class Subnet(nn.Module):
    """[1] Sec. 4 / Fig. 3: head_convs x (3x3 conv d, ReLU) + 3x3 conv with `out` channels;
    weights N(0, 0.01^2), biases 0 except the last (bias_init). norm: GroupNorm (32 groups,
    or width / 4 if fewer channels) after each hidden conv, shared by all levels."""

    width: int
    convs: int
    out: int
    bias_init: float = 0.0
    shift: bool = False
    norm: bool = False

    @nn.compact
    def __call__(self, x):
        w = nn.initializers.normal(0.01)
        for _ in range(self.convs):
            x = Conv(self.width, 3, shift=self.shift, kernel_init=w)(x)
            if self.norm:
                x = nn.GroupNorm(num_groups=min(32, self.width // 4))(x)
            x = nn.relu(x)
        return Conv(self.out, 3, shift=self.shift, kernel_init=w,
                    bias_init=nn.initializers.constant(self.bias_init))(x)


class RetinaNet(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, images, train: bool = False):
        """uint8 (B, H, W, 3) -> class logits (B, N, K), box offsets (B, N, 4) over the N
        anchors of all levels, ordered level, row, column, anchor (as `pyramid_anchors`)."""
        cfg = self.cfg
        x = images.astype(jnp.float32) / 255.0 - 0.5
        s = cfg.shift_conv
        ps = FPN(cfg.fpn_width, cfg.max_level, s)(*ResNet(cfg.backbone, s)(x, train))
        a, k = cfg.num_anchors, cfg.num_classes
        prior = -np.log((1 - cfg.prior_prob) / cfg.prior_prob)  # [1] Sec. 4.1
        n = cfg.head_norm
        cls_net = Subnet(cfg.fpn_width, cfg.head_convs, k * a, prior, s, n, name="class_subnet")
        box_net = Subnet(cfg.fpn_width, cfg.head_convs, 4 * a, shift=s, norm=n,
                         name="box_subnet")
        b = images.shape[0]
        logits = [cls_net(p).reshape(b, -1, k) for p in ps]  # (B, H*W*A, K) per level
        deltas = [box_net(p).reshape(b, -1, 4) for p in ps]  # (B, H*W*A, 4)
        return jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1)


# --- ANCHORS ---


def level_shapes(cfg: Config) -> list[int]:
    """Side of each pyramid map: image / 2^l, rounded up per stride-2 step (SAME padding)."""
    s, out = cfg.image_size, []
    for level in range(1, cfg.max_level + 1):
        s = -(-s // 2)
        if level >= 3:
            out.append(s)
    return out


def anchor_sizes(cfg: Config, level: int) -> np.ndarray:
    """(A, 2) anchor (w, h) in px on level l: side A0 2^(l-3) * scale, h / w = ratio, the area
    fixed by the side: w = side / sqrt(ratio), h = side * sqrt(ratio). Scale-major order."""
    side = cfg.anchor_size * 2.0 ** (level - 3)
    return np.array([(side * s / np.sqrt(r), side * s * np.sqrt(r))
                     for s in cfg.anchor_scales for r in cfg.anchor_ratios], np.float32)


def pyramid_anchors(cfg: Config) -> jax.Array:
    """All anchors, cxcywh in units of the image, (N, 4) with N = sum_l H_l W_l A."""
    return jnp.concatenate([
        bx.grid_anchors(s, s, anchor_sizes(cfg, level) / cfg.image_size)
        for level, s in zip(cfg.levels, level_shapes(cfg), strict=True)])


# --- LOSS ---


def focal_loss(logits, targets, alpha: float | None = 0.25, gamma: float = 2.0):
    """[1] Eq. 5 elementwise: -alpha_t (1 - p_t)^gamma log p_t with p = sigmoid(logits); the
    log terms via log-sigmoid (stable). alpha=None: no alpha_t (Eq. 4)."""
    p = jax.nn.sigmoid(logits)
    ce = -targets * jax.nn.log_sigmoid(logits) - (1.0 - targets) * jax.nn.log_sigmoid(-logits)
    p_t = p * targets + (1.0 - p) * (1.0 - targets)  # Eq. 2
    # Eq. 4 (gamma = 0 skips the power: d/dx x^0 at x = 0 would be 0 * inf = nan)
    loss = ce * (1.0 - p_t) ** gamma if gamma else ce
    if alpha is not None:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss  # Eq. 5
    return loss


def smooth_l1(x, beta: float = 1.0):
    """0.5 x^2 / beta for |x| < beta, else |x| - 0.5 beta."""
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def box_targets(gt_cxcywh, anchors):
    """R-CNN offsets (t_x, t_y, t_w, t_h) of the matched boxes w.r.t. the anchors."""
    return bx.encode(gt_cxcywh, anchors)


def assign(anchors, gt_boxes, gt_labels, cfg: Config):
    """Targets of one image. anchors (N, 4) cxcywh, gt_boxes (M, 4) xyxy in units of the
    image, gt_labels (M,) with -1 padding. Returns state (N,) 1 positive / 0 negative / -1
    ignored, class one-hot targets (N, K) and box targets (N, 4)."""
    valid = gt_labels >= 0
    a_xyxy = bx.cxcywh_to_xyxy(anchors)
    # with match_best_anchor each valid box also claims its best anchor
    idx, state = bx.match(a_xyxy, gt_boxes, valid, cfg.pos_iou, cfg.neg_iou,
                          force_best=cfg.match_best_anchor)
    state = jnp.where(valid.any(), state, 0)  # an empty image: all negative
    onehot = jax.nn.one_hot(gt_labels[idx], cfg.num_classes) * (state == 1)[:, None]
    gt = bx.xyxy_to_cxcywh(gt_boxes[idx])
    gt = jnp.where(state[:, None] == 1, gt, anchors)  # keep log() finite off the positives
    return state, onehot, box_targets(gt, anchors)


def retinanet_loss(logits, deltas, anchors, gt_boxes, gt_labels, cfg: Config):
    """Batch loss: focal over non-ignored anchors and smooth-L1 over positives, both summed
    over the batch and divided by the number of positive anchors ([1] Sec. 3.3, 4.1)."""
    state, onehot, tgt = jax.vmap(lambda g, l: assign(anchors, g, l, cfg))(gt_boxes, gt_labels)
    pos = (state == 1).astype(jnp.float32)  # (B, N)
    num_pos = jnp.maximum(pos.sum(), 1.0)
    alpha = cfg.focal_alpha if cfg.focal_alpha >= 0 else None
    fl = focal_loss(logits, onehot, alpha, cfg.focal_gamma).sum(-1)  # (B, N)
    cls = (fl * (state >= 0)).sum() / num_pos
    box = (smooth_l1(deltas - tgt, cfg.box_beta).sum(-1) * pos).sum() / num_pos
    return cls + cfg.box_weight * box, {"focal": cls, "box": box, "num_pos": pos.sum(1).mean()}


# --- UPDATE ---


@struct.dataclass
class State:
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array


def lr_schedule(cfg: Config):
    """[1] Sec. 4.1 (SGD): linear warm-up from lr / 3, lr / 10 at 60k and 80k of 90k (2/3 and
    8/9 of training, counted from step 0: join_schedules restarts the second schedule's
    count at the warm-up's end, so its boundaries are shifted back by the warm-up)."""
    n, w = cfg.total_steps, cfg.warmup_steps
    return optax.join_schedules([
        optax.linear_schedule(cfg.lr / 3, cfg.lr, w),
        optax.piecewise_constant_schedule(cfg.lr, {2 * n // 3 - w: 0.1, 8 * n // 9 - w: 0.1})],
        [w])


def make_optimizer(cfg: Config):
    if cfg.optimizer == "adam":
        return optax.adam(optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
                          if cfg.warmup_steps else cfg.lr)
    sched = lr_schedule(cfg)
    return optax.chain(bx.kernel_weight_decay(cfg.weight_decay),
                       optax.sgd(sched, momentum=0.9))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    variables = RetinaNet(cfg).init(k_net, x, train=False)
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
    anchors = pyramid_anchors(cfg)

    def loss_fn(params):
        (logits, deltas), new = RetinaNet(cfg).apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"])
        loss, parts = retinanet_loss(logits, deltas, anchors, gt, labels, cfg)
        return loss, (parts, new["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {"losses/total": loss, "losses/focal": parts["focal"], "losses/box": parts["box"],
               "charts/positive_anchors": parts["num_pos"],
               "charts/l2_grads": optax.tree.norm(grads)}
    return State(params, batch_stats, opt_state, key, state.step + 1), metrics


# --- PREDICT / EVALUATE ---


@functools.partial(jax.jit, static_argnames="cfg")
def predict(params, batch_stats, images, cfg: Config):
    """Forward, per level the top `pre_nms_topk` (anchor, class) sigmoid scores, merge,
    decode, class-wise NMS ([1] Sec. 4). Returns xyxy boxes in px (B, D, 4), scores (B, D),
    classes (B, D), valid (B, D), D = max_detections."""
    logits, deltas = RetinaNet(cfg).apply({"params": params, "batch_stats": batch_stats},
                                          images)
    return postprocess(logits, deltas, cfg)


def postprocess(logits, deltas, cfg: Config):
    """Class logits (B, N, K) and offsets (B, N, 4) of all anchors -> detections."""
    anchors = pyramid_anchors(cfg)
    boxes = bx.cxcywh_to_xyxy(bx.decode(deltas, anchors)) * cfg.image_size  # (B, N, 4)
    boxes = bx.clip_to_image(boxes, cfg.image_size, cfg.image_size)  # as Detectron, before NMS
    k, a = cfg.num_classes, cfg.num_anchors
    sizes = [s * s * a for s in level_shapes(cfg)]
    starts = np.cumsum([0, *sizes])

    def one(bo, lo):
        scores = jax.nn.sigmoid(lo)  # (N, K)
        cand_idx, cand_sc = [], []
        for start, n in zip(starts[:-1], sizes, strict=True):  # top-k per level
            sc, i = jax.lax.top_k(scores[start:start + n].reshape(-1), min(cfg.pre_nms_topk,
                                                                           n * k))
            cand_idx.append(i + start * k)
            cand_sc.append(sc)
        idx, sc = jnp.concatenate(cand_idx), jnp.concatenate(cand_sc)
        anchor, cls = idx // k, idx % k
        keep, valid = bx.batched_nms(bo[anchor], sc, cls, cfg.nms_iou, cfg.max_detections,
                                     cfg.score_threshold)
        return bo[anchor][keep], sc[keep], cls[keep], valid

    return jax.vmap(one)(boxes, logits)


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
                    "RetinaNet predictions on held-out SHAPES scenes", min_score)


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["mAP50", "mAP", "images_per_s", "losses/total"])


if __name__ == "__main__":
    main()
