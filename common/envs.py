"""One functional, batched environment interface over gymnax, navix, brax, envpool and GridMaze.

Two layers:

- `Env`: ONE unbatched environment as pure functions. ``reset(key, params)`` and
  ``step(key, state, action, params)``; ``step`` never auto-resets. ``params`` are the
  task or physics parameters of the current episode (a pytree, or None where the
  library has none). Adapters: `GymnaxEnv`, `NavixEnv`, `BraxEnv`, and the repo's own
  `GridMaze`.
- `VecEnv`: ``num_envs`` copies, vmapped and auto-resetting. On every reset the next
  episode's params come from ``sampler(key)``, a function the caller owns (curricula,
  domain randomization, meta-RL); it never falls back to the default params when a
  sampler is given. `VecEnv` holds only static config, so its ``reset``/``step`` are
  jittable and can be vmapped over an extra seed axis.

`EnvpoolVecEnv` has the same ``reset``/``step`` contract for envpool's batched C++ envs
(Atari, MuJoCo) through ``env.xla()``. `NormalizeObservation` wraps either one, and so
does `Coverage` (distinct grid cells or Montezuma rooms visited, `mark_visited`).

Episode statistics need no wrapper: ``VecEnv.step``'s ``info`` carries
``returned_episode``, ``returned_episode_return`` and ``returned_episode_length``.
Conventions: ``done = terminated | truncated``; ``truncated`` is True only when the
time limit cut an episode that did not terminate on that step.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from common.rl import RunningMeanStd

PyTree = Any
Sampler = Callable[[jax.Array], PyTree]

FOUR_ROOMS: tuple[str, ...] = (
    "#############",
    "#S    #     #",
    "#     #     #",
    "#           #",
    "#     #     #",
    "#     #     #",
    "## ####     #",
    "#     ### ###",
    "#     #     #",
    "#     #     #",
    "#           #",
    "#     #    G#",
    "#############",
)
GRID_MAPS: dict[str, Sequence[str]] = {"GridMaze-FourRooms": FOUR_ROOMS}


class Env:
    """Protocol of one unbatched environment: pure, jittable, vmappable functions."""

    num_actions: int | None = None  # discrete action count, None for continuous
    action_shape: tuple[int, ...] = ()
    observation_shape: tuple[int, ...] = ()

    def default_params(self) -> PyTree:
        """Task/physics parameters of one episode when no sampler is given."""
        return None

    def reset(self, key: jax.Array, params: PyTree) -> tuple[jax.Array, PyTree]:
        """Return (obs, state) of a new episode with `params`."""
        raise NotImplementedError

    def step(self, key: jax.Array, state: PyTree, action: jax.Array, params: PyTree):
        """Return (obs, state, reward, terminated, truncated); never auto-resets."""
        raise NotImplementedError

    def position(self, state: PyTree) -> jax.Array | None:
        """(row, col) int cell of the agent for coverage meters, or None."""
        return None


def _check_num_envs(num_envs: Any) -> None:
    """Fail before any compilation, naming the field and the value."""
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got num_envs={num_envs!r}")


def _obs_shape(env: Env) -> tuple[int, ...]:
    """Observation shape found by abstract evaluation of reset (no device work)."""
    obs, _ = jax.eval_shape(env.reset, jax.random.key(0), env.default_params())
    return tuple(obs.shape)


# ----------------------------------------------------------------------------- GridMaze


@struct.dataclass
class GridMazeParams:
    start: jax.Array  # int32[2] (row, col)
    goal: jax.Array  # int32[2] (row, col)


@struct.dataclass
class GridMazeState:
    pos: jax.Array  # int32[2] (row, col)
    time: jax.Array  # int32


class GridMaze(Env):
    """Fixed ASCII grid maze: '#' wall, 'S' start, 'G' goal, anything else floor.

    Actions 0..3 = up, down, left, right; a move into a wall stays put. Reward 1.0 and
    terminated on reaching the goal; truncated after `max_steps` steps. Observation:
    float32 ``[r / (H-1), c / (W-1)]``. Params: `GridMazeParams(start, goal)`, defaults
    from the map's 'S' and 'G', so a curriculum can move either.
    """

    num_actions = 4
    action_shape = ()
    observation_shape = (2,)
    MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int32)

    def __init__(self, grid: Sequence[str] = FOUR_ROOMS, max_steps: int = 100):
        rows = [str(r) for r in grid]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError(f"grid must be non-empty rows of equal length, got {rows!r}")
        if sum(r.count("S") for r in rows) != 1 or sum(r.count("G") for r in rows) != 1:
            raise ValueError("grid must contain exactly one 'S' and one 'G'")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.grid, self.max_steps = tuple(rows), int(max_steps)
        self.height, self.width = len(rows), len(rows[0])
        # A numpy constant: baked into the compiled program, no device work here.
        self.walls = np.array([[c == "#" for c in r] for r in rows], dtype=bool)
        find = lambda ch: next((i, r.index(ch)) for i, r in enumerate(rows) if ch in r)
        self._start, self._goal = find("S"), find("G")

    def default_params(self) -> GridMazeParams:
        return GridMazeParams(
            start=np.asarray(self._start, np.int32), goal=np.asarray(self._goal, np.int32)
        )

    def _obs(self, pos: jax.Array) -> jax.Array:
        scale = np.array([max(self.height - 1, 1), max(self.width - 1, 1)], np.float32)
        return pos.astype(jnp.float32) / scale

    def reset(self, key, params):
        pos = jnp.asarray(params.start, jnp.int32)
        return self._obs(pos), GridMazeState(pos=pos, time=jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        moved = state.pos + jnp.asarray(self.MOVES)[action]
        moved = jnp.clip(moved, 0, jnp.array([self.height - 1, self.width - 1]))
        pos = jnp.where(jnp.asarray(self.walls)[moved[0], moved[1]], state.pos, moved)
        time = state.time + 1
        terminated = jnp.all(pos == params.goal)
        truncated = (time >= self.max_steps) & ~terminated
        reward = terminated.astype(jnp.float32)
        return self._obs(pos), GridMazeState(pos, time), reward, terminated, truncated

    def position(self, state):
        return state.pos


# ----------------------------------------------------------------------------- adapters


class GymnaxEnv(Env):
    """A gymnax env through its non-resetting ``reset_env``/``step_env``.

    params: the gymnax ``EnvParams`` pytree. truncated: gymnax's ``is_truncated``
    (time limit). position: (row, column) where the state has both (DeepSea), else None.
    """

    def __init__(self, name: str, **kwargs):
        import gymnax

        self.name = name
        self.env, self._params = gymnax.make(name, **kwargs)
        space = self.env.action_space(self._params)
        self.num_actions = int(space.n) if hasattr(space, "n") else None
        self.action_shape = () if self.num_actions else tuple(space.shape)
        self.observation_shape = _obs_shape(self)

    def default_params(self):
        return self._params

    def reset(self, key, params):
        return self.env.reset_env(key, params)

    def step(self, key, state, action, params):
        obs, state, reward, terminated, _ = self.env.step_env(key, state, action, params)
        terminated = jnp.asarray(terminated, bool)
        truncated = jnp.asarray(self.env.is_truncated(state, params), bool) & ~terminated
        return obs, state, jnp.asarray(reward, jnp.float32), terminated, truncated

    def position(self, state):
        if hasattr(state, "row") and hasattr(state, "column"):
            return jnp.stack([state.row, state.column]).astype(jnp.int32)
        return None


class NavixEnv(Env):
    """A navix env; the state is navix's ``Timestep``.

    Steps with navix's non-resetting ``_step`` (``env.step`` auto-resets), after setting
    the state's PRNG key from the step key. navix has no per-episode parameters:
    ``default_params()`` is None and params are ignored. Observations keep navix's
    dtype (uint8 for symbolic/rgb). The episode limit is navix's ``max_steps`` kwarg.
    """

    def __init__(self, name: str, observation_fn: str | Callable = "symbolic", **kwargs):
        import navix

        if isinstance(observation_fn, str):
            observation_fn = getattr(navix.observations, observation_fn)
        self.name = name
        self.env = navix.make(name, observation_fn=observation_fn, **kwargs)
        self.num_actions = len(self.env.action_set)
        self.action_shape = ()
        self.observation_shape = _obs_shape(self)

    def reset(self, key, params):
        timestep = self.env.reset(key)
        return timestep.observation, timestep

    def step(self, key, state, action, params):
        state = state.replace(state=state.state.replace(key=key))
        ts = self.env._step(state, action)
        return ts.observation, ts, ts.reward, ts.is_termination(), ts.is_truncation()

    def position(self, state):
        return state.state.entities["player"].position.reshape(-1, 2)[0]


@struct.dataclass
class BraxEnvState:
    brax_state: PyTree  # brax.envs.State
    time: jax.Array  # int32


class BraxEnv(Env):
    """A brax ``PipelineEnv`` with per-episode physics multipliers.

    params: ``{"friction": f32, "mass": f32}`` scalars that multiply every geom's friction
    and every body's mass and inertia. They are applied the way brax's own
    ``DomainRandomizationVmapWrapper`` does: the env's ``sys`` is swapped for the
    modified one while reset/step are traced. ``params=None`` runs the unmodified sys.
    Continuous actions; truncated at ``episode_length`` steps.
    """

    def __init__(
        self, name: str, backend: str = "generalized", episode_length: int = 1000, **kwargs
    ):
        from brax import envs

        self.name, self.episode_length = name, int(episode_length)
        self.env = envs.get_environment(name, backend=backend, **kwargs)
        self._sys = self.env.unwrapped.sys
        self.num_actions = None
        self.action_shape = (int(self.env.action_size),)
        self.observation_shape = _obs_shape(self)

    def default_params(self):
        return {"friction": np.float32(1.0), "mass": np.float32(1.0)}

    @contextlib.contextmanager
    def _physics(self, params):
        """Swap in the sys scaled by `params` for the duration of tracing."""
        env, sys = self.env.unwrapped, self._sys
        if params is not None:
            f, m = params["friction"], params["mass"]
            sys = sys.tree_replace(
                {
                    "geom_friction": sys.geom_friction * f,
                    "body_mass": sys.body_mass * m,
                    "body_inertia": sys.body_inertia * m,
                    "link.inertia.mass": sys.link.inertia.mass * m,
                    "link.inertia.i": sys.link.inertia.i * m,
                }
            )
        try:
            env.sys = sys
            yield
        finally:
            env.sys = self._sys

    def reset(self, key, params):
        with self._physics(params):
            state = self.env.reset(key)
        return state.obs, BraxEnvState(state, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        with self._physics(params):
            bs = self.env.step(state.brax_state, action)
        time = state.time + 1
        terminated = bs.done > 0.5
        truncated = (time >= self.episode_length) & ~terminated
        return bs.obs, BraxEnvState(bs, time), bs.reward, terminated, truncated


# ----------------------------------------------------------------------------- VecEnv


@struct.dataclass
class VecState:
    env_state: PyTree  # [N, ...]
    params: PyTree  # [N, ...] params of each env's current episode
    episode_return: jax.Array  # [N] float32
    episode_length: jax.Array  # [N] int32


def _select(mask: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Per-env select between two [N, ...] pytrees."""

    def pick(a, b):
        return jax.lax.select(
            jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a.shape), a, b
        )

    return jax.tree.map(pick, on_true, on_false)


