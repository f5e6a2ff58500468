"""Tests of selfsup/bigan.py: the two losses' signs (Eq. 3 and the inverse objective), each
loss's gradient reaching only its own parameter group and both at log 2 at init, the
uniform prior, E's range (both priors), the learning rate schedule, the optimiser's
composition, the networks and the inversion error and 1-NN by hand; the behaviour
(inversion and probes of E(x) against the random-init E, against D blind to z); purity,
CLI, bad values, Config fields and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import probe, run
from selfsup import bigan as bg
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: MLPs of width 128, latent 10, a
# constant lr of 1e-3 (no decay within the run), 2 chunks of 200 steps, a 20-step
# supervised reference.
TINY = bg.Config(hidden=128, latent_dim=10, lr=1e-3, num_epochs=58, decay_epochs=0,
                 supervised_steps=20)
NUM_STEPS = 400
SEEDS = 2
LOG_EVERY = 200


def params_and_batch(cfg, key=0):
    k = jax.random.PRNGKey(key)
    x = jnp.asarray(bg.images(cfg)[0][:32])
    return compiled(lambda k: bg.init_params(k, cfg), k), x, compiled(
        lambda k: bg.sample_prior(k, 32, cfg), jax.random.PRNGKey(7))


def test_loss_signs_by_hand():
    """D's loss (-Eq. 3 / 2) and E, G's inverse objective at logits 0: both log 2 (the
    released log's first line, 0.6932); D right and confident (real +10, fake -10): D's
    loss ~e^-10, E and G's ~10 (the non-saturating -log D(G(z), z) and -log(1 - D(x,
    E(x))) terms each 10); D fooled (real -10, fake +10): the reverse. Mutation tried:
    generator_encoder_loss with discriminator_loss's labels fails."""
    z, big = np.zeros(8, np.float32), np.full(8, 10.0, np.float32)
    d0, ge0, d1, ge1, d2, ge2 = map(float, compiled(lambda: (
        bg.discriminator_loss(z, z), bg.generator_encoder_loss(z, z),
        bg.discriminator_loss(big, -big), bg.generator_encoder_loss(big, -big),
        bg.discriminator_loss(-big, big), bg.generator_encoder_loss(-big, big))))
    np.testing.assert_allclose([d0, ge0], [np.log(2)] * 2, rtol=1e-6)
    np.testing.assert_allclose([d1, ge2], [np.log1p(np.exp(-10))] * 2, rtol=1e-4)
    np.testing.assert_allclose([ge1, d2], [10.0] * 2, rtol=1e-3)


def test_each_loss_reaches_only_its_group():
    """At init D's output layer is 0 (released LinearPredictor stddev=0), so both losses
    equal log 2 (to float32 rounding; the released log's "0) JD: 0.6932 E: 0.6932"). With that layer
    drawn at random: jax.grad per parameter group of the losses `update` differentiates:
    D's loss moves only D (E's and G's gradients exactly 0), E and G's only E and G (D's
    exactly 0), and every group of its own loss gets a non-zero gradient; with D blind to
    z (the broken control) E's gradient is exactly 0. A small step along each own gradient
    lowers each loss (the signs: D descends its loss, E and G theirs). `gradients` (what
    `update` differentiates with: two vjps through D) gives the same per-group gradients
    and losses. Mutations tried: no stop_gradient on E(x) in D's loss fails; D's output
    layer at N(0, 0.02) fails (losses 0.6929, 0.6934); `gradients` pulling D's loss
    cotangent back into E (in place of E and G's) fails; D's gradient from the real pairs
    only fails."""
    params, x, z = params_and_batch(TINY)
    blind = dataclasses.replace(TINY, d_sees_z=False)

    def grads(cfg, params):
        g_d = jax.grad(lambda p: bg.losses(p, x, z, cfg)[0])(params)
        g_ge = jax.grad(lambda p: bg.losses(p, x, z, cfg)[1])(params)
        step = lambda g, names: {k: jax.tree.map(lambda a, b: a - 1e-3 * b, v, g[k])
                                 if k in names else v for k, v in params.items()}
        ld0, lge0, _ = bg.losses(params, x, z, cfg)
        ld1 = bg.losses(step(g_d, "d"), x, z, cfg)[0]
        lge1 = bg.losses(step(g_ge, "eg"), x, z, cfg)[1]
        return g_d, g_ge, (ld0, ld1, lge0, lge1)

    def all_grads(params, key):
        at_init = bg.losses(params, x, z, TINY)[:2]
        last = params["d"]["Dense_3"]["kernel"]
        params = {**params, "d": {**params["d"], "Dense_3": {
            "kernel": 0.02 * jax.random.normal(key, last.shape)}}}
        d = params["d"]  # blind D: no z branch, its output layer is Dense_2
        params_b = {**params, "d": {"Dense_0": d["Dense_0"], "Dense_1": d["Dense_1"],
                                    "Dense_2": d["Dense_3"]}}
        g_ge_b = jax.grad(lambda q: bg.losses(q, x, z, blind)[1])(params_b)
        return at_init, grads(TINY, params), g_ge_b, bg.gradients(params, x, z, TINY)

    (ld_init, lge_init), (g_d, g_ge, (ld0, ld1, lge0, lge1)), g_ge_b, (g_up, l_up) = (
        compiled(all_grads, params, jax.random.PRNGKey(3)))
    np.testing.assert_allclose([ld_init, lge_init], [np.log(2)] * 2, rtol=1e-6)  # 1 ulp
    norm = lambda t: float(sum(jnp.abs(a).sum() for a in jax.tree.leaves(t)))
    assert norm(g_d["e"]) == 0 and norm(g_d["g"]) == 0 and norm(g_d["d"]) > 0
    assert norm(g_ge["d"]) == 0 and norm(g_ge["e"]) > 0 and norm(g_ge["g"]) > 0
    assert ld1 < ld0 and lge1 < lge0, (ld0, ld1, lge0, lge1)
    assert norm(g_ge_b["e"]) == 0 and norm(g_ge_b["g"]) > 0
    # update's two-vjp gradients are these, group by group
    want = {"d": g_d["d"], "e": g_ge["e"], "g": g_ge["g"]}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9),
                 g_up, want)
    np.testing.assert_allclose(l_up[:2], [ld0, lge0], rtol=1e-6)


