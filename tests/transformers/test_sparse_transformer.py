"""Tests of transformers/sparse_transformer.py: the pattern sets, two-hop reachability,
integration modes, causality, recomputation, learning on digits, purity and the CLI."""

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
from transformers import sparse_transformer as st

TINY = st.Config(dataset="digits", seq_len=64, pattern="strided", mode="interleave", stride=8,
                 summary=2, d_model=32, n_heads=2, d_ff=64, n_layers=2, checkpoint=False,
                 batch_size=8, lr=3e-3, warmup_steps=5, total_steps=3)


def two_hop(a1, a2):
    """Positions reachable in at most two hops: one set, or A^(2) then A^(1) (or reverse)."""
    m1, m2 = a1.astype(int), a2.astype(int)
    return a1 | a2 | (m2 @ m1 > 0) | (m1 @ m2 > 0)


# --- PATTERNS ---


def test_masks_equal_the_closed_forms():
    """[1] Sec. 4.2 at n=64, l=8, c=2, checked position by position."""
    a1, a2 = st.pattern_masks("strided", 64, 8, 2)
    f1, f2 = st.pattern_masks("fixed", 64, 8, 2)
    for i in range(64):
        assert set(np.flatnonzero(a1[i])) == set(range(max(0, i - 8), i + 1))
        assert set(np.flatnonzero(a2[i])) == {j for j in range(i + 1) if (i - j) % 8 == 0}
        assert set(np.flatnonzero(f1[i])) == {j for j in range(i + 1) if j // 8 == i // 8}
        assert set(np.flatnonzero(f2[i])) == {j for j in range(i + 1) if j % 8 in (6, 7)}
    # each set is O(sqrt(n)) per row, not O(n)
    assert a1.sum(1).max() == 9 and a2.sum(1).max() == 8 and f2.sum(1).max() == 16


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_two_hops_reach_every_earlier_position_and_no_later(pattern):
    """Composition of the two masks covers the full causal mask exactly (catalog T7,
    verified at n=64, l=8, c=2), at several sizes; nothing above the diagonal."""
    for n, l, c in [(64, 8, 2), (100, 10, 1), (48, 6, 3)]:
        a1, a2 = st.pattern_masks(pattern, n, l, c)
        causal = np.tril(np.ones((n, n), bool))
        assert not (a1 | a2)[~causal].any()
        np.testing.assert_array_equal(two_hop(a1, a2), causal)
        assert not (a1 | a2).all(where=causal)  # sparse: one hop does not reach everything


def test_broken_patterns_do_not_reach_everything():
    """A local window of l - 1 positions instead of l + 1 (it misses offset l - 1), or
    c = 0 summary positions, leaves holes in the two-hop reach (catalog: False for both)."""
    n, l = 64, 8
    a1, a2 = st.pattern_masks("strided", n, l, 2)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    assert not two_hop(a1 & (i - j <= l - 2), a2).all(where=j <= i)
    f1, _ = st.pattern_masks("fixed", n, l, 2)
    assert not two_hop(f1, np.zeros_like(f1)).all(where=j <= i)


def test_integration_modes_use_the_documented_sets():
    """interleave: layer k uses A^(k mod 2) on every head; union: A^(1) u A^(2) on every
    head and layer; multihead: half the heads A^(1), half A^(2), on every layer."""
    a1, a2 = st.pattern_masks("fixed", 64, 8, 2)
    cfg = dataclasses.replace(TINY, pattern="fixed", n_heads=4)
    inter = [st.layer_masks(dataclasses.replace(cfg, mode="interleave"), k) for k in range(3)]
    assert all((inter[0] == a1).all((1, 2))) and all((inter[1] == a2).all((1, 2)))
    assert (inter[2] == inter[0]).all()
    union = st.layer_masks(dataclasses.replace(cfg, mode="union"), 1)
    assert (union == (a1 | a2)).all()
    multi = st.layer_masks(dataclasses.replace(cfg, mode="multihead"), 1)
    assert (multi[:2] == a1).all() and (multi[2:] == a2).all()
    assert (st.layer_masks(dataclasses.replace(cfg, mode="multihead"), 0) == multi).all()


def test_masked_attention_equals_softmax_over_the_set():
    """Dense masked reference at one query, by hand: softmax over j in S_i only."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 1, 16, 4))
    a1, _ = st.pattern_masks("strided", 16, 4, 1)
    out = st.masked_attention(q, k, v, a1[None])
    i = 11
    s = np.flatnonzero(a1[i])
    logits = np.asarray(k[0, 0, s] @ q[0, 0, i]) / 2.0
    p = np.exp(logits - logits.max())
    np.testing.assert_allclose(out[0, 0, i], (p / p.sum()) @ np.asarray(v[0, 0, s]), atol=1e-5)


# --- MODEL ---


# the model tests' programs are small: compiled at XLA's lowest backend optimisation level
# (the runner's init options), several times faster; parameters initialised once per config
O0 = dict(compiler_options=run.INIT_COMPILER_OPTIONS)


@functools.cache
def _params(cfg):
    tokens = jnp.zeros((1, 64), jnp.int32)
    return compiled(lambda k_: st.SparseTransformer(cfg, 18).init(k_, tokens),
                    jax.random.PRNGKey(0))


def model_fn(cfg, causal=True):
    return _params(cfg), jax.jit(lambda p, t: st.SparseTransformer(cfg, 18, causal).apply(p, t),
                                 **O0)


@pytest.mark.parametrize("pattern, mode", [("strided", "interleave"), ("fixed", "union"),
                                           ("fixed", "multihead")])
def test_no_future_leak_and_the_broken_variant_leaks(pattern, mode):
    cfg = dataclasses.replace(TINY, pattern=pattern, mode=mode)
    params, fn = model_fn(cfg)
    _, broken = model_fn(cfg, causal=False)  # the same parameters, mask off
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 64), 0, 18)
    leak.assert_no_future_leak(lambda t: fn(params, t), tokens, 30, 18)
    leak.assert_leaks(lambda t: broken(params, t), tokens, 30, 18)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_two_interleaved_layers_see_the_whole_past(pattern):
    """In a 2-layer interleaved model, output i depends on EVERY input j <= i (two hops:
    A^(1) in layer 0, then A^(2) in layer 1) and on no j > i: the Jacobian's support is the
    causal triangle. One layer alone does not reach everything."""
    def support(n_layers):
        cfg = dataclasses.replace(TINY, pattern=pattern, n_layers=n_layers)
        params, _ = model_fn(cfg)
        x = jax.random.normal(jax.random.PRNGKey(2), (1, 64, 32))

        def from_embedding(x):  # the model after its embedding layer
            h = x
            for k in range(n_layers):
                h = st.Block(cfg, k).apply({"params": params["params"][f"block_{k}"]}, h)
            return h[0].sum(-1)

        jac = jax.jit(jax.jacrev(from_embedding), **O0)(x)[:, 0]  # (64 out, 64 in, d)
        return np.abs(jac).max(-1) > 0

    causal = np.tril(np.ones((64, 64), bool))
    np.testing.assert_array_equal(support(2), causal)
    one = support(1)
    assert not one[~causal].any() and not one.all(where=causal)


def test_checkpointed_gradients_equal_plain_gradients_in_less_memory():
    """Recomputation ([1] Sec. 5.4) changes no gradient, and XLA's compiled loss gradient
    needs less temp memory with it. Measured (CPU, TINY): 2.81 MB with jax.checkpoint vs
    3.54 MB without; a no-op checkpoint gives equal sizes. Compiled at XLA's lowest backend
    optimisation level (the buffer assignment is the same)."""
    tokens, targets = st.batch(jax.random.PRNGKey(0), TINY)
    params, _ = model_fn(TINY)

    def grads(checkpoint):
        model = st.SparseTransformer(dataclasses.replace(TINY, checkpoint=checkpoint), 18)
        fn = jax.jit(jax.grad(lambda p: st.nll(p, model, tokens, targets)))
        compiled = fn.lower(params).compile(run.INIT_COMPILER_OPTIONS)
        return compiled(params), compiled.memory_analysis().temp_size_in_bytes

    (g_ck, temp_ck), (g_plain, temp_plain) = grads(True), grads(False)
    for a, b in zip(jax.tree.leaves(g_ck), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert temp_ck < 0.9 * temp_plain, (temp_ck, temp_plain)


def test_residual_output_projections_start_smaller():
    """[1] Sec. 5.2: W_p and W_2 are initialised 1/sqrt(2N) smaller than a plain layer
    (a block of an N = 8 layer model, initialised alone)."""
    cfg = dataclasses.replace(TINY, n_layers=8, d_model=64, d_ff=64)
    p = compiled(lambda k_: st.Block(cfg, 0).init(k_, jnp.zeros((1, cfg.seq_len, 64))),
                 jax.random.PRNGKey(0))["params"]
    std_qkv = float(np.std(p["qkv"]["kernel"]))
    for name in ("proj", "ff_out"):
        ratio = float(np.std(p[name]["kernel"])) / std_qkv
        assert abs(ratio - 1 / np.sqrt(16)) < 0.05, (name, ratio)


# --- TRAINING ---


# the one run of the CLI, purity and short behaviour tests: a 2-layer strided/interleave
# model of d=16 trained 120 updates of 16 digits, 2 seeds, chunks of 40
RUN = dataclasses.replace(TINY, d_model=16, d_ff=32, batch_size=16, warmup_steps=10,
                          total_steps=120)
CHUNK = 40


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """RUN through the command line, in-process, once, its chunks and evaluate compiled at
    XLA's lowest optimisation level (compile, run and evaluate: 8.7 CPU s instead of 12.4,
    loaded 2-core CPU)."""
    with tiny_run_module.lowest_level_compiles():
        return tiny_run_module.run_cli(st, RUN, tmp_path_factory.mktemp("run"), CHUNK)


def test_learns_digits_better_than_the_global_marginal_short(tiny_run):
    """Short behaviour test: the CLI run of RUN (2-layer strided/interleave model of d=16,
    120 updates of 16 digits; evaluate(), each of 2 seeds) against the global-marginal
    baseline (one add-0.1 histogram of all training pixels), computed here. Measured:
    trained 2.40 / 2.42 bits/dim (2 seeds), baseline 2.96."""
    trained = np.asarray(tiny_run.final["val_bits_per_dim"])
    train, val = (np.asarray(a) for a in st.dataset("digits", 0)[:2])
    counts = np.bincount(train.reshape(-1), minlength=17) + 0.1
    marginal = float(-np.log2(counts / counts.sum())[val.reshape(-1)].mean())
    print(f"global marginal {marginal:.3f} trained {trained} bits/dim")
    assert (trained < marginal - 0.25).all(), (trained, marginal)


@pytest.mark.slow
def test_learns_digits_better_than_the_pixel_marginal_baseline():
    """Behaviour: a 2-layer strided/interleave model (d=32) trained 400 updates of 32 digits
    beats, on the held-out images, the per-pixel marginal baseline (each of the 64
    positions' own histogram of the 17 intensities on the training images, add-0.1) and
    the untrained model. Measured: untrained 6.03 bits/dim, marginal 2.42, trained 1.97."""
    cfg = dataclasses.replace(TINY, batch_size=32, warmup_steps=40, total_steps=400)
    state, metrics = jax.jit(run.make_train(st.init, st.update, cfg))(jax.random.PRNGKey(0))
    ev = jax.jit(lambda s: st.evaluate(s, cfg))
    trained = float(ev(state)["val_bits_per_dim"])
    state0 = compiled(lambda k_: st.init(k_, cfg), jax.random.PRNGKey(0))
    untrained = float(ev(state0)["val_bits_per_dim"])
    train, val = (np.asarray(a) for a in st.dataset("digits", 0)[:2])
    counts = np.stack([np.bincount(train[:, i], minlength=17) for i in range(64)]) + 0.1
    probs = counts / counts.sum(1, keepdims=True)  # (64, 17)
    marginal = -np.log2(probs[np.arange(64), val]).mean()
    print(f"untrained {untrained:.3f} marginal {marginal:.3f} trained {trained:.3f} bits/dim")
    assert np.isfinite(metrics["losses/loss"]).all()
    assert trained < marginal - 0.1
    assert trained < untrained - 1.0


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's first chunk, rerun on the same initial states, gives the same metrics;
    the two seeds differ."""
    with tiny_run_module.lowest_level_compiles():  # the fixture's program (compile cache)
        tiny_run_module.assert_pure(st, RUN, tiny_run, CHUNK)
    assert tiny_run.history["losses/loss"].shape == (2, RUN.num_updates)


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        st.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(st.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert len(summary["val_bits_per_dim"]) == 2
    assert np.isfinite(summary["val_bits_per_dim"]).all()


def test_bad_values_fail_with_named_field():
    for bad, match in [(dict(seq_len=65), "seq_len=65"), (dict(summary=9), "summary=9"),
                       (dict(mode="merged"), "mode='merged'"), (dict(pattern="x"), "pattern"),
                       (dict(mode="multihead", n_heads=1, d_model=32), "n_heads=1")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(TINY, **bad).validate()


def test_every_config_field_is_read():
    assert unread_fields(st) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset (nothing runs), at
    n = 1024 (l = 32) instead of 12288: the dense (H, n, n) masks of every layer are built
    in numpy while tracing, and at n = 12288 they take 1.2 GB per layer (36 GB for the 30
    layers: the machine runs out of memory). Every other field is the paper's."""
    cfg, state, after = preset.trace_paper(st, seq_len=1024, stride=32)
    assert cfg.n_layers == 30 and cfg.d_model == 512
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