class VecEnv:
    """`num_envs` copies of `env`, vmapped, auto-resetting, params drawn from `sampler`."""

    def __init__(self, env: Env, num_envs: int, sampler: Sampler | None = None):
        """sampler(key) -> params for one episode (the caller owns it: curricula, domain
        randomization, meta-RL). Default: always ``env.default_params()``."""
        _check_num_envs(num_envs)
        self.env, self.num_envs = env, num_envs
        self.sampler = sampler if sampler is not None else (lambda key: env.default_params())
        self.num_actions = env.num_actions
        self.action_shape = env.action_shape
        self.observation_shape = env.observation_shape

    def _reset_all(self, key: jax.Array):
        """Draw params for every env from the sampler, then reset with them."""
        k_params, k_reset = jax.random.split(key)
        params = jax.vmap(self.sampler)(jax.random.split(k_params, self.num_envs))
        obs, state = jax.vmap(self.env.reset)(jax.random.split(k_reset, self.num_envs), params)
        return obs, state, params

    def reset(self, key: jax.Array) -> tuple[jax.Array, VecState]:
        obs, state, params = self._reset_all(key)
        zeros = jnp.zeros(self.num_envs)
        return obs, VecState(state, params, zeros, zeros.astype(jnp.int32))

    def step(self, vstate: VecState, action: jax.Array, key: jax.Array):
        """Return (obs, vstate, reward, done, info); done envs restart with new params."""
        k_step, k_reset = jax.random.split(key)
        keys = jax.random.split(k_step, self.num_envs)
        obs, state, reward, terminated, truncated = jax.vmap(self.env.step)(
            keys, vstate.env_state, action, vstate.params
        )
        reward = reward.astype(jnp.float32)
        done = terminated | truncated
        episode_return = vstate.episode_return + reward
        episode_length = vstate.episode_length + 1
        info = {
            "terminated": terminated,
            "truncated": truncated,
            "returned_episode": done,
            "returned_episode_return": jnp.where(done, episode_return, 0.0),
            "returned_episode_length": jnp.where(done, episode_length, 0),
        }
        position = jax.vmap(self.env.position)(state)
        if position is not None:
            info["position"] = position
        # Both branches are computed; done envs take the reset branch with NEW params.
        obs_r, state_r, params_r = self._reset_all(k_reset)
        vstate = VecState(
            env_state=_select(done, state_r, state),
            params=_select(done, params_r, vstate.params),
            episode_return=jnp.where(done, 0.0, episode_return),
            episode_length=jnp.where(done, 0, episode_length),
        )
        return _select(done, obs_r, obs), vstate, reward, done, info


