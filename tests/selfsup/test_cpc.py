"""Tests of selfsup/cpc.py: InfoNCE by hand and against a per-row loop, the k-step shift,
the causal masks of both context networks (PixelCNN rows, GRU time), the patch grid, the
procedural signals, behaviour against a broken variant (positives from another sequence),
probes against random init, purity, CLI and the paper presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import cpc
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every training test: sequence mode, 128 samples -> 8 frames,
# 16 channels, GRU 16, k = 1..3, 16 sequences per step (N = 128 candidates), 40 steps;
# probes on 200 / 100 signals. (Image mode at 16x16, 4-px patches, 40 steps reached only
# 1.9 and 1.2 x chance, its broken variant 2.5: too slow a learner for the default tier.)
TINY = cpc.Config(mode="sequence", seq_length=128, enc_channels=16, enc_kernels=(8, 4, 4),
                  enc_strides=(4, 2, 2), gru_size=16, pred_steps=3, batch_size=16,
                  num_steps=40, lr=1e-2, num_train=200, seq_probe_test=100,
                  probe_per_class=5, knn_k=5, shift_conv=True)
# The image mode's networks (no training): 16x16 images, 3x3 grid of 8-px patches.
IMG = cpc.Config(image_size=16, patch_size=8, patch_stride=4, stage_sizes=(1,), width=4,
                 context_blocks=2, context_channels=8, pred_steps=2, batch_size=2)
SEEDS = 2
CHANCE = 1 / (TINY.batch_size * TINY.seq_frames)


def test_info_nce_by_hand_and_k_step_shift():
    """[1] Eq. 4: preds [(1, 0), (0, 2)], targets [(1, 0), (0, 1), (1, 1)], labels [2, 1]:
    logits [[1, 0, 1], [0, 2, 2]] -> losses log(2e + 1) - 1 and log(2e^2 + 1) - 2; accuracy
    1/2 (row 1's argmax is the first of a tie). cpc_loss on random z and predictions equals
    a loop over every context (b, t, s) and offset k of -log softmax over all B T S targets
    at the target (b, t + k, s). With one-hot z and predictions 10 z_{t+k}, accuracy is 1;
    a shift by k - 1 drops it. Mutation tried: labels (bb * t + tt + k - 1) fail (at the
    loop check)."""
    loss, acc = jax.jit(cpc.info_nce)(jnp.array([[1.0, 0], [0, 2]]),
                                      jnp.array([[1.0, 0], [0, 1], [1, 1]]), jnp.array([2, 1]))
    e = np.e
    np.testing.assert_allclose(loss, (np.log(2 * e + 1) - 1 + np.log(2 * e**2 + 1) - 2) / 2,
                               rtol=1e-6)
    assert float(acc) == 0.5
    cfg = dataclasses.replace(TINY, min_step=1, pred_steps=2)
    b, t, s, d = 2, 4, 2, 5
    rng = np.random.default_rng(0)
    z = rng.normal(size=(b, t, s, d)).astype(np.float32)
    preds = rng.normal(size=(2, b, t, s, d)).astype(np.float32)
    cpc_loss = jax.jit(cpc.cpc_loss, static_argnums=2)
    loss, acc, chance = cpc_loss(z, preds, cfg)
    zf = z.reshape(-1, d)
    want = 0.0
    for i, k in enumerate((1, 2)):
        rows = []
        for bi in range(b):
            for ti in range(t - k):
                for si in range(s):
                    lg = zf @ preds[i, bi, ti, si]
                    pos = (bi * t + ti + k) * s + si
                    rows.append(np.log(np.exp(lg).sum()) - lg[pos])
        want += np.mean(rows)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert chance == 1 / (b * t * s)
    onehot = np.eye(b * t * s, dtype=np.float32).reshape(b, t, s, b * t * s)
    fut = np.stack([np.roll(onehot, -k, axis=1) for k in (1, 2)]) * 3.0
    loss, acc, _ = cpc_loss(onehot, fut, cfg)
    assert float(acc) == 1.0
    n = b * t * s
    np.testing.assert_allclose(loss, 2 * (np.log(np.exp(3) + n - 1) - 3), rtol=1e-5)


def test_pixelcnn_context_never_reads_rows_below():
    """[2]'s masked context: d c_{i,.} / d z_{i',.} is exactly 0 for every row i' > i and not
    0 for i' <= i (2 blocks reach 2 rows up), so the prediction W_k c_{i,j} of row i + k
    (k >= 1) never reads the target row or any row below it. The full network on images:
    the patch grid is 3x3, z has 16 dims. Mutation tried: padding the bottom instead of the
    top (rows i, i + 1) fails (rows below get gradient)."""
    g, d = IMG.grid, 16
    ctx = cpc.PixelCNNContext(IMG.context_blocks, IMG.context_channels, False, jnp.float32)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, g, g, d))

    @jax.jit
    def jacobian(z):
        params = ctx.init(jax.random.PRNGKey(0), z)
        return jax.jacrev(lambda z: ctx.apply(params, z))(z)

    jac = np.abs(np.asarray(jacobian(z))).sum((0, 2, 3, 4, 6, 7))  # (rows of c, rows of z)
    for i in range(g):
        assert (jac[i, i + 1:] == 0).all(), (i, jac[i])
        assert (jac[i, :i + 1] > 0).all(), (i, jac[i])
    state = jax.eval_shape(lambda k: cpc.init(k, IMG), jax.random.PRNGKey(0))
    zz, preds = jax.eval_shape(lambda p, x: cpc.CPC(IMG).apply({"params": p}, x),
                               state.params, jnp.zeros((2, 16, 16, 1)))
    assert zz.shape == (2, 3, 3, 16) and preds.shape == (2, 2, 3, 3, 16)


def test_gru_context_is_causal_and_sequences_carry_the_pitch(tiny_run):
    """Sequence mode: d c_t / d z_t' = 0 for t' > t (the GRU reads the past only) and the
    encoder gives seq_length / prod(strides) = 8 frames. The procedural signals without
    noise: the strongest frequency of each is the class pitch f_y = 0.02 + 0.18 y / 9 or its
    second harmonic (within one FFT bin of 1024 samples). No mutation tried here: the GRU is
    causal by construction; the check guards against a bidirectional context."""
    params = jax.tree.map(lambda a: a[0], tiny_run.state.params)  # seed 0, trained
    net = cpc.CPC(TINY)
    z = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 1, 16))
    jac = jax.jit(jax.jacrev(lambda z: net.apply({"params": params}, z,
                                                  method=cpc.CPC.context)))(z)
    jac = np.abs(np.asarray(jac)).sum((0, 2, 3, 4, 6, 7))  # (T of c, T of z)
    assert (np.triu(jac, 1) == 0).all() and (np.diag(jac) > 0).all()
    cfg = dataclasses.replace(TINY, seq_length=1024, seq_noise=0.0)
    x, y = jax.jit(cpc.make_sequences, static_argnums=(1, 2))(jax.random.PRNGKey(3), 20, cfg)
    x, y = np.asarray(x)[:, :, 0, 0], np.asarray(y)
    peak = np.argmax(np.abs(np.fft.rfft(x, axis=1)), 1) / 1024
    f = 0.02 + 0.18 * y / 9
    assert (np.minimum(np.abs(peak - f), np.abs(peak - 2 * f)) <= 1.5 / 1024).all()
    assert len(np.unique(y)) > 3
    zx = jax.eval_shape(lambda p, x: net.apply({"params": p}, x, method=cpc.CPC.encode),
                        params, jnp.zeros((2, 128, 1, 1)))
    assert zx.shape == (2, 8, 1, 16)


def test_patch_grid():
    """32x32 -> 7x7 patches of 8 px at stride 4 ([1]'s 256 / 64 / 32 at 1/8 scale); patch
    (i, j) is the window at (4 i, 4 j) of a ramp image."""
    cfg = dataclasses.replace(IMG, image_size=32)
    assert cfg.grid == 7 and cpc.Config().grid == 7
    x = (np.arange(32.0)[:, None] * 100 + np.arange(32.0)[None, :])[None, :, :, None]
    p = np.asarray(cpc.patches(jnp.asarray(x), cfg))
    assert p.shape == (1, 7, 7, 8, 8, 1)
    for i, j in ((0, 0), (3, 5), (6, 6)):
        np.testing.assert_array_equal(p[0, i, j], x[0, 4 * i:4 * i + 8, 4 * j:4 * j + 8])


RUN_ARGS = cli_args(TINY, cpc.Config()) + ["--num-seeds", str(SEEDS), "--log-every",
                                           str(TINY.num_updates), "--no-progress"]


def _run(run_dir):
    return cpc.main(RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("cpc"))


REAL_LOSS = cpc.cpc_loss


def _broken_loss(z, preds, cfg):
    """Broken variant: the positives (and all targets) come from the next sequence of the
    batch, which the context has never seen."""
    return REAL_LOSS(jnp.roll(z, 1, axis=0), preds, cfg)


def test_contrastive_accuracy_rises_and_broken_positives_stay_at_chance(tiny_run,
                                                                        monkeypatch):
    """Behaviour ([1] Eq. 4): TINY, 40 steps, 2 seeds; the accuracy of ranking the positive
    first among N = 128 (chance 0.0078), mean of the last 5 updates, must reach 5 x chance.
    Measured (2-core CPU): 9.6 and 7.8 x chance (first update: 0.5 and 1.0 x); a held-out
    batch (evaluate) 0.068 0.081. The broken variant in the same test (positives taken from
    the next sequence of the batch, 1 seed) stays at 2.2 x chance (it can only learn where
    in a sequence a frame sits), below the 3.5 x gate."""
    acc = tiny_run.history["charts/cpc_acc"][:, -5:].mean(1)
    monkeypatch.setattr(cpc, "cpc_loss", _broken_loss)
    _, m = jax.jit(run.make_train(cpc.init, cpc.update, TINY))(jax.random.PRNGKey(0))
    monkeypatch.undo()
    broken = float(np.asarray(m["charts/cpc_acc"])[-5:].mean())
    print("acc", acc, "broken", broken, "test", tiny_run.final["cpc_acc_test"])
    assert (acc >= 5 * CHANCE).all(), acc
    assert (tiny_run.final["cpc_acc_test"] >= 5 * CHANCE).all()
    assert broken < 3.5 * CHANCE, broken


def test_probes_against_random_init(tiny_run):
    """The encoder and GRU after 40 steps against the same networks at init, in the same run
    (evaluate's "init_" keys), on 100 held-out signals of 10 pitch classes. Measured
    (seeds 0, 1): linear probe, 200 labels, trained 0.57 0.67, init 0.48 0.51; k-NN 0.56
    0.46, init 0.49 0.32; 5 labels per class: linear 0.54 0.53 vs 0.38 0.31. Gates: the
    seed-mean linear and k-NN accuracies at least 0.04 above init."""
    f = tiny_run.final
    print({k: np.round(v, 3) for k, v in f.items()})
    assert f["linear"].mean() >= f["init_linear"].mean() + 0.04, f
    assert f["knn"].mean() >= f["init_knn"].mean() + 0.04, f


def test_train_is_pure_and_cli_writes_its_files(tiny_run, tmp_path, capsys):
    """Same keys: bit-identical a second time; the two seeds differ; --help documents every
    field and the presets; the loss falls."""
    with pytest.raises(SystemExit):
        cpc.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(cpc.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, quick_seq, audio, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    h = tiny_run.history["losses/info_nce"]
    assert h.shape == (SEEDS, TINY.num_updates) and np.isfinite(h).all()
    assert h[:, -5:].mean() < h[:, :5].mean()
    assert not np.array_equal(h[0], h[1])
    again = _run(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, tiny_run.state.params, again.state.params)
    np.testing.assert_array_equal(h, again.history["losses/info_nce"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--mode", "video"], "mode='video'"),
                       (["--min-step", "6"], "min_step=6 must be in"),
                       (["--pred-steps", "7"], "pred_steps=7 must be <"),
                       (["--patch-size", "300"], "patch_size=300"),
                       (["--enc-strides", "5", "4"], "enc_kernels=")):
        with pytest.raises(ValueError, match=msg):
            cpc.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(cpc) == []


def test_paper_presets_trace():
    """eval_shape of init and one update: `paper` ([1] Sec. 3.2: 256 x 256 images, 7 x 7
    grid of 64-px patches, ResNet-v2-101's first 3 stacks -> 1024-d z, PixelCNN context,
    W_1..W_5) and `audio` ([1] Sec. 3.1: 20480 samples -> 128 frames of 512, GRU 256,
    W_1..W_12)."""
    cfg, state, (after, metrics) = trace_paper(cpc)
    assert cfg.grid == 7 and state.params["W_k"].shape == (5, 1024, 1024)
    n_blocks = sum(1 for k in state.params["enc"] if k.startswith("PreActBottleneck"))
    assert n_blocks == 3 + 4 + 23
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    cfg, state, (after, metrics) = trace_paper(cpc, **cpc.PRESETS["audio"])
    assert cfg.seq_frames == 128 and state.params["W_k"].shape == (12, 256, 512)
    assert jax.tree.structure(after) == jax.tree.structure(state)
