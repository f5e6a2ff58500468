"""Tests of generalization/auto_augment.py: the ops on hand images (invert, rotate by 90
degrees, the identity at each op's neutral magnitude, the magnitude bins), a sub-policy's
probabilities, the controller's log-prob as the sum over its decisions (stepped by hand),
the controller finding Invert for an inverted validation set against the sign-flipped
reward, purity, CLI, paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import auto_augment as aa
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# digits 8 x 8, inverted validation set, 6 ops, 8 policies x 60 child steps x 10 updates.
TINY = aa.Config(**{**aa.PRESETS["quick"], "image_size": 8, "num_train": 300, "num_val": 300,
                    "child_steps": 60, "child_batch": 32, "child_hidden": 32,
                    "num_policies": 8, "num_controller_updates": 10})
SEEDS = 2
IMG = (np.arange(16, dtype=np.float32).reshape(4, 4, 1) + 1) / 17  # distinct values in (0, 1)


def test_ops_on_hand_images():
    """Invert = 1 - x; Rotate 90 = np.rot90 (counter-clockwise, PIL's sign); every op at its
    neutral magnitude (shear / translate / rotate 0, enhance factors 1, Solarize threshold
    above the max, Posterize 8 bits on 8-bit levels, Cutout 0, SamplePairing 0) is the
    identity; Solarize at threshold 0 inverts; TranslateX by 1/4 of 4 px moves one pixel
    right; Equalize maps levels 0.2, 0.4, 0.6, 0.8
    (2, 1, 3, 2 pixels) to (CDF - CDF(min)) / (N - CDF(min)) = 0, 1/6, 2/3, 1; AutoContrast
    stretches to [0, 1]; Sharpness at factor 0 is PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1)
    / 13 of a single bright pixel. Through apply_op: the magnitude bins (3 bins of Rotate
    span -30, 0, 30) and the op index."""
    img8 = jnp.round(IMG * 255) / 255
    neutral = {"shear_x": 0.0, "shear_y": 0.0, "translate_x": 0.0, "translate_y": 0.0,
               "rotate": 0.0, "contrast": 1.0, "color": 1.0, "brightness": 1.0,
               "sharpness": 1.0, "solarize": 1.01, "posterize": 8.0, "cutout": 0.0,
               "sample_pairing": 0.0, "identity": 0.0}
    levels = jnp.array([0.2, 0.2, 0.4, 0.6, 0.6, 0.6, 0.8, 0.8]).reshape(2, 4, 1)
    dot = jnp.zeros((5, 5, 1)).at[2, 2].set(1.0)
    rot_cfg = dataclasses.replace(TINY, ops=("rotate", "invert"), num_mag_bins=3)
    key = jax.random.PRNGKey(0)

    def cases(img, img8):
        fns = lambda x, v: aa.op_fns(x, jnp.float32(v), key, 1 - x)
        out = {name: fns(img8, v)[name]() for name, v in neutral.items()}
        out.update(invert=fns(img, 0.0)["invert"](), rot90=aa.rotate(img, 90.0),
                   solarize0=fns(img, 0.0)["solarize"](), flip=fns(img, 0.0)["flip_lr"](),
                   tx=fns(img, 0.25)["translate_x"](), equalize=aa.equalize(levels),
                   auto_contrast=fns(img, 0.0)["auto_contrast"](),
                   bins=jnp.stack([aa.apply_op(img, 0, m, key, img, rot_cfg) for m in range(3)]),
                   op1=aa.apply_op(img, 1, 0, key, img, rot_cfg), rot30=aa.rotate(img, 30.0),
                   rotm30=aa.rotate(img, -30.0), sharp0=aa.sharpen(dot, 0.0))
        return out

    out = compiled(cases, jnp.asarray(IMG), img8)
    for name in neutral:
        np.testing.assert_allclose(out[name], img8, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(out["invert"], 1 - IMG, atol=1e-6)
    np.testing.assert_allclose(out["solarize0"], 1 - IMG, atol=1e-6)
    np.testing.assert_allclose(out["rot90"], np.rot90(IMG), atol=1e-5)
    np.testing.assert_allclose(out["flip"], IMG[:, ::-1], atol=0)
    np.testing.assert_allclose(out["tx"][:, 1:], IMG[:, :-1], atol=1e-6)
    np.testing.assert_allclose(out["tx"][:, 0], 0.0, atol=1e-6)  # fill
    np.testing.assert_allclose(np.unique(out["equalize"]), [0, 1 / 6, 2 / 3, 1], atol=1e-6)
    smooth = np.zeros((5, 5)); smooth[1:4, 1:4] = 1 / 13; smooth[2, 2] = 5 / 13  # noqa: E702
    np.testing.assert_allclose(out["sharp0"][..., 0], smooth, atol=1e-6)
    np.testing.assert_allclose(out["auto_contrast"].min(), 0.0, atol=1e-6)
    np.testing.assert_allclose(out["auto_contrast"].max(), 1.0, atol=1e-6)
    np.testing.assert_allclose(out["bins"][0], np.clip(out["rotm30"], 0, 1), atol=1e-6)
    np.testing.assert_allclose(out["bins"][1], IMG, atol=1e-6)
    np.testing.assert_allclose(out["bins"][2], np.clip(out["rot30"], 0, 1), atol=1e-6)
    np.testing.assert_allclose(out["op1"], 1 - IMG, atol=1e-6)


def test_sub_policy_probabilities():
    """augment: a policy whose every op is Invert at probability bin 10 (p = 1) inverts
    every image; at bin 0 none; at bin 5 (p = 0.5) about half of 400 draws."""
    inv = TINY.ops.index("invert")

    def run_policy(pbin, keys):
        policy = jnp.zeros((TINY.num_sub_policies, 1, 3), jnp.int32).at[..., 0].set(inv)
        policy = policy.at[..., 1].set(pbin)
        cfg = dataclasses.replace(TINY, ops_per_sub_policy=1)
        return jax.vmap(lambda k: aa.augment(k, jnp.asarray(IMG), jnp.asarray(IMG), policy,
                                             cfg))(keys)

    out = compiled(jax.vmap(run_policy, (0, None)), jnp.array([10, 0, 5]),
                   jax.random.split(jax.random.PRNGKey(1), 400))
    inverted = np.all(np.abs(out - (1 - IMG)) < 1e-6, axis=(2, 3, 4))
    assert inverted[0].all() and not inverted[1].any()
    assert 0.4 < inverted[2].mean() < 0.6, inverted[2].mean()


def test_log_prob_is_the_sum_over_decisions():
    """Eq. 1: a policy sampled by `decide`, its 30 decisions replayed by hand one
    controller step at a time (the last decision's embedding as the next input); the
    sum of log softmax at the chosen classes equals `log_prob`, each decision's log-prob
    equals the sampled one, each decision's softmax sums to 1 over its own head only."""
    cfg = TINY
    params = compiled(lambda k: aa.init(k, cfg).params, jax.random.PRNGKey(3))
    actions, logp, _, _ = compiled(lambda p, k: aa.decide(p, cfg, key=k), params,
                                   jax.random.PRNGKey(4))
    total, _ = compiled(lambda p, a: aa.log_prob(p, a, cfg), params, actions)
    net, offsets = aa.controller(cfg), np.cumsum((0,) + cfg.sizes)
    step = jax.jit(lambda p, c, tok, kind: net.apply(p, c, tok, kind))
    carry = (jnp.zeros(cfg.lstm_hidden), jnp.zeros(cfg.lstm_hidden))
    token, hand = offsets[-1], []
    for t, a in enumerate(np.asarray(actions)):
        kind = t % 3
        assert 0 <= a < cfg.sizes[kind]
        carry, logits = step(params, carry, jnp.int32(token), jnp.int32(kind))
        head = np.asarray(logits)[offsets[kind]:offsets[kind + 1]]
        head_logp = head - np.log(np.exp(head - head.max()).sum()) - head.max()
        hand.append(head_logp[a])
        token = offsets[kind] + a
    np.testing.assert_allclose(logp, hand, atol=1e-5)
    np.testing.assert_allclose(total, np.sum(hand), atol=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the CLI: 2 seeds, its 10 updates in one chunk (recorded for reruns)."""
    return main_recording_chunks(aa.main, cli_args(TINY, aa.Config()) + [
        "--num-seeds", str(SEEDS), "--log-every", "10", "--no-progress", "--fast-compile",
        "--run-dir", str(tmp_path_factory.mktemp("auto_augment"))])


def test_controller_finds_invert_and_the_flipped_reward_does_not(tiny_run):
    """Behaviour (TINY: inverted validation digits, 6 ops, 8 policies x 10 updates, lr
    0.01), both arms from seed 0's initial state through the CLI's compiled chunk: the
    controller's mass on Invert (mean over the 10 op slots) measured 0.17 -> 0.73 with the
    reward = validation accuracy, 0.17 -> 0.02 with the reward sign flipped (the broken
    variant); mean validation accuracy at the last update 0.49 vs 0.01. Also fails with
    the sign ignored (reward = accuracy in both arms) and with PPO's surrogate negated."""
    _, chunks = tiny_run
    chunk, states = chunks[0]
    both = jax.tree.map(lambda x: jnp.stack([x[0], x[0]]), states)
    _, m = chunk(both.replace(reward_sign=jnp.array([1.0, -1.0])))
    p, r = np.asarray(m["charts/target_op_prob"]), np.asarray(m["charts/reward_mean"])
    print("P(invert) per update (reward, flipped):", p.round(3), "reward:", r.round(3))
    assert p[0, 0] == p[1, 0]
    assert p[0, -1] > p[0, 0] + 0.1, p
    assert p[1, -1] < p[1, 0], p
    assert r[0, -1] > r[1, -1] + 0.1, r


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The CLI trains 2 seeds in one vmapped program; its compiled chunk rerun on the same
    initial states gives bit-identical controller params and metrics; the seeds differ;
    --help documents every field."""
    first, chunks = tiny_run
    assert len(chunks) == 1
    chunk, states = chunks[0]
    again, metrics = chunk(jax.tree.map(jnp.copy, states))  # the chunk donates its input
    metrics = run.mark_undefined(jax.device_get(metrics), run.NAN_UNLESS)
    jax.tree.map(np.testing.assert_array_equal, first.state.params, again.params)
    assert set(metrics) == set(first.history)
    for k, v in metrics.items():
        np.testing.assert_array_equal(first.history[k], v, err_msg=k)
    h = first.history
    assert not np.array_equal(h["charts/reward_mean"][0], h["charts/reward_mean"][1])
    for o in TINY.ops:
        assert h[f"charts/op_prob_{o}"].shape == (SEEDS, 10)
    np.testing.assert_allclose(sum(h[f"charts/op_prob_{o}"] for o in TINY.ops), 1, atol=1e-5)
    assert (first.run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        aa.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(aa.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--ops", "invert", "warp"], "ops="),
                       (["--val-shift", "flip"], "val_shift='flip' needs op"),
                       (["--reward-sign", "2"], "reward_sign=2.0"),
                       (["--num-mag-bins", "1"], "num_mag_bins=1"),
                       (["--num-train", "1700"], "exceeds the 1,797"),
                       (["--dataset", "cifar10"], "needs --data-dir"),
                       (["--clip-coef", "1.5"], "clip_coef=1.5")):
        with pytest.raises(ValueError, match=msg):
            aa.main(["--preset", "quick"] + flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(aa) == []


def test_paper_preset_traces(monkeypatch):
    """eval_shape of init and one controller update under `paper` ([1]'s 16 ops, 5 x 2
    sub-policies, 11 / 10 bins, LSTM 100, lr 0.00035, entropy 1e-5, baseline 0.95; 8
    CIFAR-sized children on 4,000 images for 3,750 steps); zeros of CIFAR-10's shapes stand
    in for the files."""
    shapes = (np.zeros((4000, 32, 32, 3), np.float32), np.zeros(4000, np.int32),
              np.zeros((1000, 32, 32, 3), np.float32), np.zeros(1000, np.int32))
    monkeypatch.setattr(aa, "images", lambda *a: shapes)
    cfg, state, (after, metrics) = trace_paper(aa, data_dir="/nonexistent")
    assert cfg.ops == aa.PAPER_OPS and len(cfg.ops) == 16 and cfg.num_decisions == 30
    assert cfg.sizes == (16, 11, 10) and cfg.lstm_hidden == 100 and cfg.lr == 0.00035
    assert cfg.ent_coef == 0.00001 and cfg.baseline_decay == 0.95
    assert state.params["params"]["cell"]["hi"]["kernel"].shape == (100, 100)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
