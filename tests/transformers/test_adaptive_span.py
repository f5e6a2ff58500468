"""Tests of transformers/adaptive_span.py: the soft mask, z >= S == windowed attention, the
gradient support of z, the L1 penalty shrinking spans, causality, purity and CLI."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import parallel, run
from tests.common import preset
from tests.common.compiled import compiled
from tests.common.config_fields import unread_fields
from tests.common.hlo import big_constants
from tests.transformers import leak
from tests.transformers import tiny_run as tiny_run_module
from transformers import adaptive_span as A

V, L, S = 11, 8, 12
SMALL = A.Config(
    n_layer=2,
    d_model=32,
    n_head=4,
    d_inner=64,
    dropout=0.0,
    attn_span=S,
    span_ramp=4,
    span_init=0.3,
    tgt_len=L,
)
TINY = A.Config(
    corpus="this",
    byte_level=False,
    n_layer=1,
    d_model=16,
    n_head=2,
    d_inner=32,
    attn_span=8,
    span_ramp=4,
    tgt_len=8,
    batch_size=4,
    lr=0.05,
    warmup_steps=1,
    total_updates=3,
    eval_batch=2,
    eval_segments=4,
)


MODEL = A.AdaptiveSpanLM(SMALL, V)


@functools.cache
def _params():
    """SMALL's parameters, initialised once for the module."""
    mems = jnp.zeros((SMALL.n_layer, 2, S, SMALL.d_model))
    return compiled(
        lambda k_: MODEL.init(k_, jnp.zeros((2, L), jnp.int32), mems, 0), jax.random.PRNGKey(0)
    )["params"]


# SMALL's forward pass, jitted once for the module (one compile per shape): (params, tokens,
# mems, mem_valid, window or None) -> (logits, layer inputs). The equation tests' programs
# run on a few tokens: they compile at XLA's lowest backend optimisation level (the
# runner's init options), several times faster
O0 = dict(compiler_options=run.INIT_COMPILER_OPTIONS)
_apply = jax.jit(
    lambda p, t, m, valid, window: MODEL.apply({"params": p}, t, m, valid, window=window), **O0
)
_next_mems = jax.jit(A.next_mems, **O0)


def _set_spans(params, value):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, value) if p[-1].key == "span" else x, params
    )


