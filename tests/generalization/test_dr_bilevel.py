"""Tests of generalization/dr_bilevel.py: P_phi's box and samples by hand, the CEM refit
against numpy, the physics multipliers, the bilevel search against the nominal-sim policy
trained in the same program (behaviour), update's common random numbers, purity, CLI, paper
preset, every Config field read.

Mutations tried (each made the named test fail, then was taken out): the half-width w used
without |.| in `box` (test_box_samples...); the elites taken as the worst, top_k(-F), and
uniform instead of normal noise in `cem_sample` (test_cem_refit...); xi ignored in
`physics` (test_physics..., and the behaviour test: best 325 / 480 = nominal 325 / 480, as
every member is then the nominal sim); per-member PPO keys in `update` instead of common
random numbers (test_update_uses_common_random_numbers: 200 / 149 vs nominal 52 / 129);
the box's upper end not clipped to xi_min (test_box_samples...: hi = -0.9, not 0.05); the
CEM refit ranking by the sim training return and the fresh score read on the selection
episodes (test_bilevel_beats...); the PRNGKey(0) in `update` instead of the state's key
(test_train_is_pure...: the seeds' centres equal); the check of `params` against the gymnax
fields dropped (test_bad_values...: another check's message, not the expected one)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import dr_bilevel as db
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# CartPole-v1, pole length x 0.2 in "real": 2 outer iterations of 4 phi (+ the nominal sim),
# each a PPO training of 40 updates x 16 envs x 32 steps (20k steps). Big enough to learn
# (the behaviour test reads this run), small enough for the CLI test.
TINY = db.Config(
    params=("length",),
    xi_real=(0.2,),
    init_mean=(1.0, 0.25),
    init_std=(0.5, 0.25),
    population=4,
    num_iterations=2,
    ppo_updates=40,
    num_envs=16,
    num_steps=32,
    lr=2.5e-3,
    hidden=(32, 32),
    eval_episodes=4,
)
SEEDS = 2


def test_box_samples_and_coverage_by_hand():
    """phi = (c 1.0, 0.1; w -0.25, 0.5) -> |w|: box [0.75, 1.25] and [0.05, 0.6] (c - w = -0.4
    clipped to xi_min 0.05); 4000 samples lie in the box with mean ~ its middle; the box
    covers (1.0, 0.3) and not (1.3, 0.3). A box below xi_min (c = -1, w = 0.1) collapses to
    the point xi_min: lo == hi == 0.05."""
    cfg = dataclasses.replace(
        TINY,
        params=("length", "masspole"),
        xi_real=(0.2, 1.0),
        init_mean=(1, 1, 0.25, 0.25),
        init_std=(0.5, 0.5, 0.25, 0.25),
    )
    phi = jnp.array([1.0, 0.1, -0.25, 0.5])
    lo, hi = db.box(phi, cfg)
    np.testing.assert_allclose(lo, [0.75, 0.05], rtol=1e-6)
    np.testing.assert_allclose(hi, [1.25, 0.6], rtol=1e-6)
    xi = jax.vmap(lambda k: db.sample_xi(k, phi, cfg))(jax.random.split(jax.random.key(0), 4000))
    assert (xi >= lo).all() and (xi <= hi).all()
    np.testing.assert_allclose(xi.mean(0), [(0.75 + 1.25) / 2, (0.05 + 0.6) / 2], atol=0.01)
    assert bool(db.covers(phi, jnp.array([1.0, 0.3]), cfg))
    assert not bool(db.covers(phi, jnp.array([1.3, 0.3]), cfg))
    lo, hi = db.box(jnp.array([-1.0, 0.1]), TINY)
    np.testing.assert_array_equal([lo, hi], np.float32([[0.05], [0.05]]))


def test_physics_scales_the_field_and_its_derived_ones():
    """xi = 0.2 on CartPole's half pole length 0.5 -> 0.1, and polemass_length (read by the
    step) = masspole 0.1 x 0.1 follows."""
    p = db.physics(TINY, jnp.array([0.2]))
    np.testing.assert_allclose(p.length, 0.1, rtol=1e-6)
    np.testing.assert_allclose(p.polemass_length, 0.01, rtol=1e-6)


def test_cem_refit_against_numpy():
    """[3]'s refit: the top-K of 10 random phi by fitness, their mean and biased std (numpy's
    np.std) plus min_std; the elites are the K best (a refit on the worst fails)."""
    rng = np.random.default_rng(0)
    phis = rng.standard_normal((10, 4)).astype(np.float32)
    fit = rng.standard_normal(10).astype(np.float32)
    mean, std, idx = db.cem_refit(jnp.asarray(phis), jnp.asarray(fit), 3, 0.05)
    top = np.argsort(-fit)[:3]
    assert set(np.asarray(idx)) == set(top)
    np.testing.assert_allclose(mean, phis[top].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, phis[top].std(0) + 0.05, rtol=1e-5)
    s = db.cem_sample(jax.random.key(1), mean, std, 20000)
    np.testing.assert_allclose(s.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(s.std(0), std, rtol=0.03)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the CLI: 2 seeds, one chunk per iteration (recorded for reruns)."""
    return main_recording_chunks(
        db.main,
        cli_args(TINY, db.Config())
        + [
            "--num-seeds",
            str(SEEDS),
            "--log-every",
            "1",
            "--no-progress",
            "--fast-compile",
            "--run-dir",
            str(tmp_path_factory.mktemp("dr_bilevel")),
        ],
    )


