"""Weight-Agnostic Neural Networks (WANN): topology search with one shared weight.

[1] A. Gaier, D. Ha. "Weight Agnostic Neural Networks." NeurIPS 2019, arXiv:1906.04358.
    Reference code: google/brain-tokyo-workshop, WANNRelease/WANN (wann_src/*.py, p/*.json).
[2] K. O. Stanley, R. Miikkulainen. "Evolving Neural Networks through Augmenting
    Topologies" (NEAT). Evolutionary Computation 10(2), 2002.
[3] K. Deb, A. Pratap, S. Agarwal, T. Meyarivan. "A fast and elitist multiobjective genetic
    algorithm: NSGA-II." IEEE TEVC 6(2), 2002.
[4] L. Weng. "Evolution Strategies", Lil'Log 2019 (steps 1-4 below).

Every connection of a network carries the SAME weight w. A topology is judged by how well it
does over a range of w, not at one tuned w ([4]; [1] Sec. 3):

    1. initialise a population of minimal networks (inputs + bias sparsely wired to outputs)
    2. R_k(w) = mean over `num_reps` episodes of the return with all weights = w,
       w in {-2, -1, -0.5, 0.5, 1, 2}                                  [1] code task.py
    3. objectives (maximised): mean_w R_k(w), max_w R_k(w), 1/#connections;
       with prob. `prob_moo` (0.8) rank on (mean, 1/#conn), else on (mean, max)   [1] wann.py
       rank = NSGA-II non-dominated front, ties broken by crowding distance [3]
    4. cull the worst `cull_ratio`, copy the best `elite_ratio` unchanged, and make every
       other child by tournament selection + exactly ONE topological mutation  [1] Sec. 3:
       add connection | insert node (split a connection, old one disabled) | re-enable a
       connection | change a hidden node's activation, with prob. 0.20 / 0.25 / 0.05 / 0.50

The genome is a fixed-capacity padded DAG whose array index IS the topological order:
    [bias, inputs (n_in), hidden slots (max_hidden; the first num_hidden used), outputs (n_out)]
edges only go from a lower to a higher index (strictly upper-triangular matrices), so one
pass over the nodes in index order evaluates the network:
    h_0 = 1, h_{1..n_in} = obs,  h_k = act_k(w * sum_i on[i, k] h_i)  for k = h0 .. N-1
Activations ([1] ind.py): linear, step, sin(pi x), gaussian exp(-x^2/2), tanh, sigmoid
(tanh(x/2)+1)/2, inverse -x, abs, relu, cos(pi x). Action: argmax of the outputs
(discrete), or the tanh outputs themselves (continuous, e.g. the swing-up force).

Reproduce (CPU demo on gymnax CartPole-v1; [1]'s laptop settings, 32 generations):
    python evolution/wann.py --preset quick --num-seeds 4
    2-core CPU (shared, load ~10): 3.3 min wall (compile 87 s). Champion re-tested on 16
    episodes per weight: mean return over the 6 weights 472.5 +- 28.7 (500, 500, 456, 434;
    max 500), 1-2 hidden nodes, 5-9 connections; the best initial (minimal) network: ~250.
    Every seed's best mean return reached 500 (the cap) by generation 12.
[1]'s task (CartPoleSwingUp, ported below; 128 generations of 64 networks):
    python evolution/wann.py --preset swingup --num-seeds 2
    2-core CPU (shared, load ~10): 13.7 min wall. Champion re-tested on 16 episodes per
    weight: mean return over the 6 weights 415 and 447 (14 hidden nodes, 24 and 36
    connections); the best initial network scored 155 and 165 (generation 1, as evaluated).
Paper setting ([1] p/default_wan.json; 128 networks, 4 episodes per weight, 2048 gens):
    python evolution/wann.py --preset paper
[1] Table 1 reports CartPoleSwingUp 515 +- 58 for the WANN with a random shared weight and
723 +- 16 with the best single shared weight [mem].

Differences from the paper:
- CPU demo task: gymnax CartPole-v1 (balance; reward 1 per step, 500 steps); discrete
  actions are argmax over one linear output per action. CartPoleSwingUp is ported into
  this file (one tanh output = force, as [1]) without its optional observation noise.
- The genome is a padded matrix with `max_hidden` hidden slots instead of NEAT's growing
  gene lists; an insert-node mutation on a full genome is a no-op. Connections exist
  between any earlier and later node of the fixed order ([1]'s code only connects strictly
  lower to higher layers, a subset of these). No innovation numbers (no crossover: [1] uses
  prob_crossover = 0) and no speciation (third-party WANN ports set alg_speciate "none").
- Crowding distance is the standard NSGA-II one (normalised by the front's range); [1]'s
  nsga_sort.py multiplies by abs(1/max - min) (an operator-precedence slip).
- The population's episodes share their random starts per generation (common random
  numbers, as [1]'s code seeds every individual's rep i with seed+i).
- The champion (`evaluate`) is the best mean-return network seen in any generation,
  re-tested on `test_reps` fresh episodes per weight ([1] uses bestReps = 20).
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import blackbox, envs, run

# Paper ids 1..10 ([1] ind.py applyAct) in this order; ids here are 0-based.
ACTIVATIONS = ("linear", "step", "sin", "gaussian", "tanh", "sigmoid", "inverse", "abs", "relu",
               "cos")
MUTATIONS = ("add_conn", "add_node", "enable", "mut_act")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """WANN on a gymnax task or CartPoleSwingUp; defaults are [1]'s p/default_wan.json."""

    env_id: str = "CartPole-v1"
    """gymnax id (through common.envs) or CartPoleSwingUp ([1]'s task, ported in this file)"""
    num_generations: int = 2048
    """generations (maxGen)"""
    pop_size: int = 128
    """networks per generation (popSize)"""
    shared_weights: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
    """values of the single shared weight every network is tested with (alg_wDist standard)"""
    num_reps: int = 4
    """episodes per network and weight value (alg_nReps)"""
    max_steps: int = 500
    """episode step cap (CartPole-v1's own limit is 500)"""
    max_hidden: int = 32
    """capacity: hidden-node slots of the padded genome"""
    hidden_acts: tuple[str, ...] = ACTIVATIONS
    """activations a hidden node may take (h_act; names from ACTIVATIONS)"""
    prob_init_enable: float = 0.5
    """probability that an input/bias -> output connection starts enabled"""
    prob_add_conn: float = 0.20
    """roulette weight of the add-connection mutation"""
    prob_add_node: float = 0.25
    """roulette weight of the insert-node mutation (split an enabled connection)"""
    prob_enable: float = 0.05
    """roulette weight of re-enabling a disabled connection"""
    prob_mut_act: float = 0.50
    """roulette weight of changing one hidden node's activation"""
    prob_moo: float = 0.8
    """probability of ranking on (mean, 1/#connections) instead of (mean, max) (alg_probMoo)"""
    cull_ratio: float = 0.2
    """worst fraction removed from the breeding pool (select_cullRatio)"""
    elite_ratio: float = 0.2
    """fraction of the pool copied unchanged to the next generation (select_eliteRatio)"""
    tournament_size: int = 8
    """tournament size of parent selection (select_tournSize)"""
    test_reps: int = 20
    """episodes per weight when `evaluate` re-tests the champion (bestReps)"""

    @property
    def num_updates(self) -> int:
        return self.num_generations

    @property
    def steps_per_update(self) -> int:
        """episodes per generation"""
        return self.pop_size * len(self.shared_weights) * self.num_reps

    @property
    def num_elites(self) -> int:
        return int(math.floor(self.pool_size * self.elite_ratio))

    @property
    def pool_size(self) -> int:
        return self.pop_size - int(math.floor(self.cull_ratio * self.pop_size))

    def validate(self):
        for name in ("num_generations", "num_reps", "max_steps", "max_hidden", "test_reps",
                     "tournament_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pop_size < 2:
            raise ValueError(f"pop_size must be >= 2, got {self.pop_size}")
        if not self.shared_weights:
            raise ValueError("shared_weights must not be empty")
        bad = [a for a in self.hidden_acts if a not in ACTIVATIONS]
        if bad or not self.hidden_acts:
            raise ValueError(f"hidden_acts={self.hidden_acts} must be a non-empty subset of "
                             f"{ACTIVATIONS}")
        for name in ("prob_init_enable", "prob_moo", "cull_ratio", "elite_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.cull_ratio >= 1.0 or self.pool_size < 1:
            raise ValueError(f"cull_ratio={self.cull_ratio} leaves no parents")
        if self.num_elites >= self.pop_size:
            raise ValueError(f"elite_ratio={self.elite_ratio} leaves no room for children")
        probs = [getattr(self, f"prob_{m}") for m in MUTATIONS]
        if min(probs) < 0 or sum(probs) <= 0:
            raise ValueError(f"mutation weights {probs} must be >= 0 with a positive sum")
        make_env(self.env_id)  # unknown ids fail here


PRESETS = {
    # [1]'s p/laptop_swing.json (pop 64, 3 reps, elite 0.05, tournament 4, bestReps 16)
    "quick": dict(num_generations=32, pop_size=64, num_reps=3, max_hidden=12, tournament_size=4,
                  elite_ratio=0.05, test_reps=16),
    # [1]'s task with the laptop settings, 1000-step episodes
    "swingup": dict(env_id="CartPoleSwingUp", max_steps=1000, num_generations=128, pop_size=64,
                    num_reps=3, max_hidden=16, tournament_size=4, elite_ratio=0.05,
                    test_reps=16),
    "paper": dict(env_id="CartPoleSwingUp", max_steps=1000),
}

# --- ENVIRONMENT ---


@struct.dataclass
class SwingUpState:
    s: jax.Array  # (4,) x, x_dot, theta, theta_dot
    t: jax.Array


class CartPoleSwingUp(envs.Env):
    """[1]'s CartPoleSwingUp (domain/cartpole_swingup.py, from DeepPILCO) in JAX: the pole
    starts hanging down, theta ~ N(pi, 0.2), force = 10 * clip(a, -1, 1), Euler step 0.01 s,
    reward (cos(theta)+1)/2 * cos(x/2.4 * pi/2) per step, ends when |x| > 2.4 or at 1000 steps.
    Observation (x, x_dot, cos theta, sin theta, theta_dot). No observation noise."""

    num_actions = None
    action_shape = (1,)
    observation_shape = (5,)
    g, m_c, m_p, pole_len, force_mag, dt, b, t_limit, x_threshold = (
        9.82, 0.5, 0.5, 0.6, 10.0, 0.01, 0.1, 1000, 2.4)

    @staticmethod
    def _obs(s):
        return jnp.stack([s[0], s[1], jnp.cos(s[2]), jnp.sin(s[2]), s[3]])

    def reset(self, key, params):
        s = jnp.array([0.0, 0.0, jnp.pi, 0.0]) + 0.2 * jax.random.normal(key, (4,))
        return self._obs(s), SwingUpState(s, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        m_t, mpl = self.m_p + self.m_c, self.m_p * self.pole_len
        a = jnp.clip(jnp.reshape(action, ())[()], -1.0, 1.0) * self.force_mag
        x, x_dot, th, th_dot = state.s
        sn, cs = jnp.sin(th), jnp.cos(th)
        xacc = (-2 * mpl * th_dot**2 * sn + 3 * self.m_p * self.g * sn * cs + 4 * a
                - 4 * self.b * x_dot) / (4 * m_t - 3 * self.m_p * cs**2)
        thacc = (-3 * mpl * th_dot**2 * sn * cs + 6 * m_t * self.g * sn
                 + 6 * (a - self.b * x_dot) * cs) / (4 * self.pole_len * m_t - 3 * mpl * cs**2)
        s = jnp.stack([x + x_dot * self.dt, x_dot + xacc * self.dt, th + th_dot * self.dt,
                       th_dot + thacc * self.dt])
        t = state.t + 1
        reward = (jnp.cos(s[2]) + 1.0) / 2.0 * jnp.cos(s[0] / self.x_threshold * jnp.pi / 2.0)
        terminated = jnp.abs(s[0]) > self.x_threshold
        truncated = (t >= self.t_limit) & ~terminated
        return self._obs(s), SwingUpState(s, t), reward, terminated, truncated


def make_env(env_id: str) -> envs.Env:
    """`CartPoleSwingUp` (this file), else a single env of common.envs (gymnax ids)."""
    return CartPoleSwingUp() if env_id == "CartPoleSwingUp" else envs.make(env_id, 1).env


# --- GENOME ---


@struct.dataclass
class Genome:
    act: jax.Array  # (N,) int32 activation id; bias/inputs/outputs are linear (0)
    edge: jax.Array  # (N, N) bool: connection gene i -> j exists (enabled or disabled); i < j
    on: jax.Array  # (N, N) bool: connection enabled (on implies edge)
    num_hidden: jax.Array  # () int32: hidden slots h0 .. h0 + num_hidden - 1 are in use


@struct.dataclass
class Layout:
    """Static sizes of the padded genome."""

    n_in: int = struct.field(pytree_node=False)
    n_out: int = struct.field(pytree_node=False)
    max_hidden: int = struct.field(pytree_node=False)
    continuous: bool = struct.field(pytree_node=False, default=False)

    @property
    def h0(self) -> int:  # first hidden slot (after bias and inputs)
        return 1 + self.n_in

    @property
    def n(self) -> int:
        return 1 + self.n_in + self.max_hidden + self.n_out


def layout(cfg: Config) -> Layout:
    env = make_env(cfg.env_id)
    if env.num_actions is None:  # continuous: one tanh output per action dimension
        return Layout(int(np.prod(env.observation_shape)), int(np.prod(env.action_shape)),
                      cfg.max_hidden, True)
    return Layout(int(np.prod(env.observation_shape)), int(env.num_actions), cfg.max_hidden)


def activate(a, x):
    """[1] ind.py applyAct, ids 0..9 = paper ids 1..10."""
    return jnp.stack([
        x, (x > 0).astype(x.dtype), jnp.sin(jnp.pi * x), jnp.exp(-x * x / 2.0), jnp.tanh(x),
        (jnp.tanh(x / 2.0) + 1.0) / 2.0, -x, jnp.abs(x), jnp.maximum(x, 0.0), jnp.cos(jnp.pi * x),
    ])[a]


def forward(g: Genome, lay: Layout, obs, w):
    """Outputs of genome g on one observation with every weight = w (topological pass)."""
    n, h0 = lay.n, lay.h0
    w_in = g.on.T.astype(jnp.float32)  # (N, N): row k = incoming mask of node k
    h = jnp.zeros(n).at[0].set(1.0).at[1:h0].set(jnp.ravel(obs).astype(jnp.float32))

    def node(k, h):  # h_k = act_k(w * sum_i on[i, k] h_i)
        return h.at[k].set(activate(g.act[k], w * jnp.dot(w_in[k], h)))

    h = jax.lax.fori_loop(h0, n, node, h)
    return h[n - lay.n_out:]


def minimal_genome(key, lay: Layout, prob_enable) -> Genome:
    """[1] wann.py initPop: every bias/input -> output gene, each enabled w.p. prob_enable.
    Outputs are linear, or tanh for continuous actions ([1] config.py swingup o_act = 5)."""
    n = lay.n
    src = jnp.arange(n) < lay.h0
    dst = jnp.arange(n) >= n - lay.n_out
    edge = src[:, None] & dst[None, :]
    on = edge & jax.random.bernoulli(key, prob_enable, (n, n))
    act = jnp.where(dst & lay.continuous, ACTIVATIONS.index("tanh"), 0).astype(jnp.int32)
    return Genome(act, edge, on, jnp.zeros((), jnp.int32))


def _used(g: Genome, lay: Layout):
    """(N,) bool: nodes that exist (bias, inputs, used hidden, outputs)."""
    k = jnp.arange(lay.n)
    return (k < lay.h0 + g.num_hidden) | (k >= lay.n - lay.n_out)


def _pick(key, mask):
    """Uniform random index of a True entry of a 1-D mask (garbage if none)."""
    return jax.random.categorical(key, jnp.where(mask, 0.0, -jnp.inf))


def _pick2(key, mask):
    k1, k2 = jax.random.split(key)
    i = _pick(k1, mask.any(1))  # a source with at least one candidate, then a destination
    return i, _pick(k2, mask[i])


def add_conn(g: Genome, key, lay: Layout, act_mask) -> Genome:
    """[1] mutAddConn: a new enabled connection between two unconnected nodes, forward only."""
    k = jnp.arange(lay.n)
    used = _used(g, lay)
    src_ok = used & (k < lay.n - lay.n_out)  # bias, inputs, hidden
    dst_ok = used & (k >= lay.h0)  # hidden, outputs
    cand = src_ok[:, None] & dst_ok[None, :] & (k[:, None] < k[None, :]) & ~g.edge
    i, j = _pick2(key, cand)
    ok = cand.any()
    return g.replace(edge=g.edge.at[i, j].set(g.edge[i, j] | ok),
                     on=g.on.at[i, j].set(g.on[i, j] | ok))


def add_node(g: Genome, key, lay: Layout, act_mask) -> Genome:
    """[1] mutAddNode: split an enabled connection i -> j into i -> new -> j and disable it.

    The new node goes right after i in the order (or first among the hidden nodes when i is
    an input); the used hidden block from there on shifts one slot to the right."""
    k_conn, k_act = jax.random.split(key)
    ok = g.on.any() & (g.num_hidden < lay.max_hidden)
    i, j = _pick2(k_conn, g.on)
    p = jnp.maximum(i + 1, lay.h0)  # new node's index
    end = lay.h0 + g.num_hidden  # first unused slot
    q = jnp.arange(lay.n)
    old = jnp.where(q < p, q, jnp.where(q <= end, q - 1, q))  # new index q <- old index
    fresh = q == p
    clear = ~(fresh[:, None] | fresh[None, :])
    edge = g.edge[old][:, old] & clear
    on = g.on[old][:, old] & clear
    j2 = jnp.where(j < end, j + 1, j)  # j shifts if it is a hidden node
    on = on.at[i, j2].set(False).at[i, p].set(True).at[p, j2].set(True)
    edge = edge.at[i, p].set(True).at[p, j2].set(True)
    act = g.act[old].at[p].set(_pick(k_act, act_mask))
    new = Genome(act, edge, on, g.num_hidden + 1)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, g)


def enable(g: Genome, key, lay: Layout, act_mask) -> Genome:
    """[1] topoMutate choice 3: re-enable one disabled connection."""
    cand = g.edge & ~g.on
    i, j = _pick2(key, cand)
    return g.replace(on=g.on.at[i, j].set(g.on[i, j] | cand.any()))


def mut_act(g: Genome, key, lay: Layout, act_mask) -> Genome:
    """[1] topoMutate choice 4: a used hidden node gets a different allowed activation."""
    k1, k2 = jax.random.split(key)
    hidden = (jnp.arange(lay.n) >= lay.h0) & (jnp.arange(lay.n) < lay.h0 + g.num_hidden)
    node = _pick(k1, hidden)
    choices = act_mask & (jnp.arange(len(ACTIVATIONS)) != g.act[node])
    ok = hidden.any() & choices.any()
    return g.replace(act=g.act.at[node].set(jnp.where(ok, _pick(k2, choices), g.act[node])))


def mutate(g: Genome, key, lay: Layout, cfg: Config) -> Genome:
    """Exactly one topological mutation, chosen by roulette ([1] _variation.py topoMutate)."""
    k_op, k_mut = jax.random.split(key)
    probs = jnp.array([getattr(cfg, f"prob_{m}") for m in MUTATIONS])
    op = jax.random.choice(k_op, len(MUTATIONS), p=probs / probs.sum())
    act_mask = jnp.array([a in cfg.hidden_acts for a in ACTIVATIONS])
    branches = [lambda g, k, f=f: f(g, k, lay, act_mask) for f in
                (add_conn, add_node, enable, mut_act)]
    return jax.lax.switch(op, branches, g, k_mut)


def num_connections(g: Genome):
    return g.on.sum((-1, -2))


# --- RANKING ---


def dominates(obj):
    """(n, n) bool: d[p, q] = p Pareto-dominates q (maximisation), obj (n, m)."""
    ge = (obj[:, None, :] >= obj[None, :, :]).all(-1)
    gt = (obj[:, None, :] > obj[None, :, :]).any(-1)
    return ge & gt


def pareto_fronts(obj):
    """(n,) int: NSGA-II front index [3] (0 = non-dominated). The front of q is the length of
    the longest chain of points dominating it, found by n relaxation sweeps."""
    d = dominates(obj)
    n = obj.shape[0]

    def sweep(_, f):
        return jnp.max(jnp.where(d, f[:, None] + 1, 0), axis=0)

    return jax.lax.fori_loop(0, n, sweep, jnp.zeros(n, jnp.int32))


def crowding(obj, front):
    """(n,) crowding distance within each front [3]: sum over objectives of the gap between a
    point's two neighbours, over the front's range; the ends of a front get inf."""
    n = obj.shape[0]
    idx = jnp.arange(n)
    same = front[:, None] == front[None, :]
    dist = jnp.zeros(n)
    for m in range(obj.shape[1]):
        v = obj[:, m]
        above = same & ((v[None, :] > v[:, None]) | ((v[None, :] == v[:, None])
                                                       & (idx[None, :] > idx[:, None])))
        below = same & ~above & (idx[None, :] != idx[:, None])
        up = jnp.min(jnp.where(above, v[None, :], jnp.inf), 1)
        lo = jnp.max(jnp.where(below, v[None, :], -jnp.inf), 1)
        span = jnp.max(jnp.where(same, v[None, :], -jnp.inf), 1) - jnp.min(
            jnp.where(same, v[None, :], jnp.inf), 1)
        dist = dist + (up - lo) / jnp.where(span > 0, span, 1.0)
    return dist


def nsga_order(obj):
    """Indices best first: by front, then by decreasing crowding distance ([1] nsga_sort)."""
    front = pareto_fronts(obj)
    return jnp.lexsort((-crowding(obj, front), front)), front


# --- EVALUATION ---


def evaluate_population(pop: Genome, lay: Layout, cfg: Config, key, num_reps: int):
    """Returns (P, W, R) and episode lengths of every genome x shared weight x episode."""
    env = make_env(cfg.env_id)
    params = env.default_params()

    def rollout(g, w, k):
        def act(obs, _):
            out = forward(g, lay, obs, w)
            return out.reshape(env.action_shape) if lay.continuous else jnp.argmax(out)

        ret, length, _ = blackbox.episode(env, act, k, params, cfg.max_steps)
        return ret, length

    keys = jax.random.split(key, num_reps)  # shared by all genomes and weights
    ws = jnp.asarray(cfg.shared_weights, jnp.float32)
    f = jax.vmap(jax.vmap(jax.vmap(rollout, (None, None, 0)), (None, 0, None)), (0, None, None))
    return f(pop, ws, keys)


def fitness(returns):
    """Per genome: mean over weights and max over weights of the rep-averaged return."""
    per_w = returns.mean(-1)  # (P, W)  [1] task.py getDistFitness
    return per_w.mean(-1), per_w.max(-1)  # [1] wann.py tell


# --- UPDATE ---


@struct.dataclass
class State:
    pop: Genome  # (P, ...) current population (not yet evaluated)
    key: jax.Array
    generation: jax.Array
    best: Genome  # champion: highest mean return of any evaluated genome so far
    best_mean: jax.Array
    episodes: jax.Array


def init(key, cfg: Config) -> State:
    lay = layout(cfg)
    key, k = jax.random.split(key)
    pop = jax.vmap(lambda k: minimal_genome(k, lay, cfg.prob_init_enable))(
        jax.random.split(k, cfg.pop_size))
    return State(pop, key, jnp.zeros((), jnp.int32), jax.tree.map(lambda x: x[0], pop),
                 jnp.array(-jnp.inf), jnp.zeros((), jnp.int32))


def rank_population(mean, best, n_conn, key, prob_moo):
    """[1] wann.py probMoo: (mean, 1/#conn) w.p. prob_moo, else (mean, max); order best first."""
    inv_conn = 1.0 / jnp.maximum(n_conn, 1).astype(jnp.float32)  # no conns counts as 1
    second = jnp.where(jax.random.uniform(key) < prob_moo, inv_conn, best)
    return nsga_order(jnp.stack([mean, second], -1))


def reproduce(pop: Genome, order, key, lay: Layout, cfg: Config) -> Genome:
    """[1] _variation.py recombine: cull, keep elites, tournament + one mutation each."""
    ranked = jax.tree.map(lambda x: x[order], pop)
    n_child = cfg.pop_size - cfg.num_elites
    k_tour, k_mut = jax.random.split(key)
    entrants = jax.random.randint(k_tour, (n_child, cfg.tournament_size), 0, cfg.pool_size)
    parent = entrants.min(1)  # sorted by rank, so the lowest index wins
    parents = jax.tree.map(lambda x: x[parent], ranked)
    children = jax.vmap(lambda g, k: mutate(g, k, lay, cfg))(
        parents, jax.random.split(k_mut, n_child))
    elites = jax.tree.map(lambda x: x[:cfg.num_elites], ranked)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), elites, children)