def test_optimizer_l2_before_adam_and_schedule():
    """The released update: L2 added to the gradient, then Adam, then the scheduled lr. With
    a zero loss gradient Adam's first step normalises the L2 term alone: -lr sign(p); with
    every count advanced to step n in the decay epochs (zero moments, Adam's bias
    correction at n + 1): -lr_schedule(n) m_hat / (sqrt(v_hat) + eps), g = wd p. Mutations tried: L2
    after Adam (u = -lr wd p) fails; scale_by_learning_rate(cfg.lr) (no decay) fails."""
    cfg = dataclasses.replace(TINY, num_epochs=2, decay_epochs=4)  # 7 steps an epoch
    p = {"a": jnp.array([1.0, -2.0, 4.0, -8.0])}
    n = 7 * 3 + 2  # epoch 3: lr x 0.01^(2 / 4)
    tx = bg.optimizer(cfg)
    g = jax.tree.map(jnp.zeros_like, p)

    def both(p):
        s = tx.init(p)
        later = optax.tree_utils.tree_set(s, count=jnp.asarray(n, jnp.int32))
        return tx.update(g, s, p)[0]["a"], tx.update(g, later, p)[0]["a"]

    u0, un = map(np.asarray, compiled(both, p))
    sign = np.sign(np.asarray(p["a"]))
    np.testing.assert_allclose(u0, -cfg.lr * sign, rtol=1e-3)
    b1, b2, k = cfg.adam_b1, cfg.adam_b2, n + 1
    g_l2 = cfg.weight_decay * np.asarray(p["a"], np.float64)
    m_hat, v_hat = (1 - b1) * g_l2 / (1 - b1**k), (1 - b2) * g_l2**2 / (1 - b2**k)
    lr_n = cfg.lr * 0.01 ** (2 / 4)
    np.testing.assert_allclose(un, -lr_n * m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-4)