def test_span_mask_closed_form_and_gradient():
    """m_z(x) = clamp((R + z - x)/R, 0, 1); dm/dz = 1/R on the ramp z < x < z + R, else 0;
    the L1 term averages the heads of a layer and sums the layers ([1]'s get_loss): with
    2 layers of 4 heads, lambda (0.5 + 1 + 1.5 + 2 + 3 + 3 + 3 + 3) / 4 and a gradient of
    lambda / 4 for every head (a sum over heads would give 17 lambda and lambda)."""
    x = jnp.arange(9.0)
    np.testing.assert_allclose(A.span_mask(x, 3.0, 4.0), [1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
    dm = jax.vmap(jax.grad(lambda z, xi: A.span_mask(xi, z, 4.0)), (None, 0))(3.0, x + 0.5)
    np.testing.assert_allclose(dm, np.where((x + 0.5 > 3) & (x + 0.5 < 7), 0.25, 0.0))
    cfg = dataclasses.replace(SMALL, span_loss=0.01)
    z = jnp.array([[0.5, 1.0, 1.5, 2.0], [3.0, 3.0, 3.0, 3.0]])
    np.testing.assert_allclose(A.span_penalty(z, cfg), 0.01 * (5.0 / 4 + 12.0 / 4), rtol=1e-6)
    g = jax.grad(lambda z: A.span_penalty(z, cfg))(z)
    np.testing.assert_allclose(g, 0.01 / 4, rtol=1e-6)


def test_dynamic_span_starts_where_the_penalty_moves_it():
    """Hand-built gradient check at init, default span_init = 0, one layer of H = 4 heads,
    lambda = 1, zero inputs (so z_t = S sigma(b) exactly): the dynamic span starts at
    z = 0.1 S and d penalty / d b = S sigma'(b) / H = 0.09 S / H per head, at least 5% of the
    static span's d penalty / d (z/S) = S / H. The old start b = logit(1e-4) gave 1e-4 of it:
    the span barely moved."""
    cfg = dataclasses.replace(SMALL, span_init=0.0, span_loss=1.0)
    H, d, Lq = cfg.n_head, cfg.d_model, 4
    h, mem = jnp.zeros((1, Lq, d)), jnp.zeros((1, S, d))
    pos, window = jnp.zeros((S + Lq, cfg.d_head)), A.window_mask(Lq, S, S, S)
    out = {}
    for dynamic in (True, False):
        attn = A.SpanAttention(H, d, S, float(cfg.span_ramp), cfg.span_init, dynamic=dynamic)
        params = compiled(
            lambda k_, attn=attn: attn.init(k_, h, mem, pos, window), jax.random.PRNGKey(0)
        )["params"]

        def penalty(p, attn=attn):
            _, inter = attn.apply({"params": p}, h, mem, pos, window, mutable=["intermediates"])
            z = A.spans(jax.tree.leaves(inter["intermediates"]))  # (1, H)
            return A.span_penalty(z, cfg), z

        out[dynamic] = jax.jit(jax.value_and_grad(penalty, has_aux=True), **O0)(params)
    (_, z_dyn), g_dyn = out[True]
    (_, z_static), g_static = out[False]
    np.testing.assert_allclose(z_dyn, 0.1 * S, rtol=1e-5)
    np.testing.assert_allclose(z_static, 0.0)
    np.testing.assert_allclose(g_static["span"], S / H, rtol=1e-6)
    np.testing.assert_allclose(g_dyn["span_net"]["bias"], 0.09 * S / H, rtol=1e-5)
    assert (g_dyn["span_net"]["bias"] >= 0.05 * g_static["span"]).all()


def test_mask_at_the_boundary_is_the_papers_m_z_of_the_distance():
    """The attention layer applies m_z(x) at the key's distance x = i - j (the paper's
    equation, not [1]'s code's m_z(x - 1)): one query with S = 6 memory keys, R = 4, z = 1,
    q = 0 (equal scores), so the weights of distances 1..6 are m_1(x) / sum =
    (1, 3/4, 1/2, 1/4, 0, 0) / 2.5 by hand; [1]'s code would give
    (1, 1, 3/4, 1/2, 1/4, 0) / 3.5."""
    S6, d, H = 6, 8, 2
    attn = A.SpanAttention(H, d, S6, 4.0, 1.0 / S6)
    h = jnp.zeros((1, 1, d))  # q = W_q h = 0: every score is 0
    mem = jax.random.normal(jax.random.PRNGKey(3), (1, S6, d))
    pos, window = jnp.zeros((S6 + 1, d // H)), A.window_mask(1, S6, S6, S6)
    params = compiled(lambda k_: attn.init(k_, h, mem, pos, window), jax.random.PRNGKey(0))[
        "params"
    ]
    y = jax.jit(lambda p: attn.apply({"params": p}, h, mem, pos, window), **O0)(params)
    m = np.array([1, 0.75, 0.5, 0.25, 0, 0])[::-1]  # keys j = 0..5 are at distances 6..1
    v = np.einsum("jd,dhk->jhk", mem[0], params["v"]["kernel"])  # (S, H, Dh)
    expect = np.einsum("hk,hkm->m", np.einsum("j,jhk->hk", m / m.sum(), v), params["o"]["kernel"])
    np.testing.assert_allclose(y[0, 0], expect, rtol=1e-5, atol=1e-6)


def _one_row_fn(z):
    """Attention output of one query whose window holds distances 1..S (no memory mask),
    R = 4; jitted once (z is traced)."""
    key = jax.random.PRNGKey(0)
    K = S + 1  # S memory slots + the query itself (distance 0, excluded)
    scores = jax.random.normal(key, (1, 1, 1, K))
    vals = jax.random.normal(jax.random.fold_in(key, 1), (K, 3))
    dist = (S - jnp.arange(K))[None]  # x = i - j
    window = (dist >= 1) & (dist <= S)
    a = A.span_attention_weights(scores, window, dist, z, 4.0)
    return a, (a[0, 0] @ vals).sum(), scores, window


_one_row = jax.jit(_one_row_fn, **O0)


def test_full_span_equals_plain_windowed_attention():
    """z >= S: every mask value is 1, so the weights are the plain softmax over the S past
    tokens (to 1e-6), rows sum to 1, and the whole model equals adapt_span=False."""
    a, _, scores, window = _one_row(float(S))
    ref = np.where(window, np.exp(scores - scores[..., :-1].max()), 0)
    ref = ref / ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(a, ref, atol=1e-6)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
    assert a[0, 0, 0, -1] == 0  # the current token itself is not attended (post's sum)
    a_short, _, _, _ = _one_row(3.0)
    assert np.abs(a_short - a).max() > 1e-2 and np.all(a_short[..., : S - 7 + 1] == 0)

    params = _params()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, L), 0, V)
    mems = jax.random.normal(jax.random.PRNGKey(2), (2, 2, S, SMALL.d_model))
    valid = jnp.array(S, jnp.int32)
    plain = A.AdaptiveSpanLM(dataclasses.replace(SMALL, adapt_span=False), V)
    out_plain = jax.jit(lambda p: plain.apply({"params": p}, tokens, mems, S)[0], **O0)(params)
    full = _apply(_set_spans(params, 1.0), tokens, mems, valid, None)[0]
    np.testing.assert_allclose(full, out_plain, atol=1e-5)
    short = _apply(_set_spans(params, 0.2), tokens, mems, valid, None)[0]
    assert np.abs(short - out_plain).max() > 1e-3


def test_gradient_wrt_span_only_through_the_ramp():
    """d y / d z != 0 only if some key distance x lies in (z, z + R): with S = 12, R = 4,
    z = 12.5 or 20 puts the ramp beyond the window (gradient exactly 0); z = 0.5, 3.5 and
    10 put distances on it (non-zero)."""
    grad = jax.jit(jax.grad(lambda z: _one_row_fn(z)[1]), **O0)
    for z in (12.5, 20.0):
        assert float(grad(z)) == 0.0, z
    for z in (0.5, 3.5, 10.0):
        assert abs(float(grad(z))) > 1e-4, z


def test_no_future_leak_and_mask_off_leaks():
    params = _params()
    mems = jax.random.normal(jax.random.PRNGKey(2), (2, 2, S, SMALL.d_model))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, L), 0, V)
    valid = jnp.array(S, jnp.int32)
    leak.assert_no_future_leak(lambda t: _apply(params, t, mems, valid, None)[0], tokens, 5, V)
    everything = jnp.ones((L, S + L), bool)
    leak.assert_leaks(lambda t: _apply(params, t, mems, valid, everything)[0], tokens, 5, V)


