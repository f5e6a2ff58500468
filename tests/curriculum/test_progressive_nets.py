"""Tests of curriculum/progressive_nets.py: one adapter layer and a whole K = 3 forward pass
against hand computations, the lateral shapes for K = 3, the task transforms, which
parameters each arm trains and how each starts a new column, the AUC and transfer formulas,
the freeze (column 1 bit-identical after column 2 trains), the fine-tuning and random-column
baselines and the behaviour of the progressive column against the same net with its laterals
cut, in one compiled run of the CLI, purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculum import progressive_nets as pnn
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration shared by the module: bsuite Catch (10 x 5 grid, 9-step episodes),
# then the mirrored Catch; the progressive net, its laterals-cut twin (scratch) and
# baselines 2 and 4 (vmapped arms: run time, no extra compile).
TINY = pnn.Config(
    env_id="Catch-bsuite",
    tasks=("identity", "flip"),
    arms=("progressive", "scratch", "finetune_top", "random_column"),
    hidden=(32, 32),
    updates_per_task=40,
    num_envs=16,
    num_steps=16,
    num_minibatches=2,
    lr=2.5e-3,
    eval_envs=8,
    eval_steps=12,
)
K3 = dataclasses.replace(TINY, tasks=("identity", "flip", "noise"), hidden=(6, 5))
relu = lambda z: np.maximum(z, 0.0)  # noqa: E731


def _params(cfg, obs_dim=7, num_actions=3):
    return jax.device_get(
        compiled(lambda k: pnn.init_params(k, cfg, obs_dim, num_actions), jax.random.PRNGKey(3))
    )


def test_lateral_shapes_for_three_columns():
    """K = 3, n = (6, 5), 7 inputs, 3 actions (+ the value): column k >= 2 has one adapter
    per layer i >= 2 and one for the output layer; V maps the (k - 1) n_{i-1} anterior
    features onto n_{i-1}, U onto n_i; alpha holds one scalar in [0, alpha_init) per anterior
    column."""
    p = jax.eval_shape(lambda k: pnn.init_params(k, K3, 7, 3), jax.random.PRNGKey(0))
    cols = p["columns"]
    assert [lay["kernel"].shape for lay in cols["layers"]] == [(3, 7, 6), (3, 6, 5)]
    assert cols["out"]["kernel"].shape == (3, 5, 4) and cols["out"]["bias"].shape == (3, 4)
    shapes = [
        [(a["alpha"].shape, a["V"].shape, a["U"].shape) for a in col] for col in p["adapters"]
    ]
    assert shapes == [
        [((1,), (6, 6), (6, 5)), ((1,), (5, 5), (5, 4))],  # column 2
        [((2,), (12, 6), (6, 5)), ((2,), (10, 5), (5, 4))],
    ]  # column 3
    alphas = [float(x) for col in _params(K3)["adapters"] for a in col for x in a["alpha"]]
    assert all(0 <= a < K3.alpha_init for a in alphas) and len(set(alphas)) == 6


def test_one_adapter_layer_and_the_whole_forward_pass_by_hand():
    """[1] Eq. 2 by hand in numpy: h_i^(k) = relu(h_{i-1}^(k) W + b + U relu(V [alpha_1
    h_{i-1}^(1), alpha_2 h_{i-1}^(2)])) for column 3 (row-vector convention), first through
    `progressive_layer`, then the whole K = 3 network through `forward` (which reads which
    columns where); gate 0 (baseline 1) leaves column 3 alone; column 1 ignores the others."""
    p = _params(K3)
    rng = np.random.default_rng(0)
    h_own, h1, h2 = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3))
    w = jax.tree.map(lambda a: a[2], p["columns"]["layers"][1])
    lat = p["adapters"][1][0]
    anterior = np.concatenate([h1, h2], -1)
    scaled = np.concatenate([lat["alpha"][0] * h1, lat["alpha"][1] * h2], -1)
    want = relu(h_own @ w["kernel"] + w["bias"] + relu(scaled @ lat["V"]) @ lat["U"])
    got = jax.jit(pnn.progressive_layer, static_argnums=5)(
        w, h_own, anterior, lat, 1.0, jnp.float32
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    x = rng.normal(size=(4, 7)).astype(np.float32)
    cols, ad = p["columns"], p["adapters"]

    def own(i, k, h):
        lay = cols["layers"][i] if i < 2 else cols["out"]
        return h @ lay["kernel"][k] + lay["bias"][k]

    def lateral(a, hs):
        scaled = np.concatenate([al * h for al, h in zip(a["alpha"], hs, strict=True)], -1)
        return relu(scaled @ a["V"]) @ a["U"]

    h1 = [relu(own(0, k, x)) for k in range(3)]
    h2 = [relu(own(1, 0, h1[0]))] + [
        relu(own(1, k, h1[k]) + lateral(ad[k - 1][0], h1[:k])) for k in (1, 2)
    ]
    outs = [own(2, 0, h2[0])] + [own(2, k, h2[k]) + lateral(ad[k - 1][1], h2[:k]) for k in (1, 2)]
    fwd = jax.jit(pnn.forward, static_argnums=4)
    cat = lambda lv: np.concatenate([lv[0], lv[1][:, None]], -1)  # noqa: E731
    for k in range(3):
        np.testing.assert_allclose(cat(fwd(p, x, k, 1.0, K3)), outs[k], rtol=1e-4, atol=1e-5)
    alone = own(2, 2, relu(own(1, 2, relu(own(0, 2, x)))))
    np.testing.assert_allclose(cat(fwd(p, x, 2, 0.0, K3)), alone, rtol=1e-4, atol=1e-5)


def test_each_arm_trains_only_its_own_column():
    """Which parameters `update` lets train (K = 3): in stage s the progressive net trains
    column s and its adapters, nothing of columns < s; scratch trains column s without
    adapters; finetune_top only column s's output layer (s > 1); random_column as the
    progressive net (its anterior columns are reset to their init by `start_column`)."""
    p = _params(K3)
    mask = jax.jit(pnn.trainable_mask, static_argnums=3)

    def summary(arm, stage):
        m = mask(p, jnp.asarray(pnn.ARMS.index(arm)), jnp.asarray(stage), K3)
        layers = [np.asarray(lay["kernel"]).ravel().tolist() for lay in m["columns"]["layers"]]
        out = np.asarray(m["columns"]["out"]["kernel"]).ravel().tolist()
        ad = [float(col[0]["V"]) for col in m["adapters"]]
        return layers, out, ad

    assert summary("progressive", 1) == ([[0, 1, 0]] * 2, [0, 1, 0], [1, 0])
    assert summary("progressive", 2) == ([[0, 0, 1]] * 2, [0, 0, 1], [0, 1])
    assert summary("progressive", 0) == ([[1, 0, 0]] * 2, [1, 0, 0], [0, 0])
    assert summary("scratch", 2) == ([[0, 0, 1]] * 2, [0, 0, 1], [0, 0])
    assert summary("finetune_all", 1) == ([[0, 1, 0]] * 2, [0, 1, 0], [0, 0])
    assert summary("finetune_top", 0) == ([[1, 0, 0]] * 2, [1, 0, 0], [0, 0])
    assert summary("finetune_top", 1) == ([[0, 0, 0]] * 2, [0, 1, 0], [0, 0])
    assert summary("random_column", 0) == ([[1, 0, 0]] * 2, [1, 0, 0], [0, 0])
    assert summary("random_column", 2) == ([[0, 0, 1]] * 2, [0, 0, 1], [0, 1])


def test_each_arm_starts_a_new_column_as_its_baseline_says():
    """`start_column` at task 3 (K = 3, columns numbered from 1): finetune_top and
    finetune_all copy column 2 into column 3; random_column resets column 2 to its init
    (column 1 it reset at task 2), so both columns column 3 reads are random; the progressive
    net and scratch change nothing."""
    cols = {"kernel": jnp.arange(3.0)[:, None] + 1}  # column k holds k + 1
    init = {"kernel": -jnp.arange(3.0)[:, None] - 1}  # its init -(k + 1)
    start = jax.jit(pnn.start_column)
    got = {a: start(cols, init, pnn.ARMS.index(a), 2)["kernel"][:, 0].tolist() for a in pnn.ARMS}
    assert got == {
        "progressive": [1, 2, 3],
        "scratch": [1, 2, 3],
        "finetune_top": [1, 2, 2],
        "finetune_all": [1, 2, 2],
        "random_column": [1, -2, 3],
    }


def test_transforms():
    """flip mirrors the width of a [1, 10, 5] grid (Catch) and negates a vector; permute
    reverses a grid's rows and a vector's features; identity keeps both."""
    grid = jnp.arange(50.0).reshape(1, 10, 5)
    vec = jnp.arange(4.0).reshape(1, 4) - 1.5
    cfg = dataclasses.replace(TINY, tasks=("identity", "flip", "permute"))
    t = jax.jit(pnn.transform, static_argnums=3)
    k = jax.random.PRNGKey(0)
    for x, want in (
        (grid, [grid, grid[..., ::-1], grid[..., ::-1, :]]),
        (vec, [vec, -vec, vec[..., ::-1]]),
    ):
        for task in range(3):
            np.testing.assert_array_equal(t(x, task, k, cfg), want[task])


def test_auc_is_the_area_under_the_per_update_curve_and_transfer_its_ratio():
    """[1] Sec. 5 through `auc_step` (as `update` calls it): one update with 10 episodes of
    return 10, then one with 1 episode of 100: AUC = (10 + 100) / 2 = 55 (weighting every
    episode instead gives 18.2); an update where none ended repeats the last value. Transfer
    on a hand-built State: AUC / scratch's AUC per target, NaN where scratch's is <= 0."""
    cfg = dataclasses.replace(TINY, tasks=("identity", "flip", "noise"))
    step = jax.jit(pnn.auc_step, static_argnums=4)
    s = pnn.ArmState(*[None] * 6, jnp.zeros(3), jnp.zeros(3), jnp.zeros(()))
    for i, (ret, n) in enumerate(((10.0, 10), (100.0, 1), (0.0, 0))):
        ep = {"charts/episodic_return": jnp.asarray(ret), "charts/episodes": jnp.asarray(n)}
        a_sum, a_count, last = step(s, ep, 1, i == 0, cfg)
        s = s.replace(auc_sum=a_sum, auc_count=a_count, last_return=last)
        if i == 1:
            np.testing.assert_allclose(a_sum[1] / a_count[1], 55.0)
    np.testing.assert_allclose(s.auc_sum / s.auc_count.clip(1), [0, 70, 0])
    auc = jnp.array([[5.0, 6.0, 3.0], [5.0, 4.0, -1.0]])  # progressive, scratch
    two = dataclasses.replace(cfg, arms=("progressive", "scratch"))
    got = jax.jit(pnn.transfer_scores, static_argnums=1)(auc, two)
    np.testing.assert_allclose(got["transfer_progressive_2"], 1.5)
    assert np.isnan(got["transfer_progressive_3"]) and "transfer_progressive_1" not in got


def test_bad_values_fail_with_named_field(tmp_path):
    """One CLI call (alpha 0 would silently turn the progressive net into scratch); the rest
    through Config.validate()."""
    with pytest.raises(ValueError, match="alpha_init=0.0 must be > 0"):  # before the later
        # minibatch check, so a validate() that lets alpha 0 through fails here, fast
        pnn.main(["--alpha-init", "0", "--num-minibatches", "3", "--run-dir", str(tmp_path)])
    bad = [
        (dict(tasks=("identity", "zoom")), "'zoom' must be one of"),
        (dict(tasks=("identity",)), "must hold >= 2 tasks"),
        (dict(arms=("progressive", "distill")), "'distill' must be one of"),
        (dict(arms=("scratch", "scratch")), "without repeats"),
        (dict(num_minibatches=3), "not divisible by num_minibatches=3"),
        (dict(dtype="float16"), "dtype='float16' must be one of"),
        (dict(updates_per_task=0), "updates_per_task=0 must be >= 1"),
        (dict(num_envs=0), "num_envs=0 must be >= 1"),
        (dict(num_steps=0), "num_steps=0 must be >= 1"),
        (dict(num_minibatches=0), "num_minibatches=0 must be >= 1"),
        (dict(noise_std=-1.0), "noise_std >= 0"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            pnn.Config(**kw).validate()


# --- one compiled run of the CLI: column 1 on Catch, then column 2 on mirrored Catch, the
# progressive net and the laterals-cut twin (scratch) side by side on the same keys

SEEDS = 2
ARGS = cli_args(TINY, pnn.Config()) + [
    "--num-seeds",
    str(SEEDS),
    "--log-every",
    str(TINY.updates_per_task),
    "--no-progress",
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, the runner's compiled chunks with their recorded inputs): chunk 1 trains
    column 1 on task 1, chunk 2 column 2 on task 2."""
    run_dir = tmp_path_factory.mktemp("pnn")
    return main_recording_chunks(pnn.main, ARGS + ["--run-dir", str(run_dir)])