def test_networks_by_hand():
    """Width-1 networks with every weight 1 and batch-norm statistics mean 1, variance 1:
    E (normal prior, linear output): -1 -> LReLU -0.2 -> -0.2 -> BN -1.2 -> LReLU -0.24,
    and 3 -> 3 -> BN 2 -> 2; the uniform prior's E is 2 sigmoid - 1 of the same. D(x, z):
    (-1, 0) -> -0.2 + 0 -> BN -1.2 -> -0.24 and (3, -1) -> 3 - 1 -> BN 1 -> 1. G(z) with
    ReLU and z into the second layer: -1 -> BN -2 -> 0 -> 0 - 1 -> BN -2 -> 0 -> sigmoid
    0.5, and 2 -> 1 -> 1 + 2 -> BN 2 -> sigmoid(2). Batch-norm layers: E one, G two, D one.
    Mutations tried: E's LReLU slope 0, BN dropped from E, G's sigmoid dropped: each
    fails."""
    enc_n = bg.Encoder(1, 1, "normal")
    enc_u, gen, dis = bg.Encoder(1, 1, "uniform"), bg.Generator(1, 1), bg.Discriminator(1)
    a = jnp.array([[-1.0], [3.0]])
    xd, zd = jnp.array([[-1.0], [3.0]]), jnp.array([[0.0], [-1.0]])
    zg = jnp.array([[-1.0], [2.0]])

    nets = ((enc_n, (a,)), (enc_u, (a,)), (dis, (xd, zd)), (gen, (zg,)))
    shapes = [jax.eval_shape(lambda m=m, a=a: m.init(jax.random.PRNGKey(0), *a, train=True))
              for m, a in nets]
    stats = [sorted(v["batch_stats"]) for v in shapes]

    def by_hand():
        ones = lambda t: jax.tree.map(lambda s: jnp.ones(s.shape), t)
        return [m.apply({"params": ones(v["params"]), "batch_stats": ones(v["batch_stats"])},
                        *a, train=False).reshape(-1)
                for (m, a), v in zip(nets, shapes, strict=True)]

    e_n, e_u, d, g = compiled(by_hand)
    assert stats == [["BatchNorm_0"], ["BatchNorm_0"], ["BatchNorm_0"],
                     ["BatchNorm_0", "BatchNorm_1"]], stats
    np.testing.assert_allclose(e_n, [-0.24, 2.0], rtol=1e-5)
    np.testing.assert_allclose(e_u, 2 / (1 + np.exp(-np.array([-0.24, 2.0]))) - 1, rtol=1e-5)
    np.testing.assert_allclose(d, [-0.24, 1.0], rtol=1e-5)
    np.testing.assert_allclose(g, [0.5, 1 / (1 + np.exp(-2.0))], rtol=1e-5)


def test_simultaneous_and_alternating_steps(recorded_run):
    """One `update` from the run's recorded initial state (seed 0) both ways: D's step is
    the same (it always answers the current E and G), E's and G's differ (alternating: they
    answer the updated D), and every group moves. Mutation tried: the alternating branch
    keeping the simultaneous gradients fails (E's steps equal)."""
    alt = dataclasses.replace(TINY, simultaneous=False)
    s0 = jax.tree.map(lambda a: a[0], recorded_run[1][0][1])
    p_sim, p_alt = compiled(lambda s: (bg.update(s, TINY)[0].params,
                                       bg.update(s, alt)[0].params), s0)
    p0 = s0.params
    diff = lambda a, b: float(sum(jnp.abs(u - v).sum() for u, v in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))
    assert diff(p_sim["d"], p_alt["d"]) == 0
    assert diff(p_sim["e"], p_alt["e"]) > 0 and diff(p_sim["g"], p_alt["g"]) > 0
    assert min(diff(p0[k], p_sim[k]) for k in "egd") > 0


def test_prior_encoder_range_and_schedule():
    """z ~ U[-1, 1]^d (mean ~0, all inside, var ~1/3); E(x) = 2 sigmoid - 1 lies inside
    (-1, 1) on both sides of 0 and is 2 sigmoid - 1 of the "pre_" features times E's
    output layer, a normal prior's E is linear (outside [-1, 1] somewhere for
    the input 10 x under the batch-norm statistics of x); the released schedule: lr for
    num_epochs, then lr x 0.01^((e - E + 1) / D) per epoch,
    0.01 lr from the last epoch on. Mutations tried: decay from epoch E without the +1
    fails (the first decayed epoch would still be at lr); E's output a plain sigmoid fails
    (no negative value); the normal prior's E through 2 sigmoid - 1 fails; the "pre_"
    features taken before E's last LReLU fail."""
    z = np.asarray(compiled(lambda k: bg.sample_prior(k, 4000, TINY), jax.random.PRNGKey(0)))
    assert z.shape == (4000, 10) and np.abs(z).max() <= 1
    np.testing.assert_allclose(z.var(), 1 / 3, rtol=0.05)
    params, x, _ = params_and_batch(TINY)
    normal = dataclasses.replace(TINY, prior="normal")
    e, e_n, pre = map(np.asarray, compiled(lambda p: (
        bg.encode(p["e"], x, x, TINY), bg.encode(p["e"], 10 * x, x, normal),
        bg.encode(p["e"], x, x, TINY, features=True)), params))
    assert e.shape == (32, 10) and np.abs(e).max() < 1 and e.min() < 0 < e.max()
    # the "pre_" probes' features: E(x) = 2 sigmoid(pre W) - 1 with W E's output layer
    w = np.asarray(params["e"]["Dense_2"]["kernel"])
    assert pre.shape == (32, 128)
    np.testing.assert_allclose(e, 2 / (1 + np.exp(-pre @ w)) - 1, rtol=1e-4, atol=1e-6)
    assert np.abs(e_n).max() > 1
    cfg = dataclasses.replace(TINY, num_epochs=2, decay_epochs=4)  # 7 steps an epoch
    lrs = np.asarray(compiled(lambda s: jax.vmap(bg.lr_schedule(cfg))(s),
                              jnp.arange(0, 7 * 8, 7)))
    want = TINY.lr * 0.01 ** np.array([0, 0, 1 / 4, 2 / 4, 3 / 4, 1, 1, 1])
    np.testing.assert_allclose(lrs, want, rtol=1e-5)