# ----------------------------------------------------------------------------- envpool


@struct.dataclass
class EnvpoolState:
    handle: jax.Array  # uint8 handle of the C++ pool
    episode_return: jax.Array  # [N]
    episode_length: jax.Array  # [N]


class EnvpoolVecEnv:
    """envpool's batched C++ envs with VecEnv's ``reset``/``step`` contract.

    ``reset(key)`` is host-side and ignores `key` (envpool seeds are fixed at creation:
    pass ``seed=`` here). ``step`` is jittable through ``env.xla()`` (checked working
    with envpool 1.2.5 and jax 0.10.2 on CPU); it is not vmappable. Fallback: envpool's
    XLA buffers keep the task's dtypes, and MuJoCo tasks use float64, which jax turns
    into float32 unless ``jax_enable_x64`` is on (the buffers would then mismatch); such
    tasks step the host pool through an ordered ``jax.experimental.io_callback`` instead
    (jittable, slower, float32 obs/actions, ``info`` without task extras). envpool auto-resets
    itself, NEXT-STEP style: the step that returns done gives the last obs of the
    episode, and the following step ignores its action and returns the first obs of the
    new one (reward 0). Episode statistics use the unclipped ``info["reward"]`` and the
    real game over ``info["terminated"]`` where the task reports them (Atari).
    envpool tasks are not parameterisable, so a sampler is refused.
    """

    def __init__(
        self, env_id: str, num_envs: int, sampler: Sampler | None = None, **envpool_kwargs
    ):
        if sampler is not None:
            raise ValueError(
                f"envpool task {env_id!r} is not parameterisable: sampler must "
                "be None (use a JAX-native env for curricula/randomization)"
            )
        _check_num_envs(num_envs)
        import envpool

        envpool_kwargs.setdefault("env_type", "gymnasium")
        self.pool = envpool.make(env_id, num_envs=num_envs, **envpool_kwargs)
        self.num_envs = num_envs
        self._handle, _, _, self._xla_step = self.pool.xla()
        specs = [
            *self.pool.spec.action_array_spec.values(),
            *self.pool.spec.state_array_spec.values(),
        ]
        wide = any(
            np.dtype(v.dtype).itemsize == 8 and np.dtype(v.dtype).kind in "fiu" for v in specs
        )
        self.uses_callback = wide and not jax.config.jax_enable_x64
        space = self.pool.action_space
        self.num_actions = int(space.n) if hasattr(space, "n") else None
        self.action_shape = tuple(space.shape)
        self._action_dtype = jax.dtypes.canonicalize_dtype(space.dtype)
        self.observation_shape = tuple(self.pool.observation_space.shape)

    def reset(self, key: jax.Array | None = None) -> tuple[jax.Array, EnvpoolState]:
        obs, _ = self.pool.reset()
        zeros = jnp.zeros(self.num_envs)
        return jnp.asarray(obs), EnvpoolState(
            jnp.asarray(self._handle), zeros, zeros.astype(jnp.int32)
        )

    def _host_step(self, handle: jax.Array, action: jax.Array):
        """Step the host pool via an ordered io_callback (fallback for float64 tasks)."""
        from jax.experimental import io_callback

        n, f32 = self.num_envs, jnp.float32
        shapes = (
            jax.ShapeDtypeStruct((n, *self.observation_shape), f32),
            jax.ShapeDtypeStruct((n,), f32),
            jax.ShapeDtypeStruct((n,), bool),
            jax.ShapeDtypeStruct((n,), bool),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )

        def host(a):
            a = np.asarray(a, self.pool.action_space.dtype)
            obs, rew, term, trunc, info = self.pool.step(a)
            return (
                np.asarray(obs, np.float32),
                np.asarray(rew, np.float32),
                np.asarray(term, bool),
                np.asarray(trunc, bool),
                np.asarray(info["elapsed_step"], np.int32),
            )

        obs, rew, term, trunc, elapsed = io_callback(host, shapes, action, ordered=True)
        return handle, (obs, rew, term, trunc, {"elapsed_step": elapsed})

    def step(self, state: EnvpoolState, action: jax.Array, key: jax.Array | None = None):
        step_fn = self._host_step if self.uses_callback else self._xla_step
        handle, (obs, reward, terminated, truncated, pinfo) = step_fn(
            state.handle, jnp.asarray(action, self._action_dtype)
        )
        done = terminated | truncated
        game_over = pinfo.get("terminated", terminated).astype(bool) | truncated
        episode_return = state.episode_return + pinfo.get("reward", reward)
        episode_length = pinfo["elapsed_step"].astype(jnp.int32)
        info = {
            "terminated": terminated,
            "truncated": truncated,
            "returned_episode": game_over,
            "returned_episode_return": jnp.where(game_over, episode_return, 0.0),
            "returned_episode_length": jnp.where(game_over, episode_length, 0),
            **{k: v for k, v in pinfo.items() if k in ("ram", "lives")},
        }
        state = EnvpoolState(handle, jnp.where(game_over, 0.0, episode_return), episode_length)
        return obs, state, reward.astype(jnp.float32), done, info


