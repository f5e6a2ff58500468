"""Tests of selfsup/moco.py: InfoNCE with the positive first (by hand), the momentum update,
the FIFO queue with wrap-around, no gradient into the key encoder, the schedules, purity,
CLI, the paper preset, the behaviour against the broken variant m = 0 (contrastive accuracy
at TINY), and (slow tier) the probes against random init and m = 0."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import moco
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 16x16 digits, a one-stage ResNet of
# width 8 (32-d representation), 32 images per step in 4 BN sub-batches, K = 256 (8
# batches), 2 epochs of 31 steps.
TINY = moco.Config(version="v2", image_size=16, batch_size=32, num_epochs=2, queue_size=256,
                   key_momentum=0.9, temperature=0.2, feature_dim=16, bn_splits=4,
                   optimizer="adam", lr=3e-3, weight_decay=1e-6, stage_sizes=(1,), width=8,
                   blur_in_v2=False, shift_conv=True)
SEEDS = 2


def test_info_nce_positive_first_by_hand():
    """[1] Eq. 1 on n = 2 queries, K = 2 queue keys in 2-d, T = 0.5. q1 = (1, 0), k1+ =
    (1, 0), queue (0, 1), (-1, 0): logits (1, 0, -1) / 0.5 = (2, 0, -2), loss1 =
    log(e^2 + 1 + e^-2) - 2. q2 = (0, 1), k2+ = (0.6, 0.8): logits (0.8, 1, 0) / 0.5 =
    (1.6, 2, 0), loss2 = log(e^1.6 + e^2 + 1) - 1.6; q2 ranks a negative first, so the
    accuracy is 1/2. Putting the positive last (mutation tried: loss differs) or dropping it
    from the denominator changes the number."""
    q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    k = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    queue = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
    loss, acc = moco.info_nce(q, k, queue, 0.5)
    l1 = np.log(np.exp(2) + 1 + np.exp(-2)) - 2
    l2 = np.log(np.exp(1.6) + np.exp(2) + 1) - 1.6
    np.testing.assert_allclose(loss, (l1 + l2) / 2, rtol=1e-6)
    assert float(acc) == 0.5


def test_momentum_update_by_hand():
    """[1] Eq. 2: theta_k <- m theta_k + (1 - m) theta_q on every leaf; m = 1 freezes f_k,
    m = 0 copies f_q."""
    k = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    q = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}
    out = moco.momentum_update(k, q, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 1.5])
    np.testing.assert_allclose(out["b"]["c"], 3.0)
    jax.tree.map(np.testing.assert_array_equal, moco.momentum_update(k, q, 1.0), k)
    jax.tree.map(np.testing.assert_array_equal, moco.momentum_update(k, q, 0.0), q)


def test_queue_is_fifo_with_wrap_around():
    """K = 6, batches of 2: three enqueues fill rows 0-1, 2-3, 4-5; the fourth overwrites
    the oldest (rows 0-1, the first batch) and the pointer wraps 6 -> 0 -> 2."""
    queue, ptr = jnp.zeros((6, 1)), jnp.array(0)
    for b in range(4):
        queue, ptr = jax.jit(moco.enqueue)(queue, ptr, jnp.full((2, 1), b + 1.0))
        if b == 2:
            assert int(ptr) == 0
            np.testing.assert_array_equal(queue[:, 0], [1, 1, 2, 2, 3, 3])
    assert int(ptr) == 2
    np.testing.assert_array_equal(queue[:, 0], [4, 4, 2, 2, 3, 3])


def _keys(state, k_batch, k_aug, k_shuffle):
    idx = jax.random.choice(k_batch, TINY.num_train, (TINY.batch_size,), replace=False)
    _, x_k = moco.make_views(k_aug, jnp.asarray(moco.images(TINY)[0])[idx], TINY)
    params_k = moco.momentum_update(state.params_k, state.params_q, TINY.key_momentum)
    perm = jax.random.permutation(k_shuffle, TINY.batch_size)
    return moco.encode(moco.network(TINY), params_k, state.stats_k, x_k, TINY.bn_splits,
                       perm)[1]


@pytest.fixture(scope="module")
def one_step(recorded_run):
    """Seed 0 before and after its first update in the CLI run (the inputs of its first and
    second one-update chunks), and the first update's metrics: nothing compiles again."""
    quick_run, chunks = recorded_run
    first = lambda t: jax.tree.map(lambda x: np.asarray(x)[0], t)  # noqa: E731
    return (first(chunks[0][1]), first(chunks[1][1]),
            {k: v[0, 0] for k, v in quick_run.history.items()})


