"""Tests of transformers/transformer_xl.py: relative shift, causality, memory == one pass,
stop-gradient, memory vs no memory, purity, CLI, and a port of HF XLNet's attention."""

import dataclasses
import functools
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import parallel, run
from tests.common import preset
from tests.common.compiled import compiled
from tests.common.config_fields import unread_fields
from tests.common.hlo import big_constants
from tests.transformers import leak, peer
from tests.transformers import tiny_run as tiny_run_module
from transformers import transformer_xl as X

V, L, D = 11, 8, 32
SMALL = X.TransformerXL(vocab=V, n_layer=2, d_model=D, n_head=4, d_head=8, d_inner=64)
TINY = X.Config(
    corpus="this",
    byte_level=False,
    n_layer=1,
    d_model=16,
    n_head=2,
    d_head=8,
    d_inner=32,
    dropout=0.1,
    tgt_len=8,
    mem_len=8,
    eval_tgt_len=8,
    eval_mem_len=16,
    batch_size=4,
    lr=1e-3,
    total_updates=3,
    eval_batch=2,
    eval_segments=4,
)


@functools.cache
def _params():
    """SMALL's parameters (their shapes do not depend on the memory length), initialised
    once for the module."""
    tokens = jnp.zeros((2, L), jnp.int32)
    mems = jnp.zeros((SMALL.n_layer, 2, 8, SMALL.d_model))
    return compiled(lambda k_: SMALL.init(k_, tokens, mems, 8), jax.random.PRNGKey(0))["params"]


# SMALL's forward pass, jitted once for the module (one compile per shape): (params, tokens,
# mems, mem_valid, mask or None) -> (logits, layer inputs, last hidden state). The equation
# tests' programs run on a few tokens: they compile at XLA's lowest backend optimisation
# level (the runner's init options), several times faster
O0 = dict(compiler_options=run.INIT_COMPILER_OPTIONS)
_apply = jax.jit(
    lambda p, t, m, valid, mask: SMALL.apply({"params": p}, t, m, valid, mask=mask), **O0
)
_next_mems = jax.jit(X.next_mems, **O0)


def _stream(B, n, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, n), 0, V)


def test_rel_shift_equals_gather_reference():
    """(b)+(d) via the relative shift equals the score gathered by distance d = M + i - j,
    (q_i + v)^T W_R r_d, on every allowed (i, j); for M = 0, 5 and 8 (the scores in numpy,
    the shift jitted)."""
    rng = np.random.default_rng(0)
    shift = jax.jit(X.rel_shift, **O0)
    for M in (0, 5, 8):
        K = M + L
        qv = rng.normal(size=(2, 3, L, 4)).astype(np.float32)  # (B, H, L, Dh)
        kr_by_dist = rng.normal(size=(K, 3, 4)).astype(np.float32)  # W_R r_d
        kr = kr_by_dist[::-1]  # the model's layout: row c holds distance K-1-c
        shifted = shift(np.einsum("bhid,jhd->bhij", qv, kr))
        i, j = np.arange(L)[:, None], np.arange(K)[None]
        dist = np.clip(M + i - j, 0, K - 1)
        gathered = np.einsum("bhid,ijhd->bhij", qv, kr_by_dist[dist])  # reference
        allowed = j <= M + i
        np.testing.assert_allclose(
            np.where(allowed, shifted, 0), np.where(allowed, gathered, 0), atol=1e-5
        )
    # the shift is not the identity: without it the scores differ
    assert np.abs(np.where(allowed, np.einsum("bhid,jhd->bhij", qv, kr) - gathered, 0)).max() > 0.1


def test_no_future_leak_and_mask_off_leaks():
    """Outputs before t do not depend on tokens >= t (memory full of context); the same
    model with the mask switched off (every key visible) fails the check."""
    M = 8
    params = _params()
    mems = jax.random.normal(jax.random.PRNGKey(3), (2, 2, M, D))
    tokens = _stream(2, L)
    valid = jnp.array(M, jnp.int32)
    leak.assert_no_future_leak(lambda t: _apply(params, t, mems, valid, None)[0], tokens, 5, V)
    no_mask = jnp.ones((L, M + L), bool)
    leak.assert_leaks(lambda t: _apply(params, t, mems, valid, no_mask)[0], tokens, 5, V)