def test_memory_decoding_equals_one_pass_with_sliding_window():
    """The copied Transformer-XL memory: 4 segments decoded one by one with an S-position
    memory (empty at the start) equal one pass over the 32 tokens in which every query sees
    the S tokens before it (distances 1..S)."""
    params = _params()
    B, n = 2, 4
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, n * L), 0, V)
    mems, valid, outs = jnp.zeros((2, B, S, SMALL.d_model)), jnp.array(0, jnp.int32), []
    for s in range(n):
        logits, inputs = _apply(params, tokens[:, s * L : (s + 1) * L], mems, valid, None)
        mems, valid = _next_mems(mems, inputs, valid)
        outs.append(logits)
    t, j = np.arange(n * L)[:, None], np.arange(n * L)[None]
    band = jnp.asarray((t - j >= 1) & (t - j <= S))
    full = _apply(
        params, tokens, jnp.zeros((2, B, 0, SMALL.d_model)), jnp.array(0, jnp.int32), band
    )[0]
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5)


# the one run of the CLI, purity and short behaviour tests: the 'local' stream, 1 layer of
# d=16, S = 16, spans start at S, a strong L1 penalty (lambda = 0.1 on the mean of 2 heads),
# 30 updates, chunks of 15; 2 x SEEDS seeds in one compiled program, seeds SEEDS.. the
# broken variant (no penalty: the traced span_loss = 0)
RUN = A.Config(
    corpus="local",
    local_vocab=16,
    local_chars=20_000,
    n_layer=1,
    d_model=16,
    n_head=2,
    d_inner=32,
    dropout=0.0,
    attn_span=16,
    span_ramp=4,
    span_init=1.0,
    span_loss=0.1,
    tgt_len=8,
    batch_size=8,
    lr=0.05,
    warmup_steps=5,
    max_grad_norm=1.0,
    total_updates=30,
    eval_batch=4,
    eval_segments=8,
)
CHUNK = 15
SEEDS = tiny_run_module.SEEDS
KEYS = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's keys (--seed 0)
_INIT = A.init  # the file's own (the fixture patches A.init)


