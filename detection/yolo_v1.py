"""YOLO (v1): one network, one pass, an S x S grid of boxes and class probabilities.

[1] J. Redmon, S. Divvala, R. Girshick, A. Farhadi. "You Only Look Once: Unified,
    Real-Time Object Detection." CVPR 2016, arXiv:1506.02640.

The image is divided into an S x S grid. Each cell predicts B boxes (x, y, w, h) with a
confidence C each, and one set of K class probabilities Pr(class_c | object): the output
is S x S x (5B + K). (x, y) is the centre's offset inside the cell, (w, h) is relative to
the image and the net predicts sqrt(w), sqrt(h). The confidence is trained towards
Pr(object) * IoU(pred, truth). Of the B boxes of the cell holding an object's centre, the
one whose *current* prediction has the highest IoU with the truth is "responsible"
(1^obj_ij); that choice is made under stop_gradient, and while no box of the cell overlaps
the truth the one of lowest RMSE over (x, y, w, h) is (darknet's tie-break). The loss
([1] Eq. 3) is sum-squared:

    L = l_coord sum_ij 1^obj_ij [(x_i - x^_i)^2 + (y_i - y^_i)^2]
      + l_coord sum_ij 1^obj_ij [(sqrt w_i - sqrt w^_i)^2 + (sqrt h_i - sqrt h^_i)^2]
      + sum_ij 1^obj_ij (C_ij - C^_ij)^2 + l_noobj sum_ij 1^noobj_ij (C_ij - C^_ij)^2
      + sum_i 1^obj_i sum_c (p_i(c) - p^_i(c))^2
    l_coord = 5, l_noobj = 0.5; C^_ij = IoU(box_ij, truth) for the responsible box, 0 else

At test time the class-specific score of box j in cell i is Pr(class_c | object) * C_ij
([1] Eq. 2), followed by per-class non-maximum suppression.

Reproduce (CPU, SHAPES-64, tiny conv net, conv head):
    python detection/yolo_v1.py --preset quick
    measured (2-core CPU shared with other jobs, wall-clock not representative): with
    --batch-size 16 --total-steps 300 (the test's gate run, seed 0, ~50 CPU-s of training)
    mAP@0.5 0.412 on 100 held-out scenes (0.514 before darknet's RMSE tie-break of the
    responsible box was added; YOLOv2's quick model reaches 0.679 at less cost); the full
    quick preset was not run to completion here.
Paper scale (GPU; 24 conv + 2 FC at 448, S=7, B=2, SHAPES-448 on photo backgrounds):
    python detection/yolo_v1.py --preset paper
[1] Table 1: YOLO 63.4 mAP on VOC 2007 at 45 FPS; Fast YOLO 52.7 mAP at 155 FPS.

Differences from the paper:
- No ImageNet pre-training of the first 20 convs (and no 224 -> 448 resolution change):
  everything trains from scratch on SHAPES (procedural scenes), not VOC.
- The `quick` preset replaces the 24-conv + 2-FC network with 5 conv layers (stride 8, an
  8 x 8 grid on 64 px) and a 1x1 conv head with S*S*(5B+K) outputs in all, uses Adam and
  batch norm (which [1] does not have; YOLOv2 added it) to train in a few CPU minutes; the
  `paper` preset keeps the 2 FC layers (4096, dropout 0.5) and no batch norm.
- The paper's schedule (lr 1e-3 warm-up to 1e-2 for 75 epochs, 1e-3 for 30, 1e-4 for 30;
  momentum 0.9, decay 5e-4) is kept in `paper` as fractions of total_steps; no data
  augmentation (SHAPES scenes are never repeated).
- If two objects' centres fall into one cell the later one (in the annotation order) owns
  the cell, as the single object per cell of [1]'s formulation (darknet's loop over the
  truths overwrites it too); the other is not a target.
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

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """YOLO v1 on SHAPES scenes; defaults are [1]'s (448 px, S=7, B=2, 24 conv + 2 FC,
    l_coord=5, l_noobj=0.5, leaky ReLU 0.1, SGD with momentum 0.9 and decay 5e-4)."""

    image_size: int = 448
    """side of the input images"""
    num_boxes: int = 2
    """B: boxes per cell"""
    backbone: str = "paper"
    """paper (24 conv, stride 64 -> S=7 at 448) or tiny (4 conv, stride 8)"""
    width: float = 1.0
    """multiplier of every backbone channel count"""
    head: str = "fc"
    """fc (the paper's 2 FC layers over the conv map) or conv (1x1 conv per cell)"""
    fc_hidden: int = 4096
    """width of the first FC layer"""
    dropout: float = 0.5
    """dropout after the first FC layer"""
    batch_norm: bool = False
    """batch norm after every conv (not in [1])"""
    lambda_coord: float = 5.0
    """weight of the box terms"""
    lambda_noobj: float = 0.5
    """weight of the confidence term of boxes not responsible for an object"""
    sqrt_wh: bool = True
    """predict sqrt(w), sqrt(h) (False: w, h; an ablation)"""
    conf_target: str = "iou"
    """confidence target of the responsible box: iou (IoU with the truth) or one"""
    optimizer: str = "sgd"
    """sgd (momentum 0.9, weight decay, the paper's schedule) or adam"""
    lr: float = 1e-2
    """peak learning rate"""
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
    """detections below this class-specific score are dropped before NMS"""
    nms_iou: float = 0.5
    """IoU above which NMS suppresses a lower-scored box of the same class"""
    max_detections: int = 100
    """detections per image after NMS"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls (common.nets): same maths, fast weight gradients
    inside the runner's lax.scan on XLA:CPU"""

    @property
    def num_classes(self) -> int:
        return 3 * self.colours

    @property
    def stride(self) -> int:
        spec = BACKBONES[self.backbone]
        return int(np.prod([2 if x == "M" else x[2] for x in spec]))

    @property
    def grid(self) -> int:
        return self.image_size // self.stride

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} must be one of {sorted(BACKBONES)}")
        if self.image_size % self.stride:
            raise ValueError(f"image_size={self.image_size} must be a multiple of the "
                             f"backbone stride {self.stride}")
        for name, value, ok in (("head", self.head, ("fc", "conv")),
                                ("conf_target", self.conf_target, ("iou", "one")),
                                ("optimizer", self.optimizer, ("sgd", "adam"))):
            if value not in ok:
                raise ValueError(f"{name}={value!r} must be one of {ok}")
        if not 0 < self.min_object <= self.max_object < self.image_size:
            raise ValueError(f"need 0 < min_object <= max_object < image_size, got "
                             f"{self.min_object}, {self.max_object}, {self.image_size}")
        for name in ("num_boxes", "batch_size", "total_steps", "eval_images", "fc_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


PRESETS = {
    # CPU: SHAPES-64, S=8, B=2, conv head (the catalog's CI setting).
    "quick": dict(image_size=64, backbone="tiny", head="conv", batch_norm=True,
                  optimizer="adam", lr=2e-3, batch_size=32, total_steps=600, colours=1,
                  max_objects=4, min_object=8, max_object=28, photo_backgrounds=False,
                  eval_images=300, shift_conv=True),
    "paper": dict(),
}

# --- NETWORKS ---

# (channels, kernel, stride) convs with leaky ReLU 0.1, "M": 2x2 max-pool ([1] Fig. 3).
BACKBONES = {
    "paper": ((64, 7, 2), "M", (192, 3, 1), "M",
              (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), "M",
              *((256, 1, 1), (512, 3, 1)) * 4, (512, 1, 1), (1024, 3, 1), "M",
              *((512, 1, 1), (1024, 3, 1)) * 2, (1024, 3, 1), (1024, 3, 2),
              (1024, 3, 1), (1024, 3, 1)),
    "tiny": ((16, 3, 1), "M", (32, 3, 1), "M", (64, 3, 1), "M", (128, 3, 1), (128, 3, 1)),
}


class YOLO(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, images, train: bool = False):
        cfg = self.cfg
        x = images.astype(jnp.float32) / 255.0
        for layer in BACKBONES[cfg.backbone]:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            c, k, s = layer
            x = Conv(max(8, int(c * cfg.width)), k, s, cfg.shift_conv,
                     use_bias=not cfg.batch_norm)(x)
            if cfg.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.leaky_relu(x, 0.1)
        b, g = x.shape[0], cfg.grid
        d = 5 * cfg.num_boxes + cfg.num_classes
        if cfg.head == "conv":
            return Conv(d, 1, shift=cfg.shift_conv)(x)  # (B, S, S, 5B+K)
        x = nn.leaky_relu(nn.Dense(cfg.fc_hidden)(x.reshape(b, -1)), 0.1)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        return nn.Dense(g * g * d)(x).reshape(b, g, g, d)  # (B, S, S, 5B+K), linear


# --- LOSS ---


def split_output(out, num_boxes: int):
    """(..., S, S, 5B+K) -> boxes (..., S, S, B, 4) as (x, y, sqrt w, sqrt h) or (x, y, w,
    h), confidences (..., S, S, B), class probabilities (..., S, S, K)."""
    boxes = out[..., :5 * num_boxes].reshape(*out.shape[:-1], num_boxes, 5)
    return boxes[..., :4], boxes[..., 4], out[..., 5 * num_boxes:]


def decode(box, sqrt_wh: bool = True):
    """Cell-relative (x, y, sqrt w, sqrt h) on an S x S grid (..., S, S, B, 4) -> cxcywh in
    units of the image."""
    s = box.shape[-3]
    row, col = jnp.meshgrid(jnp.arange(s), jnp.arange(s), indexing="ij")
    cx = (box[..., 0] + col[:, :, None]) / s
    cy = (box[..., 1] + row[:, :, None]) / s
    wh = jnp.square(box[..., 2:]) if sqrt_wh else jnp.maximum(box[..., 2:], 0.0)
    return jnp.concatenate([cx[..., None], cy[..., None], wh], -1)


def build_targets(gt_boxes, gt_labels, s: int, num_classes: int):
    """Targets of one image: gt_boxes (M, 4) cxcywh in units of the image, labels (M,)
    (-1 padding). The cell holding a centre is responsible for the object. Returns per
    cell: obj (S, S), xy offset in the cell (S, S, 2), box cxcywh (S, S, 4), one-hot class
    (S, S, K)."""
    valid = gt_labels >= 0
    col = jnp.clip(jnp.floor(gt_boxes[:, 0] * s), 0, s - 1).astype(jnp.int32)
    row = jnp.clip(jnp.floor(gt_boxes[:, 1] * s), 0, s - 1).astype(jnp.int32)
    xy = gt_boxes[:, :2] * s - jnp.stack([col, row], -1)
    idx = (jnp.where(valid, row, s), col)  # padding rows scatter out of range: dropped
    _, put = bx.cell_owner(idx, valid, (s, s))  # one object per cell: the last one
    onehot = jax.nn.one_hot(jnp.maximum(gt_labels, 0), num_classes)
    return dict(obj=put(valid), xy=put(xy), box=put(gt_boxes), cls=put(onehot))


def responsible_box(pred_cxcywh, gt_cxcywh):
    """1^obj_ij selection: among the B predicted boxes of a cell (..., B, 4), the one with
    the highest IoU with the cell's truth (..., 4); when no box overlaps the truth (every
    IoU 0, as early in training), the one of lowest RMSE over (x, y, w, h) in image units,
    as darknet's detection_layer.c breaks the tie. Computed without gradient. Returns the
    IoUs (..., B) and the one-hot choice (..., B)."""
    pred_cxcywh = jax.lax.stop_gradient(pred_cxcywh)
    ious = bx.iou_aligned(bx.cxcywh_to_xyxy(pred_cxcywh),
                          bx.cxcywh_to_xyxy(gt_cxcywh)[..., None, :])
    rmse = jnp.sqrt(jnp.sum(jnp.square(pred_cxcywh - gt_cxcywh[..., None, :]), -1))
    best = jnp.where(ious.max(-1) > 0, jnp.argmax(ious, -1), jnp.argmin(rmse, -1))
    return ious, jax.nn.one_hot(best, ious.shape[-1])


def yolo_loss(out, gt_boxes, gt_labels, cfg: Config):
    """[1] Eq. 3 on raw outputs (N, S, S, 5B+K) and ground truth (N, M, 4) cxcywh in units of
    the image; sums over cells and boxes, mean over images. Returns (total, parts)."""
    s = out.shape[1]
    tgt = jax.vmap(lambda g, l: build_targets(g, l, s, cfg.num_classes))(gt_boxes, gt_labels)
    box, conf, probs = split_output(out, cfg.num_boxes)
    ious, choice = responsible_box(decode(box, cfg.sqrt_wh), tgt["box"])
    obj_i = tgt["obj"].astype(jnp.float32)  # 1^obj_i   (N, S, S)
    obj_ij = obj_i[..., None] * choice  # 1^obj_ij  (N, S, S, B)
    size = lambda wh: jnp.sqrt(wh) if cfg.sqrt_wh else wh
    target = jnp.concatenate([tgt["xy"], size(tgt["box"][..., 2:])], -1)[..., None, :]
    sq = jnp.square(box - target)  # (N, S, S, B, 4)
    xy = cfg.lambda_coord * (obj_ij * sq[..., :2].sum(-1)).sum((1, 2, 3))  # Eq. 3 line 1
    wh = cfg.lambda_coord * (obj_ij * sq[..., 2:].sum(-1)).sum((1, 2, 3))  # Eq. 3 line 2
    c_hat = ious if cfg.conf_target == "iou" else jnp.ones_like(ious)
    obj = (obj_ij * jnp.square(conf - c_hat)).sum((1, 2, 3))  # Eq. 3 line 3
    noobj = cfg.lambda_noobj * ((1 - obj_ij) * jnp.square(conf)).sum((1, 2, 3))  # line 4
    cls = (obj_i * jnp.square(probs - tgt["cls"]).sum(-1)).sum((1, 2))  # Eq. 3 line 5
    parts = {"xy": xy.mean(), "wh": wh.mean(), "obj": obj.mean(), "noobj": noobj.mean(),
             "class": cls.mean()}
    return sum(parts.values()), parts


# --- UPDATE ---


@struct.dataclass
class State:
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array


def lr_schedule(cfg: Config):
    """[1] Sec. 2.2: 135 epochs; lr 1e-3 -> 1e-2 over the first epoch, 1e-2 up to epoch 75,
    1e-3 up to 105, 1e-4 up to 135 (as fractions of training). join_schedules restarts the
    second schedule's step count at the warm-up's end, so its boundaries are shifted back."""
    n = cfg.total_steps
    w = max(1, n // 135)
    return optax.join_schedules(
        [optax.linear_schedule(cfg.lr / 10, cfg.lr, w),
         optax.piecewise_constant_schedule(cfg.lr, {75 * n // 135 - w: 0.1,
                                                    105 * n // 135 - w: 0.1})], [w])


def make_optimizer(cfg: Config):
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr)
    sched = lr_schedule(cfg)
    return optax.chain(bx.kernel_weight_decay(cfg.weight_decay),
                       optax.sgd(sched, momentum=0.9))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    variables = YOLO(cfg).init(k_net, x, train=False)
    params = variables["params"]
    return State(params, variables.get("batch_stats", {}), make_optimizer(cfg).init(params),
                 key, jnp.zeros((), jnp.int32))


def draw_batch(key, cfg: Config):
    """SHAPES scenes: uint8 images, cxcywh boxes in units of the image, labels."""
    photos = jnp.asarray(data.sample_photos(cfg.image_size)) if cfg.photo_backgrounds else None
    images, boxes, labels = data.shapes_batch(
        key, cfg.batch_size, cfg.image_size, cfg.max_objects, cfg.min_object, cfg.max_object,
        cfg.colours, photos=photos)
    return images, bx.xyxy_to_cxcywh(boxes / cfg.image_size), labels


def update(state: State, cfg: Config):
    key, k_data, k_drop = jax.random.split(state.key, 3)
    images, gt, labels = draw_batch(k_data, cfg)

    def loss_fn(params):
        out, new = YOLO(cfg).apply({"params": params, "batch_stats": state.batch_stats},
                                   images, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": k_drop})
        loss, parts = yolo_loss(out, gt, labels, cfg)
        return loss, (parts, new.get("batch_stats", {}))

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {"losses/total": loss, **{f"losses/{k}": v for k, v in parts.items()},
               "charts/l2_grads": optax.tree.norm(grads)}
    return State(params, batch_stats, opt_state, key, state.step + 1), metrics


# --- PREDICT / EVALUATE ---


@functools.partial(jax.jit, static_argnames="cfg")
def predict(params, batch_stats, images, cfg: Config):
    """Forward pass; class-specific scores Pr(class | obj) * C ([1] Eq. 2) for every (box,
    class) pair; per-class NMS. Returns xyxy boxes in pixels (N, D, 4), scores (N, D),
    classes (N, D), valid (N, D) with D = max_detections."""
    out = YOLO(cfg).apply({"params": params, "batch_stats": batch_stats}, images)
    box, conf, probs = split_output(out, cfg.num_boxes)
    n, k = out.shape[0], cfg.num_classes
    xyxy = bx.cxcywh_to_xyxy(decode(box, cfg.sqrt_wh)) * cfg.image_size  # (N, S, S, B, 4)
    xyxy = bx.clip_to_image(xyxy, cfg.image_size, cfg.image_size)  # as darknet's output
    scores = conf[..., :, None] * probs[..., None, :]  # (N, S, S, B, K)
    boxes = jnp.repeat(xyxy.reshape(n, -1, 4), k, axis=1)  # (N, S*S*B*K, 4)
    scores = scores.reshape(n, -1)
    classes = jnp.tile(jnp.arange(k), scores.shape[1] // k)

    def one(bo, sc):
        keep, valid = bx.batched_nms(bo, sc, classes, cfg.nms_iou, cfg.max_detections,
                                     cfg.score_threshold)
        return bo[keep], sc[keep], classes[keep], valid

    return jax.vmap(one)(boxes, scores)


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
                    "YOLO v1 predictions on held-out SHAPES scenes", min_score, colour="cyan")


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["mAP50", "mAP", "images_per_s", "losses/total"])


if __name__ == "__main__":
    main()
