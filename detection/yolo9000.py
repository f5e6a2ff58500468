"""YOLO9000: joint detection and classification training over a WordTree.

[1] J. Redmon, A. Farhadi. "YOLO9000: Better, Faster, Stronger." CVPR 2017, arXiv:1612.08242
    (Sec. 2 YOLOv2, the detector; Sec. 3 "Stronger": WordTree and joint training).

The detector is YOLOv2 (direct location prediction, k-means anchors, BN, passthrough), and
its network pieces are imported from detection/yolo_v2.py (copy both files with common/);
only the class term changes: one logit per node of a WordTree, a softmax within each
sibling group (co-hyponyms), and products of conditionals along the path ([1] Sec. 3):

    Pr(n | parent(n)) = softmax over the siblings of n of the logits          [1] Sec. 3
    Pr(n | object) = prod_{a in path(root -> n)} Pr(a | parent(a))            [1] Sec. 3
    Pr(n) = sigma(t_o) * Pr(n | object)           (sigma(t_o): the box's objectness)
    label propagation: a sample labelled n is also positive for every ancestor of n
    L_tree(n) = - sum_{a in path(n)} log Pr(a | parent(a))   (CE of each sibling group on
                the path; groups below n get no error: "at or above the label's level")

Detection images: the YOLOv2 loss (as detection/yolo_v2.py) with the class term replaced
by L_tree of the box's label, which may be any node (e.g. only "triangle").
Classification-only images (one image-level label n, no box): the box (cell, anchor) with
the highest sigma(t_o) Pr(n | object) (stop-gradient argmax) gets L_tree(n) and, "assuming
IoU >= .3", BCE(t_o, .3) - H(.3) while sigma(t_o) < .3; nothing else gets gradient. Each
batch mixes both ([1]: ImageNet : COCO = 4 : 1; `cls_fraction`). Inference descends the
tree, taking the most probable child while Pr(n | object) >= `tree_threshold` (darknet's
hierarchy_top_prediction); mAP uses per-leaf scores sigma(t_o) Pr(leaf | object).

TREE-SHAPES (synthetic; WordNet needs a download): root -> {circle, polygon -> {rectangle,
triangle}}, each shape -> its "<colour> <shape>" leaves (SHAPES with colours > 1).
Detection scenes label objects under `coarse_nodes` with that node only (default: "triangle",
so triangle colours never have a box, like [1]'s ImageNet classes without detection data).
Metrics: mAP over all leaves; mAP50_nobox / mAP50_box over leaves without / with boxes.

Reproduce (CPU, TREE-SHAPES-64, 3 colours, tiny backbone, 16 + 16 images per update):
    python detection/yolo9000.py --preset quick
    measured (300 held-out scenes, seed 0): leaf mAP@0.5 0.916, mAP@[.5:.95] 0.497; no-box
    leaves 0.912, box leaves 0.918; 199 CPU-s with compile (650 s wall on the 2-core CPU
    under load 9-13 from other jobs); predict 131 images/s under that load.
    test gate (8 + 8 images x 300 updates, 100 held-out scenes, seed 0): leaf mAP@0.5
    0.553 (no-box leaves 0.557, box leaves 0.550), mAP@[.5:.95] 0.235; x/y-swapped targets
    0.360; detection-only (the same 8 scenes, no classification images): no-box 0.175.
Paper scale (GPU; DarkNet-19 at 416, 8 colours, photo backgrounds, 4:1 classification):
    python detection/yolo9000.py --preset paper
[1] Sec. 3: 19.7 mAP on ImageNet detection (200 classes, 44 with COCO detection data);
16.0 mAP on the 156 classes without any detection data.

Differences from the paper:
- A synthetic 3-level WordTree over shape x colour instead of WordNet's 9418 nodes; SHAPES
  scenes instead of COCO + ImageNet; no ImageNet pre-training. Classification images are
  single SHAPES objects at the detection scale and input size.
- quick: a 3-pool conv-BN-leaky backbone (stride 8), Adam; paper: DarkNet-19, SGD as
  YOLOv2. No multi-scale training. Anchors are hard-coded, from YOLOv2's k-means with
  d = 1 - IoU (yolo_v2.kmeans_iou, k = 3 as YOLO9000's 3 priors), in units of the image.
- quick picks a classification image's box by objectness alone (cls_box="objectness"), not
  by [1]'s max sigma(t_o) Pr(label | object) (cls_box="class": the default and paper). From
  scratch, [1]'s rule lets an anchor that already favours a label win the selection for it
  (self-confirming label-specialist anchors). No-box leaf mAP@0.5 at 8 + 8 images/update:
  0.255 at 300 updates, 0.417 at 750 with [1]'s rule; 0.557 at 300, 0.754 at 450 by
  objectness. [1] starts from an ImageNet classifier that already finds the object.
- Objectness BCE toward IoU (stop-gradient) and the tree CE replace darknet's squared
  errors. Darknet's region layer also puts the no-object term on every box of a
  classification image, and later versions zero the .3 delta; we follow the paper's text.
"""