# ----------------------------------------------------------------------------- wrappers


@struct.dataclass
class NormalizeState:
    inner: PyTree
    rms: RunningMeanStd  # running mean/var of observations over all envs and steps


class NormalizeObservation:
    """Normalise observations by running mean/var over all envs, clipped to +-clip."""

    def __init__(self, vecenv: Any, clip: float = 5.0):
        self.vecenv, self.clip = vecenv, float(clip)

    def __getattr__(self, name: str):  # num_envs, num_actions, action_shape, ...
        if name == "vecenv":
            raise AttributeError(name)
        return getattr(self.vecenv, name)

    def reset(self, key: jax.Array):
        obs, inner = self.vecenv.reset(key)
        rms = RunningMeanStd.create(obs.shape[1:]).update(obs)
        return rms.normalize(obs, self.clip), NormalizeState(inner, rms)

    def step(self, state: NormalizeState, action: jax.Array, key: jax.Array):
        obs, inner, reward, done, info = self.vecenv.step(state.inner, action, key)
        rms = state.rms.update(obs)
        return rms.normalize(obs, self.clip), NormalizeState(inner, rms), reward, done, info


@struct.dataclass
class CoverageState:
    inner: PyTree
    visited: jax.Array  # (G, G) grid cells or (256,) Montezuma rooms seen since the start
    steps: jax.Array  # int32: env steps taken by the whole batch since the start
    positives: jax.Array  # int32: finished episodes with a positive return
    first_success: jax.Array  # int32: `steps` when the first positive episode ended; -1 before


def mark_visited(visited: jax.Array, info: dict) -> jax.Array:
    """Coverage, the exploration papers' measure: `visited` with what this step's envs
    stand on set True. A (G, G) `visited` takes the grid cells `info["position"]` ((N, 2)
    row, col; clipped to the grid); a (256,) one takes Montezuma's Revenge rooms (RAM byte
    3 of `info["ram"]`). Unchanged where `info` has neither (e.g. a grid on Atari)."""
    if visited.ndim == 1 and "ram" in info:
        return visited.at[info["ram"][..., 3].astype(jnp.int32)].set(True)
    if visited.ndim == 2 and "position" in info:
        pos = jnp.clip(info["position"], 0, visited.shape[0] - 1)
        return visited.at[pos[:, 0], pos[:, 1]].set(True)
    return visited


class Coverage:
    """The exploration papers' measures, over the whole batch since the start: what any env
    has visited (`mark_visited`: grid cells on a `grid` x `grid` board, or Montezuma rooms
    when `rooms`; `state.visited.sum()` is the number of distinct cells or rooms), the env
    steps taken, the finished episodes with a positive return, and the step at which the
    first of them ended (-1 before). `restart(state)` zeroes the measures (e.g. after
    warm-up steps that should not count)."""

    def __init__(self, vecenv: Any, grid: int, rooms: bool = False):
        self.vecenv, self.grid, self.rooms = vecenv, int(grid), bool(rooms)

    def __getattr__(self, name: str):  # num_envs, num_actions, observation_shape, ...
        if name == "vecenv":
            raise AttributeError(name)
        return getattr(self.vecenv, name)

    def reset(self, key: jax.Array):
        obs, inner = self.vecenv.reset(key)
        return obs, self.restart(CoverageState(inner, None, None, None, None))

    def restart(self, state: CoverageState) -> CoverageState:
        shape = (256,) if self.rooms else (self.grid, self.grid)
        zero = jnp.zeros((), jnp.int32)
        return state.replace(visited=jnp.zeros(shape, bool), steps=zero, positives=zero,
                             first_success=zero - 1)

    def step(self, state: CoverageState, action: jax.Array, key: jax.Array):
        obs, inner, reward, done, info = self.vecenv.step(state.inner, action, key)
        steps = state.steps + self.vecenv.num_envs
        success = info["returned_episode"] & (info["returned_episode_return"] > 0)
        first = jnp.where((state.first_success < 0) & success.any(), steps, state.first_success)
        new = CoverageState(inner, mark_visited(state.visited, info), steps,
                            state.positives + success.sum(dtype=jnp.int32), first)
        return obs, new, reward, done, info


@struct.dataclass
class NoisyTVState:
    inner: PyTree
    inner_obs: jax.Array  # the inner env's last observation (kept while the remote is pressed)
    tv: jax.Array  # (dims,) the picture on the TV now
    time: jax.Array  # int32 steps of this episode (controllable TV: the remote's own limit)