def test_column_one_is_frozen(recorded):
    """The key property ([1] Sec. 2): after column 2 has trained, column 1's parameters are
    bit-identical to what they were at the end of task 1, in the progressive, scratch and
    finetune_top arms and every seed (with the forward pass test, its task-1 policy is
    unchanged); column 2 did move. Fails when the gradient mask is dropped from the optax
    chain (tried)."""
    res, chunks = recorded
    before = chunks[1][1].arms.params  # the state entering task 2 = the end of task 1
    after = res.state.arms.params
    keep = [TINY.arms.index(a) for a in ("progressive", "scratch", "finetune_top")]
    col1 = lambda p: jax.tree.map(lambda a: np.asarray(a[:, keep, 0]), p["columns"])  # noqa: E731
    for a, b in zip(jax.tree.leaves(col1(before)), jax.tree.leaves(col1(after)), strict=True):
        np.testing.assert_array_equal(a, b)
    col2 = lambda p: np.asarray(p["columns"]["layers"][0]["kernel"][:, :, 1])  # noqa: E731
    assert not np.array_equal(col2(before), col2(after))


def test_finetune_top_and_random_column_baselines(recorded):
    """In the run: finetune_top's column 2 starts as a copy of its column 1 and trains only
    its output layer (the hidden layers still equal column 1's, the output layer moved);
    random_column trained column 1 on task 1 and reset it to its init for task 2; the
    task-1 score of finetune_top is that of its last column (not the progressive net's
    column 1, which has the same parameters). Fails with finetune_top's mask ignored, with
    the gradient mask dropped, or with fine-tuners scored on column 1 (each tried)."""
    res, chunks = recorded
    before, after = chunks[1][1].arms, res.state.arms
    ft, rc = TINY.arms.index("finetune_top"), TINY.arms.index("random_column")
    b, a = before.params["columns"], after.params["columns"]
    for i in range(len(TINY.hidden)):
        np.testing.assert_array_equal(
            a["layers"][i]["kernel"][:, ft, 1], b["layers"][i]["kernel"][:, ft, 0]
        )
    assert not np.array_equal(a["out"]["kernel"][:, ft, 1], b["out"]["kernel"][:, ft, 0])
    k0 = lambda p: np.asarray(p["layers"][0]["kernel"][:, rc, 0])  # noqa: E731
    init = k0(after.init_columns)
    assert not np.array_equal(k0(b), init)
    np.testing.assert_array_equal(k0(a), init)
    f = res.final
    assert (f["task1_finetune_top"] != f["task1_progressive"]).all()