def _twin_init(key, cfg):
    """A.init, where seed SEEDS + i is seed i's twin (same key: same initial parameters and
    segments) trained without the penalty (the traced span_loss = 0)."""
    i = jnp.argmax(jnp.all(key == KEYS, -1))
    state = _INIT(KEYS[i % SEEDS], cfg)
    return state.replace(span_loss=jnp.where(i >= SEEDS, 0.0, state.span_loss))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """RUN through the command line, in-process, once, with its 2 x SEEDS seeds; its chunk
    and evaluate compiled at XLA's lowest optimisation level (compile, run and evaluate:
    7.8 CPU s instead of 12.2, loaded 2-core CPU)."""
    with pytest.MonkeyPatch.context() as mp, tiny_run_module.lowest_level_compiles():
        mp.setattr(A, "init", _twin_init)
        return tiny_run_module.run_cli(
            A, RUN, tmp_path_factory.mktemp("run"), CHUNK, extra=("--num-seeds", str(2 * SEEDS))
        )


def test_l1_penalty_shrinks_spans_short(tiny_run):
    """Short behaviour test: the CLI run of RUN (lambda = 0.1, each of 2 seeds) against its
    twins in the same compiled run (same keys) trained without the penalty (the broken
    variant, the traced span_loss = 0: spans stay near S). Measured: mean span 10.0 / 10.0
    with the penalty (2 seeds) vs 15.8 / 16.0 without."""
    span = np.asarray(tiny_run.final["val_mean_span"])
    pen, free = span[:SEEDS], span[SEEDS:]
    print(f"mean span with the penalty {pen}, without {free}")
    assert (free > 14.0).all(), (pen, free)
    assert (pen < 0.8 * free).all(), (pen, free)


