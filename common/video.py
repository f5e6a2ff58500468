"""Procedural videos for the video-based self-supervised methods (arrow of time; later
odd-one-out, tracking triplets, colorization): K sprites over a textured background.

Motion (one step = one frame, units: pixels and frames; y grows downwards):
    constant: p_{t+1} = p_t + v_t, elastic bounces on the walls (|v| is conserved) or
              wrap-around (`wrap`): gravity = 0, restitution = 1.
    gravity:  exact parabolas p_{t+1} = p_t + v_t + a/2, v_{t+1} = v_t + a, a = (g, 0),
              with LOSSY bounces: the floor is hit at the root t* of y + v_y t + g t^2/2 =
              floor, the velocity there is reflected and scaled by the restitution e < 1,
              and the rest of the frame is flown again. Energy per unit mass
                  E = |v|^2 / 2 + g (floor - y)                                  (energy)
              is constant in flight and falls at every bounce, so a reversed clip gains
              energy: the arrow of time is physically visible.
Gravity and restitution are traced numbers (per seed, per video), not static settings.

Outputs (`Video`): frames (T, H, W, C) in [0, 1] (noise_std > 0 adds noise that may leave
[0, 1]: no clipping), masks (T, K, H, W) (each sprite's full
silhouette, occluded or not), ids (T, H, W) the top-most sprite's track id (-1 background),
positions and velocities (T, K, 2) as (y, x). Sprite k is drawn after sprite k - 1.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SHAPES = ("disk", "square")


@dataclass(frozen=True)
class VideoSpec:
    """Static sizes of a procedural video (hashable: a jit closure may hold it)."""

    size: int = 64  # side H = W of the frames, pixels
    num_frames: int = 30  # frames T
    num_sprites: int = 2  # sprites K
    channels: int = 1  # 1: grey levels, 3: a random colour per sprite (grey background)
    radius: tuple[float, float] = (3.0, 6.0)  # range of a sprite's radius (half side), px
    speed: tuple[float, float] = (0.5, 2.0)  # range of the initial speed, px per frame
    wrap: bool = False  # constant motion only (gravity 0): wrap around the borders
    texture: float = 0.4  # amplitude of the background texture (sprites are 0.6-1.0 bright)
    noise_std: float = 0.0  # std of fresh (uniform) pixel noise in every frame (unclipped)


@struct.dataclass
class Video:
    frames: jax.Array  # (T, H, W, C)
    masks: jax.Array  # (T, K, H, W) bool
    ids: jax.Array  # (T, H, W) int32, top-most sprite, -1 where background
    pos: jax.Array  # (T, K, 2) (y, x) centres, px
    vel: jax.Array  # (T, K, 2) (v_y, v_x), px per frame
    radius: jax.Array  # (K,) px


def _bounce(p, v, lo, hi, e):
    """Reflect an axis that left [lo, hi] during the last step (after the step): position
    mirrored about the wall and scaled by e, velocity reversed and scaled by e."""
    below, above = p < lo, p > hi
    p = jnp.where(below, lo + e * (lo - p), jnp.where(above, hi - e * (p - hi), p))
    return jnp.clip(p, lo, hi), jnp.where(below | above, -e * v, v)


def step(p, v, r, size, gravity, restitution, wrap: bool):
    """One frame of motion of one sprite: p, v (2,) (y, x) -> p', v'."""
    g, e, lo, hi = gravity, restitution, r, size - r
    if wrap:
        return jnp.mod(p + v, size), v
    y, vy = p[0] + v[0] + g / 2, v[0] + g  # exact parabola over one frame
    # floor: root t* in (0, 1] of p_y + v_y t + g t^2 / 2 = hi (rationalised, g >= 0)
    disc = jnp.maximum(v[0] ** 2 + 2 * g * (hi - p[0]), 0.0)
    t_hit = 2 * (hi - p[0]) / jnp.maximum(v[0] + jnp.sqrt(disc), 1e-9)
    v_out = -e * (v[0] + g * t_hit)  # reflected, lossy
    tau = 1 - t_hit
    y_f, vy_f = hi + v_out * tau + g * tau ** 2 / 2, v_out + g * tau
    settle = y_f > hi  # a second floor contact in the same frame: at rest on the floor
    y_f, vy_f = jnp.where(settle, hi, y_f), jnp.where(settle, 0.0, vy_f)
    floor = y > hi
    y, vy = jnp.where(floor, y_f, y), jnp.where(floor, vy_f, vy)
    y, vy = _bounce(y, vy, lo, hi, e)  # the ceiling (the floor case is already inside)
    x, vx = _bounce(p[1] + v[1], v[1], lo, hi, e)
    return jnp.stack([y, x]), jnp.stack([vy, vx])


def simulate(p0, v0, r, spec: VideoSpec, gravity, restitution):
    """Trajectories of K sprites: p0, v0 (K, 2), r (K,) -> pos, vel (T, K, 2)."""
    one = lambda p, v, rr: step(p, v, rr, spec.size, gravity, restitution, spec.wrap)

    def body(carry, _):
        p, v = jax.vmap(one)(*carry, r)
        return (p, v), (p, v)

    _, (ps, vs) = jax.lax.scan(body, (p0, v0), None, spec.num_frames - 1)
    return jnp.concatenate([p0[None], ps]), jnp.concatenate([v0[None], vs])


def energy(video: Video, size: int, gravity):
    """(T, K) energy per unit mass |v|^2 / 2 + g (floor - y), floor = size - r."""
    return 0.5 * (video.vel ** 2).sum(-1) + gravity * (size - video.radius - video.pos[..., 0])


def silhouettes(pos, r, shape, spec: VideoSpec):
    """(K, H, W) bool masks of the sprites at centres pos (K, 2): disks or squares of
    radius (half side) r, pixel centres at i + 0.5; periodic distances when `wrap`."""
    grid = jnp.arange(spec.size) + 0.5
    d = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"), -1)[None] - pos[:, None, None]
    if spec.wrap:
        d = jnp.mod(d + spec.size / 2, spec.size) - spec.size / 2  # (K, H, W, 2)
    disk = (d ** 2).sum(-1) <= r[:, None, None] ** 2
    square = jnp.abs(d).max(-1) <= r[:, None, None]
    return jnp.where((shape == 0)[:, None, None], disk, square)


def background(u_coarse, u_fine, spec: VideoSpec):
    """(H, W, C) texture from uniforms: coarse 4x4 noise (4, 4, C) upsampled (bilinear)
    plus fine per-pixel grain (H, W, C)."""
    s = spec.size
    m = np.clip(1 - np.abs((np.arange(s) + 0.5) * 4 / s - 0.5 - np.arange(4)[:, None]), 0, 1).T
    m = jnp.asarray(m / m.sum(1, keepdims=True))  # (S, 4) interpolation weights, edges clamped
    coarse = jnp.einsum("ya,abc,xb->yxc", m, u_coarse, m)
    return spec.texture * (0.6 * coarse + 0.4 * u_fine)


def make_video(key, spec: VideoSpec, gravity=0.0, restitution=1.0) -> Video:
    """A random video: K sprites (random shape, size, brightness or colour) at random places
    inside the frame with random velocities (under gravity: vertically at a uniform time of
    a random bounce orbit), moving under `gravity` (px / frame^2) with
    bounces of `restitution` (constant motion: 0 and 1). Every random number comes from one
    uniform draw, sliced (one threefry call compiles far faster than several). Under gravity
    the start orbit needs radius[1] < size / 4 (apex heights up to size - 4 r); `wrap` needs
    gravity 0 (checked where gravity is a concrete number)."""
    if spec.wrap and isinstance(gravity, int | float) and gravity > 0:
        raise ValueError(f"wrap=True needs gravity 0 (wrap-around has no floor), got {gravity}")
    K, s, c, T = spec.num_sprites, spec.size, spec.channels, spec.num_frames
    shapes = [(K,), (K, 2), (K,), (K,), (K,), (K, c), (4, 4, c), (s, s, c), (T, s, s, c), (K,)]
    sizes = [int(np.prod(sh)) for sh in shapes]
    flat = jax.random.uniform(key, (sum(sizes),))
    at = np.cumsum([0] + sizes)
    u = [flat[at[i]:at[i + 1]].reshape(sh) for i, sh in enumerate(shapes)]
    r = spec.radius[0] + (spec.radius[1] - spec.radius[0]) * u[0]
    p0 = r[:, None] + (s - 2 * r[:, None]) * u[1]  # inside the walls
    angle = 2 * jnp.pi * u[2]
    speed = spec.speed[0] + (spec.speed[1] - spec.speed[0]) * u[3]
    v0 = speed[:, None] * jnp.stack([jnp.sin(angle), jnp.cos(angle)], -1)
    # Under gravity, the vertical state is drawn at a uniform time tau of a bounce orbit of
    # apex height h above the floor (uniform below the ceiling): the stationary, time-
    # symmetric start of elastic bouncing, so that only the lossy bounces order time.
    g = jnp.maximum(gravity, 1e-9)
    w = jnp.sqrt(2 * g * u[1][:, 0] * jnp.maximum(s - 4 * r, 0.0))  # impact speed, apex
    # h = u (S - 4r) (0 when r > S / 4: resting on the floor, not NaN)
    tau = 2 * w / g * u[9]  # time since the last floor contact, uniform over one period
    y_orbit = s - r - (w * tau - g * tau ** 2 / 2)
    p0 = p0.at[:, 0].set(jnp.where(gravity > 0, y_orbit, p0[:, 0]))
    v0 = v0.at[:, 0].set(jnp.where(gravity > 0, g * tau - w, v0[:, 0]))
    shape = jnp.floor(u[4] * len(SHAPES)).astype(jnp.int32)
    colour = 0.6 + 0.4 * u[5]
    bg = jnp.broadcast_to(background(u[6][..., :1], u[7][..., :1], spec), (s, s, c))  # grey
    pos, vel = simulate(p0, v0, r, spec, gravity, restitution)
    masks = jax.vmap(lambda p: silhouettes(p, r, shape, spec))(pos)  # (T, K, H, W)
    ids = jnp.max(jnp.where(masks, jnp.arange(K)[None, :, None, None], -1), axis=1)
    top = jax.nn.one_hot(ids, K)  # (T, H, W, K), all zero on the background
    frames = jnp.where(ids[..., None] >= 0, top @ colour, bg[None])
    if spec.noise_std:  # uniform noise of that std
        frames = frames + spec.noise_std * np.sqrt(3.0) * (2 * u[8] - 1)
    return Video(frames, masks, ids.astype(jnp.int32), pos, vel, r)

