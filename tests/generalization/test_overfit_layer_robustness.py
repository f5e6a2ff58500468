"""Tests of generalization/overfit_layer_robustness.py: the layer swap (only layer l changes,
to checkpoint tau or to the fresh draw), the checkpoints kept in the state, the chunked error
rate and the re-randomisation draw by hand; behaviour (re-initialising the first layer to
theta_0 hurts far more than any later layer, re-randomising any layer is near chance)
against a swap that writes the final weights and one that resets every layer, with the NaN
of unreached checkpoints; purity, CLI, the MNIST loader on a fixture, the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import overfit_layer_robustness as lr
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.datasets import write_mnist
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: digits upsampled to 32x32, FCN
# 3x128, Adam 1e-3, 25 epochs of 7 steps, checkpoints at epochs 0, 1 and 10.
TINY = lr.Config(hidden=(128, 128, 128), optimizer="adam", lr=1e-3, num_epochs=25,
                 checkpoint_epochs=(0, 1, 10))
SEEDS = 2
RUN_ARGS = cli_args(TINY, lr.Config()) + ["--num-seeds", str(SEEDS), "--log-every",
                                          str(TINY.num_updates), "--no-progress",
                                          "--fast-compile"]


def _run(run_dir, extra=()):
    return lr.main(RUN_ARGS + ["--run-dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("lr")
    res = _run(d / "run", ["--plot", str(d / "fig.png")])
    res.png = d / "fig.png"
    return res


def _seed(tree, i=0):
    return jax.tree.map(lambda x: np.asarray(x[i]), tree)


def _fresh(state):
    """Seed 0's re-randomisation draw theta~ (jitted: eager flax init is slow)."""
    key = jnp.asarray(state.rerand_key[0])
    fn = jax.jit(lambda k: lr.draw_params(k, TINY))
    return fn.lower(key).compile(run.INIT_COMPILER_OPTIONS)(key)


# --- equations, through the functions update and evaluate run ---


def test_swap_changes_only_layer_l_to_its_source(tiny_run):
    """Eq. (1) / (2): for every layer l and source s (0: the fresh draw, 1 + i: checkpoint
    i), swap_layer's tree equals the trained tree in every layer but l and equals source s
    there; layer -1 swaps nothing. Mutations tried: `layer <= i` (resets every layer up to
    l): fails; the source index ignored (always checkpoint 0): fails."""
    params, ckpts = _seed(tiny_run.state.params), _seed(tiny_run.state.ckpts)
    fresh = _fresh(tiny_run.state)
    sources = jax.tree.map(lambda f, c: np.concatenate([np.asarray(f)[None], c]), fresh, ckpts)
    swap = jax.jit(lr.swap_layer)
    names = lr.layer_names(TINY)
    for l in range(-1, TINY.num_layers):
        for s in range(1 + len(TINY.checkpoint_epochs)):
            out = swap(params, sources, l, s)
            for i, n in enumerate(names):
                want = jax.tree.map(lambda x: x[s], sources[n]) if i == l else params[n]
                jax.tree.map(np.testing.assert_array_equal, out[n], want)
    # the checkpoints are distinct, so the comparisons above could tell them apart
    k = ckpts["Dense_0"]["kernel"]
    assert not np.array_equal(k[0], k[1]) and not np.array_equal(k[1], k[2])


def test_robustness_matrix_is_the_error_of_the_swapped_network(tiny_run):
    """Eq. (3): entries of evaluate's matrices equal the error of a network assembled by hand
    (trained weights, layer l from theta_tau or the fresh draw), and the unswapped network's
    error equals the last logged test error. Mutation tried: test and train outputs swapped
    in `robustness`: fails."""
    f = {k: v[0] for k, v in tiny_run.final.items()}
    params, ckpts = _seed(tiny_run.state.params), _seed(tiny_run.state.ckpts)
    fresh = _fresh(tiny_run.state)
    tr_x, tr_y, te_x, te_y = lr.arrays("digits", "", 32, TINY.num_train, TINY.num_test)
    err = jax.jit(lambda p, x, y: lr.error_rate(p, x, y, TINY))
    cases = ((0, 2, jax.tree.map(lambda c: c[1], ckpts)["Dense_0"]),   # layer 1 <- epoch 1
             (2, 1, jax.tree.map(lambda c: c[0], ckpts)["Dense_2"]),   # layer 3 <- theta_0
             (3, 0, fresh["Dense_3"]))                                  # output <- fresh
    for l, col, layer in cases:
        p = {**params, f"Dense_{l}": layer}
        np.testing.assert_allclose(f["test_err_matrix"][l, col], err(p, te_x, te_y), atol=1e-6)
        np.testing.assert_allclose(f["train_err_matrix"][l, col], err(p, tr_x, tr_y),
                                   atol=1e-6)
    np.testing.assert_allclose(f["test_err"], tiny_run.history["charts/test_err"][0, -1],
                               atol=1e-6)