@pytest.fixture(scope="module")
def encoder_checks(one_step):
    """One program (compiled once, XLA's lowest level) on seed 0's state before its first
    update: the keys f_k(x_k) of that update's key views, recomputed with the update's key
    split; and the keys of the first batch of digits, permuted by a random perm and in
    order, with one BN batch (splits = 1) and with 4 sub-batches."""
    state = one_step[0]
    _, k_batch, k_aug, k_shuffle = jax.random.split(state.key, 4)
    x = jnp.asarray(moco.images(TINY)[0][:TINY.batch_size])
    perm = jax.random.permutation(jax.random.PRNGKey(1), TINY.batch_size)

    def checks(state, keys, x, perm):
        ident = jnp.arange(TINY.batch_size)
        enc = lambda splits, p: moco.encode(moco.network(TINY), state.params_k,  # noqa: E731
                                            state.stats_k, x, splits, p)[1]
        return _keys(state, *keys), [[enc(s, p) for p in (perm, ident)] for s in (1, 4)]

    return compiled(checks, state, (k_batch, k_aug, k_shuffle), x, perm)


def test_one_update_moves_queue_key_encoder_and_query_encoder(one_step, encoder_checks):
    """After one update: f_k = m f_k + (1 - m) f_q of the state before (f_k started as a
    copy, so it equals f_q's old parameters); the newest queue rows hold unit-norm keys,
    the rest are untouched; the pointer moved by one batch; the new rows are the keys
    f_k(x_k) (mutation tried: enqueueing constant unit vectors fails here)."""
    state, after, metrics = one_step
    jax.tree.map(np.testing.assert_array_equal, state.params_q, state.params_k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), after.params_k,
                 moco.momentum_update(state.params_k, state.params_q, TINY.key_momentum))
    assert int(after.queue_ptr) == TINY.batch_size
    np.testing.assert_array_equal(after.queue[TINY.batch_size:], state.queue[TINY.batch_size:])
    np.testing.assert_allclose(jnp.linalg.norm(after.queue[:TINY.batch_size], axis=-1), 1.0,
                               rtol=1e-5)
    # the newest rows are f_k's keys of this step's key views, recomputed here through the
    # same functions (views, EMA, shuffled per-sub-batch BN) with the update's key split
    np.testing.assert_allclose(after.queue[:TINY.batch_size], encoder_checks[0], rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(after.params_q["fc"]["kernel"], state.params_q["fc"]["kernel"])
    assert np.isfinite(float(metrics["losses/info_nce"]))


def test_shuffled_key_batch_is_unshuffled(encoder_checks):
    """Shuffling BN ([1] Sec. 3.3): with one BN batch (splits = 1) the statistics do not
    depend on the order, so encode() with a permutation must return the unpermuted rows
    (mutation tried: dropping the un-shuffle fails here); with 4 sub-batches the shuffle
    changes the statistics and so the keys."""
    keys = encoder_checks[1]
    np.testing.assert_allclose(*keys[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(*keys[1], atol=1e-4)


def test_schedules_of_v1_and_v2():
    """main_moco.py: v1 lr 0.03, x 0.1 after epochs 120 and 160; v2 (--cos) a half cosine."""
    cfg = moco.Config(num_train=256 * 5)  # 5 steps per epoch
    sched = moco.make_optimizer(cfg)[1]
    np.testing.assert_allclose([sched(0), sched(599), sched(600), sched(800)],
                               [0.03, 0.03, 0.003, 0.0003], rtol=1e-5)
    sched = moco.make_optimizer(dataclasses.replace(cfg, version="v2"))[1]
    np.testing.assert_allclose([sched(0), sched(500)], [0.03, 0.015], rtol=1e-5)


RUN_ARGS = cli_args(TINY, moco.Config()) + ["--num-seeds", str(SEEDS), "--log-every", "1",
                                            "--no-progress"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once (SEEDS seeds, one-update chunks), with its
    compiled chunks and their inputs."""
    return main_recording_chunks(moco.main, RUN_ARGS + [
        "--run-dir", str(tmp_path_factory.mktemp("moco"))])


@pytest.fixture(scope="module")
def quick_run(recorded_run):
    return recorded_run[0]


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states of seed 0 again, and its first update rerun
    from them by the run's compiled chunk, are bit-identical to the run's; the two seeds
    differ; the run wrote its files; --help documents every field."""
    quick_run, chunks = recorded_run
    with pytest.raises(SystemExit):
        moco.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(moco.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, v2, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    h = quick_run.history["losses/info_nce"]
    assert h.shape == (SEEDS, TINY.num_updates) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    for k in ("linear", "linear_few", "knn", "knn_few"):
        assert np.isfinite(quick_run.final[k]).all()
    assert len(chunks) == TINY.num_updates
    jax.tree.map(np.testing.assert_array_equal, chunks[0][1],
                 run.initial_states(moco.init, TINY, 0, SEEDS))
    state, metrics = chunks[0][0](jax.tree.map(jnp.copy, chunks[0][1]))
    jax.tree.map(np.testing.assert_array_equal, state, chunks[1][1])
    np.testing.assert_array_equal(h[:, :1], metrics["losses/info_nce"])


def test_momentum_encoder_keeps_the_queue_consistent_and_m0_does_not(recorded_run):
    """Behaviour at TINY (62 steps, K = 256; chance 1/257 = 0.004), 2 seeds, against the
    broken variant m = 0 ([1] Fig. 5: the key encoder is the query encoder at every step,
    the queue's keys come from many different encoders, training fails). The m = 0 arm runs
    the CLI run's own compiled update (no new compile) from the same initial states, with
    f_k set to f_q before every update: Eq. 2 then gives m f_q + (1 - m) f_q = f_q, the
    update of m = 0 (up to rounding). Measured on a loaded 2-core CPU, contrastive accuracy
    over the last 10 updates: MoCo 0.053 0.047, m = 0 0.016 0.016 (a separately compiled
    m = 0 training; both start near 0.2-0.4 while the queue is empty of old keys). Mutation
    tried: momentum_update returning theta_q (m ignored, f_k = f_q) gives MoCo 0.0156
    0.0156, the same as this m = 0 arm, and fails. The probes do not separate at this
    budget (see the slow test)."""
    quick_run, chunks = recorded_run
    update, state = chunks[0][0], jax.tree.map(jnp.copy, chunks[0][1])
    acc0 = []
    for _ in range(TINY.num_updates):
        state, metrics = update(state.replace(params_k=jax.tree.map(jnp.copy, state.params_q)))
        acc0.append(np.asarray(metrics["charts/contrastive_acc"])[:, 0])
    acc = quick_run.history["charts/contrastive_acc"][:, -10:].mean(1)
    acc0 = np.stack(acc0, 1)[:, -10:].mean(1)
    print("contrastive acc, MoCo", acc, "m = 0", acc0)
    assert (acc >= 0.035).all() and (acc0 <= 0.025).all(), (acc, acc0)


QUICK = moco.Config(**moco.PRESETS["quick"])


@pytest.mark.slow
def test_moco_beats_init_and_zero_momentum():
    """Behaviour at the `quick` preset (350 steps of 128 images, K = 4096, m = 0.99), 1 seed,
    against the same encoder at random init and against the broken variant m = 0 (the key
    encoder is the query encoder at every step; [1] Fig. 5: training fails). Measured on a
    loaded 2-core CPU (this test, 3.7 min): k-NN 10/class MoCo 0.709, init 0.486, m = 0
    0.378 (linear 10/class 0.777, 0.734, 0.624; the CLI run of the preset: 0.698, 0.787);
    m = 0's loss stays at log(K + 1) = 8.318 (contrastive accuracy 0.0016, chance 1/4097),
    MoCo's falls to about 7.0-7.4 (accuracy 0.03-0.10). At TINY
    (124 steps, K = 256) neither separates: MoCo's loss climbs to log(K + 1) as the queue
    fills, so this gate is slow-tier only."""
    fmt = lambda ev: {k: float(np.asarray(v).mean()) for k, v in ev.items()}
    init = fmt(run.evaluate_seeds(moco.evaluate, run.initial_states(moco.init, QUICK, 0, 1),
                                  QUICK, 1))
    out = {}
    for name, cfg in (("moco", QUICK), ("m0", dataclasses.replace(QUICK, key_momentum=0.0))):
        train = jax.jit(jax.vmap(run.make_train(moco.init, moco.update, cfg)))
        state, metrics = train(run.seed_keys(0, 1))
        out[name] = fmt(run.evaluate_seeds(moco.evaluate, state, cfg, 1))
        out[name]["acc"] = float(np.asarray(metrics["charts/contrastive_acc"])[0, -20:].mean())
    print("init", init, out)
    assert out["moco"]["knn_few"] >= init["knn_few"] + 0.1, (out, init)
    assert out["moco"]["knn_few"] >= out["m0"]["knn_few"] + 0.1, out
    assert out["moco"]["linear_few"] >= init["linear_few"] + 0.02, (out, init)
    assert out["moco"]["acc"] > 20 / QUICK.queue_size > out["m0"]["acc"], out


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--temperature", "0"], "temperature=0"),
                       (["--queue-size", "100"], "queue_size=100 must be a multiple"),
                       (["--key-momentum", "1.5"], "key_momentum=1.5"),
                       (["--bn-splits", "3"], "bn_splits=3"),
                       (["--version", "v3"], "version='v3'"),
                       (["--lr", "-1"], "--lr must be > 0")):
        with pytest.raises(ValueError, match=msg):
            moco.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(moco) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: ResNet-50 (2048-d representation,
    linear head 2048 -> 128), batch 256 in 8 BN sub-batches, K = 65536; nothing runs."""
    cfg, state, (after, metrics) = trace_paper(moco)
    assert cfg.batch_size == 256 and cfg.queue_size == 65536 and cfg.key_momentum == 0.999
    assert state.params_q["fc"]["kernel"].shape == (2048, 128)
    assert "mlp" not in state.params_q
    assert state.queue.shape == (65536, 128)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
