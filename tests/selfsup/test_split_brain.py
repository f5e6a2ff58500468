"""Tests of selfsup/split_brain.py: Lab conversion, the ab and L binning, the cross-entropy of
both directions through `losses` (and the halves' disjointness), the prior-only bound; the
behaviour against the blind (inputs zeroed) variant; purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import split_brain as sb
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for the module: the quick preset's 32x32 crops with narrower halves,
# 8 crops per step at lr 1e-2, 2 chunks of 30 steps.
TINY = sb.Config(
    **{
        **sb.PRESETS["quick"],
        "batch_size": 8,
        "num_steps": 60,
        "lr": 1e-2,
        "channels": (8, 16, 16, 16, 16),
        "num_eval_crops": 16,
        "probe_size": 16,
    }
)
SEEDS = 2
LOG_EVERY = 30


def test_lab_of_known_colours_and_round_trip():
    """sRGB (D65) -> Lab against skimage.color.rgb2lab's values (quoted): white (100, 0, 0),
    red (53.2408, 80.0925, 67.2032), grey 128 (53.585, 0, 0); Lab -> RGB inverts it.
    Mutation tried: sRGB gamma 2.2 for 2.4 fails."""
    rgb = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [128 / 255] * 3])
    want = np.array([[100.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032], [53.585, 0.0, 0.0]])
    np.testing.assert_allclose(sb.rgb_to_lab(rgb, np), want, atol=0.01)
    r = np.random.default_rng(0).uniform(size=(200, 3))
    np.testing.assert_allclose(sb.lab_to_rgb(sb.rgb_to_lab(r, np), np), r, atol=1e-9)


def test_bins_quantisation_and_block_targets():
    """The ab grid over the sRGB gamut: 261 bins on multiples of 10 holding grey and the
    primaries' bins (red (80, 70), green (-90, 80), blue (80, -110)); (13, -4) goes to (10,
    0). L in 50 bins of width 2: 0 -> 0, 3.9 -> 1, 99.9 and 100 -> 49. The targets are the
    Lab crop averaged over stride x stride blocks. Mutations tried: floor instead of round
    in the grid (265 bins) fails; L bins of width 100 / (l_bins - 1) fails."""
    bins = sb.ab_bins(10.0)
    assert bins.shape == (261, 2)
    np.testing.assert_array_equal(bins % 10, 0)
    have = {tuple(b) for b in bins.astype(int).tolist()}
    assert {(0, 0), (80, 70), (-90, 80), (80, -110)} <= have
    lab = np.array([[0.0, 13.0, -4.0], [3.9, 0.0, 0.0], [99.9, 80.0, 70.0], [100.0, 0.0, 0.0]])
    q_ab, q_l = sb.quantise(lab, TINY, np)
    assert tuple(bins[q_ab[0]]) == (10.0, 0.0) and tuple(bins[q_ab[2]]) == (80.0, 70.0)
    np.testing.assert_array_equal(q_l, [0, 1, 49, 49])
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float64).reshape(2, 4, 4, 3)
    d = sb.downsample(x, 2)
    assert d.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(d[1, 0, 1], x[1, :2, 2:].mean((0, 1)))


@pytest.fixture(scope="module")
def params():
    return jax.jit(sb.init_params, static_argnums=1)(jax.random.PRNGKey(0), TINY)


def test_cross_entropy_of_both_directions_through_losses(params):
    """[1] Eq. 3 through `losses` (what update runs): with the halves' output kernels zeroed
    and biases b_ab, b_L, every pixel's prediction is softmax(b), so ce_ab = -mean log
    softmax(b_ab)[q_ab] and ce_l likewise over the block-averaged targets; loss = ce_ab +
    ce_l. The halves are disjoint: ce_ab has no gradient in F2's parameters, ce_l none in
    F1's. Mutations tried: targets at full resolution (no downsample) fails; F2 fed L
    (the input channels swapped) fails the disjointness."""
    last = f"Conv_{len(TINY.channels)}"
    p = jax.tree.map(jnp.asarray, params)
    rng = np.random.default_rng(1)
    for half in ("f1", "f2"):
        leaf = p[half]["params"][last]
        leaf["kernel"] = jnp.zeros_like(leaf["kernel"])
        leaf["bias"] = jnp.asarray(rng.normal(size=leaf["bias"].shape), jnp.float32)
    lab = sb.rgb_to_lab(rng.uniform(size=(2, 32, 32, 3)), np).astype(np.float32)

    @jax.jit
    def go(p, lab):
        out = sb.losses(p, lab, jnp.float32(0.0), TINY)
        g_ab = jax.grad(lambda q: sb.losses(q, lab, 0.0, TINY)["ce_ab"])(p)
        g_l = jax.grad(lambda q: sb.losses(q, lab, 0.0, TINY)["ce_l"])(p)
        return out, g_ab, g_l

    out, g_ab, g_l = go(p, lab)
    q_ab, q_l = sb.quantise(sb.downsample(lab.astype(np.float64), 4), TINY, np)

    def log_softmax(b):
        b = np.asarray(b, np.float64)
        return b - np.log(np.exp(b - b.max()).sum()) - b.max()

    want_ab = -log_softmax(p["f1"]["params"][last]["bias"])[q_ab].mean()
    want_l = -log_softmax(p["f2"]["params"][last]["bias"])[q_l].mean()
    np.testing.assert_allclose(out["ce_ab"], want_ab, rtol=1e-5)
    np.testing.assert_allclose(out["ce_l"], want_l, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], want_ab + want_l, rtol=1e-5)
    for leaf in jax.tree.leaves(g_ab["f2"]) + jax.tree.leaves(g_l["f1"]):
        assert not np.any(np.asarray(leaf))
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g_ab["f1"]))
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g_l["f2"]))


def test_each_half_sees_only_its_channels(params):
    """The split: F1's ab logits do not change when the ab channels of its input are
    perturbed, nor F2's L logits when L is; each does change with its own input channels.
    Mutation tried: split_inputs returning lab[..., :2] as X2 (F2 sees L and a) fails."""
    rng = np.random.default_rng(2)
    lab = sb.rgb_to_lab(rng.uniform(size=(2, 32, 32, 3)), np).astype(np.float32)
    noise = rng.normal(size=lab.shape).astype(np.float32)
    d_ab, d_l = lab.copy(), lab.copy()
    d_ab[..., 1:] += 20 * noise[..., 1:]
    d_l[..., :1] += 20 * noise[..., :1]
    (a0, l0), (a1, l1), (a2, l2) = compiled(
        lambda p, *xs: [sb.apply(p, x, 0.0, TINY)[:2] for x in xs], params, lab, d_ab, d_l
    )
    np.testing.assert_array_equal(a1, a0)  # F1 ignores ab
    np.testing.assert_array_equal(l2, l0)  # F2 ignores L
    assert np.abs(np.asarray(a2) - np.asarray(a0)).max() > 1e-6
    assert np.abs(np.asarray(l1) - np.asarray(l0)).max() > 1e-6


def test_prior_only_bound_and_prior_init():
    """The prior-only bound: targets (0, 0, 1, 1) over 3 bins have entropy log 2; init
    puts each half's output bias at the log of the training marginal (sums to 1 in
    probability): init's F1 and F2 output biases equal log_priors exactly. Mutations
    tried: p log p without the minus sign fails; init without its bias override fails."""
    h = jax.jit(sb.marginal_entropy, static_argnums=1)(jnp.array([0, 0, 1, 1]), 3)
    np.testing.assert_allclose(h, np.log(2.0), rtol=1e-6)
    log_ab, log_l = sb.log_priors(TINY)
    assert log_ab.shape == (261,) and log_l.shape == (TINY.l_bins,)
    for lp in (log_ab, log_l):
        np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(), 1.0, rtol=1e-5)
    p = compiled(lambda k: sb.init(k, TINY).params, jax.random.PRNGKey(0))
    last = f"Conv_{len(TINY.channels)}"
    np.testing.assert_array_equal(p["f1"]["params"][last]["bias"], log_ab)
    np.testing.assert_array_equal(p["f2"]["params"][last]["bias"], log_l)


RUN_ARGS = cli_args(TINY, sb.Config(), "quick") + [
    "--num-seeds",
    str(SEEDS),
    "--log-every",
    str(LOG_EVERY),
    "--no-progress",
]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS seeds in 2 chunks of 30 steps, then
    evaluate() at XLA's lowest optimisation level (the probes compile slowly otherwise)."""
    real = run.evaluate_seeds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            run,
            "evaluate_seeds",
            lambda *a, **k: real(*a, **{**k, "compiler_options": run.INIT_COMPILER_OPTIONS}),
        )
        return main_recording_chunks(
            sb.main, RUN_ARGS + ["--run-dir", str(tmp_path_factory.mktemp("sb"))]
        )