def update(state: State, cfg: Config):
    """One generation: evaluate over the shared weights, rank, reproduce."""
    lay = layout(cfg)
    key, k_eval, k_rank, k_rep = jax.random.split(state.key, 4)
    returns, lengths = evaluate_population(state.pop, lay, cfg, k_eval, cfg.num_reps)
    mean, best = fitness(returns)
    n_conn = num_connections(state.pop)
    order, front = rank_population(mean, best, n_conn, k_rank, cfg.prob_moo)
    top = jnp.argmax(mean)
    top_g = jax.tree.map(lambda x: x[top], state.pop)
    better = mean[top] > state.best_mean
    champion = jax.tree.map(lambda a, b: jnp.where(better, a, b), top_g, state.best)
    episodes = state.episodes + returns.size
    new = State(reproduce(state.pop, order, k_rep, lay, cfg), key, state.generation + 1,
                champion, jnp.maximum(mean[top], state.best_mean), episodes)
    metrics = {
        "charts/best_mean_return": mean[top],
        "charts/best_max_return": best.max(),
        "charts/connections": n_conn[top].astype(jnp.float32),
        "charts/nodes": state.pop.num_hidden[top].astype(jnp.float32),
        "charts/pop_mean_return": mean.mean(),
        "charts/pop_connections": n_conn.mean(),
        "charts/front0_size": (front == 0).sum().astype(jnp.float32),
        "charts/episodes": episodes.astype(jnp.float32),
        "charts/env_steps": lengths.sum().astype(jnp.float32),
    }
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Re-test the champion on `test_reps` fresh episodes per shared weight."""
    lay = layout(cfg)
    g = jax.tree.map(lambda x: x[None], state.best)
    returns, _ = evaluate_population(g, lay, cfg, jax.random.fold_in(state.key, 7),
                                     cfg.test_reps)
    per_w = returns[0].mean(-1)
    out = {"mean_return": per_w.mean(), "max_return": per_w.max(), "min_return": per_w.min(),
           "connections": num_connections(state.best).astype(jnp.float32),
           "nodes": state.best.num_hidden.astype(jnp.float32)}
    for w, r in zip(cfg.shared_weights, per_w, strict=True):
        out[f"return_w{w:+g}"] = r
    return out


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__)


if __name__ == "__main__":
    main()
