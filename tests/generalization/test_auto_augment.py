"""Tests of generalization/auto_augment.py: the ops on hand images (invert, rotate by 90
degrees, the identity at each op's neutral magnitude, the magnitude bins) and against PIL,
a sub-policy's probabilities and order, the controller's log-prob as the sum over its
decisions (stepped by hand) and PPO's clipped loss (Eq. 3), the baseline (Eq. 2), the
controller finding Invert for an inverted validation set against the sign-flipped reward,
purity, CLI, paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

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
U8 = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)  # PIL's peer
U8[0, 0] = 255
PAPER = dataclasses.replace(TINY, ops=aa.PAPER_OPS)
PEER_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "auto_contrast",
            "invert", "solarize", "posterize", "contrast", "color", "brightness", "sharpness",
            "cutout", "sample_pairing")
PEER_BINS = (0, 5, 9)


def pil_peer(op, v):
    """PIL's image for op at magnitude v, and the mask of pixels to compare (geometric ops:
    those whose source and its neighbours' lie inside the image; Sharpness: not the border,
    which PIL leaves unfiltered). Shear / Translate take [1]'s PIL affine maps, moved to turn
    about the centre as ours do; Translate's sign is ours (the released code's mirrors it at
    random)."""
    pil, mask = Image.fromarray(U8), np.ones((32, 32), bool)
    enhance = {"contrast": ImageEnhance.Contrast, "color": ImageEnhance.Color,
               "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
    xy = {"shear_x": ((1, v, 0), (0, 1, 0)), "shear_y": ((1, 0, 0), (v, 1, 0)),
          "translate_x": ((1, 0, -v * 32), (0, 1, 0)), "translate_y": ((1, 0, 0), (0, 1, -v * 32))}
    if op in xy or op == "rotate":
        if op == "rotate":
            warp = lambda im: im.rotate(v, resample=Image.BILINEAR)
        else:  # centre coordinates -> PIL's corner ones: c' = c + 16 - 16 a - 16 b
            data = [x for a, b, c in xy[op] for x in (a, b, c + 16 - 16 * a - 16 * b)]
            warp = lambda im: im.transform((32, 32), Image.AFFINE, data, Image.BILINEAR)
        inside = np.pad(np.asarray(warp(Image.new("L", (32, 32), 255))) == 255, 1)
        mask = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1]  # PIL clamps the
        return warp(pil), mask & inside[1:-1, :-2] & inside[1:-1, 2:]  # half-pixel rim: eroded
    if op == "sharpness":
        mask[[0, -1]] = mask[:, [0, -1]] = False
    if op in enhance:
        return enhance[op](pil).enhance(v), mask
    return {"auto_contrast": lambda: ImageOps.autocontrast(pil),
            "invert": lambda: ImageOps.invert(pil),
            "solarize": lambda: ImageOps.solarize(pil, int(np.ceil(v * 255 - 1e-3))),
            "posterize": lambda: ImageOps.posterize(pil, int(round(v))),
            "cutout": lambda: None, "sample_pairing": lambda: None}[op](), mask


def test_ops_on_hand_images():
    """Invert = 1 - x; Rotate 90 = np.rot90 (counter-clockwise, PIL's sign); every op at its
    neutral magnitude (shear / translate / rotate 0, enhance factors 1, Posterize 8 bits on
    8-bit levels, Cutout 0, SamplePairing 0) is the identity, and so is Solarize's top bin
    (threshold 256 / 255) on a white image; Solarize at threshold 0 inverts; TranslateX by
    1/4 of 4 px moves one pixel right; Equalize maps levels 0.2, 0.4, 0.6, 0.8 (2, 1, 3, 2
    pixels) to ours (CDF - CDF(min)) / (N - CDF(min)) = 0, 1/6, 2/3, 1 (not PIL's LUT);
    AutoContrast stretches to [0, 1]; Sharpness at factor 0 is PIL's SMOOTH filter (1 1 1 /
    1 5 1 / 1 1 1) / 13 of a single bright pixel. Through apply_op: the magnitude bins (3
    bins of Rotate span -30, 0, 30) and the op index. PIL's peer: 15 of [1]'s ops through
    apply_op at bins 0, 5 and 9 on a 32 x 32 RGB image agree with PIL within 2 of 255 levels
    (pil_peer's masks); Cutout at bin m blanks a square of side 60/331 * 32 * m / 9 px
    (rounded either way) to 0.5; SamplePairing at bin 9 is 0.6 x + 0.4 partner."""
    img8 = jnp.round(IMG * 255) / 255
    neutral = {"shear_x": 0.0, "shear_y": 0.0, "translate_x": 0.0, "translate_y": 0.0,
               "rotate": 0.0, "contrast": 1.0, "color": 1.0, "brightness": 1.0,
               "sharpness": 1.0, "posterize": 8.0, "cutout": 0.0,
               "sample_pairing": 0.0, "identity": 0.0}
    levels = jnp.array([0.2, 0.2, 0.4, 0.6, 0.6, 0.6, 0.8, 0.8]).reshape(2, 4, 1)
    dot = jnp.zeros((5, 5, 1)).at[2, 2].set(1.0)
    rot_cfg = dataclasses.replace(TINY, ops=("rotate", "invert"), num_mag_bins=3)
    key, key1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)  # key1: Cutout's centre inside

    def cases(img, img8, x32):
        fns = lambda x, v: aa.op_fns(x, jnp.float32(v), key, 1 - x)
        out = {name: fns(img8, v)[name]() for name, v in neutral.items()}
        out.update(invert=fns(img, 0.0)["invert"](), rot90=aa.rotate(img, 90.0),
                   solarize0=fns(img, 0.0)["solarize"](), flip=fns(img, 0.0)["flip_lr"](),
                   tx=fns(img, 0.25)["translate_x"](), equalize=aa.equalize(levels),
                   auto_contrast=fns(img, 0.0)["auto_contrast"](),
                   bins=jnp.stack([aa.apply_op(img, 0, m, key, img, rot_cfg) for m in range(3)]),
                   op1=aa.apply_op(img, 1, 0, key, img, rot_cfg), rot30=aa.rotate(img, 30.0),
                   rotm30=aa.rotate(img, -30.0), sharp0=aa.sharpen(dot, 0.0),
                   solarize_top=aa.apply_op(jnp.ones((4, 4, 1)), TINY.ops.index("solarize"),
                                            9, key, img, TINY),
                   peer=jax.vmap(lambda o, m: aa.apply_op(x32, o, m, key1, x32[::-1], PAPER))(
                       *jnp.array([(aa.PAPER_OPS.index(o), m) for o in PEER_OPS
                                   for m in PEER_BINS]).T))
        return out

    x32 = jnp.asarray(U8 / 255.0, jnp.float32)
    out = compiled(cases, jnp.asarray(IMG), img8, x32)
    assert (out["solarize_top"] == 1).all()
    peer = np.asarray(out["peer"]).reshape(len(PEER_OPS), len(PEER_BINS), 32, 32, 3)
    for i, op in enumerate(PEER_OPS):
        for j, m in enumerate(PEER_BINS):
            lo, hi = aa.OPS[op]
            v = lo + (hi - lo) * m / 9
            ref, mask = pil_peer(op, v)
            if op == "cutout":
                box = (peer[i, j] == 0.5).all(-1)
                rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
                assert box.sum() == len(rows) * len(cols), op  # a rectangle
                for side in (len(rows), len(cols)):
                    assert np.floor(v * 32) <= side <= np.ceil(v * 32), (m, side, v * 32)
                continue
            if op == "sample_pairing":
                ref = (1 - v) * U8 + v * U8[::-1]
            diff = np.abs(peer[i, j] * 255 - np.asarray(ref, np.float32))[mask]
            assert mask.mean() > 0.3 and diff.max() < 2, (op, m, diff.max(), mask.mean())
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


def test_sub_policy_probabilities_and_order():
    """augment with 2 ops per sub-policy (ops identity, invert, flip_lr), 400 draws per
    policy: (a) every sub-policy Invert p = 1 then FlipLR p = 1 gives flip(1 - x) for every
    image (the second op reads the first's output); (b) that sub-policy only as number 0 of
    5, the others identity: a fifth of the images (0.2 +- 0.05), the rest unchanged; (c)
    Invert at probability bin 5 (p = 0.5) about half; (d) probability bin 0 none."""
    cfg = dataclasses.replace(TINY, ops=("identity", "invert", "flip_lr"), ops_per_sub_policy=2)
    inv_flip, ident = [[1, 10, 0], [2, 10, 0]], [[0, 10, 0], [0, 10, 0]]
    policies = jnp.array([[inv_flip] * 5, [inv_flip] + [ident] * 4,
                          [[[1, 5, 0], [0, 0, 0]]] * 5, [[[1, 0, 0], [2, 0, 0]]] * 5])

    def run_policy(policy, keys):
        return jax.vmap(lambda k: aa.augment(k, jnp.asarray(IMG), jnp.asarray(IMG), policy,
                                             cfg))(keys)

    out = compiled(jax.vmap(run_policy, (0, None)), policies,
                   jax.random.split(jax.random.PRNGKey(1), 400))
    same = lambda ref: np.all(np.abs(out - ref) < 1e-6, axis=(2, 3, 4))
    inv_flipped, inverted, unchanged = same((1 - IMG)[:, ::-1]), same(1 - IMG), same(IMG)
    assert inv_flipped[0].all()
    assert 0.15 < inv_flipped[1].mean() < 0.25, inv_flipped[1].mean()
    assert (inv_flipped[1] | unchanged[1]).all()
    assert 0.4 < inverted[2].mean() < 0.6 and (inverted[2] | unchanged[2]).all()
    assert unchanged[3].all()


def test_log_prob_is_the_sum_over_decisions_and_ppo_clips():
    """Eq. 1: a policy sampled by `decide`, its 30 decisions replayed by hand one
    controller step at a time (the last decision's embedding as the next input); the
    sum of log softmax at the chosen classes equals `log_prob`, each decision's log-prob
    equals the sampled one, each decision's softmax sums to 1 over its own head only.
    Eq. 3 on that policy with pi / pi_old = 1.5 or 0.5 and A = +1 or -1 (clip 0.2): the
    loss is -1.2, +1.5, -0.5, +0.8 minus ent_coef times the summed entropy."""
    cfg = TINY
    ratios, advs = np.array([1.5, 1.5, 0.5, 0.5]), np.array([1.0, -1.0, 1.0, -1.0])

    def setup(key):
        params = aa.init(key, cfg).params
        actions, logp, ent, _ = aa.decide(params, cfg, key=jax.random.fold_in(key, 1))
        total, ent_sum = aa.log_prob(params, actions, cfg)
        ppo = jax.vmap(lambda r, a: aa.ppo_loss(params, actions[None],
                                                total[None] - jnp.log(r), a[None], cfg))
        return params, actions, logp, ent.sum(), total, ent_sum, ppo(ratios, advs)

    params, actions, logp, ent, total, ent_sum, (loss, ppo_ent) = compiled(
        setup, jax.random.PRNGKey(3))
    np.testing.assert_allclose(ent_sum, ent, rtol=1e-5)
    np.testing.assert_allclose(ppo_ent, ent, rtol=1e-5)
    np.testing.assert_allclose(loss, np.array([-1.2, 1.5, -0.5, 0.8]) - cfg.ent_coef * ent,
                               atol=2e-5)
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


@pytest.fixture(scope="module")
def arms(tiny_run):
    """The CLI's compiled chunk rerun on seed 0's initial state twice, with reward_sign +1
    (arm 0: the CLI's seed 0 again, for purity) and -1 (arm 1: the broken variant)."""
    _, chunks = tiny_run
    chunk, states = chunks[0]
    both = jax.tree.map(lambda x: jnp.stack([x[0], x[0]]), states)
    after, m = chunk(both.replace(reward_sign=jnp.array([1.0, -1.0])))
    return after, run.mark_undefined(jax.device_get(m), run.NAN_UNLESS)


def test_controller_finds_invert_and_the_flipped_reward_does_not(arms):
    """Behaviour (TINY: inverted validation digits, 6 ops, 8 policies x 10 updates, lr
    0.01), both arms from seed 0's initial state through the CLI's compiled chunk: the
    controller's mass on Invert (mean over the 10 op slots) measured 0.17 -> 0.83 with the
    reward = validation accuracy, 0.17 -> 0.01 with the reward sign flipped (the broken
    variant); mean validation accuracy at the last update 0.44 vs 0.003; the child without
    augmentation at most 0.003. Also fails with the sign ignored (reward = accuracy in both
    arms), with PPO's surrogate negated and with the baseline dropped (A = R)."""
    _, m = arms
    p, r = np.asarray(m["charts/target_op_prob"]), np.asarray(m["charts/reward_mean"])
    print("P(invert) per update (reward, flipped):", p.round(3), "reward:", r.round(3),
          "no augmentation:", m["charts/noaug_acc"].max())
    assert p[0, 0] == p[1, 0]
    assert p[0, -1] > 0.5 and p[0, -1] > p[0, 0] + 0.1, p
    assert p[1, -1] < p[1, 0], p
    assert r[0, -1] > r[1, -1] + 0.1, r
    assert m["charts/noaug_acc"].max() < 0.1


def test_train_is_pure_and_cli_writes_its_files(tiny_run, arms, capsys):
    """The CLI trains 2 seeds in one vmapped program; its compiled chunk rerun on seed 0's
    initial state (arm 0 of `arms`) gives bit-identical controller params and metrics; the
    seeds differ; Eq. 2's baseline starts at the first mean reward and then follows
    b <- 0.95 b + 0.05 mean R; --help documents every field."""
    first, chunks = tiny_run
    assert len(chunks) == 1
    again, metrics = arms
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b[0]), first.state.params,
                 again.params)
    assert set(metrics) == set(first.history)
    for k, v in metrics.items():
        np.testing.assert_array_equal(first.history[k][0], v[0], err_msg=k)
    h = first.history
    assert not np.array_equal(h["charts/reward_mean"][0], h["charts/reward_mean"][1])
    b, r = h["charts/baseline"], h["charts/reward_mean"]
    np.testing.assert_allclose(b[:, 0], r[:, 0], rtol=1e-6)
    np.testing.assert_allclose(b[:, 1:], 0.95 * b[:, :-1] + 0.05 * r[:, :-1], rtol=1e-5)
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
                       (["--clip-coef", "1.5"], "clip_coef=1.5"),
                       (["--child-steps", "0"], "child_steps=0"),
                       (["--dataset", "cifar10", "--data-dir", str(tmp_path), "--image-size",
                         "32", "--num-train", "49500", "--num-val", "600"], "exceeds the 50,000")):
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
    assert cfg.ent_coef == 0.00001 and cfg.baseline_decay == 0.95 and cfg.init_scale == 0.1
    assert state.params["params"]["cell"]["hi"]["kernel"].shape == (100, 100)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