def test_checkpoints_hold_theta_at_their_epochs(tiny_run):
    """The state keeps theta_0 in slot 0 (bit for bit the runner's initial params) and theta
    after epoch tau in the slot of tau: each slot's relative distance from theta_0, layer by
    layer, equals the distance logged at the end of epoch tau (and differs from the
    neighbouring epochs'). Mutations tried: the slot written at `epoch - 1` (checkpoint 1 =
    theta after epoch 2): fails; the slot of epoch 0 overwritten each epoch: fails."""
    first = run.initial_states(lr.init, TINY, 0, SEEDS)
    jax.tree.map(np.testing.assert_array_equal, first.params,
                 jax.tree.map(lambda c: c[:, 0], tiny_run.state.ckpts))
    h, ck = tiny_run.history, tiny_run.state.ckpts
    for i, n in enumerate(lr.layer_names(TINY)):
        k = np.asarray(ck[n]["kernel"], np.float64)  # (seeds, slots, in, out)
        dist = (np.linalg.norm(k - k[:, :1], axis=(2, 3))
                / np.linalg.norm(k[:, 0], axis=(1, 2))[:, None])
        for slot, epoch in enumerate(TINY.checkpoint_epochs[1:], 1):
            logged = h[f"charts/dist_L{i}"][:, epoch - 1]
            np.testing.assert_allclose(dist[:, slot], logged, rtol=1e-4)
            assert (np.abs(h[f"charts/dist_L{i}"][:, epoch] - logged) > 1e-3 * logged).all()


def test_rerandomisation_draws_from_the_initial_distribution(tiny_run):
    """Eq. (2): the fresh draw is independent of theta_0 (another key) and from the same He
    initialiser: kernel std sqrt(2 / fan_in) within 3%, biases 0 (as at init). Mutation
    tried: the draw made with the init key (re-randomisation = re-initialisation to
    theta_0): fails."""
    theta0 = _seed(tiny_run.state.ckpts)
    theta0 = jax.tree.map(lambda c: c[0], theta0)
    fresh = _fresh(tiny_run.state)
    for n, fan_in in zip(lr.layer_names(TINY), (1024, 128, 128, 128), strict=True):
        k = np.asarray(fresh[n]["kernel"])
        assert abs(k.std() / np.sqrt(2 / fan_in) - 1) < 0.03, (n, k.std())
        assert not np.allclose(k, theta0[n]["kernel"])
        np.testing.assert_array_equal(fresh[n]["bias"], 0)


def test_error_rate_in_chunks_by_hand(monkeypatch):
    """The chunked error rate: 7 images in chunks of 3 (2 padded, not counted); a one-layer
    net whose logits are the input's first 10 values, so the prediction is argmax(x[:10])."""
    monkeypatch.setattr(lr, "EVAL_CHUNK", 3)
    cfg = dataclasses.replace(TINY, hidden=())
    eye = jnp.eye(12, 10)
    params = {"Dense_0": {"kernel": eye, "bias": jnp.zeros(10)}}
    pred = np.array([3, 1, 4, 1, 5, 9, 2])
    x = np.eye(12)[pred].astype(np.float32)
    y = np.array([3, 1, 0, 1, 0, 9, 0], np.int32)  # wrong: images 2, 4 and 6
    assert float(jax.jit(lambda *a: lr.error_rate(*a, cfg))(params, x, y)) == \
        pytest.approx(3 / 7)


# --- behaviour ---


def _swap_final(params, sources, layer, source):
    """Broken: 're-initialisation' writes the trained (final) weights back."""
    return params


def _swap_all(params, sources, layer, source):
    """Broken: every layer reset at once (not one layer at a time)."""
    return {n: jax.tree.map(lambda p, s: jnp.where(layer >= 0, s[source], p), params[n],
                            sources[n]) for n in params}


def _criticality(final):
    """Per seed: rise of test error when re-initialising layer 1 to theta_0, the largest
    rise over the later layers (hidden and output), and the lowest re-randomisation error
    over the layers."""
    base = final["test_err"]
    m = final["test_err_matrix"]  # (seeds, L, 1 + T)
    return m[:, 0, 1] - base, m[:, 1:, 1].max(1) - base, m[:, :, 0].min(1)


