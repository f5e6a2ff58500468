"""Tests of selfsup/denoising_ae.py: the masking corruption (exactly nu d components set to
0), the tied sigmoid autoencoder and its cross-entropy by hand, the clean target, greedy
stacking on clean codes, behaviour against "output the corrupted input" and an ordinary
(nu = 0) autoencoder in the same run, probes beside random init, purity, CLI and the paper
preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import denoising_ae as dae
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: the 8x8 digits, two layers of 128
# (overcomplete: an ordinary autoencoder can then learn to copy its input) and 32 units,
# batches of 16, 3 epochs of 62 steps per layer (372 updates). With (32, 16) units the
# ordinary autoencoder denoised nearly as well as the DAE (0.038 vs 0.035).
TINY = dae.Config(image_size=8, hidden_sizes=(128, 32), lr=0.1, batch_size=16, num_epochs=3)
SEEDS = 2
CORRUPT = jax.jit(dae.corrupt, static_argnums=2)
UPDATE = jax.jit(dae.update, static_argnums=1)


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def test_masking_destroys_exactly_nu_d_components_at_random():
    """[1] Sec. 2.3: "a fixed number nu d of components are chosen at random, and their
    value is forced to 0, while the others are left untouched". On 2,000 rows of d = 64
    values in (0.5, 1): every row has exactly round(0.25 * 64) = 16 zeros, the other values
    are the input's, every component is destroyed in 25% +- 3% of the rows, and the rows
    differ. nu = 0 is the identity; nu is traced (one program for both). Bernoulli destroys
    a binomial count (mean nu d, not fixed); gaussian adds noise of std nu. Mutations
    tried: destroying the first nu d components (no permutation) fails the frequencies;
    Bernoulli in place of masking fails the exact count."""
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, (2000, 64)), jnp.float32)
    key = jax.random.PRNGKey(0)
    xt = np.asarray(CORRUPT(key, x, "masking", jnp.float32(0.25)))
    zero = xt == 0
    assert (zero.sum(1) == 16).all()
    np.testing.assert_array_equal(xt[~zero], np.asarray(x)[~zero])
    np.testing.assert_allclose(zero.mean(0), 0.25, atol=0.03)
    assert len({r.tobytes() for r in zero[:50]}) == 50
    np.testing.assert_array_equal(CORRUPT(key, x, "masking", jnp.float32(0.0)), x)
    nb = (np.asarray(CORRUPT(key, x, "bernoulli", jnp.float32(0.25))) == 0).sum(1)
    assert abs(nb.mean() - 16) < 0.5 and nb.std() > 2
    g = np.asarray(CORRUPT(key, x, "gaussian", jnp.float32(0.3))) - np.asarray(x)
    assert abs(g.mean()) < 0.01 and abs(g.std() - 0.3) < 0.01


def test_tied_sigmoid_autoencoder_and_cross_entropy_by_hand():
    """[1] Sec. 2.2 and Eq. 2 on d = 3, d' = 2: y = s(W x + b), z = s(W^T y + b'),
    L_H = -sum_k [x_k log z_k + (1 - x_k) log(1 - z_k)] for a grey-level x, in numpy; and
    with untied weights z = s(W' y + b'). nu = 0 makes dae_loss that loss. Mutations tried:
    the decoder with W in place of W^T (a shape error here; with d = d' a wrong value),
    a mean over components in place of the sum, each fails."""
    w = np.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]], np.float32)  # (d, d')
    b, bp = np.array([0.1, -0.2], np.float32), np.array([0.0, 0.3, -0.1], np.float32)
    x = np.array([[1.0, 0.25, 0.0]], np.float32)
    y = _sigmoid(x @ w + b)
    z = _sigmoid(y @ w.T + bp)
    hand = -(x * np.log(z) + (1 - x) * np.log(1 - z)).sum()
    wp = np.array([[0.3, -0.4, 1.0], [2.0, 0.1, -0.5]], np.float32)  # (d', d)
    zu = _sigmoid(y @ wp + bp)
    hand_u = -(x * np.log(zu) + (1 - x) * np.log(1 - zu)).sum()

    @jax.jit  # one program (eager, each op compiles on its own)
    def ours(p, x, wp):
        logits = dae.decode_logits(p, dae.encode(p, x))
        untied = dae.decode_logits({**p, "W_prime": wp}, dae.encode(p, x))
        return (
            dae.encode(p, x),
            jax.nn.sigmoid(logits),
            dae.reconstruction_loss(logits, x),
            dae.dae_loss(p, x, jax.random.PRNGKey(0), "masking", 0.0),
            dae.reconstruction_loss(untied, x),
        )

    p = {"W": jnp.asarray(w), "b": jnp.asarray(b), "b_prime": jnp.asarray(bp)}
    y_ours, z_ours, loss, loss_nu0, loss_u = ours(p, jnp.asarray(x), jnp.asarray(wp))
    np.testing.assert_allclose(y_ours, y, rtol=1e-6)
    np.testing.assert_allclose(z_ours, z, rtol=1e-6)
    np.testing.assert_allclose(loss, hand, rtol=1e-5)
    np.testing.assert_allclose(loss_nu0, hand, rtol=1e-5)
    np.testing.assert_allclose(loss_u, hand_u, rtol=1e-5)
    layer = dae.init_layer(jax.random.PRNGKey(0), 64, 32, tied=True)
    a = 4 * np.sqrt(6 / 96)
    assert set(layer) == {"W", "b", "b_prime"} and np.abs(layer["W"]).max() <= a
    assert np.abs(layer["W"]).max() > 0.9 * a and not np.asarray(layer["b"]).any()
    assert dae.init_layer(jax.random.PRNGKey(0), 64, 32, tied=False)["W_prime"].shape == (32, 64)


def test_dae_reconstructs_the_clean_input_and_stacks_on_clean_codes():
    """[1] Eq. 3: the loss of a corrupted x~ is L_H(x, g(f(x~))) against the CLEAN x (not
    x~), with x~ from the same key. [1] Sec. 2.4: layer 2 trains as a DAE on layer 1's code
    of the uncorrupted input, y_1 = f_1(x), with its own corruption. Mutations tried: the
    target x~ in place of x, and layer 2 fed the code of the corrupted input, each fails."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0, 1, (4, 64)), jnp.float32)
    params = jax.jit(dae.init, static_argnums=1)(jax.random.PRNGKey(0), TINY).params
    key, nu = jax.random.PRNGKey(3), jnp.float32(0.25)
    k1, k2 = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    losses = jax.jit(
        lambda params, x: [dae.layer_loss(params, k, x, key, "masking", nu) for k in range(2)]
    )(params, x)

    @jax.jit  # the hand computation as one program
    def hand(params, x):
        p1, p2 = params
        xt = dae.corrupt(k1, x, "masking", nu)
        out = dae.decode_logits(p1, dae.encode(p1, xt))
        y1 = dae.encode(p1, x)
        y1t = dae.corrupt(k2, y1, "masking", nu)
        return (
            dae.reconstruction_loss(out, x),
            dae.reconstruction_loss(out, xt),
            dae.reconstruction_loss(dae.decode_logits(p2, dae.encode(p2, y1t)), y1),
        )

    clean, against_xt, hand2 = hand(params, x)
    assert abs(float(clean - against_xt)) > 0.1
    np.testing.assert_allclose(losses[0], clean, rtol=1e-5)
    np.testing.assert_allclose(losses[1], hand2, rtol=1e-5)


def test_layers_train_one_at_a_time_bottom_first():
    """[1] Sec. 2.4, greedy: in the first steps_per_layer updates only layer 1 moves; after
    them only layer 2 (its loss does not reach layer 1 through the stopped code). SGD step
    by hand: the layer in training moves by -lr * grad of its own loss. Mutations tried:
    dropping stop_gradient moves layer 1 in layer 2's phase, summing every layer's loss
    moves both layers in both phases, the switch always on branch 0 (layer 1) moves the
    wrong layer; each fails."""
    state = jax.jit(dae.init, static_argnums=1)(jax.random.PRNGKey(0), TINY)
    for step, moving in ((0, 0), (TINY.steps_per_layer, 1), (TINY.num_updates - 1, 1)):
        s = state.replace(step=jnp.asarray(step, jnp.int32))
        after, metrics = UPDATE(s, TINY)
        assert float(metrics["charts/layer"]) == moving
        for k in range(2):
            same = [
                np.array_equal(a, b)
                for a, b in zip(
                    jax.tree.leaves(after.params[k]), jax.tree.leaves(s.params[k]), strict=True
                )
            ]
            assert all(same) == (k != moving), (step, k)

    @jax.jit  # the step of layer 1: -lr * grad of its loss on the batch update draws
    def by_hand(state):
        _, k_batch, k_noise = jax.random.split(state.key, 3)
        idx = jax.random.choice(k_batch, TINY.num_train, (TINY.batch_size,), replace=False)
        x = jnp.asarray(dae.train_images(TINY)[0])[idx]
        g = jax.grad(
            lambda p: dae.layer_loss((p, state.params[1]), 0, x, k_noise, "masking", state.nu)
        )(state.params[0])
        return state.params[0]["W"] - TINY.lr * g["W"]

    after, _ = UPDATE(state, TINY)
    np.testing.assert_allclose(after.params[0]["W"], by_hand(state), atol=1e-5)


# chunks of one epoch (62 updates; one compiled program): the purity test reruns 62 updates.
# Seeds 0 and 1 train the DAE (nu = 0.25), seed AE (State.nu = 0) an ordinary autoencoder,
# all in the run's one vmapped program.
CHUNK = TINY.steps_per_layer // TINY.num_epochs
AE = 2
RUN_ARGS = cli_args(TINY, dae.Config()) + [
    "--num-seeds",
    str(SEEDS + 1),
    "--log-every",
    str(CHUNK),
    "--no-progress",
]


GATE = 0.6
"""held-out MSE of the denoised digits, as a share of the corrupted input's: the DAE is below,
the ordinary autoencoder above"""


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS + 1 seeds (the last one an ordinary
    autoencoder: the runner's initial states with nu = 0) in chunks of CHUNK updates, then
    evaluate(); with the compiled chunks and their inputs, and the compiled evaluate."""
    evaluates = []
    real_initial_states = run.initial_states

    def initial_states(*args):
        states = real_initial_states(*args)
        return states.replace(nu=jnp.where(jnp.arange(SEEDS + 1) == AE, 0.0, states.nu))

    def evaluate_seeds(evaluate, state, cfg, num_seeds, compiler_options=None):
        """run.evaluate_seeds (a jitted evaluate), the compiled program kept."""
        fn = jax.jit(run.seed_map(lambda s: evaluate(s, cfg), num_seeds))
        evaluates.append(fn.lower(state).compile(compiler_options))
        return jax.device_get(evaluates[-1](state))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "initial_states", initial_states)
        mp.setattr(run, "evaluate_seeds", evaluate_seeds)
        res, chunks = main_recording_chunks(
            dae.main, RUN_ARGS + ["--run-dir", str(tmp_path_factory.mktemp("dae"))]
        )
    return res, chunks, evaluates[0]


def test_dae_denoises_held_out_digits_better_than_its_input_and_an_ordinary_ae(recorded_run):
    """Behaviour ([1] Sec. 2.3): TINY (2 x 186 updates), 2 seeds, on the 797 held-out
    digits with 25% of their pixels masked: per-pixel MSE of the first layer's
    reconstruction against the clean digit, beside "output the corrupted input", an
    ordinary autoencoder (nu = 0, a third seed of the same run: the broken variant) and the
    stack at init (the run's compiled evaluate). Measured on a loaded 2-core CPU (jax
    0.10.2):
        DAE 0.0299 0.0295   corrupted input 0.0588   ordinary AE 0.0431   init 0.28 0.26
    so the DAE passes the gate of 0.6 x the corrupted input's MSE (0.0353) and the ordinary
    AE fails it. Probes of the top code, k-NN with 10 labels per class: DAE 0.803 0.793,
    init 0.683 0.681 (asserted: + 0.05), ordinary AE 0.856 (init 0.753): on digits the
    denoising criterion does not give better features than the ordinary AE here.
    Mutations tried: training ignores nu (every seed an ordinary AE): DAE seeds 0.0439
    0.0432, fail; nu from the config instead of the state (the AE seed trains as a DAE):
    AE 0.0298, fails; no parameter update: 0.28 0.26, fails the gate (before the probe
    assert); recon_ce of the logits against x~ instead of the clean x: 16.92 against L_H
    19.93 by hand, fails."""
    quick_run, chunks, evaluate = recorded_run
    initial = chunks[0][1]
    np.testing.assert_array_equal(initial.nu, [0.25, 0.25, 0.0])
    out = quick_run.final
    init = jax.device_get(evaluate(jax.tree.map(jnp.copy, initial)))
    print(
        {k: np.round(v, 4) for k, v in out.items()},
        "init",
        {k: np.round(v, 4) for k, v in init.items()},
    )
    mse, base = out["recon_mse"], out["corrupted_mse"]
    np.testing.assert_allclose(base, base[0])  # the same corrupted test set for every seed
    assert (mse[:SEEDS] <= GATE * base[0]).all(), (mse, base)
    assert mse[AE] > GATE * base[0], mse
    assert (init["recon_mse"] > 2 * base[0]).all(), init
    assert (out["knn_few"][:SEEDS] >= init["knn_few"][:SEEDS] + 0.05).all(), (out, init)
    # recon_ce: L_H per held-out digit of the first layer's denoising logits, in numpy
    params0 = jax.tree.map(lambda a: a[0], quick_run.state.params)
    te_x = dae.train_images(TINY)[2]
    _, logits, _ = jax.jit(dae.denoise, static_argnums=3)(
        params0, jnp.asarray(te_x), jax.random.PRNGKey(1), TINY
    )
    logits = np.asarray(logits, np.float64)  # log z = -log(1 + e^-a), log(1 - z) = -log(1 + e^a)
    l_h = (te_x * np.logaddexp(0, -logits) + (1 - te_x) * np.logaddexp(0, logits)).sum(1)
    np.testing.assert_allclose(out["recon_ce"][0], l_h.mean(), rtol=1e-4)


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states of seeds 0-2 again (nu from the config), and
    its first chunk rerun from them, are bit-identical to the run's; the two DAE seeds
    differ; the run wrote its files; --help documents every field. Mutation tried: init
    ignoring its key (every seed the same run) fails."""
    quick_run, chunks, _ = recorded_run
    with pytest.raises(SystemExit):
        dae.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(dae.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    h = quick_run.history["losses/reconstruction"]  # layer 1's for the first 186 updates
    assert h.shape == (SEEDS + 1, TINY.num_updates) and np.isfinite(h).all()
    assert (h[:, 150:180].mean(1) < h[:, :10].mean(1)).all()  # layer 1's loss falls
    assert not np.array_equal(h[0], h[1])
    first_chunk, first_input = chunks[0]
    again = run.initial_states(dae.init, TINY, 0, SEEDS + 1)
    np.testing.assert_array_equal(again.nu, 0.25)
    jax.tree.map(
        np.testing.assert_array_equal, first_input, again.replace(nu=jnp.array([0.25, 0.25, 0.0]))
    )
    state, metrics = first_chunk(jax.tree.map(jnp.copy, first_input))  # the chunk donates
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :CHUNK], metrics["losses/reconstruction"])


def test_evaluate_probes_the_top_code():
    """evaluate's probes get the code of the top layer (32 units in TINY, the first has 128)
    for the 1,000 training and 797 held-out digits: probe.probe's inputs recorded under
    jax.eval_shape (nothing runs). Mutation tried: the first layer's code probed fails."""
    seen = []

    def record(key, f_tr, y_tr, f_te, y_te, *args):
        seen.append((f_tr.shape, f_te.shape))
        return {}

    state = jax.eval_shape(lambda k: dae.init(k, TINY), jax.random.PRNGKey(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dae.probe, "probe", record)
        jax.eval_shape(lambda s: dae.evaluate(s, TINY), state)
    assert seen == [((TINY.num_train, TINY.hidden_sizes[-1]), (797, TINY.hidden_sizes[-1]))]


def test_bad_values_fail_with_named_field(tmp_path):
    """Each bad value fails before anything compiles, naming the field. The flags go on top
    of TINY's with one update, so a check that went missing fails fast (a mutant without the
    corruption check trained the paper preset for minutes)."""
    tiny = cli_args(TINY, dae.Config()) + ["--num-updates", "1", "--no-progress"]
    for i, (flags, msg) in enumerate(
        (
            (["--corruption", "salt"], "corruption='salt' must be one of"),
            (["--corruption-fraction", "1.5"], "--corruption-fraction must be in"),
            (["--lr", "0"], "--lr must be > 0"),
            (["--hidden-sizes", "32", "0"], "hidden_sizes=\\(32, 0\\)"),
            (["--batch-size", "2000"], "batch_size=2000 exceeds"),
        )
    ):
        with pytest.raises(ValueError, match=msg):
            dae.main(tiny + flags + ["--run-dir", str(tmp_path / str(i))])


def test_every_config_field_is_read():
    """Mutation tried: the k-NN probe with a literal 0.07 for knn_temperature fails."""
    assert unread_fields(dae) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: three tied layers of 1000 sigmoid
    units on 28x28 digits, single-example SGD, 15 epochs per layer; nothing runs. Mutation
    tried: a paper preset at 8x8 fails the shapes."""
    cfg, state, (after, metrics) = trace_paper(dae)
    assert [p["W"].shape for p in state.params] == [(784, 1000), (1000, 1000), (1000, 1000)]
    assert all("W_prime" not in p for p in state.params)
    assert cfg.num_updates == 3 * 15 * 1000 and cfg.batch_size == 1
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
