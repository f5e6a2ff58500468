"""Tests of transformers/image_transformer.py: blocked local attention equals the dense
masked reference, the memory windows, causality, behaviour on digits, purity and the CLI."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from tests.common import preset
from tests.common.compiled import compiled
from tests.common.config_fields import unread_fields
from tests.transformers import leak
from tests.transformers import tiny_run as tiny_run_module
from transformers import image_transformer as it

QUICK = it.Config(**it.PRESETS["quick"])
TINY = dataclasses.replace(QUICK, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                           batch_size=4, total_steps=3)
SPECS = [  # (name, config): digits 8x8 and 4x12 RGB crops, with uneven memories
    ("1d", dataclasses.replace(QUICK, attn="local1d")),
    ("1d-uneven", dataclasses.replace(QUICK, attn="local1d", query_len=4, memory_len=6)),
    ("2d", dataclasses.replace(QUICK, attn="local2d")),
    ("2d-uneven", dataclasses.replace(QUICK, attn="local2d", query_h=4, query_w=2,
                                      memory_h=1, memory_w=3)),
    ("1d-rgb", dataclasses.replace(QUICK, dataset="photos", photo_crop=4, attn="local1d",
                                   query_len=6, memory_len=12)),
    ("2d-rgb", dataclasses.replace(QUICK, dataset="photos", photo_crop=4, attn="local2d",
                                   query_h=2, query_w=6, memory_h=1, memory_w=3)),
]


# the equation tests' programs are small: jitted (one compile per config) at XLA's lowest
# backend optimisation level (the runner's init options), several times faster to compile
O0 = dict(compiler_options=run.INIT_COMPILER_OPTIONS)
_blocked = jax.jit(it.blocked_local_attention, static_argnums=(3, 4), **O0)
_dense = jax.jit(it.dense_local_attention, static_argnums=3, **O0)


@pytest.mark.parametrize("name,cfg", SPECS, ids=[s[0] for s in SPECS])
def test_blocked_equals_dense_masked_attention(name, cfg):
    n = int(np.prod(cfg.image_shape))
    q, k, v = np.random.default_rng(0).normal(size=(3, 2, 3, n, 8)).astype(np.float32) * 2
    a = _blocked(q, k, v, cfg, True)
    b = _dense(q, k, v, cfg)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def _allowed_raster(cfg, r, c):
    """The dense mask's allowed set of the query at grid (r, c), as grid coordinates."""
    H, Wc = cfg.grid
    perm = it.generation_order(cfg)
    s = int(np.argsort(perm)[r * Wc + c])
    return {(int(p // Wc), int(p % Wc)) for p in perm[np.flatnonzero(it.dense_mask(cfg)[s])]}


def test_memory_windows_match_hand_written_sets():
    """1-D (8x8, l_q = 8, l_m = 8): the query at raster 20 (row 2, col 4) sees positions
    8..20. 2-D (8x8, 2x4 query blocks, flanges h_m = 2, w_m = 2): the query at (2, 5) lies
    in block (1, 1); its window is rows 0-3 x cols 2-7 (clipped at the right edge), and of
    it were generated before: rows 0-1 (blocks (0,0), (0,1)), rows 2-3 x cols 2-3 (block
    (1,0)) and (2,4), (2,5) itself inside its own block."""
    one = dataclasses.replace(QUICK, attn="local1d", query_len=8, memory_len=8)
    assert _allowed_raster(one, 2, 4) == {(p // 8, p % 8) for p in range(8, 21)}
    two = dataclasses.replace(QUICK, attn="local2d", query_h=2, query_w=4, memory_h=2,
                              memory_w=2)
    want = ({(r, c) for r in (0, 1) for c in range(2, 8)} | {(r, c) for r in (2, 3)
                                                               for c in (2, 3)}
            | {(2, 4), (2, 5)})
    assert _allowed_raster(two, 2, 5) == want
    # the block raster order: the first 8 generated positions are the 2x4 block (0, 0)
    np.testing.assert_array_equal(it.generation_order(two)[:8], [0, 1, 2, 3, 8, 9, 10, 11])


@pytest.mark.parametrize("attn", ["local1d", "local2d"])
def test_each_query_attends_exactly_within_its_memory_window(attn):
    """d out_s / d v_t of the blocked implementation is non-zero exactly where the dense
    spec allows t for s: nothing outside the window, nothing in the future, all of the
    window used."""
    cfg = dataclasses.replace(QUICK, attn=attn)
    q, k, v = jnp.asarray(np.random.default_rng(1).normal(size=(3, 1, 1, 64, 2)), jnp.float32)
    jac = jax.jit(jax.jacfwd(lambda v: it.blocked_local_attention(q, k, v, cfg)), **O0)(
        v)  # (.., s, d, .., t, d)
    support = np.abs(np.asarray(jac[0, 0, :, 0, 0, 0, :, 0])) > 0  # (s, t)
    np.testing.assert_array_equal(support, it.dense_mask(cfg))


@pytest.mark.parametrize("attn", ["local1d", "local2d"])
def test_no_future_leak_in_generation_order_and_mask_off_leaks(attn):
    """The prediction of step s (logits at s) uses only the intensities of steps < s: the
    helper checks next(tokens)[:, u] = logits[:, u + 1] (which may see steps <= u) for
    changes at steps >= t, exactly. With the causal mask off inside the windows it leaks."""
    cfg = dataclasses.replace(TINY, attn=attn)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 64), 0, cfg.levels)

    params = compiled(lambda k_: it.ImageTransformer(cfg).init(k_, tokens),
                      jax.random.PRNGKey(0))

    def fn(causal):  # the same parameters, with the mask on or off
        model = it.ImageTransformer(cfg, causal=causal)
        pad = jnp.zeros((tokens.shape[0], 1, cfg.levels))
        return jax.jit(lambda t: jnp.concatenate([model.apply(params, t)[:, 1:], pad], 1),
                       **O0)

    good = fn(True)
    for t in (1, 13, 40, 62):
        leak.assert_no_future_leak(good, tokens, t, cfg.levels)
    leak.assert_leaks(fn(False), tokens, 13, cfg.levels)


# the one run of the CLI, purity and short behaviour tests: a 1-layer d = 16 2-D-local
# model trained 120 updates (batch 32, Adam 3e-3), 2 seeds, chunks of 40
RUN = dataclasses.replace(QUICK, attn="local2d", num_layers=1, d_model=16, num_heads=2,
                          d_ff=32, total_steps=120, warmup_steps=10, lr=3e-3)
CHUNK = 40


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """RUN through the command line, in-process, once."""
    return tiny_run_module.run_cli(it, RUN, tmp_path_factory.mktemp("run"), CHUNK, "quick")


def test_beats_the_global_marginal_baseline_on_digits_short(tiny_run):
    """Short behaviour test: the CLI run of RUN (a 1-layer d=16 2-D-local model trained 120
    updates, batch 32, Adam 3e-3; test bits/dim of each of 2 seeds) against the
    global-marginal baseline (one add-one histogram of the 17 intensities over all training
    pixels), computed here. Measured: model 2.41 / 2.39 bits/dim (2 seeds), baseline 2.92
    (the untrained model: ~4.1)."""
    train, test = it.dataset("digits", RUN.photo_crop)
    counts = np.bincount(np.asarray(train).reshape(-1), minlength=17) + 1.0
    baseline = float(-np.log2(counts / counts.sum())[np.asarray(test).reshape(-1)].mean())
    bpd = np.asarray(tiny_run.final["test_bits_per_dim"])
    print(f"model {bpd} global marginal {baseline:.3f}")
    assert (bpd < baseline - 0.25).all(), (bpd, baseline)


@pytest.mark.slow
def test_beats_the_per_position_marginal_baseline_on_digits():
    """Behaviour: a 2-layer d=32 2-D-local model trained 300 updates (batch 32, Adam 1e-3)
    reaches a test NLL below the per-position independent-categorical baseline (add-one
    counts of each pixel's 17 intensities on the training split), computed here.
    Measured: model 2.20 bits/dim (1-D local: 2.20), baseline 2.37, global-marginal 2.92;
    the untrained model scores ~4.1 (= log2 17)."""
    cfg = dataclasses.replace(QUICK, attn="local2d", num_layers=2, d_model=32, num_heads=2,
                              d_ff=64, total_steps=300)
    train, test = it.dataset("digits", cfg.photo_crop)
    x, y = train.reshape(len(train), -1), test.reshape(len(test), -1)
    counts = np.ones((64, 17))
    np.add.at(counts, (np.tile(np.arange(64), len(x)), x.reshape(-1)), 1)
    p = counts / counts.sum(1, keepdims=True)
    baseline = float(-np.log2(p[np.arange(64)[None], y]).mean())
    state, _ = jax.jit(run.make_train(it.init, it.update, cfg))(jax.random.PRNGKey(0))
    bpd = float(jax.jit(lambda s: it.evaluate(s, cfg))(state)["test_bits_per_dim"])
    print(f"model {bpd:.3f} baseline {baseline:.3f}")
    assert bpd < baseline - 0.08, (bpd, baseline)


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's first chunk, rerun on the same initial states, gives the same metrics;
    the two seeds differ."""
    tiny_run_module.assert_pure(it, RUN, tiny_run, CHUNK)
    assert tiny_run.history["losses/loss"].shape == (2, RUN.total_steps)


def test_sampling_draws_each_token_from_the_logits_of_its_prefix():
    """Ancestral sampling: the token at generation step s is the categorical draw, with the
    step's key (the s-th split of the sampler's key chain), from the model's logits at s
    given the sampled prefix. Re-derived here in one causal pass over the sampled sequence
    (logits at s see only steps < s): every token must match. Logits taken one position off
    (s - 1 or s + 1) draw other tokens (tried: s - 1 gives 41 of 192 mismatches). Weights
    scaled up so the logits are far from uniform."""
    cfg = dataclasses.replace(TINY, attn="local2d")
    params = jax.tree.map(lambda w: 3.0 * w,
                          compiled(lambda k_: it.init(k_, cfg), jax.random.PRNGKey(0)).params)
    key = jax.random.PRNGKey(1)
    imgs = jax.jit(lambda p, k: it.sample(p, cfg, k, 3), **O0)(params, key)
    assert imgs.shape == (3, 8, 8, 1) and imgs.dtype == jnp.uint8
    seq = it.to_sequence(imgs, cfg)  # raster -> generation order
    back = jnp.zeros_like(seq).at[:, it.generation_order(cfg)].set(seq)  # and back
    np.testing.assert_array_equal(back.reshape(imgs.shape), imgs)

    @functools.partial(jax.jit, **O0)
    def redraw(params, seq):
        logits = it.ImageTransformer(cfg).apply(params, seq)  # (3, n, V), causal in s

        def step(key, logits_s):
            key, k = jax.random.split(key)
            return key, jax.random.categorical(k, logits_s)

        return jax.lax.scan(step, key, jnp.moveaxis(logits, 1, 0))[1].T

    want = redraw(params, seq)
    assert len(np.unique(np.asarray(seq))) > 3  # not a degenerate (constant) image
    np.testing.assert_array_equal(seq, want)


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        it.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(it.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, photos, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    assert tiny_run.history["charts/bits_per_dim"].shape == (2, RUN.total_steps)
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert len(summary["test_bits_per_dim"]) == 2
    assert np.isfinite(summary["test_bits_per_dim"]).all()


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="query_len=5 does not divide the sequence length 64"):
        it.main(["--preset", "quick", "--query-len", "5", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="query block 3x4 does not tile the 8x8"):
        it.main(["--preset", "quick", "--attn", "local2d", "--query-h", "3",
                 "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="attn='local3d'"):
        it.main(["--attn", "local3d", "--run-dir", str(tmp_path)])


def test_photo_crops():
    train, test = it.dataset("photos", 16)
    assert train.shape == (2, 106, 120, 3) and test.shape[1:] == (16, 16, 3)
    cfg = dataclasses.replace(TINY, dataset="photos", photo_crop=16)
    batch = it.sample_train(jax.random.PRNGKey(0), jnp.asarray(train), cfg)
    assert batch.shape == (4, 16, 16, 3) and cfg.grid == (16, 48) and cfg.levels == 256


def test_every_config_field_is_read():
    assert unread_fields(it) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset (nothing runs)."""
    cfg, state, after = preset.trace_paper(it)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