def test_first_layer_is_critical_the_others_robust(tiny_run, monkeypatch):
    """[1] Fig. 1a on TINY (2 seeds). Measured (2-core CPU, jax 0.10.2): trained test error
    0.026 / 0.034; re-initialising to theta_0 layer 1 0.472 / 0.664, layer 2 0.049 / 0.082,
    layer 3 0.110 / 0.099, output 0.043 / 0.066; re-randomisation 0.85-0.99 for every
    layer. Asserted: layer 1's rise >= 0.2 and >= 3x the largest rise of layers 2, 3 and
    output (here layer 3's: 0.084 / 0.065), every re-randomisation error >= 0.6. Broken
    variants, re-evaluated on seed 0's trained state: the swap writes the final weights
    (layer-1 rise 0.0: fails), the swap resets every layer at once (every row = everything
    at theta_0, rise 0.83 = layer 1's: fails the 3x ratio). Those re-evaluations (no new
    compile for it) also check the NaN of unreached checkpoints: seed 0's epoch counter is
    set to 5, as after --num-updates 5, so the slot of epoch 10 still holds theta_0 and its
    column must be NaN in both matrices (mutation tried: no mask in evaluate: fails); the
    finished run has no NaN."""
    first, later, rerand = _criticality(tiny_run.final)
    print("rise layer 1", first, "largest rise later", later, "min re-rand error", rerand)
    assert (first >= 0.2).all() and (first >= 3 * later).all() and (rerand >= 0.6).all()

    assert not np.isnan(tiny_run.final["test_err_matrix"]).any()
    seed0 = jax.tree.map(lambda x: x[:1], tiny_run.state).replace(
        epoch=jnp.full((1,), 5, jnp.int32))  # checkpoint 10 (column 3) not reached
    for broken in (_swap_final, _swap_all):
        monkeypatch.setattr(lr, "swap_layer", broken)
        ev = jax.jit(jax.vmap(lambda s: lr.evaluate(s, TINY)))  # a new trace per variant
        ev = ev.lower(seed0).compile(run.INIT_COMPILER_OPTIONS)
        out = jax.tree.map(np.asarray, ev(seed0))
        for k in ("test_err_matrix", "train_err_matrix"):
            assert np.isnan(out[k][:, :, 3]).all() and not np.isnan(out[k][:, :, :3]).any()
        b_first, b_later, _ = _criticality(out)
        print(broken.__name__, b_first, b_later)
        assert not ((b_first >= 0.2) & (b_first >= 3 * b_later)).any()


def test_train_is_pure_and_cli_writes_its_files(tiny_run, tmp_path, capsys):
    """Same seeds: identical a second time; the two seeds differ; the run wrote its files
    and the plot; --help documents every field."""
    with pytest.raises(SystemExit):
        lr.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(lr.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--plot PNG" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists() and tiny_run.png.stat().st_size > 0
    h = tiny_run.history["losses/train"]
    assert h.shape == (SEEDS, TINY.num_updates) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    again = _run(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, tiny_run.state.params, again.state.params)
    jax.tree.map(np.testing.assert_array_equal, tiny_run.state.ckpts, again.state.ckpts)


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--lr", "0"], "--lr must be > 0"),
                       (["--momentum", "1.0"], "momentum=1.0"),
                       (["--optimizer", "rmsprop"], "optimizer='rmsprop'"),
                       (["--checkpoint-epochs", "1", "2"], "must start at 0"),
                       (["--checkpoint-epochs", "0", "3", "2"], "increase strictly"),
                       (["--checkpoint-epochs", "0", "100"], "below num_epochs=100"),
                       (["--num-test", "900"], "exceeds the 1,797"),
                       (["--dataset", "mnist"], "needs --data-dir")):
        with pytest.raises(ValueError, match=msg):
            lr.main(flags + ["--run-dir", str(tmp_path)])


def test_label_corruption_replaces_labels_with_uniform_classes():
    """Zhang et al. 2017's corruption (for the package comparison), drawn once at init from
    fold_in(state.key, 1): at p = 0 the training labels are the true ones; at p = 1 they are
    independent of the images: they agree with the true label for ~1/10 of the 1,000 (0.1
    +- 0.04) and every class appears ~100 times; at p = 0.5 they agree for ~0.55; init's
    state holds exactly these labels; p outside [0, 1] is refused. Mutations tried:
    train_labels ignoring p (true labels kept): fails; init keeping the true labels: fails."""
    y = np.asarray(lr.arrays("digits", "", TINY.image_size, TINY.num_train, TINY.num_test)[1])
    key = jax.random.PRNGKey(3)
    labels = {p: np.asarray(jax.jit(lr.train_labels, static_argnums=1)(
        key, dataclasses.replace(TINY, label_corruption=p))) for p in (0.0, 0.5, 1.0)}
    np.testing.assert_array_equal(labels[0.0], y)
    assert abs((labels[0.5] == y).mean() - 0.55) < 0.05, (labels[0.5] == y).mean()
    assert abs((labels[1.0] == y).mean() - 0.1) < 0.04, (labels[1.0] == y).mean()
    counts = np.bincount(labels[1.0], minlength=10)
    assert counts.size == 10 and counts.min() > 60 and counts.max() < 140, counts
    cfg = dataclasses.replace(TINY, label_corruption=1.0)
    k0 = jax.random.PRNGKey(0)
    state = jax.jit(lr.init, static_argnums=1).lower(k0, cfg).compile(
        run.INIT_COMPILER_OPTIONS)(k0)
    want = jax.jit(lr.train_labels, static_argnums=1)(jax.random.fold_in(state.key, 1), cfg)
    np.testing.assert_array_equal(state.train_y, want)
    assert (np.asarray(state.train_y) != y).mean() > 0.8
    with pytest.raises(ValueError, match="label_corruption=1.5 must be in"):
        dataclasses.replace(TINY, label_corruption=1.5).validate()