def test_bilevel_beats_the_nominal_sim_in_real(tiny_run):
    """Behaviour ([2]'s claim that phi should be picked for the target): after 2 outer
    iterations of 4 phi, the best phi's policy beats the policy trained in the nominal
    simulator (the baseline, trained in the same program with the same keys) in "real"
    (pole length x 0.2), also on fresh target episodes, the last population's mean beats
    it, and the CEM mean's centre has moved from 1.0 toward 0.2.
    Measured (seeds 0 / 1, loaded 2-core CPU): best 479 / 500 (fresh episodes 440 / 444:
    the winner's curse) vs nominal 162 / 150; population mean 312 / 309; centre 0.42 / 0.33;
    the best phi's box holds xi_real in both seeds (not asserted: see the file's docstring on
    ties at the maximum return). Mutations: the CEM refit ranking by the sim training return
    instead of the target return: fresh 316 / 169, population 250 / 139: fails (seed 1); the
    fresh score on the selection episodes (fold_in(key, 1) = k_eval): fails the != assert."""
    h = tiny_run[0].history
    best, nominal = h["charts/best_return"][:, -1], h["charts/nominal_return"][:, -1]
    fresh, pop = h["charts/best_return_fresh"][:, -1], h["charts/target_return_mean"]
    centre = h["charts/centre_length"][:, -1]
    print("best", best, "fresh", h["charts/best_return_fresh"], "nominal", nominal)
    print("population", pop, "centre", centre, "covers", h["charts/best_covers"][:, -1])
    assert (best > nominal + 100).all(), (best, nominal)
    assert (fresh > nominal + 100).all(), (fresh, nominal)
    assert (h["charts/best_return_fresh"] != h["charts/best_return"]).any()  # other episodes
    assert (pop[:, -1] > nominal).all(), (pop, nominal)
    assert (centre < 0.7).all(), centre


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The CLI trains 2 seeds in one vmapped program; its last compiled chunk (iteration 2)
    rerun on the same input states gives bit-identical CEM state and metrics; the seeds
    differ; --help documents every field."""
    first, chunks = tiny_run
    assert len(chunks) == TINY.num_iterations
    chunk, states = chunks[-1]
    again, metrics = chunk(jax.tree.map(jnp.copy, states))  # the chunk donates its input
    metrics = run.mark_undefined(jax.device_get(metrics), run.NAN_UNLESS)
    assert set(metrics) == set(first.history)
    for k, v in metrics.items():
        np.testing.assert_array_equal(first.history[k][:, -1:], v, err_msg=k)
    for k in ("mean", "std", "best_phi", "best_return", "best_fresh"):
        np.testing.assert_array_equal(getattr(first.state, k), getattr(again, k), err_msg=k)
    assert not np.array_equal(
        first.history["charts/centre_length"][0], first.history["charts/centre_length"][1]
    )
    for k in ("charts/best_return", "charts/nominal_return", "charts/width_length"):
        assert first.history[k].shape == (SEEDS, 2) and np.isfinite(first.history[k]).all(), k
    assert (first.run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        db.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(db.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out


def test_update_uses_common_random_numbers(tiny_run):
    """update's wiring, through the CLI's first compiled chunk: with the CEM's mean at the
    nominal phi and its std 0, every member IS the nominal sim, trained and scored with the
    same keys as the baseline, so all P target returns equal the nominal one exactly.
    Catches per-member keys, or a baseline that is not the nominal sim."""
    chunk, states = tiny_run[1][0]
    states = jax.tree.map(jnp.copy, states)
    nominal = jnp.broadcast_to(db.nominal_phi(TINY), states.mean.shape)
    _, m = chunk(states.replace(mean=nominal, std=jnp.zeros_like(states.std)))
    m = jax.device_get(m)
    print("nominal-phi population:", m["charts/target_return_mean"], m["charts/nominal_return"])
    np.testing.assert_array_equal(m["charts/target_return_mean"], m["charts/nominal_return"])
    np.testing.assert_array_equal(m["charts/target_return_max"], m["charts/nominal_return"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in (
        (["--params", "lenght"], "params=.*lenght"),
        (["--xi-real", "0.2"], r"xi_real=\(0.2,\)"),
        (["--init-mean", "1.0"], "init_mean"),
        (["--elite-frac", "0"], "elite.frac"),
        (["--env-id", "Hopper"], "env_id='Hopper'"),
        (["--xi-real", "9", "1"], "xi_real=.*xi_min"),
        (["--num-envs", "0"], "num.envs"),
    ):
        with pytest.raises(ValueError, match=msg):
            db.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(db) == []


def test_paper_preset_traces():
    """eval_shape of init and one outer iteration under the paper preset (CartPole-v1, two
    fields, population 16 + the nominal sim, 64 envs x 128 steps x 100 PPO updates each)."""
    cfg, state, (after, metrics) = trace_paper(db)
    assert cfg.population == 16 and cfg.params == ("length", "masspole")
    assert state.mean.shape == (4,) and state.best_phi.shape == (4,)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))


@pytest.mark.slow
def test_quick_preset_beats_the_nominal_sim(tmp_path):
    """The quick preset (8 phi x 5 iterations, 61k PPO steps each, 2 seeds): the best phi's
    policy against the nominal-sim policy trained in the same program with the same keys
    (the baseline). Measured on a loaded 2-core CPU (83 s wall): best 500 / 500 (also on
    fresh episodes) vs nominal 201 / 222; last population mean 494 / 276; CEM centre
    0.02 / 0.49 (from 1.0)."""
    h = db.main(
        [
            "--preset",
            "quick",
            "--num-seeds",
            "2",
            "--no-progress",
            "--log-every",
            "5",
            "--run-dir",
            str(tmp_path),
        ]
    ).history
    best, nominal = h["charts/best_return"][:, -1], h["charts/nominal_return"][:, -1]
    print("best", best, "nominal", nominal, "centre", h["charts/centre_length"][:, -1])
    assert (best > nominal + 150).all(), (best, nominal)
    assert (h["charts/best_return_fresh"][:, -1] > nominal + 150).all()
    assert (h["charts/target_return_mean"][:, -1] > nominal + 40).all()
    assert (h["charts/centre_length"][:, -1] < 0.6).all()
    assert h["charts/mean_covers"].mean() > 0.5