@pytest.mark.parametrize("M", [L, 2 * L])
def test_memory_decoding_equals_one_pass_with_block_mask(M):
    """Segment-by-segment with a memory of M positions (empty at the start) equals one pass
    over the concatenated 4 segments in which the query at t, in segment s, sees keys
    j <= t with j >= sL - M. M = 2L is the eval-longer-than-train case (memory spans two
    segments). Measured max diff ~1e-6 (float32)."""
    S, B = 4, 2
    params = _params()
    tokens = _stream(B, S * L)
    mems, valid, outs = jnp.zeros((2, B, M, D)), jnp.array(0, jnp.int32), []
    for s in range(S):
        logits, inputs, _ = _apply(params, tokens[:, s * L : (s + 1) * L], mems, valid, None)
        mems, valid = _next_mems(mems, inputs, valid)
        outs.append(logits)
    seq = np.concatenate(outs, 1)
    t, j = np.arange(S * L)[:, None], np.arange(S * L)[None]
    mask = (j <= t) & (j >= t // L * L - M)

    def one_pass(t, mask):
        return _apply(params, t, jnp.zeros((2, B, 0, D)), jnp.array(0, jnp.int32), mask)[0]

    full = one_pass(tokens, jnp.asarray(mask))
    np.testing.assert_allclose(seq, full, atol=2e-5)
    # the memory matters: a plain causal one-pass (seeing everything) differs
    causal = one_pass(tokens, jnp.asarray(j <= t))
    assert np.abs(np.asarray(causal) - seq).max() > 1e-3


def test_gradient_through_memory_is_zero():
    """SG(m): the loss of a segment has exactly zero gradient w.r.t. the memory it reads,
    although its value depends on that memory (one jitted program)."""
    M = 8
    params = _params()
    tokens, targets = _stream(2, L), _stream(2, L, seed=2)
    mems = jax.random.normal(jax.random.PRNGKey(3), (2, 2, M, D))

    @functools.partial(jax.jit, **O0)
    def check(params, mems):
        def loss(p, m):
            return X.lm_loss(SMALL.apply({"params": p}, tokens, m, M)[0], targets)

        (value, (g_params, g_mems)) = jax.value_and_grad(loss, (0, 1))(params, mems)
        return value, loss(params, 2 * mems), g_params, g_mems

    value, value_2m, g_params, g = check(params, mems)
    assert np.all(np.asarray(g) == 0.0)
    assert abs(float(value) - float(value_2m)) > 1e-4
    assert float(jnp.abs(g_params["u"]).max()) > 0  # the segment itself does get gradients


# the one run of the CLI, purity and behaviour tests: a 1-layer model with a memory of
# M = 8 on the 'copy' stream, 300 updates of 16 segments, chunks of 100; 2 x SEEDS seeds in
# one compiled program, seeds SEEDS.. the broken variant (memory masked out: use_memory = 0)
RUN = X.Config(
    corpus="copy",
    copy_vocab=8,
    copy_chars=40_000,
    n_layer=1,
    d_model=32,
    n_head=2,
    d_head=16,
    d_inner=64,
    dropout=0.0,
    tgt_len=8,
    mem_len=8,
    eval_tgt_len=8,
    eval_mem_len=8,
    batch_size=16,
    lr=3e-3,
    warmup_steps=20,
    total_updates=300,
    eval_batch=8,
    eval_segments=32,
)
CHUNK = 100
SEEDS = tiny_run_module.SEEDS
KEYS = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's keys (--seed 0)
_INIT = X.init  # the file's own (the fixture patches X.init)


def _twin_init(key, cfg):
    """X.init, where seed SEEDS + i is seed i's twin (same key: same initial parameters and
    segments) that never reads its memory (the traced use_memory = 0)."""
    i = jnp.argmax(jnp.all(key == KEYS, -1))
    state = _INIT(KEYS[i % SEEDS], cfg)
    return state.replace(use_memory=jnp.where(i >= SEEDS, 0, state.use_memory))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """RUN through the command line, in-process, once, with its 2 x SEEDS seeds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(X, "init", _twin_init)
        return tiny_run_module.run_cli(
            X, RUN, tmp_path_factory.mktemp("run"), CHUNK, extra=("--num-seeds", str(2 * SEEDS))
        )


def test_memory_solves_copy_across_segments_and_no_memory_cannot(tiny_run):
    """Behaviour: on the 'copy' stream (the second half of each segment repeats the first
    half of the previous segment; 8 symbols, L = 8), a 1-layer model with a memory of
    M = 8 learns the copy in 300 updates (the CLI run of RUN, each of 2 seeds); its twin
    (same keys, same compiled run) with the memory masked out of every read (the traced
    use_memory = 0: the model without memory) cannot see the source and stays at chance
    (1/8). Measured at 300 updates: val copy accuracy 1.000 / 0.995 (2 seeds) vs 0.129 /
    0.132 (their twins without memory), val loss 1.54 / 1.63 vs 2.08 / 2.08 nats (ln 8 =
    2.08). Fails when `update` ignores the traced use_memory (the twins then learn the copy
    in training: 1.000 / 0.995 on its last 50 segments)."""
    acc, loss = (np.asarray(tiny_run.final[k]) for k in ("val_copy_accuracy", "val_loss"))
    acc8, loss8, acc0, loss0 = acc[:SEEDS], loss[:SEEDS], acc[SEEDS:], loss[SEEDS:]
    print(f"memory: accuracy {acc8} loss {loss8}; no memory: {acc0} {loss0}")
    assert (acc0 < 0.25).all(), acc0
    assert (acc8 > 0.6).all(), acc8
    assert (loss8 < loss0 - 0.3).all(), (loss8, loss0)
    # the twins trained without memory too (not only evaluated so): chance on the last
    # 50 training segments
    train_acc = tiny_run.history["charts/copy_accuracy"][:, -50:].mean(1)
    print(f"training copy accuracy, last 50 updates: {train_acc}")
    assert (train_acc[SEEDS:] < 0.25).all(), train_acc


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's first chunk, rerun on the same initial states (the same compiled
    program), gives the run's first logged rows bit for bit; the seeds differ; losses are
    finite; the memory filled up."""
    n = 2 * SEEDS
    states = run.initial_states(_twin_init, RUN, 0, n)
    step = run.make_chunk(X.update, RUN, CHUNK, parallel.seed_sharding(n), n)
    state, metrics = jax.device_get(step(states))
    for k in tiny_run.history:
        np.testing.assert_array_equal(tiny_run.history[k][:, :CHUNK], metrics[k], err_msg=k)
    kernel = next(x for x in jax.tree.leaves(state.params) if x.ndim >= 3)
    assert not np.array_equal(kernel[0], kernel[1])
    loss = tiny_run.history["losses/loss"]
    assert loss.shape == (n, RUN.num_updates) and np.isfinite(loss).all()
    assert not np.array_equal(loss[0], loss[1])
    assert (np.asarray(tiny_run.state.mem_valid) == 8).all()
    assert not np.array_equal(tiny_run.state.mems[0], tiny_run.state.mems[1])
    np.testing.assert_array_equal(tiny_run.state.use_memory, [1] * SEEDS + [0] * SEEDS)


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        X.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(X.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    assert tiny_run.history["charts/bits_per_char"].shape == (2 * SEEDS, RUN.num_updates)
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert len(summary["val_bits_per_char"]) == 2 * SEEDS
    assert np.isfinite(summary["val_bits_per_char"]).all()


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="mem_len must be >= 0, got -1"):
        X.main(["--mem-len", "-1", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="corpus must be"):
        X.main(["--corpus", "enwik9", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="corpus='enwik8' is read from disk: pass data_dir"):
        X.main(["--corpus", "enwik8", "--run-dir", str(tmp_path)])


PEER = textwrap.dedent("""
    import numpy as np, torch
    from transformers import XLNetConfig, XLNetModel
    d = np.load("inputs.npz")
    torch.manual_seed(0)
    cfg = XLNetConfig(vocab_size=11, d_model=32, n_layer=2, n_head=4, d_inner=64,
                      ff_activation="relu", untie_r=True, attn_type="uni", bi_data=False,
                      clamp_len=-1, mem_len=8, dropout=0.0, layer_norm_eps=1e-5)
    model = XLNetModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # large weights, so a wrong offset is visible
    tokens = torch.tensor(d["tokens"]).long()
    mems, outs = None, []
    with torch.no_grad():
        for s in range(3):
            o = model(tokens[:, s * 8:(s + 1) * 8], mems=mems, use_mems=True)
            mems = o.mems
            outs.append(o.last_hidden_state.numpy())
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez("peer.npz", out=np.concatenate(outs, 1), **w)
""")


@pytest.mark.peer
def test_matches_hf_xlnet_uni_attention(tmp_path):
    """HF transformers v5 XLNetModel(attn_type="uni") is Transformer-XL attention with
    post-LN (its content stream): port its weights (re-initialised N(0, 0.3)) and run 3
    segments of 8 tokens with a memory of 8. Measured max diff 4.8e-7 (catalog: 1.9e-6;
    a wrong distance offset gives 1.85)."""
    tokens = np.asarray(_stream(2, 3 * L))
    np.savez(tmp_path / "inputs.npz", tokens=tokens)
    peer.run_peer(PEER, tmp_path)  # skips if torch cannot be installed, fails if PEER raises
    w = dict(np.load(tmp_path / "peer.npz"))
    model = X.TransformerXL(
        vocab=V, n_layer=2, d_model=D, n_head=4, d_head=8, d_inner=64, untie_r=True
    )
    p = {"embed": {"embedding": w["word_embedding.weight"]}, "out_bias": np.zeros(V, np.float32)}
    for n in range(2):
        a = f"layer.{n}.rel_attn."
        f = f"layer.{n}.ff."
        p[f"u_{n}"], p[f"v_{n}"] = w[a + "r_w_bias"], w[a + "r_r_bias"]
        p[f"layer_{n}"] = {
            "attn": {
                **{k: {"kernel": w[a + k]} for k in "qkvr"},
                "o": {"kernel": w[a + "o"].transpose(1, 2, 0)},
            },  # (d,H,Dh)->(H,Dh,d)
            "ln_attn": {"scale": w[a + "layer_norm.weight"], "bias": w[a + "layer_norm.bias"]},
            "ff1": {"kernel": w[f + "layer_1.weight"].T, "bias": w[f + "layer_1.bias"]},
            "ff2": {"kernel": w[f + "layer_2.weight"].T, "bias": w[f + "layer_2.bias"]},
            "ln_ff": {"scale": w[f + "layer_norm.weight"], "bias": w[f + "layer_norm.bias"]},
        }
    mems, valid, outs = jnp.zeros((2, 2, L, D)), jnp.array(0), []
    for s in range(3):
        _, inputs, h = model.apply({"params": p}, tokens[:, s * L : (s + 1) * L], mems, valid)
        mems, valid = X.next_mems(mems, inputs, valid)
        outs.append(h)
    err = float(np.abs(np.concatenate(outs, 1) - w["out"]).max())
    print(f"max |ours - HF XLNet| = {err:.2e}")
    assert err < 2e-5, err


def test_corpus_is_a_uint8_input_of_update_and_evaluate_not_a_constant():
    """RUN's 'copy' ids live in the State as uint8, so the compiled update and evaluate
    take them as an input: no constant of 1k elements or more in their lowered text (the
    int32 streams were: 36k elements in update, 4k in evaluate)."""
    state = jax.eval_shape(lambda k: X.init(k, RUN), jax.random.PRNGKey(0))
    train, val, _ = X._data(RUN)
    assert state.train_ids.shape == train.shape and state.val_ids.shape == val.shape
    assert state.train_ids.dtype == state.val_ids.dtype == jnp.uint8
    assert train.shape[0] > 30_000 and val.shape[0] > 3_000
    for fn in (X.update, X.evaluate):
        hlo = jax.jit(fn, static_argnums=1).lower(state, RUN).as_text()
        assert not big_constants(hlo, 1000), (fn.__name__, big_constants(hlo, 1000)[:1])


def test_every_config_field_is_read():
    assert unread_fields(X) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset (nothing runs)."""
    cfg, state, after = preset.trace_paper(X)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