def test_inversion_error_and_nn1_by_hand():
    """||x - G(E(x))|| on a perfect reconstruction is 0 and its random pairing (x' = the
    next image) the mean distance between neighbours: for x = [0, 3e_1, 3e_1 + 4e_2] it is
    (3 + 4 + 5) / 3 = 4. The euclidean 1-NN takes the nearest training feature's label
    (cosine would pick differently here). Mutation tried: base error against x itself
    (no roll) fails."""
    x = jnp.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    err, base = compiled(bg.inversion_errors, x, x)
    assert float(err) == 0 and abs(float(base) - 4.0) < 1e-6
    tr = jnp.array([[1.0, 0.0], [10.0, 1.0]])
    te = jnp.array([[9.0, 0.0], [0.9, 0.2]])
    acc = compiled(bg.nn1_accuracy, tr, jnp.array([0, 1]), te, jnp.array([1, 0]))
    assert float(acc) == 1.0


RUN_ARGS = cli_args(TINY, bg.Config()) + [
    "--num-seeds", str(SEEDS), "--num-updates", str(NUM_STEPS), "--log-every",
    str(LOG_EVERY), "--no-progress"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS seeds in 2 chunks of 200 steps (one
    compiled program), then evaluate(); with the compiled chunks and their inputs."""
    return main_recording_chunks(bg.main, RUN_ARGS + [
        "--run-dir", str(tmp_path_factory.mktemp("bigan"))])


BLIND_STEPS = 200


def blind_run():
    """The broken control, the same seeds, BLIND_STEPS steps: D sees x alone, so E's loss gradient
    is exactly 0. Returns its linear probes of E(x) (all labels, 10 per class) and its
    inversion errors (the same functions evaluate() runs), per seed."""
    cfg = dataclasses.replace(TINY, d_sees_z=False)

    def one(key):
        s, _ = run.make_train(bg.init, bg.update, cfg, BLIND_STEPS)(key)
        tr_x, tr_y, te_x, te_y = s.data
        f_tr, f_te = (bg.encode(s.params["e"], a, tr_x, cfg) for a in (tr_x, te_x))
        idx = probe.per_class_indices(jax.random.PRNGKey(0), tr_y, 10, cfg.probe_per_class)
        few = probe.linear_probe(f_tr[idx], tr_y[idx], f_te, te_y, 10, cfg.probe_l2)
        lin = probe.linear_probe(f_tr, tr_y, f_te, te_y, 10, cfg.probe_l2)
        return lin, few, *bg.inversion_errors(te_x, bg.reconstruct(s.params, te_x, tr_x, cfg))

    return [np.asarray(a) for a in compiled(jax.vmap(one), run.seed_keys(0, SEEDS))]


def test_bigan_learns_features_and_inverts_g(recorded_run):
    """Behaviour on the 797 held-out digits after 400 steps, both seeds, in one test with
    its broken control (D blind to z). BiGAN: the linear probe of E(x) on all 1,000 labels
    beats the same E at its random init on each seed, the 10-per-class probe on the mean of
    the two seeds, and G(E(x)) is closer to x than to the next image. Measured (loaded
    2-core CPU; seeds 0, 1; deterministic): linear 0.837, 0.808 vs init 0.740, 0.729;
    linear few 0.737, 0.710 (mean 0.723) vs 0.593, 0.645 (0.619); 1-NN 0.844, 0.853 vs
    0.729, 0.813 (not gated); inversion 2.32, 2.18 vs random pairing 2.98, 2.95 (ratios
    0.78, 0.74; at init both 3.36). Supervised E (20 steps, from the same init): linear few
    0.866, 0.846. GAN
    training is chaotic (an earlier N(0, 0.02)-initialised D output gave linear few 0.728,
    0.670, and the same run as one 400-step scan 0.770, 0.720), hence gates on all
    labels (margins +0.097, +0.079 against 0.02) and on a two-seed mean (+0.104 against
    0.02) rather than on one seed's 10-label probe. Blind D (BLIND_STEPS = 200 steps; at
    400: the same chance probes): E gets no loss gradient, but Adam still steps on its L2
    decay and shrinks it to a constant: linear 0.093, linear few 0.093 (chance), inversion
    = its random pairing to 1e-6 (3.240, 3.343). Asserted:
    linear > init + 0.02 per seed, mean linear few > mean init + 0.02, inversion < 0.85 x
    random pairing; the control fails all three. Mutation tried: E(x) stopped in E and G's
    loss (E untrained): linear 0.093, linear few 0.092 on both seeds, fails."""
    res, _ = recorded_run
    f = {k: np.asarray(v) for k, v in res.final.items()}
    print({k: f[k] for k in ("linear_few", "init_linear_few", "sup_linear_few", "linear",
                             "init_linear", "nn1", "init_nn1", "inversion",
                             "inversion_random")})
    lin_b, few_b, inv_b, base_b = blind_run()
    print(dict(blind_linear=lin_b, blind_linear_few=few_b, blind_inversion=inv_b,
               blind_random=base_b))
    assert (f["linear"] > f["init_linear"] + 0.02).all()
    assert f["linear_few"].mean() > f["init_linear_few"].mean() + 0.02
    assert (f["inversion"] < 0.85 * f["inversion_random"]).all()
    # the control fails all three gates
    assert not (lin_b > f["init_linear"] + 0.02).any()
    assert not few_b.mean() > f["init_linear_few"].mean() + 0.02
    assert not (inv_b < 0.85 * base_b).any()


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and its first chunk rerun from them,
    are bit-identical to the run's; the two seeds differ; the run wrote its files and
    evaluated every probe; --help documents every field; the digits enter update as an
    input (in the state), not as constants compiled into it."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        bg.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(bg.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/discriminator"]
    assert h.shape == (SEEDS, NUM_STEPS) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    for k in ("nn1", "init_nn1", "sup_nn1", "linear_few", "init_knn", "inversion",
              "pre_nn1", "init_pre_linear", "pixels_nn1", "pixels_knn_few"):
        assert np.isfinite(res.final[k]).all(), k
    chunk, first = chunks[0]
    assert len(chunks) == NUM_STEPS // LOG_EVERY
    jax.tree.map(np.testing.assert_array_equal, first,
                 run.initial_states(bg.init, TINY, 0, SEEDS))
    state, metrics = chunk(jax.tree.map(jnp.copy, first))  # the chunk donates its input
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :LOG_EVERY], metrics["losses/discriminator"])
    one = jax.tree.map(lambda a: a[0], first)
    hlo = jax.jit(bg.update, static_argnums=1).lower(one, TINY).as_text()
    big = [ln for ln in hlo.splitlines() if "constant" in ln and "1000x64xf32" in ln]
    assert one.data[0].shape == (1000, 64) and not big, big[:1]


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--prior", "laplace"], "prior='laplace' must be one of"),
                       (["--lr", "0"], "--lr must be > 0"),
                       (["--num-train", "50"], "num_train=50 must be in"),
                       (["--batch-size", "2000"], "batch_size=2000 exceeds"),
                       (["--final-lr-mult", "0"], r"final_lr_mult=0.0 must be in \(0, 1\]"),
                       (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
                       (["--dtype", "float16"], "dtype='float16' must be")):
        with pytest.raises(ValueError, match=msg):
            bg.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(bg) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: the released MNIST MLPs (width
    1024, latent 50) on 64-d digits; D's z branch is a 50 x 1024 matrix, G's output 64."""
    cfg, state, (after, metrics) = trace_paper(bg)
    p = state.params
    assert p["d"]["Dense_2"]["kernel"].shape == (50, 1024)
    assert p["d"]["Dense_3"]["kernel"].shape == (1024, 1)
    assert p["e"]["Dense_2"]["kernel"].shape == (1024, 50)
    assert p["g"]["Dense_3"]["kernel"].shape == (1024, 64)
    assert cfg.num_updates == 400 * 7
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