def test_every_config_field_is_read():
    assert unread_fields(lr) == []


# --- data on disk and the paper preset ---


def test_mnist_arrays_from_idx_files(tmp_path):
    """MNIST through common.data.load_mnist: flattened to 784, scaled to [0, 1], cut to
    num_train / num_test."""
    root = write_mnist(tmp_path / "mnist", 12, 5)
    tx, ty, sx, sy = lr.arrays("mnist", root, 28, 10, 4)
    assert tx.shape == (10, 784) and sx.shape == (4, 784) and ty.dtype == np.int32
    from common.data import load_mnist
    raw = load_mnist(root)
    np.testing.assert_allclose(tx[3], raw[0][3].ravel() / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(sy, raw[3][:4])
    with pytest.raises(ValueError, match="exceed"):
        lr.arrays("mnist", root, 28, 13, 4)


def test_paper_preset_traces(monkeypatch):
    """eval_shape of init, one epoch and evaluate under `paper` (MNIST 60K / 10K, FCN
    784-256-256-256-10, 8 checkpoints); the data are zeros of MNIST's shapes."""
    z = lambda n: (np.zeros((n, 784), np.float32), np.zeros(n, np.int32))  # noqa: E731
    monkeypatch.setattr(lr, "arrays", lambda *a: (*z(60000), *z(10000)))
    cfg, state, (after, metrics) = trace_paper(lr, data_dir="/nonexistent")
    assert state.params["Dense_0"]["kernel"].shape == (784, 256)
    assert state.ckpts["Dense_3"]["kernel"].shape == (8, 256, 10)
    assert cfg.num_updates == 100 and cfg.steps_per_update == 468
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    out = jax.eval_shape(lambda s: lr.evaluate(s, cfg), state)
    assert out["test_err_matrix"].shape == (4, 9)


# --- slow tier: the quick preset's setting against the catalogue's anchors ---


@pytest.mark.slow
def test_slow_quick_preset_first_layer_critical(monkeypatch):
    """The quick preset (digits 32x32, FCN 3x256, Adam 1e-3, 500 epochs = 3,500 steps, 2
    seeds) against the catalogue's gate: re-initialising layer 1 to theta_0 raises the test
    error by >= 0.1 and >= 3x the largest rise of any later layer; every re-randomisation
    leaves >= 0.7 error. Measured (2-core CPU, jax 0.10.2; one scan over the whole run, so
    not bit-identical to the runner's chunks): trained 0.016 / 0.019; layer 1 re-init to
    epoch 0 0.253 / 0.371 (epoch 3: 0.044 / 0.083, epoch 30: 0.016 / 0.023), layers 2, 3,
    output <= 0.061 for every checkpoint; re-randomisation 0.87-0.97 (4 min). The
    catalogue's anchor (nearest-neighbour x4, 4,000 steps): layer-1 accuracy 0.870 / 0.832
    against 0.976 / 0.979. Broken variant (the swap writes the final weights): rise 0.0,
    fails."""
    cfg = lr.Config(**lr.PRESETS["quick"])
    train = jax.jit(jax.vmap(run.make_train(lr.init, lr.update, cfg)))
    state, _ = train(run.seed_keys(0, 2))
    ev = lambda: jax.tree.map(np.asarray, jax.jit(jax.vmap(  # noqa: E731
        lambda s: lr.evaluate(s, cfg)))(state))
    out = ev()
    print({k: np.round(v, 3) for k, v in out.items()})
    rise = out["test_err_matrix"][:, :, 1] - out["test_err"][:, None]  # (seeds, L)
    assert (rise[:, 0] >= 0.1).all() and (rise[:, 0] >= 3 * rise[:, 1:].max(1)).all(), rise
    assert (out["test_err_matrix"][:, :, 0] >= 0.7).all()
    monkeypatch.setattr(lr, "swap_layer", _swap_final)
    broken = ev()
    b = broken["test_err_matrix"][:, 0, 1] - broken["test_err"]
    print("broken: final weights written back, layer-1 rise", b)
    assert not (b >= 0.1).any()