def test_progressive_column_learns_the_mirrored_task_faster_than_without_laterals(recorded):
    """Behaviour ([1] Sec. 5): AUC (area under the per-update training curve) on mirrored Catch of
    column 2 with laterals from the frozen Catch column vs the same column with its laterals
    cut (U = 0, which is also baseline 1, a single column from scratch), same keys, 40
    updates of 16 x 16 steps per task. Measured on CPU (jax 0.10.2), seeds 0, 1 (Catch's
    return is +1 caught, -1 missed):
        task 1 (column 1, identical in every arm)     -0.430  -0.475
        task 2 progressive                            -0.002  -0.111
        task 2 no laterals (scratch)                  -0.381  -0.453
        task 2 random_column, finetune_top            -0.347  -0.423,  -0.716  -0.572
    Cutting the laterals in the progressive arm too makes the arms tie (mutation tried)."""
    res, _ = recorded
    f = res.final
    print({k: np.round(v, 3) for k, v in f.items()})
    np.testing.assert_array_equal(f["auc_progressive_1"], f["auc_scratch_1"])
    prog, scratch = f["auc_progressive_2"], f["auc_scratch_2"]
    assert (prog > scratch + 0.15).all(), (prog, scratch)


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's first compiled chunk again on its recorded input (no tracing, no
    compiling) gives bit-identical metrics; seeds differ; `--help` documents every field."""
    res, chunks = recorded
    with pytest.raises(SystemExit):
        pnn.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(pnn.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history
    n = TINY.updates_per_task
    assert h["losses/value"].shape == (SEEDS, 2 * n)
    np.testing.assert_array_equal(h["charts/task"][0], [1] * n + [2] * n)
    assert not np.array_equal(h["losses/value"][0], h["losses/value"][1])
    assert len(chunks) == 2
    _, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    for k in ("losses/value", "charts/return_progressive", "losses/policy"):
        np.testing.assert_array_equal(h[k][:, :n], metrics[k])


@pytest.mark.slow
def test_quick_preset_transfer_scores(tmp_path):
    """The `quick` preset (CartPole-v1 -> negated CartPole-v1, 150 updates of 16 x 64 steps
    per task, all five arms), 5 seeds, through the CLI. Measured (a loaded 2-core CPU, 149 s
    of CPU, 13.4 min wall), transfer score (AUC / scratch's) per seed: progressive 1.46 1.12
    1.49 1.48 1.53; random_column (baseline 4) 1.19 1.05 0.87 0.97 1.03; finetune_all 0.51
    0.27 0.81 0.42 0.57; finetune_top 0.07 0.06 0.06 0.07 0.08; scratch, the same net with
    its laterals cut (the broken variant), 1 by definition."""
    res = pnn.main(
        [
            "--preset",
            "quick",
            "--num-seeds",
            "5",
            "--log-every",
            "50",
            "--no-progress",
            "--run-dir",
            str(tmp_path),
        ]
    )
    f = res.final
    print({k: np.round(v, 3) for k, v in f.items()})
    assert f["transfer_progressive_2"].min() > 1.05, f["transfer_progressive_2"]
    assert (f["auc_progressive_2"] > f["auc_scratch_2"]).all()
    assert (f["auc_progressive_2"] > f["auc_random_column_2"]).all()
    assert f["transfer_progressive_2"].min() > f["transfer_finetune_all_2"].max()
    assert f["transfer_progressive_2"].min() > 2 * f["transfer_finetune_top_2"].max()
    # the fine-tuned networks forgot task 1; the progressive net kept its column 1
    assert f["task1_progressive"].min() > 2 * f["task1_finetune_all"].max()


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(pnn) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (Breakout-MinAtar,
    3 columns of 256-256, every arm, 64 x 128 steps): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(pnn)
    assert cfg.env_id == "Breakout-MinAtar" and cfg.num_columns == 3
    assert state.arms.params["columns"]["layers"][0]["kernel"].shape == (5, 3, 400, 256)
    assert state.arms.params["adapters"][1][0]["V"].shape == (5, 512, 256)
    assert state.arms.obs.shape == (5, 64, 10, 10, 4)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert {f"charts/return_{a}" for a in pnn.ARMS} <= set(metrics)
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state.arms.params)
    logits, value = jax.eval_shape(
        lambda p: pnn.forward(p, jnp.zeros((2, 10, 10, 4)), 2, 1.0, bf16), params
    )
    assert logits.shape == (2, 3) and value.shape == (2,) and logits.dtype == jnp.float32