def test_both_directions_beat_the_prior_and_the_blind_variant_does_not(recorded_run):
    """Behaviour: from seed 0's initial nets, the split-brain halves and the blind variant
    (both inputs zeroed, so each half is a prior-only predictor) train the same 60 steps
    (the run's compiled chunk; blind is a traced flag of the state). On the held-out bands'
    crops, the gate: held-out CE below the prior-only CE (the training marginal's) by 0.2
    nats, in both directions. Measured (loaded 2-core CPU): L -> ab 2.762 vs prior 3.310,
    ab -> L 4.216 vs 4.492 (margins 0.55, 0.28); blind 3.327 and 4.370 (margins -0.02 and
    0.12: fails). The held-out entropies (no input-blind predictor can go below them; the
    bands differ in colour, so the training marginal is 0.5-0.9 nats above) are 2.829 and
    3.621. Mutation tried: the target bins shuffled against the input (q_ab rolled by
    one crop in `losses`) fails both directions."""
    _, chunks = recorded_run
    chunk, first = chunks[0]
    one = jax.tree.map(lambda a: np.stack([np.asarray(a)[0]] * 2), first)
    start = one.replace(blind=np.array([0.0, 1.0], np.float32))
    state = jax.tree.map(jnp.asarray, start)
    for _ in range(TINY.num_steps // LOG_EVERY):
        state, _ = chunk(state)
    m = run.evaluate_seeds(sb.evaluate, state, TINY, SEEDS, run.INIT_COMPILER_OPTIONS)
    keys = ("ce_ab", "prior_ab", "entropy_ab", "ce_l", "prior_l", "entropy_l")
    print({k: np.asarray(m[k]) for k in keys})
    margin_ab = np.asarray(m["prior_ab"]) - np.asarray(m["ce_ab"])
    margin_l = np.asarray(m["prior_l"]) - np.asarray(m["ce_l"])
    assert margin_ab[0] > 0.2 and margin_l[0] > 0.2, (margin_ab, margin_l)
    assert margin_ab[1] < 0.2 and margin_l[1] < 0.2, (margin_ab, margin_l)


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and its first chunk rerun from them,
    are bit-identical to the run's; the two seeds differ; the run wrote its files and
    evaluated the held-out CEs and the probes; --help documents every field."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        sb.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(sb.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/loss"]
    assert h.shape == (SEEDS, TINY.num_steps) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    for k in (
        "ce_ab",
        "ce_l",
        "prior_ab",
        "entropy_l",
        "linear",
        "l_linear_few",
        "ab_knn",
        "init_linear",
    ):
        assert np.isfinite(res.final[k]).all(), k
    assert (res.final["init_linear"] > 0.3).all()
    chunk, first = chunks[0]
    assert len(chunks) == TINY.num_steps // LOG_EVERY
    jax.tree.map(np.testing.assert_array_equal, first, run.initial_states(sb.init, TINY, 0, SEEDS))
    state, metrics = chunk(jax.tree.map(jnp.copy, first))  # the chunk donates its input
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :LOG_EVERY], metrics["losses/loss"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in (
        (["--lr", "0"], "--lr must be > 0"),
        (["--crop-size", "100"], "crop_size=100 must be a multiple"),
        (["--kernels", "3"], "need the same"),
        (["--l-bins", "1"], "l_bins=1"),
        (["--probe-layer", "9"], "probe_layer=9 must be in"),
        (["--band-size", "300"], "must fit a band"),
    ):
        with pytest.raises(ValueError, match=msg):
            sb.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(sb) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: half-width AlexNet (conv1 11x11/4
    with 48 channels per half, fc7 as a 1x1 conv of 2048), Q_ab and 50 L logits at 11x11
    for 176-px crops."""
    cfg, state, (after, metrics) = trace_paper(sb)
    p = state.params
    assert p["f1"]["params"]["Conv_0"]["kernel"].shape == (11, 11, 1, 48)
    assert p["f2"]["params"]["Conv_0"]["kernel"].shape == (11, 11, 2, 48)
    assert p["f1"]["params"]["Conv_7"]["kernel"].shape == (1, 1, 2048, 261)
    assert p["f2"]["params"]["Conv_7"]["kernel"].shape == (1, 1, 2048, 50)
    out = jax.eval_shape(lambda s: sb.apply(s.params, jnp.zeros((2, 176, 176, 3)), 0.0, cfg), state)
    assert out[0].shape == (2, 11, 11, 261) and out[1].shape == (2, 11, 11, 50)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
