"""Procedural top-down tabletop scenes for the visual domain-randomization methods (uniform DR
visual; later RCAN, DeceptionNet, Meta-Sim): a textured table, a target object and up to K
distractors, a directional light, a camera and pixel noise.

A scene is a `Scene` pytree of float parameters. `sample_params(key, ranges)` draws every
field uniformly in [low, high] from a `Scene` of ranges whose leaves have a leading axis of 2
(low, high), built by `make_ranges(style, K)`; a field with low == high is fixed. Integer
choices are floats floored: the texture family `texture` in [0, len(TEXTURES)), shapes in
[0, len(SHAPES)), the number of distractors in [0, K + 1). A range (low, high) must have
low <= high (make_ranges raises otherwise): a point of two values is an np.array, not a tuple.
`render(scene, hw, edge)` returns the (H, W, 3) image (noise_std > 0 adds unclipped Gaussian
noise), the target's (x, y) in table coordinates, its (H, W) bool mask (the target is drawn
last, on top) and the (H, W) int32 label map (0 table, 1 target, 2 + j distractor j).
Gradients: with edge = 0 (hard masks) the image has zero gradient w.r.t. the objects'
positions and sizes (use REINFORCE or finite differences); edge > 0 blends each object's
border over a sigmoid of its signed distance / edge (table units), so the image is
differentiable in them (the mask and labels stay hard).

Aspects (ASPECTS): the Scene fields randomized together (texture, colour, distractors, light,
camera, noise); `restyle(scene, style, aspects)` sets the fields of those aspects to the
style's (low) values and keeps the geometry (target and distractor positions, noise seed):
e.g. a scene and its canonical twin for RCAN-style pairs.

Geometry: view coordinates v in [-1, 1]^2 (v_x right, v_y down, pixel centres); the camera
maps them to table coordinates p = R(cam_angle) v / cam_zoom + cam_offset; objects live on the
table at centres in table coordinates (half size `size`). Light: the rendered colour is
multiplied by light (1 + light_grad . v) (a linear shading gradient in the image).
No table edge or floor is drawn (the texture fills the view), so nothing in the image fixes
the table frame: camera randomization only adds label noise to the position targets.
Named styles: CANONICAL (plain grey table, red disc, no distractors (dark grey 0.2 when
shown, so they differ from the table), uniform light, no noise) and REAL, the held-out "real"
style: the `rings` texture family (wood) and a side light (light_grad) that RANDOM, the
randomized ranges, never sample.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

TEXTURES = ("stripes", "checker", "noise", "gradient", "rings")
SHAPES = ("disc", "square", "triangle")
GRID = 4  # side of the value-noise grid of the `noise` family


@struct.dataclass
class Scene:
    table: jax.Array  # (3,) first colour of the table texture
    table2: jax.Array  # (3,) second colour of the table texture
    texture: jax.Array  # () family index (floored) into TEXTURES
    tex_freq: jax.Array  # () cycles over the table's width
    tex_angle: jax.Array  # () orientation of the texture, radians
    tex_grid: jax.Array  # (GRID, GRID) values of the `noise` family
    target_xy: jax.Array  # (2,) target centre (x, y), table coordinates
    target_size: jax.Array  # () half size
    target_colour: jax.Array  # (3,)
    target_shape: jax.Array  # () index (floored) into SHAPES
    distractor_xy: jax.Array  # (K, 2)
    distractor_size: jax.Array  # (K,)
    distractor_colour: jax.Array  # (K, 3)
    distractor_shape: jax.Array  # (K,)
    num_distractors: jax.Array  # () floored: distractors 0 .. n - 1 are drawn
    light: jax.Array  # () brightness
    light_grad: jax.Array  # (2,) shading slope over view coordinates
    cam_offset: jax.Array  # (2,) table point under the image centre
    cam_zoom: jax.Array  # ()
    cam_angle: jax.Array  # () radians
    noise_std: jax.Array  # () std of the additive Gaussian pixel noise
    noise_seed: jax.Array  # () in [0, 1): seeds the pixel noise


def field_shapes(k: int) -> dict:
    """Shape of every Scene field with K = k distractors."""
    return dict(table=(3,), table2=(3,), texture=(), tex_freq=(), tex_angle=(),
                tex_grid=(GRID, GRID), target_xy=(2,), target_size=(), target_colour=(3,),
                target_shape=(), distractor_xy=(k, 2), distractor_size=(k,),
                distractor_colour=(k, 3), distractor_shape=(k,), num_distractors=(),
                light=(), light_grad=(2,), cam_offset=(2,), cam_zoom=(), cam_angle=(),
                noise_std=(), noise_seed=())


# Styles: field -> (low, high), or a value (low = high), broadcast to the field's shape.
TARGET = dict(target_xy=(-0.7, 0.7), target_size=(0.16, 0.2), distractor_xy=(-0.8, 0.8),
              noise_seed=(0.0, 1.0), tex_grid=(0.0, 1.0))
CANONICAL = dict(TARGET, table=0.5, table2=0.5, texture=0.0, tex_freq=1.0, tex_angle=0.0,
                 target_colour=np.array([0.9, 0.15, 0.1]), target_shape=0.0,
                 distractor_size=0.15, distractor_colour=0.2, distractor_shape=1.0,
                 num_distractors=0.0, light=1.0, light_grad=0.0, cam_offset=0.0,
                 cam_zoom=1.0, cam_angle=0.0, noise_std=0.0)
RANDOM = dict(CANONICAL, table=(0.0, 1.0), table2=(0.0, 1.0), texture=(0.0, 4.0),
              tex_freq=(1.0, 6.0), tex_angle=(0.0, np.pi),
              target_colour=(np.array([0.6, 0.0, 0.0]), np.array([1.0, 0.4, 0.4])),
              distractor_size=(0.1, 0.2), distractor_colour=(0.0, 1.0),
              distractor_shape=(1.0, 3.0), num_distractors=(0.0, 1e9), light=(0.5, 1.3),
              light_grad=(-0.3, 0.3), cam_offset=(-0.05, 0.05), cam_zoom=(0.9, 1.1),
              cam_angle=(-0.1, 0.1), noise_std=(0.0, 0.05))
"""Uniform DR ranges (num_distractors up to K: high is clipped to K + 1 by make_ranges);
`texture` in [0, 4): never the rings family; light_grad within +-0.3; the target stays
reddish (its colour jittered), distractors take any colour."""
REAL = dict(CANONICAL, table=np.array([0.55, 0.35, 0.2]), table2=np.array([0.35, 0.2, 0.1]),
            texture=4.0, tex_freq=3.0, tex_angle=0.3, distractor_colour=(0.2, 0.8),
            distractor_shape=(1.0, 3.0), num_distractors=3.0, light=0.9,
            light_grad=np.array([0.45, 0.35]), noise_std=0.02)
"""The held-out "real" style: wood rings, a side light, 3 distractors (min(3, K)), a red disc
target."""


ASPECTS = {  # aspect -> the Scene fields it randomizes (the rest is geometry and noise seed)
    "texture": ("table", "table2", "texture", "tex_freq", "tex_angle"),
    "colour": ("target_colour", "distractor_colour"),
    "distractors": ("num_distractors", "distractor_size", "distractor_shape"),
    "light": ("light", "light_grad"),
    "camera": ("cam_offset", "cam_zoom", "cam_angle"),
    "noise": ("noise_std",),
}


def make_ranges(style: dict, k: int) -> Scene:
    """A Scene of (2, *shape) leaves (low, high) from a style dict with K = k distractors.
    A tuple is a range (low, high) and must have low <= high everywhere."""
    out = {}
    for name, shape in field_shapes(k).items():
        v = style[name]
        lo, hi = (v if isinstance(v, tuple) else (v, v))
        if isinstance(v, tuple) and (len(v) != 2 or np.any(np.asarray(lo) > np.asarray(hi))):
            raise ValueError(f"{name}={v}: a tuple is a range (low, high) with low <= high; "
                             "write a point of several values as an np.array")
        if name == "num_distractors":
            lo, hi = min(lo, k), min(hi, k + 1)
        out[name] = jnp.stack([jnp.broadcast_to(jnp.asarray(lo, jnp.float32), shape),
                               jnp.broadcast_to(jnp.asarray(hi, jnp.float32), shape)])
    return Scene(**out)


def restyle(scene: Scene, style: dict, aspects=tuple(ASPECTS)) -> Scene:
    """`scene` with the fields of `aspects` set to `style`'s low values (a point for a fixed
    field), broadcast over any leading batch axes; geometry and noise seed kept."""
    k = scene.distractor_xy.shape[-2]
    fixed = make_ranges(style, k)
    fields = [f for a in aspects for f in ASPECTS[a]]
    return scene.replace(**{f: jnp.broadcast_to(getattr(fixed, f)[0], getattr(scene, f).shape)
                            for f in fields})


def sample_params(key, ranges: Scene) -> Scene:
    """Every field uniform in [low, high] (one uniform draw, sliced)."""
    leaves, tree = jax.tree.flatten(ranges)
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    flat = jax.random.uniform(key, (sum(sizes),))
    at = np.cumsum([0] + sizes)
    return tree.unflatten([r[0] + (r[1] - r[0]) * flat[at[i]:at[i + 1]].reshape(r.shape[1:])
                           for i, r in enumerate(leaves)])


def view_coords(hw: tuple[int, int]):
    """(H, W, 2) view coordinates (v_x, v_y) in [-1, 1] of the pixel centres."""
    h, w = hw
    vy, vx = jnp.meshgrid((jnp.arange(h) + 0.5) * 2 / h - 1, (jnp.arange(w) + 0.5) * 2 / w - 1,
                          indexing="ij")
    return jnp.stack([vx, vy], -1)


def table_coords(scene: Scene, hw: tuple[int, int]):
    """(H, W, 2) table coordinates of the pixel centres: R(angle) v / zoom + offset."""
    c, s = jnp.cos(scene.cam_angle), jnp.sin(scene.cam_angle)
    rot = jnp.array([[c, -s], [s, c]])
    return view_coords(hw) @ rot.T / scene.cam_zoom + scene.cam_offset


def shape_dist(p, xy, size, shape):
    """(H, W) signed distance-like value, <= 0 inside: disc |d| - size, square max|d_i| - size,
    or triangle (circumradius size, pointing up) max_i n_i . d - size / 2, at centre xy; p
    (H, W, 2) table coordinates."""
    d = p - xy
    disc = jnp.sqrt((d ** 2).sum(-1) + 1e-12) - size
    square = jnp.abs(d).max(-1) - size
    normals = jnp.array([[0.0, 1.0], [0.866, -0.5], [-0.866, -0.5]])  # outward, y down
    tri = (d @ normals.T).max(-1) - size / 2
    k = jnp.floor(shape).astype(jnp.int32)
    return jnp.where(k == 0, disc, jnp.where(k == 1, square, tri))


def shape_mask(p, xy, size, shape):
    """(H, W) bool: the inside of the shape (shape_dist <= 0)."""
    return shape_dist(p, xy, size, shape) <= 0


def texture_value(scene: Scene, p):
    """(H, W) texture value in [0, 1] of the family `scene.texture` at table points p."""
    u = p @ jnp.array([jnp.cos(scene.tex_angle), jnp.sin(scene.tex_angle)])
    f = scene.tex_freq
    stripes = 0.5 + 0.5 * jnp.sin(jnp.pi * f * u)
    rot = p @ jnp.array([[jnp.cos(scene.tex_angle), -jnp.sin(scene.tex_angle)],
                         [jnp.sin(scene.tex_angle), jnp.cos(scene.tex_angle)]])
    checker = jnp.mod(jnp.floor(f * rot[..., 0]) + jnp.floor(f * rot[..., 1]), 2.0)
    g = jnp.clip((p + 1.5) / 3 * (GRID - 1), 0, GRID - 1 - 1e-4)  # bilinear value noise
    i, t = jnp.floor(g).astype(jnp.int32), g - jnp.floor(g)
    at = lambda di, dj: scene.tex_grid[i[..., 1] + di, i[..., 0] + dj]
    noise = ((1 - t[..., 1]) * ((1 - t[..., 0]) * at(0, 0) + t[..., 0] * at(0, 1))
             + t[..., 1] * ((1 - t[..., 0]) * at(1, 0) + t[..., 0] * at(1, 1)))
    gradient = jnp.clip(0.5 + 0.35 * u, 0, 1)
    rings = 0.5 + 0.5 * jnp.sin(jnp.pi * f * jnp.sqrt(((p - 0.3) ** 2).sum(-1)))
    k = jnp.clip(jnp.floor(scene.texture).astype(jnp.int32), 0, len(TEXTURES) - 1)
    return jnp.stack([stripes, checker, noise, gradient, rings])[k]


def render(scene: Scene, hw: tuple[int, int], edge: float = 0.0):
    """(image (H, W, 3) float32, target (x, y) in table coordinates (2,), target mask (H, W)
    bool, label map (H, W) int32: 0 table, 1 target, 2 + j distractor j). Distractors are
    drawn in order, the target last (on top). edge > 0: each object covers its pixels with
    weight sigmoid(-dist / edge) (differentiable in position and size); 0: hard masks."""
    p = table_coords(scene, hw)
    t = texture_value(scene, p)[..., None]
    img = (1 - t) * scene.table + t * scene.table2  # (H, W, 3)
    labels = jnp.zeros(hw, jnp.int32)
    n = jnp.floor(scene.num_distractors)

    def draw(img, dist, shown, colour):
        if edge > 0:
            a = jax.nn.sigmoid(-dist / edge) * shown
        else:
            a = ((dist <= 0) & shown).astype(img.dtype)
        return img * (1 - a[..., None]) + a[..., None] * colour

    for j in range(scene.distractor_xy.shape[0]):
        dist = shape_dist(p, scene.distractor_xy[j], scene.distractor_size[j],
                          scene.distractor_shape[j])
        img = draw(img, dist, j < n, scene.distractor_colour[j])
        labels = jnp.where((dist <= 0) & (j < n), 2 + j, labels)
    dist = shape_dist(p, scene.target_xy, scene.target_size, scene.target_shape)
    mask = dist <= 0
    img = draw(img, dist, True, scene.target_colour)
    labels = jnp.where(mask, 1, labels)
    img = jnp.clip(img * scene.light * (1 + view_coords(hw) @ scene.light_grad)[..., None], 0, 1)
    key = jax.random.PRNGKey((scene.noise_seed * 2 ** 24).astype(jnp.int32))
    img = img + scene.noise_std * jax.random.normal(key, img.shape)
    return img.astype(jnp.float32), scene.target_xy, mask, labels