class NoisyTV(Env):
    """A noisy TV in the room (Burda et al. 2018, Sec. 5; the post's "noisy-TV problem").

    The observation gains `dims` "screen" features: the TV's picture while the agent stands
    on one of `cells` ((row, col) from `env.position`), zeros elsewhere. Uncontrollable: the
    picture is redrawn, i.i.d. uniform on [0, 1]^dims, at every step. Controllable: the
    picture changes only when the agent presses an extra action, the remote (index
    `env.num_actions`); pressing it leaves the inner env where it is, and episodes are then
    also cut at `max_steps` steps of the wrapper's own. Either way the screen carries no
    information about the task: a forward model cannot predict it, a curious agent that
    rewards its prediction error is drawn to it.
    """

    def __init__(self, env: Env, cells, dims: int = 8, controllable: bool = False,
                 max_steps: int = 100):
        if env.num_actions is None:
            raise ValueError("NoisyTV needs a discrete-action env (the remote is an action)")
        self.env, self.dims, self.controllable = env, int(dims), bool(controllable)
        self.cells = np.asarray(cells, np.int32).reshape(-1, 2)
        self.max_steps = int(max_steps)
        self.num_actions = env.num_actions + (1 if controllable else 0)
        self.action_shape = env.action_shape
        self.observation_shape = (int(np.prod(env.observation_shape)) + self.dims,)

    def default_params(self):
        return self.env.default_params()

    def _obs(self, inner_obs, inner_state, tv):
        on = self.on_tv(inner_state)
        screen = jnp.where(on, tv, 0.0)
        return jnp.concatenate([inner_obs.reshape(-1).astype(jnp.float32), screen])

    def on_tv(self, inner_state) -> jax.Array:
        """Whether the agent stands on a TV cell."""
        pos = self.env.position(inner_state)
        return jnp.any(jnp.all(pos[None] == jnp.asarray(self.cells), axis=-1))

    def reset(self, key, params):
        k_env, k_tv = jax.random.split(key)
        obs, inner = self.env.reset(k_env, params)
        tv = jax.random.uniform(k_tv, (self.dims,))
        return self._obs(obs, inner, tv), NoisyTVState(inner, obs, tv, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        k_env, k_tv = jax.random.split(key)
        fresh = jax.random.uniform(k_tv, (self.dims,))
        if not self.controllable:
            obs, inner, reward, terminated, truncated = self.env.step(
                k_env, state.inner, action, params)
            return (self._obs(obs, inner, fresh), NoisyTVState(inner, obs, fresh, state.time + 1),
                    reward, terminated, truncated)
        remote = action == self.env.num_actions
        obs, inner, reward, terminated, truncated = self.env.step(
            k_env, state.inner, jnp.where(remote, 0, action), params)
        inner = jax.tree.map(lambda a, b: jnp.where(remote, a, b), state.inner, inner)
        obs = jnp.where(remote, state.inner_obs, obs)
        reward = jnp.where(remote, 0.0, reward)
        terminated = ~remote & terminated
        time = state.time + 1
        truncated = ~terminated & ((~remote & truncated) | (time >= self.max_steps))
        tv = jnp.where(remote, fresh, state.tv)
        return (self._obs(obs, inner, tv), NoisyTVState(inner, obs, tv, time), reward,
                terminated, truncated)

    def position(self, state):
        return self.env.position(state.inner)


# A TV in FourRooms' start room (its floor is rows 1-5, cols 1-5; the start is (1, 1)).
FOUR_ROOMS_TV_CELLS = ((4, 3), (4, 4), (5, 3), (5, 4))


# ----------------------------------------------------------------------------- make


def _known_ids() -> list[str]:
    """Every id `make` accepts, from each registry that can be imported."""
    import importlib

    listers = {
        "gymnax": lambda m: m.registered_envs,
        "navix": lambda m: [n for n in m.registry() if n.startswith("Navix-")],
        "brax.envs": lambda m: [f"brax/{n}" for n in getattr(m, "_envs", {})],
        "envpool": lambda m: m.list_all_envs(),
    }
    ids = list(GRID_MAPS) + ["GridMaze-FourRooms-NoisyTV"]
    for module, lister in listers.items():
        with contextlib.suppress(ImportError):
            ids += list(lister(importlib.import_module(module)))
    return list(dict.fromkeys(ids))


def _unknown(env_id: str) -> ValueError:
    close = difflib.get_close_matches(env_id, _known_ids(), n=6, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " No close match found."
    return ValueError(f"Unknown environment id {env_id!r}.{hint}")


def check_id(env_id: str, envpool: bool = False) -> None:
    """Raise ValueError (listing close matches) if `make` does not know `env_id`; builds
    nothing, so a Config's `validate()` can call it cheaply."""
    if envpool or env_id.endswith("-v5"):
        import envpool as ep

        known = env_id in ep.list_all_envs()
    elif env_id in GRID_MAPS or env_id == "GridMaze-FourRooms-NoisyTV":
        known = True
    elif _deepsea_size(env_id):
        known = True
    elif env_id.startswith("Navix-"):
        import navix

        known = env_id in navix.registry()
    elif env_id.startswith("brax/"):
        from brax import envs as brax_envs

        known = env_id[len("brax/"):] in getattr(brax_envs, "_envs", {})
    else:
        import gymnax

        known = env_id in gymnax.registered_envs
    if not known:
        raise _unknown(env_id)


def _deepsea_size(env_id: str) -> int:
    """N of ``DeepSea-bsuite-<N>`` (gymnax's DeepSea at size N), else 0."""
    head, _, size = env_id.rpartition("-")
    return int(size) if head == "DeepSea-bsuite" and size.isdigit() and int(size) > 0 else 0


def make(env_id: str, num_envs: int, sampler: Sampler | None = None, **kwargs):
    """Build a batched env by id: ``GridMaze-FourRooms``, ``Navix-*``, ``brax/<name>``,
    envpool ids (``*-v5`` Atari, or any id with ``envpool=True``), else gymnax ids;
    ``DeepSea-bsuite-<N>`` is gymnax's DeepSea at size N (any file can pick the size
    through its env id).

    `kwargs` go to the adapter's constructor. Bad ids and num_envs fail here, before
    anything is compiled. Envs are memoised on their arguments, so an algorithm may call
    `make` inside `init` and `update` and get the same object (one envpool instance), and
    they are built with `jax.ensure_compile_time_eval()`: some libraries (navix) cache
    arrays on first construction, which must not be tracers of whichever jit came first.
    """
    key = (env_id, num_envs, sampler, tuple(sorted(kwargs.items())))
    try:
        hash(key)
    except TypeError:  # unhashable kwargs: build a fresh env
        with jax.ensure_compile_time_eval():
            return _make(env_id, num_envs, sampler, **kwargs)
    return _make_cached(*key)


@functools.cache
def _make_cached(env_id, num_envs, sampler, kw_items):
    with jax.ensure_compile_time_eval():
        return _make(env_id, num_envs, sampler, **dict(kw_items))


def _make(env_id: str, num_envs: int, sampler: Sampler | None = None, **kwargs):
    _check_num_envs(num_envs)
    envpool = kwargs.pop("envpool", False)
    check_id(env_id, envpool)
    if envpool or env_id.endswith("-v5"):
        return EnvpoolVecEnv(env_id, num_envs, sampler, **kwargs)
    if env_id == "GridMaze-FourRooms-NoisyTV":
        tv = {k: kwargs.pop(k) for k in ("dims", "controllable") if k in kwargs}
        env: Env = NoisyTV(GridMaze(FOUR_ROOMS, **kwargs), FOUR_ROOMS_TV_CELLS,
                           max_steps=kwargs.get("max_steps", 100), **tv)
    elif env_id in GRID_MAPS:
        env = GridMaze(GRID_MAPS[env_id], **kwargs)
    elif _deepsea_size(env_id):
        env = GymnaxEnv("DeepSea-bsuite", **{"size": _deepsea_size(env_id), **kwargs})
    elif env_id.startswith("Navix-"):
        env = NavixEnv(env_id, **kwargs)
    elif env_id.startswith("brax/"):
        env = BraxEnv(env_id[len("brax/") :], **kwargs)
    else:
        env = GymnaxEnv(env_id, **kwargs)
    return VecEnv(env, num_envs, sampler)


# ----------------------------------------------------------------------------- meta-RL tasks
#
# Task families whose `params` ARE the task, each with a sampler that draws one task, and
# the `Trial` wrapper of RL^2 (Duan et al. 2016, arXiv 1611.02779) that keeps one task for
# n episodes. `make_meta` builds them batched: a `VecEnv` whose sampler draws a new task
# at every trial start (the wrapper is one long episode of the VecEnv).


@struct.dataclass
class BanditParams:
    p: jax.Array  # float32[K] success probability of each arm


class BernoulliBandit(Env):
    """K independent Bernoulli arms; one pull is one episode (Duan et al. 2016 Sec. 4.1).

    Action a in 0..K-1; reward ~ Bernoulli(p[a]); every step terminates (the trial wrapper
    makes n pulls one trial). Observation: the constant [1.0] (a bandit has no state).
    Tasks: `sample_params` draws p ~ U[0, 1]^K independently per arm.
    """

    observation_shape = (1,)
    action_shape = ()

    def __init__(self, num_arms: int = 5):
        if num_arms < 2:
            raise ValueError(f"num_arms must be >= 2, got {num_arms}")
        self.num_actions = int(num_arms)

    def default_params(self) -> BanditParams:
        return BanditParams(p=np.full((self.num_actions,), 0.5, np.float32))

    def sample_params(self, key: jax.Array) -> BanditParams:
        return BanditParams(p=jax.random.uniform(key, (self.num_actions,)))

    def reset(self, key, params):
        return jnp.ones((1,), jnp.float32), jnp.zeros((), jnp.int32)

    def step(self, key, state, action, params):
        reward = jax.random.bernoulli(key, jnp.asarray(params.p)[action]).astype(jnp.float32)
        return jnp.ones((1,), jnp.float32), state + 1, reward, jnp.array(True), jnp.array(False)


@struct.dataclass
class TabularMDPParams:
    transitions: jax.Array  # float32[S, A, S] P(s' | s, a)
    reward_mean: jax.Array  # float32[S, A] mean of the Gaussian reward of (s, a)


@struct.dataclass
class TabularMDPState:
    s: jax.Array  # int32 current state
    time: jax.Array  # int32 steps taken in this episode


class TabularMDP(Env):
    """Random finite MDPs of Duan et al. 2016 Sec. 4.2: S states, A actions, episodes of
    `episode_length` steps that always start in state 0.

    Tasks (`sample_params`): P(.|s, a) ~ Dirichlet(1, ..., 1) and the reward mean
    mu(s, a) ~ N(1, 1) per task; each step's reward is r ~ N(mu(s, a), 1). Observation:
    one-hot(s) [S]. An episode ends by the time limit (truncated), never terminates.
    (Distributions as in tristandeleu/pytorch-maml-rl `envs/mdp.py`, written after [RL^2].)
    """

    action_shape = ()

    def __init__(self, num_states: int = 10, num_actions: int = 5, episode_length: int = 10):
        for name, v in (("num_states", num_states), ("num_actions", num_actions),
                        ("episode_length", episode_length)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.num_states, self.num_actions = int(num_states), int(num_actions)
        self.episode_length = int(episode_length)
        self.observation_shape = (self.num_states,)

    def default_params(self) -> TabularMDPParams:
        s, a = self.num_states, self.num_actions
        return TabularMDPParams(np.full((s, a, s), 1.0 / s, np.float32),
                                np.ones((s, a), np.float32))

    def sample_params(self, key: jax.Array) -> TabularMDPParams:
        k_p, k_r = jax.random.split(key)
        s, a = self.num_states, self.num_actions
        # Dirichlet(1, ..., 1) exactly, as normalised Exp(1) draws (cheaper to compile than
        # jax.random.dirichlet's gamma sampler). Flat draws, then reshaped: under vmap, XLA:CPU
        # compiles a multi-dimensional threefry draw ~10x slower (jax 0.10.2).
        e = jax.random.exponential(k_p, (s * a * s,)).reshape(s, a, s)
        transitions = e / e.sum(-1, keepdims=True)  # [S, A, S]
        mu = 1.0 + jax.random.normal(k_r, (s * a,)).reshape(s, a)
        return TabularMDPParams(transitions, mu)

    def _obs(self, s):
        return jax.nn.one_hot(s, self.num_states, dtype=jnp.float32)

    def reset(self, key, params):
        s = jnp.zeros((), jnp.int32)
        return self._obs(s), TabularMDPState(s, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        k_r, k_s = jax.random.split(key)
        mu, P = jnp.asarray(params.reward_mean), jnp.asarray(params.transitions)
        reward = mu[state.s, action] + jax.random.normal(k_r)
        s = jax.random.categorical(k_s, jnp.log(P[state.s, action]))
        time = state.time + 1
        truncated = time >= self.episode_length
        return self._obs(s), TabularMDPState(s, time), reward, jnp.array(False), truncated


@struct.dataclass
class PointNavState:
    pos: jax.Array  # float32[2]
    time: jax.Array  # int32


class PointNav2D(Env):
    """2-D point navigation of Finn et al. 2017 (MAML, arXiv 1703.03400, Sec. 5.2).

    The point starts at the origin; the action is a velocity clipped to [-0.1, 0.1]^2;
    pos' = pos + clip(a); reward -||pos' - goal||_2. Terminated when |pos' - goal| < 0.01 in
    both coordinates (as cbfinn/maml_rl's `point_env_randgoal.py`), truncated after
    `episode_length` = 100 steps. Observation: pos [2]. Tasks (`sample_params`): the goal
    ~ U[-0.5, 0.5]^2.
    """

    num_actions = None
    action_shape = (2,)
    observation_shape = (2,)

    def __init__(self, episode_length: int = 100, max_speed: float = 0.1):
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        self.episode_length, self.max_speed = int(episode_length), float(max_speed)

    def default_params(self) -> jax.Array:
        return np.zeros(2, np.float32)

    def sample_params(self, key: jax.Array) -> jax.Array:
        return jax.random.uniform(key, (2,), minval=-0.5, maxval=0.5)

    def reset(self, key, params):
        pos = jnp.zeros(2, jnp.float32)
        return pos, PointNavState(pos, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        pos = state.pos + jnp.clip(action, -self.max_speed, self.max_speed)
        diff = pos - params
        reward = -jnp.sqrt(jnp.sum(diff**2))
        terminated = jnp.all(jnp.abs(diff) < 0.01)
        time = state.time + 1
        truncated = (time >= self.episode_length) & ~terminated
        return pos, PointNavState(pos, time), reward, terminated, truncated


@struct.dataclass
class TrialState:
    inner: PyTree  # the inner env's state
    episode: jax.Array  # int32 index (0..n-1) of the current episode within the trial


class Trial(Env):
    """One RL^2 trial (Duan et al. 2016 Sec. 2.2) as ONE episode of `env`: the task
    (`params`) stays fixed for `episodes_per_trial` episodes, the inner env is reset between
    them, and the trial terminates only when the last one ends. So a `VecEnv` over a
    `Trial` draws a new task per trial, and an agent's recurrent state may be reset exactly
    where the VecEnv reports done.

    Observation: concat(inner obs, a_{t-1}, r_{t-1}, d_{t-1}) where a_{t-1} is one-hot for
    discrete actions (the raw action for continuous ones) and d_{t-1} = 1.0 when the
    previous step ended an inner episode; all three are zero at the trial's first step.
    The inner episode boundary is that flag (the last feature) and `state.episode`.
    """

    def __init__(self, env: Env, episodes_per_trial: int):
        if episodes_per_trial < 1:
            raise ValueError(f"episodes_per_trial must be >= 1, got {episodes_per_trial}")
        self.env, self.episodes_per_trial = env, int(episodes_per_trial)
        self.num_actions, self.action_shape = env.num_actions, env.action_shape
        self.action_features = env.num_actions or int(np.prod(env.action_shape))
        inner = int(np.prod(env.observation_shape))
        self.observation_shape = (inner + self.action_features + 2,)

    def default_params(self):
        return self.env.default_params()

    def sample_params(self, key):
        return self.env.sample_params(key)

    def _obs(self, inner_obs, action, reward, done):
        if self.num_actions:
            a = jax.nn.one_hot(action, self.num_actions, dtype=jnp.float32)
        else:
            a = jnp.asarray(action, jnp.float32).reshape(-1)
        return jnp.concatenate([inner_obs.reshape(-1).astype(jnp.float32), a,
                                jnp.asarray(reward, jnp.float32)[None],
                                jnp.asarray(done, jnp.float32)[None]])

    def reset(self, key, params):
        obs, inner = self.env.reset(key, params)
        no_action = jnp.zeros((), jnp.int32) if self.num_actions else jnp.zeros(self.action_shape)
        first = self._obs(obs, no_action, 0.0, False)
        return first.at[-self.action_features - 2:].set(0.0), TrialState(inner, jnp.int32(0))

    def step(self, key, state, action, params):
        k_step, k_reset = jax.random.split(key)
        obs, inner, reward, terminated, truncated = self.env.step(
            k_step, state.inner, action, params)
        ended = terminated | truncated  # the inner episode ended on this step
        obs_r, inner_r = self.env.reset(k_reset, params)  # same task: params unchanged
        inner = jax.tree.map(lambda a, b: jnp.where(ended, a, b), inner_r, inner)
        obs = jnp.where(ended, obs_r, obs)
        last = ended & (state.episode == self.episodes_per_trial - 1)
        episode = jnp.where(ended, state.episode + 1, state.episode)
        return (self._obs(obs, action, reward, ended), TrialState(inner, episode), reward,
                last, jnp.array(False))


META_ENVS = ("Meta-Bandit-<K>", "Meta-TabularMDP", "Meta-Nav2D")
"""Ids of `make_meta`: K-armed Bernoulli bandits, random tabular MDPs, 2-D navigation."""


def meta_env(env_id: str, **kwargs) -> Env:
    """The unbatched task family of `env_id` (see META_ENVS); `kwargs` go to its class.
    Raises ValueError listing the known ids for anything else."""
    if env_id.startswith("Meta-Bandit-") and env_id[len("Meta-Bandit-"):].isdigit():
        return BernoulliBandit(int(env_id[len("Meta-Bandit-"):]), **kwargs)
    if env_id == "Meta-TabularMDP":
        return TabularMDP(**kwargs)
    if env_id == "Meta-Nav2D":
        return PointNav2D(**kwargs)
    raise ValueError(f"Unknown meta-RL environment id {env_id!r}; known: {', '.join(META_ENVS)}"
                     " (e.g. Meta-Bandit-5)")


def make_meta(env_id: str, num_envs: int, episodes_per_trial: int, **kwargs) -> VecEnv:
    """`num_envs` RL^2 trials of `episodes_per_trial` episodes of the task family `env_id`;
    each trial draws its task with the family's `sample_params`. Memoised like `make`."""
    return _make_meta_cached(env_id, num_envs, episodes_per_trial, tuple(sorted(kwargs.items())))


@functools.cache
def _make_meta_cached(env_id, num_envs, episodes_per_trial, kw_items):
    _check_num_envs(num_envs)
    with jax.ensure_compile_time_eval():
        trial = Trial(meta_env(env_id, **dict(kw_items)), episodes_per_trial)
        return VecEnv(trial, num_envs, sampler=trial.sample_params)


# ----------------------------------------------------------------------------- dynamics DR
#
# Domain randomization of the dynamics (Peng et al. 2018, arXiv 1710.06537): physics drawn
# per episode by the `VecEnv` sampler the method owns, plus the two non-physical parts of
# "dynamics", an action delay and observation noise, which need state of their own.


def with_physics(params: PyTree, **values) -> PyTree:
    """gymnax ``EnvParams`` with the named physical fields set to `values` (traced or not),
    and the fields DERIVED from them recomputed: CartPole's step reads ``total_mass =
    masscart + masspole`` and ``polemass_length = masspole * length``, so setting
    ``masspole`` or ``length`` alone would leave its dynamics inconsistent. A name the
    params do not have raises ValueError (a field the env never reads cannot be set)."""
    unknown = [k for k in values if not hasattr(params, k)]
    if unknown:
        raise ValueError(f"{type(params).__name__} has no field(s) {unknown}; it has "
                         f"{sorted(f for f in vars(params) if not f.startswith('_'))}")
    params = params.replace(**values)
    if hasattr(params, "total_mass") and hasattr(params, "polemass_length"):  # CartPole
        params = params.replace(total_mass=params.masscart + params.masspole,
                                polemass_length=params.masspole * params.length)
    return params


@struct.dataclass
class DynamicsParams:
    physics: PyTree  # the inner env's params of this episode (gymnax EnvParams, brax dict)
    delay: jax.Array  # int32 in [0, max_delay]: the action applied at t was chosen at t - delay
    obs_noise: jax.Array  # float32 >= 0: std of the Gaussian noise on every observation feature


@struct.dataclass
class DynamicsState:
    inner: PyTree
    actions: jax.Array  # [max_delay + 1, *action_shape] the last actions chosen, newest first


class DynamicsRandomized(Env):
    """`env` with an action delay and observation noise, both part of `DynamicsParams`, so
    that a `VecEnv` sampler draws them per episode together with the physics.

    Delay d: the action applied at step t is the one the agent chose at step t - d (a ring
    buffer of the last ``max_delay + 1`` actions in the state; d is clipped to
    ``max_delay``, the buffer's size, fixed at construction); during the first d steps
    of an episode the buffer's `default_action` (zeros: action 0, or zero torque) is
    applied. Noise: zero-mean Gaussian with std ``obs_noise`` added to every feature of
    every observation, a fresh draw at each step (the reward and termination use the true
    state). ``default_params()`` is the inner env's, with no delay and no noise.
    """

    def __init__(self, env: Env, max_delay: int = 0):
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay}")
        self.env, self.max_delay = env, int(max_delay)
        self.num_actions, self.action_shape = env.num_actions, env.action_shape
        self.observation_shape = env.observation_shape
        self._action_dtype = jnp.int32 if env.num_actions else jnp.float32

    def default_params(self) -> DynamicsParams:
        return DynamicsParams(self.env.default_params(), np.int32(0), np.float32(0.0))

    def _noisy(self, key, obs, params):
        noise = jax.random.normal(key, obs.shape) * params.obs_noise
        return obs + noise.astype(obs.dtype)

    def reset(self, key, params):
        k_env, k_noise = jax.random.split(key)
        obs, inner = self.env.reset(k_env, params.physics)
        actions = jnp.zeros((self.max_delay + 1, *self.action_shape), self._action_dtype)
        return self._noisy(k_noise, obs, params), DynamicsState(inner, actions)

    def step(self, key, state, action, params):
        k_env, k_noise = jax.random.split(key)
        action = jnp.asarray(action, self._action_dtype)
        actions = jnp.concatenate([action[None], state.actions[:-1]])  # newest first
        applied = actions[jnp.clip(params.delay, 0, self.max_delay)]
        obs, inner, reward, terminated, truncated = self.env.step(
            k_env, state.inner, applied, params.physics)
        return (self._noisy(k_noise, obs, params), DynamicsState(inner, actions), reward,
                terminated, truncated)

    def position(self, state):
        return self.env.position(state.inner)