import functools
import time
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
from detection.yolo_v2 import BACKBONES, ConvBN, space_to_depth

EVAL_SEED = 10_009  # held-out scenes; training keys come from the runner's PRNGKey(seed)
COLOUR_NAMES = ("red", "blue", "green", "yellow", "magenta", "cyan", "orange", "white")
# k-means-IoU anchors (k=3) from yolo_v2.kmeans_iou on the boxes of 1000 SHAPES-64 scenes
# (8..28 px, mean best IoU 0.713) and of 300 SHAPES-416 photo scenes (16..200 px, 0.566).
ANCHORS_64 = (0.2825, 0.1704, 0.1839, 0.317, 0.3546, 0.337)
ANCHORS_416 = (0.2489, 0.1011, 0.1035, 0.3106, 0.3434, 0.3249)

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """YOLO9000 on TREE-SHAPES; defaults are [1]'s where they apply (3 anchors, 416 px,
    DarkNet-19, 4:1 classification : detection images, IoU .3 assumption)."""

    image_size: int = 416
    """side of the scenes (detection and classification images)"""
    backbone: str = "darknet19"
    """darknet19 (the paper's) or tiny (3 x conv-BN-leaky + max-pool, stride 8)"""
    width: float = 1.0
    """multiplier of every backbone channel count"""
    head_convs: int = 2
    """3x3 convs of `head_channels` after the backbone, before the passthrough"""
    head_channels: int = 1024
    """channels of the head's 3x3 convs"""
    passthrough_channels: int = 64
    """1x1 conv width on the fine map before space-to-depth (0: raw features)"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients in lax.scan on CPU"""
    num_anchors: int = 3
    """anchors per cell ([1] Sec. 3: YOLO9000 uses 3 priors)"""
    anchors: tuple[float, ...] = ANCHORS_416
    """flat (w, h) pairs in units of the image (k-means-IoU, see ANCHORS_*)"""
    colours: int = 8
    """SHAPES classes are 3 shapes x colours colours: the WordTree's leaves"""
    polygon_node: bool = True
    """an internal node 'polygon' over rectangle and triangle (a three-level tree)"""
    coarse_nodes: tuple[str, ...] = ("triangle",)
    """detection boxes under these nodes are labelled with the node only (no fine label)"""
    cls_fraction: float = 0.8
    """share of each batch that is classification-only images ([1]: ImageNet : COCO 4:1)"""
    cls_box: str = "class"
    """classification images' box: class ([1]: max sigma(t_o) Pr(label)) or objectness"""
    iou_assumed: float = 0.3
    """classification images: assumed IoU of the best box, its objectness target floor"""
    tree_threshold: float = 0.5
    """descend the tree while Pr(node | object) stays above this"""
    lambda_coord: float = 5.0
    """weight of the box terms"""
    lambda_obj: float = 1.0
    """weight of the objectness term of responsible anchors (and of the .3 term)"""
    lambda_noobj: float = 0.5
    """weight of the no-object term"""
    lambda_class: float = 1.0
    """weight of the WordTree class term (detection and classification images)"""
    ignore_iou: float = 0.6
    """no no-object penalty for predictions overlapping some ground truth by more"""
    optimizer: str = "sgd"
    """sgd (momentum 0.9, weight decay, step schedule) or adam"""
    lr: float = 1e-3
    """learning rate"""
    weight_decay: float = 5e-4
    """L2 weight decay on kernels, added to the gradient as darknet does (sgd only)"""
    batch_size: int = 64
    """images per update (detection + classification)"""
    total_steps: int = 40_000
    """updates"""
    max_objects: int = 12
    """objects per detection scene at most"""
    min_object: int = 16
    """smallest object side in px"""
    max_object: int = 200
    """largest object side in px"""
    photo_backgrounds: bool = True
    """paste the objects on crops of scikit-learn's sample photos"""
    eval_images: int = 500
    """held-out detection scenes (fine leaf labels) for mAP"""
    score_threshold: float = 0.005
    """detections below this score are dropped before NMS"""
    nms_iou: float = 0.45
    """IoU above which NMS suppresses a lower-scored box of the same class"""
    pre_nms_topk: int = 300
    """candidates (box, class) kept by score before NMS"""
    max_detections: int = 100
    """detections per image after NMS"""

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    @property
    def cls_images(self) -> int:
        return int(round(self.cls_fraction * self.batch_size))

    def validate(self):
        for name, ok in (("backbone", tuple(BACKBONES)), ("optimizer", ("sgd", "adam")),
                         ("cls_box", ("class", "objectness"))):
            if getattr(self, name) not in ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {ok}")
        if self.image_size % (stride := 2 ** BACKBONES[self.backbone].count("M")):
            raise ValueError(f"image_size={self.image_size} must be a multiple of the "
                             f"backbone stride {stride}")
        if len(self.anchors) != 2 * self.num_anchors:
            raise ValueError(f"anchors has {len(self.anchors)} numbers; need 2 * num_anchors "
                             f"= {2 * self.num_anchors}")
        if not 1 <= self.colours <= len(COLOUR_NAMES):
            raise ValueError(f"colours={self.colours} must be in [1, {len(COLOUR_NAMES)}]")
        names = shapes_tree(self.colours, self.polygon_node)[0].names
        if bad := [n for n in self.coarse_nodes if n not in names]:
            raise ValueError(f"coarse_nodes={bad} are not a node of the tree {names}")
        if not 0.0 <= self.cls_fraction < 1.0 or self.cls_images >= self.batch_size:
            raise ValueError(f"cls_fraction={self.cls_fraction} must leave >= 1 detection "
                             f"image in batch_size={self.batch_size}")
        if not 0 < self.min_object <= self.max_object < self.image_size:
            raise ValueError(f"need 0 < min_object <= max_object < image_size, got "
                             f"{self.min_object}, {self.max_object}, {self.image_size}")
        for name in ("batch_size", "total_steps", "num_anchors", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


PRESETS = {
    # CPU: TREE-SHAPES-64 with 3 colours (9 leaves, 13 nodes), 8 x 8 grid, half the batch
    # classification images, triangles' colours only from classification data.
    "quick": dict(image_size=64, backbone="tiny", head_convs=0, head_channels=128,
                  passthrough_channels=16, shift_conv=True, anchors=ANCHORS_64, colours=3,
                  cls_fraction=0.5, cls_box="objectness", optimizer="adam", lr=2e-3, batch_size=32,
                  total_steps=600, max_objects=4, min_object=8, max_object=28,
                  photo_backgrounds=False, eval_images=300),
    "paper": dict(),
}

# --- WORDTREE ---


class WordTree:
    """A label tree given by parent indices (-1: a child of the root; parents before
    children). Sibling groups are the children of one node; `ancestors[n, m]` is 1 where m
    is on the path root -> n (n included): row n is the propagated multi-hot label of n."""

    def __init__(self, names, parent):
        self.names, self.parent = list(names), np.asarray(parent, np.int32)
        n = len(self.names)
        if any(p >= i for i, p in enumerate(self.parent)):
            raise ValueError("every parent index must precede its child")
        keys = list(dict.fromkeys(self.parent.tolist()))  # one sibling group per parent
        self.group = np.array([keys.index(p) for p in self.parent], np.int32)
        self.num_groups = len(keys)
        self.ancestors = np.zeros((n, n), np.float32)
        for i in range(n):
            j = i
            while j >= 0:
                self.ancestors[i, j], j = 1.0, self.parent[j]
        self.depth = int(self.ancestors.sum(1).max())
        self.children = np.zeros((n + 1, n), bool)  # row n: the root's children
        self.children[np.where(self.parent >= 0, self.parent, n), np.arange(n)] = True


@functools.lru_cache(maxsize=16)
def shapes_tree(colours: int, polygon: bool = True):
    """TREE-SHAPES: root -> {circle, [polygon ->] {rectangle, triangle}}, each shape ->
    its colour leaves. Returns (tree, leaf node of each SHAPES class id shape + 3 colour)."""
    names = ["circle"] + ["polygon"] * polygon + list(data.SHAPES[1:])
    parent = [-1] * (1 + polygon) + [1 if polygon else -1] * 2
    shape_node = [names.index(s) for s in data.SHAPES]
    leaf = np.arange(len(names), len(names) + 3 * colours, dtype=np.int32)  # id s + 3 c
    names += [f"{COLOUR_NAMES[c]} {s}" for c in range(colours) for s in data.SHAPES]
    parent += [shape_node[s] for _ in range(colours) for s in range(3)]
    return WordTree(names, parent), leaf


def tree_of(cfg: Config):
    """(tree, leaf node per class id, detection label node per class id)."""
    tree, leaf = shapes_tree(cfg.colours, cfg.polygon_node)
    coarse = [tree.names.index(n) for n in cfg.coarse_nodes]
    det = leaf.copy()
    for k, n in enumerate(leaf):  # the highest coarse node on the leaf's path, if any
        on_path = [c for c in coarse if tree.ancestors[n, c]]
        if on_path:
            det[k] = min(on_path, key=lambda c: tree.ancestors[c].sum())
    return tree, leaf, det


def tree_log_softmax(logits, tree: WordTree):
    """log Pr(node | parent) (..., N): a log-softmax within every sibling group ([1] Sec.
    3), as a segment softmax over the last axis."""
    g, k = jnp.asarray(tree.group), tree.num_groups
    x = jnp.moveaxis(logits, -1, 0)  # (N, ...)
    m = jax.lax.stop_gradient(jax.ops.segment_max(x, g, k))
    z = x - m[g]
    lse = jnp.log(jax.ops.segment_sum(jnp.exp(z), g, k))
    return jnp.moveaxis(z - lse[g], 0, -1)


def tree_log_prob(log_cond, tree: WordTree):
    """log Pr(node | object) = sum over the path root -> node of log Pr(a | parent(a))."""
    return log_cond @ jnp.asarray(tree.ancestors.T)


def tree_nll(log_cond, label, tree: WordTree):
    """L_tree: -sum_{a in path(label)} log Pr(a | parent(a)); label propagation up the tree
    (ancestors row), nothing below the label. label -1 (none): 0."""
    path = jnp.asarray(tree.ancestors)[jnp.maximum(label, 0)]
    return -(path * log_cond).sum(-1) * (label >= 0)


def descend(log_cond, tree: WordTree, threshold: float):
    """[1] Sec. 3 inference: from the root take the most probable child at every split
    while Pr(node | object) stays >= threshold; the root's best child is always taken (as
    darknet's hierarchy_top_prediction). (..., N) -> node index (...)."""
    logp = tree_log_prob(log_cond, tree)
    ch = jnp.asarray(tree.children)
    pick = lambda mask: jnp.argmax(jnp.where(mask, log_cond, -jnp.inf), -1)
    node = pick(ch[-1])
    for _ in range(tree.depth - 1):
        mask = ch[node]
        best = pick(mask)
        p = jnp.take_along_axis(logp, best[..., None], -1)[..., 0]
        node = jnp.where(mask.any(-1) & (p >= np.log(threshold)), best, node)
    return node


# --- NETWORK (YOLOv2-style) ---

# DarkNet-19 (BACKBONES), ConvBN and the passthrough's space_to_depth are YOLOv2's, imported
# from detection/yolo_v2.py: YOLO9000 is that network with a WordTree output.


class YOLO9000(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, images, train: bool = False):
        cfg, s = self.cfg, self.cfg.shift_conv
        x, fine = images.astype(jnp.float32) / 255.0, None
        for layer in BACKBONES[cfg.backbone]:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            elif layer == "P":
                fine = x
            else:
                c, k = layer if isinstance(layer, tuple) else (layer, 3)
                x = ConvBN(max(8, int(c * cfg.width)), k, s)(x, train)
        for _ in range(cfg.head_convs):
            x = ConvBN(cfg.head_channels, shift=s)(x, train)
        if cfg.passthrough_channels > 0:
            fine = ConvBN(cfg.passthrough_channels, 1, s)(fine, train)
        x = ConvBN(cfg.head_channels, shift=s)(jnp.concatenate([space_to_depth(fine), x], -1),
                                               train)
        n = len(tree_of(cfg)[0].names)  # per anchor: t_x, t_y, t_w, t_h, t_o, one logit/node
        out = Conv(cfg.num_anchors * (5 + n), 1, shift=s)(x)
        b, g = out.shape[0], out.shape[1]
        return out.reshape(b, g, g, cfg.num_anchors, 5 + n)  # (B, S, S, A, 5+N)


# --- LOSS ---


decode = bx.decode_grid  # [1] Sec. 2: direct location prediction (common/boxes)


def build_targets(gt_boxes, gt_nodes, anchors, s: int):
    """Targets of one detection image: gt_boxes (M, 4) cxcywh in units of the image,
    gt_nodes (M,) WordTree label nodes (-1 padding). Each box goes to the cell of its
    centre and the anchor of best shape IoU. Returns (S, S, A) arrays: resp, xy (offset in
    the cell), twh (log(g/p)), node, box."""
    a = anchors.shape[0]
    valid = gt_nodes >= 0
    col = jnp.clip(jnp.floor(gt_boxes[:, 0] * s), 0, s - 1).astype(jnp.int32)
    row = jnp.clip(jnp.floor(gt_boxes[:, 1] * s), 0, s - 1).astype(jnp.int32)
    inter = (jnp.minimum(gt_boxes[:, None, 2], anchors[None, :, 0])
             * jnp.minimum(gt_boxes[:, None, 3], anchors[None, :, 1]))
    union = (gt_boxes[:, 2] * gt_boxes[:, 3])[:, None] + anchors.prod(-1)[None] - inter
    best = jnp.argmax(inter / union, axis=1)
    idx = (jnp.where(valid, row, s), col, best)  # padding scatters out of range: dropped
    owner, put = bx.cell_owner(idx, valid, (s, s, a))  # two boxes on one anchor: the last
    xy = gt_boxes[:, :2] * s - jnp.stack([col, row], -1)
    twh = jnp.log(jnp.maximum(gt_boxes[:, 2:], 1e-6) / anchors[best])
    node = jnp.where(owner >= 0, gt_nodes[jnp.maximum(owner, 0)], -1)
    return dict(resp=put(valid), xy=put(xy), twh=put(twh), node=node, box=put(gt_boxes))


def detection_loss(out, gt_boxes, gt_nodes, anchors, tree, cfg: Config):
    """YOLOv2 loss with the WordTree class term, per image (B,) parts:
    l_coord sum_resp [(sig(t_xy) - xy^)^2 + (t_wh - log(wh/p))^2]
    + l_obj sum_resp BCE(t_o, IoU) + l_noobj sum_{not resp, IoU <= .6} BCE(t_o, 0)
    + l_class sum_resp L_tree(label node)."""
    s = out.shape[1]
    tgt = jax.vmap(lambda g, n: build_targets(g, n, anchors, s))(gt_boxes, gt_nodes)
    resp = tgt["resp"].astype(jnp.float32)
    pred_xyxy = jax.lax.stop_gradient(bx.cxcywh_to_xyxy(decode(out[..., :4], anchors)))
    ious = jax.vmap(lambda p, g: bx.iou(p.reshape(-1, 4), g))(pred_xyxy,
                                                              bx.cxcywh_to_xyxy(gt_boxes))
    ious = jnp.where(gt_nodes[:, None, :] >= 0, ious, 0.0).max(-1).reshape(resp.shape)
    noobj = (1.0 - resp) * (ious <= cfg.ignore_iou)
    d_xy = jnp.square(jax.nn.sigmoid(out[..., :2]) - tgt["xy"]).sum(-1)
    d_wh = jnp.square(out[..., 2:4] - tgt["twh"]).sum(-1)
    bce = optax.sigmoid_binary_cross_entropy
    iou_gt = bx.iou_aligned(pred_xyxy, bx.cxcywh_to_xyxy(tgt["box"]))
    nll = tree_nll(tree_log_softmax(out[..., 5:], tree), tgt["node"], tree)
    per = lambda x: x.sum((1, 2, 3))
    return {"coord": cfg.lambda_coord * per(resp * (d_xy + d_wh)),
            "obj": cfg.lambda_obj * per(resp * bce(out[..., 4], iou_gt)),
            "noobj": cfg.lambda_noobj * per(noobj * bce(out[..., 4], jnp.zeros_like(iou_gt))),
            "class": cfg.lambda_class * per(resp * nll)}


def classification_loss(out, nodes, tree, cfg: Config):
    """[1] Sec. 3, classification-only images (label node per image (B,), -1: none): the box
    with the highest sigma(t_o) Pr(node | object) gets L_tree(node) and, assuming IoU >= .3
    with the unseen truth, BCE(t_o, .3) - H(.3) while sigma(t_o) < .3. Per image (B,) parts."""
    log_cond = tree_log_softmax(out[..., 5:], tree)
    logp = tree_log_prob(log_cond, tree)  # (B, S, S, A, N)
    lab = jnp.maximum(nodes, 0)[:, None, None, None, None]
    score = jax.nn.log_sigmoid(out[..., 4])
    if cfg.cls_box == "class":
        score = score + jnp.take_along_axis(logp, lab, -1)[..., 0]
    flat = jax.lax.stop_gradient(score).reshape(out.shape[0], -1)
    best = jax.nn.one_hot(jnp.argmax(flat, -1), flat.shape[1]).reshape(score.shape)
    best = best * (nodes >= 0)[:, None, None, None]
    nll = tree_nll(log_cond, nodes[:, None, None, None], tree)
    low = jax.nn.sigmoid(out[..., 4]) < cfg.iou_assumed
    q = cfg.iou_assumed  # BCE(t_o, q) - H(q): the KL to q, zero at sigma(t_o) = q
    kl = optax.sigmoid_binary_cross_entropy(out[..., 4], q) + q * np.log(q) + (1 - q) * np.log1p(-q)
    obj = jnp.where(low, kl, 0.0)
    return {"cls_only_class": cfg.lambda_class * (best * nll).sum((1, 2, 3)),
            "cls_only_obj": cfg.lambda_obj * (best * obj).sum((1, 2, 3))}


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
    n = cfg.total_steps  # YOLOv2's SGD: momentum .9, decay 5e-4, lr / 10 at 3/8 and 9/16
    sched = optax.piecewise_constant_schedule(cfg.lr, {3 * n // 8: 0.1, 9 * n // 16: 0.1})
    return optax.chain(bx.kernel_weight_decay(cfg.weight_decay),
                       optax.sgd(sched, momentum=0.9))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    variables = YOLO9000(cfg).init(k_net, x, train=False)
    params = variables["params"]
    return State(params, variables["batch_stats"], make_optimizer(cfg).init(params), key,
                 jnp.zeros((), jnp.int32))


def draw_batch(key, cfg: Config):
    """Detection scenes (cxcywh boxes in units of the image, label nodes, coarse where
    `coarse_nodes` says) then classification images (one object, leaf node, no box)."""
    _, leaf, det = tree_of(cfg)
    photos = jnp.asarray(data.sample_photos(cfg.image_size)) if cfg.photo_backgrounds else None
    n_cls = cfg.cls_images
    k_det, k_cls = jax.random.split(key)
    make = lambda k, n, m: data.shapes_batch(k, n, cfg.image_size, m, cfg.min_object,
                                             cfg.max_object, cfg.colours, photos=photos)
    images, boxes, labels = make(k_det, cfg.batch_size - n_cls, cfg.max_objects)
    nodes = jnp.where(labels >= 0, jnp.asarray(det)[jnp.maximum(labels, 0)], -1)
    cls_nodes = jnp.zeros((0,), jnp.int32)
    if n_cls:
        cls_images, _, cls_labels = make(k_cls, n_cls, 1)  # boxes dropped: image labels only
        cls_nodes = jnp.where(cls_labels[:, 0] >= 0, jnp.asarray(leaf)[cls_labels[:, 0]], -1)
        images = jnp.concatenate([images, cls_images])
    return images, bx.xyxy_to_cxcywh(boxes / cfg.image_size), nodes, cls_nodes


def update(state: State, cfg: Config):
    key, k_data = jax.random.split(state.key)
    images, gt, nodes, cls_nodes = draw_batch(k_data, cfg)
    tree, n_det = tree_of(cfg)[0], cfg.batch_size - cfg.cls_images
    anchors = jnp.asarray(cfg.anchors, jnp.float32).reshape(-1, 2)

    def loss_fn(params):
        out, new = YOLO9000(cfg).apply({"params": params, "batch_stats": state.batch_stats},
                                       images, train=True, mutable=["batch_stats"])
        parts = detection_loss(out[:n_det], gt, nodes, anchors, tree, cfg)
        if cfg.cls_images:
            parts |= classification_loss(out[n_det:], cls_nodes, tree, cfg)
        parts = {k: v.sum() / cfg.batch_size for k, v in parts.items()}  # mean over images
        return sum(parts.values()), (parts, new["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    metrics = {"losses/total": loss, **{f"losses/{k}": v for k, v in parts.items()},
               "charts/l2_grads": optax.tree.norm(grads)}
    return State(optax.apply_updates(state.params, upd), batch_stats, opt_state, key,
                 state.step + 1), metrics


# --- PREDICT / EVALUATE ---


def forward(params, batch_stats, images, cfg: Config):
    """xyxy boxes in pixels (B, S*S*A, 4), objectness (B, S*S*A), log Pr(n|parent) (.., N)."""
    out = YOLO9000(cfg).apply({"params": params, "batch_stats": batch_stats}, images)
    b, size = out.shape[0], images.shape[1]
    anchors = jnp.asarray(cfg.anchors, jnp.float32).reshape(-1, 2)
    boxes = bx.cxcywh_to_xyxy(decode(out[..., :4], anchors)).reshape(b, -1, 4) * size
    boxes = bx.clip_to_image(boxes, size, size)  # as darknet's output, before NMS
    log_cond = tree_log_softmax(out[..., 5:], tree_of(cfg)[0]).reshape(b, boxes.shape[1], -1)
    return boxes, jax.nn.sigmoid(out[..., 4]).reshape(b, -1), log_cond


@functools.partial(jax.jit, static_argnames="cfg")
def predict(params, batch_stats, images, cfg: Config):
    """Per-leaf detections for mAP: score(box, class k) = sigma(t_o) Pr(leaf_k | object),
    top-k, per-class NMS. Returns xyxy pixels (B, D, 4), scores, class ids, valid (B, D)."""
    tree, leaf, _ = tree_of(cfg)
    boxes, obj, log_cond = forward(params, batch_stats, images, cfg)
    scores = obj[..., None] * jnp.exp(tree_log_prob(log_cond, tree)[..., leaf])  # (B, R, K)
    return jax.vmap(lambda bo, sc: bx.topk_nms(bo, sc, cfg.pre_nms_topk, cfg.nms_iou,
                                               cfg.max_detections, cfg.score_threshold))(
        boxes, scores)


@functools.partial(jax.jit, static_argnames="cfg")
def predict_tree(params, batch_stats, images, cfg: Config):
    """[1] Sec. 3 inference: class-agnostic NMS on objectness, each box labelled with the
    tree descent's node. Returns boxes, scores, node ids, valid (B, D)."""
    boxes, obj, log_cond = forward(params, batch_stats, images, cfg)
    nodes = descend(log_cond, tree_of(cfg)[0], cfg.tree_threshold)

    def one(bo, sc, nd):
        keep, valid = bx.batched_nms(bo, sc, jnp.zeros_like(nd), cfg.nms_iou,
                                     cfg.max_detections, cfg.score_threshold)
        return bo[keep], sc[keep], nd[keep], valid

    return jax.vmap(one)(boxes, obj, nodes)


def eval_set(cfg: Config) -> dict:
    return data.shapes(cfg.eval_images, cfg.image_size, cfg.max_objects, cfg.min_object,
                       cfg.max_object, cfg.colours, photo_backgrounds=cfg.photo_backgrounds,
                       seed=EVAL_SEED)


@run.host_evaluate
def evaluate(state: State, cfg: Config) -> dict:
    """Leaf mAP@0.5 and mAP@[.5:.95] (COCO 101-point) on held-out scenes with fine labels,
    mAP@0.5 over the leaves without any detection label (under `coarse_nodes`) and over
    the others, and images/s of the jitted predict (after a warm-up call)."""
    d = eval_set(cfg)
    images = jnp.asarray(d["images"])
    out = jax.block_until_ready(predict(state.params, state.batch_stats, images, cfg))
    t0 = time.perf_counter()
    jax.block_until_ready(predict(state.params, state.batch_stats, images, cfg))
    ips = len(images) / (time.perf_counter() - t0)
    b, s, c, v = jax.device_get(out)
    _, leaf, det = tree_of(cfg)
    ap = bx.mean_average_precision(  # per leaf class and IoU threshold .5:.95 (K, 10)
        [(b[i][v[i]], s[i][v[i]], c[i][v[i]]) for i in range(len(b))],
        [(d["boxes"][i][d["labels"][i] >= 0], d["labels"][i][d["labels"][i] >= 0])
         for i in range(len(b))], len(leaf), np.linspace(0.5, 0.95, 10))[1]
    nobox = det != leaf
    sub = lambda m: float(np.nanmean(ap[m, 0])) if m.any() else float("nan")
    metrics = {"mAP50": float(np.nanmean(ap[:, 0])), "mAP": float(np.nanmean(ap))}
    return {**metrics, "mAP50_nobox": sub(nobox), "mAP50_box": sub(~nobox),
            "images_per_s": ips}


def plot_predictions(state: State, cfg: Config, path, n: int = 8, min_score: float = 0.3):
    """Save a PNG of the tree-descent detections (deepest confident node and objectness) on
    n held-out scenes; leaves read as colour initial + shape ('Rtri'), inner nodes 'poly'."""
    d = eval_set(cfg)
    out = predict_tree(state.params, state.batch_stats, jnp.asarray(d["images"][:n]), cfg)
    names = [w[:4] if " " not in w else w[0].upper() + w.split()[1][:3]
             for w in tree_of(cfg)[0].names]
    plot.detections(d["images"][:n], jax.device_get(out), names, path,
                    "YOLO9000 tree-descent predictions on held-out TREE-SHAPES", min_score)


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["mAP50", "mAP", "mAP50_nobox", "mAP50_box",
                                               "images_per_s", "losses/total"])


if __name__ == "__main__":
    main()