@pytest.mark.slow
def test_l1_penalty_shrinks_spans_of_heads_that_only_need_local_context():
    """Behaviour: on the 'local' stream (x_t = x_{t-2} on half the positions, so only
    distance 1 helps), 1 layer, 2 heads, S = 16, R = 4, spans start at S. With the L1
    penalty (lambda = 1e-2 on the heads' mean) the spans shrink to ~0 and the loss is no
    worse than without it; without the penalty they stay near S. Measured at 200 updates:
    mean span 0.0 vs 14.5, val loss 2.24 vs 2.78 nats (ln 16 = 2.77: in 200 Adagrad steps
    only the short-span model starts to pick out distance 1; the optimum is
    ln 16 / 2 = 1.39)."""
    out = {}
    for lam in (1e-2, 0.0):
        cfg = A.Config(
            corpus="local",
            local_vocab=16,
            local_chars=40_000,
            n_layer=1,
            d_model=32,
            n_head=2,
            d_inner=64,
            dropout=0.0,
            attn_span=16,
            span_ramp=4,
            span_init=1.0,
            span_loss=lam,
            tgt_len=8,
            batch_size=16,
            lr=0.05,
            warmup_steps=20,
            max_grad_norm=1.0,
            total_updates=200,
            eval_batch=8,
            eval_segments=32,
        )
        state, _ = jax.jit(run.make_train(A.init, A.update, cfg))(jax.random.PRNGKey(0))
        ev = jax.jit(lambda s, cfg=cfg: A.evaluate(s, cfg))(state)
        out[lam] = float(ev["val_mean_span"]), float(ev["val_loss"])
    (span_pen, loss_pen), (span_free, loss_free) = out[1e-2], out[0.0]
    assert span_free > 8.0, out
    assert span_pen < 0.5 * span_free, out
    assert loss_pen < loss_free + 0.05, out


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's first chunk, rerun on the same initial states (the same compiled
    program, at the fixture's optimisation level), gives the run's first logged rows bit for
    bit; the seeds differ; losses are finite; the spans stay clipped to [0, 1] and move."""
    n = 2 * SEEDS
    states = run.initial_states(_twin_init, RUN, 0, n)
    with tiny_run_module.lowest_level_compiles():
        step = run.make_chunk(A.update, RUN, CHUNK, parallel.seed_sharding(n), n)
        state, metrics = jax.device_get(step(states))
    for k in tiny_run.history:
        np.testing.assert_array_equal(tiny_run.history[k][:, :CHUNK], metrics[k], err_msg=k)
    kernel = next(x for x in jax.tree.leaves(state.params) if x.ndim >= 3)
    assert not np.array_equal(kernel[0], kernel[1])
    loss = tiny_run.history["losses/loss"]
    assert loss.shape == (n, RUN.num_updates) and np.isfinite(loss).all()
    assert not np.array_equal(loss[0], loss[1])
    spans = np.asarray(tiny_run.state.params["layer_0"]["attn"]["span"])
    assert (spans >= 0).all() and (spans <= 1).all() and (spans < 1).any()
    np.testing.assert_array_equal(
        tiny_run.state.span_loss, np.float32([RUN.span_loss] * SEEDS + [0.0] * SEEDS)
    )


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        A.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(A.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    assert tiny_run.history["charts/mean_span"].shape == (2 * SEEDS, RUN.num_updates)
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert len(summary["val_bits_per_char"]) == 2 * SEEDS
    assert np.isfinite(summary["val_bits_per_char"]).all()
    assert (0 < np.asarray(tiny_run.final["val_mean_span"])).all()
    assert (np.asarray(tiny_run.final["val_mean_span"]) <= 16).all()


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="span_init must be in"):
        A.main(["--span-init", "1.5", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="d_model=30 must be divisible by n_head=8"):
        A.main(["--d-model", "30", "--run-dir", str(tmp_path)])


def test_remat_changes_nothing_but_memory():
    """One update with each layer recomputed in the backward pass (remat) gives the same
    parameters as one that stores the activations, dropout included; and XLA's compiled
    update needs less temp memory with remat (2 layers, L = S = 32, batch 8). Measured
    (CPU): 2.67 MB with remat vs 2.94 MB without; a no-op remat gives equal sizes. Both
    updates compile at XLA's lowest backend optimisation level (the runner's init options:
    the same buffer sizes, 9 s instead of 29 s of CPU) from one initial state."""
    base = dataclasses.replace(
        TINY, n_layer=2, d_model=32, d_inner=64, attn_span=32, tgt_len=32, batch_size=8
    )
    state = compiled(lambda k_: A.init(k_, base), jax.random.PRNGKey(0))
    after, temp = [], []
    for remat in (True, False):
        cfg = dataclasses.replace(base, remat=remat)
        step = (
            jax.jit(A.update, static_argnums=1).lower(state, cfg).compile(run.INIT_COMPILER_OPTIONS)
        )
        temp.append(step.memory_analysis().temp_size_in_bytes)
        after.append(step(state)[0].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *after)
    assert temp[0] < 0.95 * temp[1], temp


def test_corpus_is_a_uint8_input_of_update_and_evaluate_not_a_constant():
    """RUN's 'local' ids live in the State as uint8, so the compiled update and evaluate
    take them as an input: no constant of 1k elements or more in their lowered text (the
    int32 streams were: 18k elements in update, 2k in evaluate)."""
    state = jax.eval_shape(lambda k: A.init(k, RUN), jax.random.PRNGKey(0))
    train, val, _ = A._data(RUN)
    assert state.train_ids.shape == train.shape and state.val_ids.shape == val.shape
    assert state.train_ids.dtype == state.val_ids.dtype == jnp.uint8
    assert train.shape[0] > 15_000 and val.shape[0] > 1_500
    for fn in (A.update, A.evaluate):
        hlo = jax.jit(fn, static_argnums=1).lower(state, RUN).as_text()
        assert not big_constants(hlo, 1000), (fn.__name__, big_constants(hlo, 1000)[:1])


def test_every_config_field_is_read():
    assert unread_fields(A) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset (nothing runs)."""
    cfg, state, after = preset.trace_paper(A)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
