"""Tests of curriculum/transfer_curriculum.py: the pacing function, the step decay, the
batch sampler, the balanced order and the SVM scores by hand; the arms' orders and one
update of paced SGD per arm against numpy; the linear toy's easy-first behaviour against
anti-curriculum with a broken (random) scorer in the same test; the CIFAR-10 split on a
fixture in the real format; purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from curriculum import transfer_curriculum as tc
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.datasets import write_cifar10
from tests.common.preset import trace_paper

SEEDS = 2
# One tiny digits configuration (teacher, SVM and the conv student) for the CLI and purity.
TINY = tc.Config(**{**tc.PRESETS["quick"], "widths": (4,), "kernels": (3,), "dense": 8,
                    "teacher_steps": 20, "num_batches": 20, "eval_every": 10,
                    "batch_increase": 10, "batch_size": 16})
TOY = tc.Config(dataset="linear", batch_size=10, num_batches=400, eval_every=20,
                batch_increase=20, lr=(0.02,) * 4, lr_decay_rate=(1.0,) * 4,
                lr_batch_size=(100,) * 4)


def test_pacing_by_hand():
    """n_t = ceil(N min(1, 0.04 * 1.9^floor(t / 100))) for N = 1000: 40 at t = 0 and 99,
    76 at t = 100, ceil(144.4) = 145 at t = 250, all 1000 once 0.04 * 1.9^k >= 1 (k = 6)."""
    cfg = tc.Config(dataset="linear")
    got = [int(tc.pacing(t, 1000, cfg)) for t in (0, 99, 100, 250, 599, 600, 10_000)]
    assert got == [40, 40, 76, 145, int(np.ceil(1000 * 0.04 * 1.9**5)), 1000, 1000]


def test_learning_rates_step_decay_per_arm_by_hand():
    """lr_t = max(lr / decay^floor(t / interval), 1e-4) with the released per-arm schedules:
    at t = 100 only the curriculum arm (interval 100) has decayed once; at t = 600 the four
    have decayed 6, 3, 1, 1 times; far out every arm sits at the floor."""
    cfg = tc.Config(dataset="linear")
    np.testing.assert_allclose(tc.learning_rates(0, cfg), cfg.lr, rtol=1e-6)
    np.testing.assert_allclose(tc.learning_rates(100, cfg), [0.03 / 1.1, 0.025, 0.025, 0.035],
                               rtol=1e-6)
    np.testing.assert_allclose(tc.learning_rates(600, cfg),
                               [0.03 / 1.1**6, 0.025 / 1.1**3, 0.025 / 1.3, 0.035 / 1.8],
                               rtol=1e-5)
    np.testing.assert_allclose(tc.learning_rates(10**6, cfg), [1e-4] * 4)


def test_l2_penalty_is_keras_l2_on_kernels_only():
    """Keras l2(5e-3): 5e-3 x the sum of squared kernel entries, biases spared: a 2 x 3 kernel
    of ones and a bias of ones give 5e-3 x 6."""
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
              "Conv_0": {"kernel": 2 * jnp.ones((1, 1, 1, 1))}}
    np.testing.assert_allclose(tc.l2_penalty(params, tc.Config()), 5e-3 * (6 + 4), rtol=1e-6)


def test_sample_batch_is_uniform_over_the_open_examples_without_replacement():
    """Ranks 0..19 over 20 examples: with 5 open the batch of 5 is exactly the open set;
    with 12 open, batches of 4 are distinct, open, and over 4,000 draws each open example
    appears 4/12 of the time (binomial sd 0.0075)."""
    rank = jnp.asarray(np.random.default_rng(0).permutation(20))
    u = jax.random.uniform(jax.random.PRNGKey(0), (20,))
    assert set(np.asarray(tc.sample_batch(u, rank, 5, 5)).tolist()) == set(
        np.flatnonzero(np.asarray(rank) < 5).tolist())
    us = jax.random.uniform(jax.random.PRNGKey(1), (4000, 20))
    idx = np.asarray(jax.vmap(lambda u: tc.sample_batch(u, rank, 12, 4))(us))
    assert all(len(set(row)) == 4 for row in idx) and (np.asarray(rank)[idx] < 12).all()
    freq = np.bincount(idx.ravel(), minlength=20)[np.asarray(rank) < 12] / 4000
    np.testing.assert_allclose(freq, 4 / 12, atol=0.03)


def test_balance_order_by_hand():
    """Order [3, 0, 4, 1, 2, 5] with classes y = [0, 0, 1, 1, 0, 1]: the easiest of each class
    are 3 (class 1) and 0 (class 0), then 4 and 2, then 1 and 5, each group in the order's
    sequence: [3, 0, 4, 2, 1, 5]. A class that runs out leaves the later groups."""
    y = np.array([0, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(tc.balance_order(np.array([3, 0, 4, 1, 2, 5]), y),
                                  [3, 0, 4, 2, 1, 5])
    short = np.array([0, 0, 1, 0, 0])  # class 1 has one example: groups 1, 2 hold class 0
    np.testing.assert_array_equal(tc.balance_order(np.array([0, 1, 4, 2]), short), [0, 2, 1, 4])


def test_svm_scores_rank_a_mislabelled_example_hardest():
    """Two separated clusters of 30 points, one point of cluster 0 labelled 1: its score
    P_svm(y_i | phi_i) is the lowest, and typical points score above 0.7."""
    rng = np.random.default_rng(0)
    f = np.concatenate([rng.normal(-2, 0.5, (30, 2)), rng.normal(2, 0.5, (30, 2))])
    y = np.repeat([0, 1], 30)
    y[5] = 1
    s = tc.svm_scores(f, y)
    assert np.argmin(s) == 5 and np.median(s) > 0.7


def test_init_orders_easiest_first_anti_reversed_random_permuted():
    """Linear toy: the curriculum arm's ranks sort the examples by the optimal hypothesis'
    loss (ascending), the anti arm is the exact reverse, the random arm a permutation that
    differs per seed, vanilla the curriculum order (unused); all arms start equal."""
    s0, s1 = (jax.tree.map(lambda a: a[i], jax.jit(jax.vmap(lambda k: tc.init(k, TOY)))(
        run.seed_keys(0, 2))) for i in (0, 1))
    x, y, _, _, w_bar, _ = tc.datasets(TOY)
    loss = (x @ w_bar - y) ** 2
    order = np.argsort(np.asarray(s0.ranks[0]))
    assert (np.diff(loss[order]) >= 0).all()
    np.testing.assert_array_equal(s0.ranks[1], len(y) - 1 - s0.ranks[0])
    assert sorted(np.asarray(s0.ranks[2]).tolist()) == list(range(len(y)))
    assert not np.array_equal(s0.ranks[2], s1.ranks[2])
    jax.tree.map(lambda p: np.testing.assert_array_equal(p[0], p[3]), s0.params)


def test_one_update_is_paced_sgd_per_arm_by_hand():
    """Linear toy, N = 50, 3 SGD steps of 5 per update, one learning rate per arm: per step
    the key splits into (key, k_u, k_drop), u ~ U(0, 1)^N is shared, each arm draws its batch
    among its open examples (vanilla: all) and steps w -= lr_t x^T (x w + b - y) / B,
    b -= lr_t mean(x w + b - y) (numpy by hand), lr_t halving at t = 2 for the two arms whose
    decay interval is 2."""
    cfg = dataclasses.replace(TOY, linear_num_train=50, batch_size=5, eval_every=3,
                              num_batches=3, lr=(0.1, 0.2, 0.3, 0.4), starting_percent=0.2,
                              batch_increase=2, lr_decay_rate=(2.0,) * 4,
                              lr_batch_size=(2, 2, 9, 9))
    state = tc.init(jax.random.PRNGKey(3), cfg)
    new, metrics = jax.jit(tc.update, static_argnums=1)(state, cfg)
    x, y, xt, yt, _, _ = tc.datasets(cfg)
    key = state.key
    w = np.asarray(state.params["kernel"])[:, :, 0].astype(np.float64)
    b = np.asarray(state.params["bias"])[:, 0].astype(np.float64)
    for t in range(3):
        key, k_u, _ = jax.random.split(key, 3)
        u = jax.random.uniform(k_u, (50,))
        n_open = 10 if t < 2 else 19  # ceil(50 * 0.2) then ceil(50 * 0.38)
        for a in range(4):
            idx = np.asarray(tc.sample_batch(u, state.ranks[a], n_open if a < 3 else 50, 5))
            r = x[idx] @ w[a] + b[a] - y[idx]
            lr = cfg.lr[a] / (2.0 if t == 2 and a < 2 else 1.0)  # arms 0, 1 decay at t = 2
            w[a] -= lr * x[idx].T @ r / 5
            b[a] -= lr * r.mean()
    np.testing.assert_allclose(new.params["kernel"][:, :, 0], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.params["bias"][:, 0], b, rtol=1e-4, atol=1e-6)
    for a, arm in enumerate(tc.ARMS):
        np.testing.assert_allclose(metrics[f"charts/test_mse_{arm}"],
                                   np.mean((xt @ w[a] + b[a] - yt) ** 2), rtol=1e-4)
    assert int(new.step) == 3
    np.testing.assert_allclose(metrics["charts/open_fraction"], 19 / 50, rtol=1e-6)


def test_easy_first_beats_hard_first_on_the_linear_toy_and_a_random_scorer_does_not():
    """Behaviour ([1] Sec. 3, Theorem 1's direction): linear regression, 20-d inputs on the
    sphere |x| = sqrt(20), noise sd ~ U(0, 2) per example, 1,000 examples, batch 10, 400
    steps, the same learning rate for every arm, 8 seeds; test MSE against the noise-free
    targets averaged over the run. Measured (loaded 2-core CPU): curriculum 0.097-0.174,
    anti 0.344-0.452, random 0.130-0.180, vanilla 0.094-0.171. The gate: easy-first beats
    hard-first by 0.1 in every seed. The broken variant in the same compiled program, the
    orders of a scorer that ranks by random numbers (the states' ranks replaced), makes both
    orders random and fails it."""
    train = jax.jit(jax.vmap(lambda s: jax.lax.scan(lambda s, _: tc.update(s, TOY), s, None,
                                                    TOY.num_updates)[1]))
    states = jax.vmap(lambda k: tc.init(k, TOY))(run.seed_keys(0, 8))
    order = np.argsort(np.random.default_rng(1).random(TOY.linear_num_train))
    rank = np.argsort(order)  # the position of each example in the random scorer's order
    bad = np.broadcast_to(np.stack([rank, len(rank) - 1 - rank]), (8, 2, len(rank)))
    broken_states = states.replace(ranks=states.ranks.at[:, :2].set(bad))
    real, broken = ({arm: np.asarray(m[f"charts/test_mse_{arm}"]).mean(1) for arm in tc.ARMS}
                    for m in (train(states), train(broken_states)))
    print({k: v.round(3) for k, v in real.items()}, {k: v.round(3) for k, v in broken.items()})
    assert (real["curriculum"] < real["anti"] - 0.1).all()
    assert real["curriculum"].mean() < real["random"].mean()
    assert not (broken["curriculum"] < broken["anti"] - 0.1).all()


def test_cifar10_split_on_a_fixture_in_the_real_format(tmp_path):
    """CIFAR-10's python batches (2 images each; label = batch + image): the target classes
    3..7 keep training labels {3, 3, 4, 4, 5} remapped to {0, 0, 1, 1, 2}, the teacher gets
    the other five training images with labels 0..K-1 of its own classes, the test set keeps
    labels 5 and 6 (-> 2, 3); the target training images are standardised per channel."""
    root = write_cifar10(tmp_path / "cifar", 2)
    cfg = tc.Config(data_dir=root)
    x, y, xt, yt, xs, ys = tc.datasets(cfg)
    assert x.shape == (5, 32, 32, 3) and sorted(y.tolist()) == [0, 0, 1, 1, 2]
    assert sorted(yt.tolist()) == [2, 3] and xs.shape[0] == 5 and sorted(ys.tolist()) == [
        0, 1, 1, 2, 2]
    np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-5)


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI: the teacher (20 Adam steps on digits 5-9), the SVM scores, two
    updates of 10 steps of the four arms, 2 seeds; the compiled chunks recorded."""
    out = tmp_path_factory.mktemp("tc")
    argv = cli_args(TINY, tc.Config(**tc.PRESETS["quick"]), "quick") + [
        "--num-seeds", str(SEEDS), "--log-every", "1", "--no-progress",
        "--run-dir", str(out / "run"), "--plot", str(out / "f.png")]
    res, chunks = main_recording_chunks(tc.main, argv)
    return res, chunks, out / "f.png"


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and its first chunk rerun from them,
    are bit-identical to the run's; the two seeds differ; the figure is written; --help
    documents every field; the curriculum and anti ranks are reverses of each other."""
    res, chunks, png = recorded_run
    with pytest.raises(SystemExit):
        tc.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(tc.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert png.stat().st_size > 1000 and (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/train_loss_curriculum"]
    assert h.shape == (SEEDS, 2) and np.isfinite(h).all() and not np.array_equal(h[0], h[1])
    first_chunk, first_input = chunks[0]
    init = run.initial_states(tc.init, TINY, 0, SEEDS)
    jax.tree.map(np.testing.assert_array_equal, first_input, init)
    state, metrics = first_chunk(first_input)
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :1], metrics["losses/train_loss_curriculum"])
    n = init.ranks.shape[-1]
    np.testing.assert_array_equal(init.ranks[:, 1], n - 1 - init.ranks[:, 0])


def test_image_order_is_balanced_and_easiest_first_within_each_class(recorded_run):
    """The TINY run's scorer: the difficulty score is the SVM's confidence in the true class on
    the teacher's penultimate features (width `dense`, not the logits; higher = easier);
    every group of K consecutive examples of the curriculum order holds each of the K classes
    once, and within a class the confidence never rises along the order."""
    _, y, _, _, _, _ = tc.datasets(TINY)
    feats = tc.teacher_features(TINY)  # cached by the run
    assert feats.shape == (len(y), TINY.dense)  # penultimate features, not the 5 logits
    order, scores = tc.curriculum_order(TINY), tc.difficulty_scores(TINY)
    np.testing.assert_allclose(scores, tc.svm_scores(feats, y, TINY.data_seed), atol=1e-9)
    k = len(TINY.target_classes)
    groups = y[order[: k * (np.bincount(y).min())]].reshape(-1, k)
    assert all(sorted(g) == list(range(k)) for g in groups)
    for c in range(k):
        s = scores[order][y[order] == c]
        assert (np.diff(s) <= 0).all()


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in (
        (["--lr", "0.1", "0.1"], "one positive value per arm"),
        (["--lr-decay-rate", "0.5", "1", "1", "1"], "must be >= 1"),
        (["--dataset", "mnist"], "dataset='mnist'"),
        (["--target-classes", "3"], "two or more"),
        (["--starting-percent", "0.01"], "fewer than batch_size"),
        (["--widths", "4", "8"], "one positive"),
        (["--batch-increase", "0"], "batch_increase=0"),
        (["--target-classes", "3", "3", "4"], "duplicates"),
    ):
        with pytest.raises(ValueError, match=msg):
            tc.main(cli_args(TINY, tc.Config(**tc.PRESETS["quick"]), "quick") + flags
                    + ["--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="needs --data-dir"):
        tc.Config().validate()


def test_every_config_field_is_read():
    assert unread_fields(tc) == []


def test_paper_preset_traces(monkeypatch):
    """eval_shape of init and one update under `paper` (stVGG on 32x32x3, batch 100, the
    released schedules): CIFAR-10 replaced by a fifth of its size in zeros (5,000 target
    training images, 5 classes), the teacher's scores by random numbers (training the teacher
    is the GPU run's job; the loader is tested on the fixture above)."""
    rng = np.random.default_rng(0)
    fake = (np.zeros((10_000, 32, 32, 3), np.uint8), np.arange(10_000) % 10,
            np.zeros((2_000, 32, 32, 3), np.uint8), np.arange(2_000) % 10)
    monkeypatch.setattr(tc.data, "load_cifar10", lambda d: fake)
    monkeypatch.setattr(tc, "difficulty_scores", lambda cfg: rng.random(5_000))
    cfg, state, (after, metrics) = trace_paper(tc, data_dir="/nonexistent")
    assert state.ranks.shape == (4, 5_000) and state.data[0].shape == (5_000, 32, 32, 3)
    assert state.params["Conv_0"]["kernel"].shape == (4, 3, 3, 3, 32)
    assert state.params["Dense_0"]["kernel"].shape == (4, 2 * 2 * 256, 512)
    assert cfg.num_updates == 70 and jax.tree.structure(after) == jax.tree.structure(state)
    assert metrics["charts/test_acc_curriculum"].shape == ()
    tc.datasets.cache_clear()
