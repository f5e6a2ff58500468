"""Hugging Face ports and real corpora of transformers/bert.py and transformers/albert.py.

Peer tier (torch + HF transformers 5 in a throw-away uv environment, tests/transformers/
peer.py): randomly initialised BertForPreTraining and AlbertForPreTraining are saved with
save_pretrained; ours load the real model.safetensors through `init_from` and match their
MLM and NSP / SOP logits on padded ids with token types. Default tier (no torch): the
loaders on hand-made state dicts written in the safetensors format, against a numpy forward
of HF's equations; the shape / layer / sharing / config.json errors; a wikitext-2 fixture
read through --corpus wikitext-2 --data-dir."""

import dataclasses
import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from common import data, run
from tests.common.compiled import compiled
from tests.common.datasets import write_hf_checkpoint, write_wikitext
from tests.transformers import peer
from transformers import albert, bert

V, L, D, H, NL, F, E = 50, 16, 32, 4, 2, 64, 16  # vocab, positions, hidden, heads, layers,
# intermediate size, ALBERT's embedding size of the HF models
SMALL = dict(corpus="this", vocab_size=V, seq_len=L, max_positions=L, num_layers=NL,
             d_model=D, num_heads=H, d_ff=F, max_predictions_per_seq=4, dupe_factor=1,
             batch_size=2)
BERT = bert.Config(**SMALL, gelu="erf", hidden_dropout_prob=0.0, attention_dropout_prob=0.0,
                   span_len=4, num_labelled=2, num_eval=2, finetune_batch=2, eval_instances=2)
ALBERT = albert.Config(**SMALL, embedding_size=E, eval_instances=2)
MODELS = {"bert": (bert, BERT), "albert": (albert, ALBERT)}
PAD = bert.specials(BERT)["pad"]  # 48: the corpus's 45 characters, then [CLS] [SEP] [MASK]
assert PAD == albert.specials(ALBERT)["pad"] < V
IDS = np.random.default_rng(0).integers(0, PAD, (2, L)).astype(np.int32)
IDS[1, -5:] = PAD  # row 1 right-padded: HF's attention mask 0 there, ours masks [PAD] keys
TYPES = np.zeros((2, L), np.int32)
TYPES[0, 7:], TYPES[1, 6:-5] = 1, 1  # segment B
MASK = (IDS != PAD).astype(np.int64)


def _init(mod, cfg):
    return compiled(lambda k: mod.init(k, cfg).params, jax.random.PRNGKey(0))


def _apply(mod, cfg, params, ids, types):
    """(MLM logits (B, L, V) at every position, sentence logits (B, 2)) of ours."""
    out = mod.model_of(cfg).apply(params, ids, types, jnp.broadcast_to(jnp.arange(L), (2, L)))
    return (out["mlm"], out["nsp"]) if mod is bert else out[:2]


def _logits(mod, cfg, params):
    mlm, sent = compiled(functools.partial(_apply, mod, cfg), params, jnp.asarray(IDS),
                         jnp.asarray(TYPES))
    return np.asarray(mlm), np.asarray(sent)


# --- default tier: hand-made checkpoints -------------------------------------------------


def _hf_tensors(name: str, seed=0, std=0.3, groups=1) -> dict:
    """A state dict with HF's names: BertForPreTraining (legacy gamma/beta LayerNorm names on
    odd seeds, as bert-base-uncased's) or AlbertForPreTraining with `groups` layer groups."""
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * std).astype(np.float32)
    t = {}

    def lin(p, i, o):
        t[p + ".weight"], t[p + ".bias"] = r(o, i), r(o)

    def ln(p, n):
        g, b = ("gamma", "beta") if seed % 2 else ("weight", "bias")
        t[f"{p}.{g}"], t[f"{p}.{b}"] = 1 + r(n), r(n)

    w = E if name == "albert" else D
    pre = name + "."
    for emb, rows in (("word", V), ("position", L), ("token_type", 2)):
        t[f"{pre}embeddings.{emb}_embeddings.weight"] = r(rows, w)
    ln(pre + "embeddings.LayerNorm", w)
    lin(pre + "pooler" + (".dense" if name == "bert" else ""), D, D)
    if name == "bert":
        for l in range(NL):
            p = f"bert.encoder.layer.{l}."
            for n in ("query", "key", "value"):
                lin(p + "attention.self." + n, D, D)
            lin(p + "attention.output.dense", D, D)
            ln(p + "attention.output.LayerNorm", D)
            lin(p + "intermediate.dense", D, F)
            lin(p + "output.dense", F, D)
            ln(p + "output.LayerNorm", D)
        lin("cls.predictions.transform.dense", D, D)
        ln("cls.predictions.transform.LayerNorm", D)
        t["cls.predictions.bias"] = r(V)
        lin("cls.seq_relationship", D, 2)
    else:
        lin("albert.encoder.embedding_hidden_mapping_in", E, D)
        for g in range(groups):
            p = f"albert.encoder.albert_layer_groups.{g}.albert_layers.0."
            for n in ("query", "key", "value", "dense"):
                lin(p + "attention." + n, D, D)
            ln(p + "attention.LayerNorm", D)
            lin(p + "ffn", D, F)
            lin(p + "ffn_output", F, D)
            ln(p + "full_layer_layer_norm", D)
        lin("predictions.dense", D, E)
        ln("predictions.LayerNorm", E)
        t["predictions.bias"] = r(V)
        lin("sop_classifier.classifier", D, 2)
    return t


def _write(folder, tensors, **config):
    """model.safetensors + config.json (tests/common/datasets.py)."""
    return write_hf_checkpoint(folder, tensors, {"num_attention_heads": H, **config})


def _numpy_forward(t: dict, name: str):
    """HF's forward written out in numpy (float64): Linear y = x W^T + b; embeddings summed
    then LayerNorm (eps 1e-12); ALBERT: E -> H projection and every layer the one group's;
    post-LN layers LN(h + Attn(h)), LN(a + W_2 act(W_1 a)), heads split inside q, k, v,
    masked keys out of the softmax; act: BERT's 'gelu' (erf), ALBERT's 'gelu_new' (tanh);
    MLM: LN(act(h W_t)) E^T + b, sentence head on tanh(h_[CLS] W_p). ALBERT's layer l runs
    group l G / L (G groups in the state dict)."""
    t = {k.replace("gamma", "weight").replace("beta", "bias"): v.astype(np.float64)
         for k, v in t.items()}
    al = name == "albert"
    groups = len({k.split(".")[3] for k in t if ".albert_layer_groups." in k})
    ln = lambda x, p: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
                       * t[p + ".weight"] + t[p + ".bias"])
    lin = lambda x, p: x @ t[p + ".weight"].T + t[p + ".bias"]
    if al:
        act = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    else:
        act = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))
    e = name + ".embeddings."
    h = ln(t[e + "word_embeddings.weight"][IDS] + t[e + "position_embeddings.weight"][:L]
           + t[e + "token_type_embeddings.weight"][TYPES], e + "LayerNorm")
    if al:
        h = lin(h, "albert.encoder.embedding_hidden_mapping_in")

    def attn(x, p):
        q, k, v = (lin(x, p + n).reshape(2, L, H, D // H) for n in ("query", "key", "value"))
        w = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
        w = np.where(MASK[:, None, None, :] > 0, w, -np.inf)
        w = np.exp(w - w.max(-1, keepdims=True))
        return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v).reshape(2, L, D)

    for l in range(NL):
        if al:
            p = f"albert.encoder.albert_layer_groups.{l * groups // NL}.albert_layers.0."
            a = ln(h + lin(attn(h, p + "attention."), p + "attention.dense"),
                   p + "attention.LayerNorm")
            h = ln(a + lin(act(lin(a, p + "ffn")), p + "ffn_output"), p + "full_layer_layer_norm")
        else:
            p = f"bert.encoder.layer.{l}."
            a = ln(h + lin(attn(h, p + "attention.self."), p + "attention.output.dense"),
                   p + "attention.output.LayerNorm")
            h = ln(a + lin(act(lin(a, p + "intermediate.dense")), p + "output.dense"),
                   p + "output.LayerNorm")
    pooled = np.tanh(lin(h[:, 0], name + ".pooler" + ("" if al else ".dense")))
    head = "predictions." if al else "cls.predictions."
    x = ln(act(lin(h, head + ("dense" if al else "transform.dense"))),
           head + ("LayerNorm" if al else "transform.LayerNorm"))
    mlm = x @ t[e + "word_embeddings.weight"].T + t[head + "bias"]
    return mlm, lin(pooled, "sop_classifier.classifier" if al else "cls.seq_relationship")


@pytest.mark.parametrize("name", ["bert", "albert", "albert share=none"])
def test_loader_reads_a_hand_made_checkpoint(name, tmp_path):
    """HF-named tensors (std 0.3; BERT's with the legacy LayerNorm gamma/beta names) in a
    model.safetensors through load_hf (init's init_from path), in one compiled program with
    the file's init and forward: every tensor lands where the numpy forward of HF's
    equations puts it (MLM and sentence logits to 1e-4 of their scale), the params have
    init's shapes and dtypes; BERT's fine-tuning heads keep their random init. ALBERT with
    one group per layer (num_hidden_groups = 2) loads as share=none."""
    groups = 2 if name.endswith("none") else 1
    name = name.split()[0]
    mod, cfg = MODELS[name]
    cfg = dataclasses.replace(cfg, share="none") if groups == 2 else cfg
    t = _hf_tensors(name, seed=1 if name == "bert" else 0, groups=groups)
    folder = _write(tmp_path / name, t, hidden_act="gelu" if name == "bert" else "gelu_new")

    def fn(key):
        fresh = mod.init_params(key, cfg)
        loaded = mod.load_hf(folder, cfg, fresh)  # the file's arrays: constants of the program
        return fresh, loaded, _apply(mod, cfg, loaded, jnp.asarray(IDS), jnp.asarray(TYPES))

    fresh, loaded, ours = compiled(fn, jax.random.PRNGKey(0))
    assert jax.tree.structure(loaded) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    for o, w in zip(ours, _numpy_forward(t, name), strict=True):
        err = np.abs(np.asarray(o) - w).max()
        assert err < 1e-4 * max(1, np.abs(w).max()), err
    if mod is bert:  # the fine-tuning heads are ours: the random init stays
        for k in bert.HEADS:
            for a, b in zip(jax.tree.leaves(loaded["params"][k]),
                            jax.tree.leaves(fresh["params"][k]), strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["bert", "albert"])
def test_loader_names_the_mismatch(name, tmp_path):
    """A wrong intermediate size, vocabulary, depth / sharing layout, a missing tensor, or a
    config.json that disagrees on heads or GELU fails before anything runs, with the tensor
    (or config entry) and the Config field to change; init(init_from=...) raises it too."""
    mod, cfg = MODELS[name]
    params = jax.eval_shape(lambda k: mod.init_params(k, cfg), jax.random.PRNGKey(0))
    t = _hf_tensors(name)
    if name == "bert":
        lay = "bert.encoder.layer.{}."
        cases = [({lay.format(1) + "intermediate.dense.weight": np.zeros((48, D), np.float32)},
                  r"'encoder\.layer\.1\.intermediate\.dense\.weight' has shape \(48, 32\), "
                  r"ours \(64, 32\): set d_model / d_ff"),
                 ({lay.format(2) + "output.dense.weight": np.zeros((D, F), np.float32)},
                  "more than num_layers=2"),
                 ({lay.format(1) + "output.LayerNorm.bias": None},
                  r"'encoder\.layer\.1\.output\.LayerNorm\.bias' is missing")]
        emb, gelu = "bert.embeddings.word_embeddings.weight", "gelu_new"
    else:
        grp = "albert.encoder.albert_layer_groups.{}.albert_layers.{}."
        cases = [({grp.format(0, 0) + "ffn.weight": np.zeros((48, D), np.float32)},
                  r"'encoder\.albert_layer_groups\.0\.albert_layers\.0\.ffn\.weight' has "
                  r"shape \(48, 32\), ours \(64, 32\): set d_model / d_ff"),
                 ({grp.format(1, 0) + "ffn.bias": np.zeros(F, np.float32)},
                  r"num_hidden_groups=2 \(num_layers=2, share='all'\): set share to 'none'"),
                 ({grp.format(0, 1) + "ffn.bias": np.zeros(F, np.float32)},
                  "inner_group_num > 1"),
                 ({"predictions.bias": None}, r"'predictions\.decoder\.bias' is missing")]
        emb, gelu = "albert.embeddings.word_embeddings.weight", "gelu"
    cases.append(({emb: np.zeros((V + 1, t[emb].shape[1]), np.float32)},
                  "has shape .*: set vocab_size"))
    for change, match in cases:
        bad = {k: v for k, v in {**t, **change}.items() if v is not None}
        with pytest.raises(ValueError, match=match):
            mod.params_from_hf(bad, cfg, params)
    with pytest.raises(ValueError, match="num_attention_heads=2, ours 4: set num_heads"):
        mod.load_hf(_write(tmp_path / "heads", t, num_attention_heads=2), cfg, params)
    with pytest.raises(ValueError, match=f"hidden_act='{gelu}'.*: set gelu"):
        mod.load_hf(_write(tmp_path / "act", t, hidden_act=gelu), cfg, params)
    bad = dataclasses.replace(cfg, init_from=_write(tmp_path / "short", {**t, emb: t[emb][:-1]}))
    with pytest.raises(ValueError, match="has shape .*: set vocab_size"):  # init reads init_from
        jax.eval_shape(lambda k: mod.init(k, bad), jax.random.PRNGKey(0))


# --- default tier: a real corpus from --data-dir -----------------------------------------


def _wikitext(folder):
    """WikiText fixture with five articles per split (tests/common/datasets.py)."""
    return write_wikitext(folder, articles=5, sizes=(1500, 300, 300))


@pytest.mark.parametrize("name", ["bert", "albert"])
def test_wikitext2_from_data_dir(name, tmp_path):
    """--corpus wikitext-2 --data-dir: the Config check needs the folder (text_corpus's
    error), the documents and the pre-training instances are built from the fixture's text,
    and init traces."""
    mod, cfg = MODELS[name]
    args = ["--vocab-size", "None", "--seq-len", "16", "--max-positions", "16",
            "--num-layers", "2", "--d-model", "32", "--num-heads", "4", "--d-ff", "64",
            "--batch-size", "2", "--eval-instances", "2", "--dupe-factor", "1",
            "--max-predictions-per-seq", "4"]
    args += (["--span-len", "4", "--num-labelled", "2", "--num-eval", "2",
              "--finetune-batch", "2"] if mod is bert else ["--embedding-size", "16"])
    with pytest.raises(ValueError, match="corpus='wikitext-2' is read from disk: pass data_dir"):
        run.check_config(run.parse(mod.Config, mod.PRESETS, args + ["--corpus", "wikitext-2"])[0])
    folder = _wikitext(tmp_path / "wt2")
    cfg, _ = run.parse(mod.Config, mod.PRESETS,
                       args + ["--corpus", "wikitext-2", "--data-dir", folder])
    run.check_config(cfg)
    text = data.text_corpus("wikitext-2", data_dir=folder)
    train, val, chars = mod.corpus_docs(cfg.corpus, cfg.val_fraction, cfg.sentence_chars,
                                        cfg.data_dir)
    assert chars == sorted(set(text) - set("\n")) and "§" in chars
    seen = "".join(chars[i] for d in train for s in d for i in s)  # words cut to sentences
    assert "".join(seen.split()) == "".join(text[:int(len(text) * (1 - cfg.val_fraction))].split())
    x = (mod.instances(cfg, "train") if mod is bert else mod.instances(cfg, "train", "sop"))[0]
    s = mod.specials(cfg)
    assert len(x) > 10 and (x[:, 0] == s["cls"]).all() and (x == chars.index("§")).any()
    state = jax.eval_shape(lambda k: mod.init(k, cfg), jax.random.PRNGKey(0))
    emb = state.params["params"]["word_embeddings"]["embedding"]
    assert emb.shape == (len(chars) + 4, 32 if mod is bert else 16)


# --- peer tier: torch + HF transformers ---------------------------------------------------

PEER = textwrap.dedent(f"""
    import numpy as np, torch
    from transformers import (AlbertConfig, AlbertForPreTraining, BertConfig,
                              BertForPreTraining)
    d = np.load("inputs.npz")
    ids, types, mask = (torch.tensor(d[k]).long() for k in ("ids", "types", "mask"))
    torch.manual_seed(0)
    common = dict(vocab_size={V}, max_position_embeddings={L}, hidden_size={D},
                  num_hidden_layers={NL}, num_attention_heads={H}, intermediate_size={F},
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  pad_token_id={PAD})
    out = {{}}
    for name, conf, model_cls, extra in (
            ("bert", BertConfig, BertForPreTraining, dict(hidden_act="gelu")),
            ("albert", AlbertConfig, AlbertForPreTraining,
             dict(hidden_act="gelu_new", embedding_size={E}, classifier_dropout_prob=0.0))):
        model = model_cls(conf(**common, **extra)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)  # large weights, so a misplaced tensor shows
        model.save_pretrained(name)  # the real model.safetensors (decoder tied: not saved)
        with torch.no_grad():
            o = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
        sent = o.seq_relationship_logits if name == "bert" else o.sop_logits
        out[name + "_mlm"], out[name + "_sent"] = o.prediction_logits.numpy(), sent.numpy()
    np.savez("peer.npz", **out)
""")


@pytest.mark.peer
def test_matches_hugging_face_logits(tmp_path):
    """BertForPreTraining (hidden_act 'gelu', the erf form: our gelu='erf') and
    AlbertForPreTraining (E 16, one shared group, 'gelu_new'), 2 layers of d 32, 4 heads,
    intermediate 64, vocab 50, 16 positions, every parameter N(0, 0.3), saved by
    save_pretrained and read back by ours through init_from; the MLM logits at every
    position and the NSP / SOP logits on 2 x 16 ids with two segments, row 1 right-padded
    by 5 ([PAD], attention mask 0). Measured max |ours - HF| (loaded 2-core CPU): BERT MLM
    8.3e-7, NSP 5.7e-7; ALBERT MLM 3.0e-7, SOP 1.2e-7 (logits up to 2.1 / 0.4 / 1.2 / 0.35).
    The broken arms: BERT's square attention output kernels left untransposed (torch's
    (out, in) storage: no shape error) differs by 0.50; BERT with the tanh GELU instead of
    HF's erf one by 4.1e-4 (500 times the match's error; post-LN damps it)."""
    np.savez(tmp_path / "inputs.npz", ids=IDS, types=TYPES, mask=MASK)
    peer.run_peer(PEER, tmp_path)  # skips if torch cannot be installed, fails if PEER raises
    want = dict(np.load(tmp_path / "peer.npz"))
    errs = {}
    for name, (mod, cfg) in MODELS.items():
        params = _init(mod, dataclasses.replace(cfg, init_from=str(tmp_path / name)))
        mlm, sent = _logits(mod, cfg, params)
        errs[name + "_mlm"] = float(np.abs(mlm - want[name + "_mlm"]).max())
        errs[name + "_sent"] = float(np.abs(sent - want[name + "_sent"]).max())
    t = data.read_safetensors(tmp_path / "bert" / "model.safetensors")
    bad = {k: (v.T.copy() if k.endswith("attention.output.dense.weight") else v)
           for k, v in t.items()}
    broken = bert.params_from_hf(bad, BERT, _init(bert, BERT))
    errs["bert transposed W_o"] = float(np.abs(_logits(bert, BERT, broken)[0]
                                                 - want["bert_mlm"]).max())
    tanh = dataclasses.replace(BERT, gelu="tanh")
    params = bert.params_from_hf(t, tanh, _init(bert, tanh))
    errs["bert tanh gelu"] = float(np.abs(_logits(bert, tanh, params)[0] - want["bert_mlm"]).max())
    print({k: f"{v:.2e}" for k, v in errs.items()}, "logit scale",
          {k: f"{np.abs(v).max():.2f}" for k, v in want.items()})
    assert max(errs[k] for k in ("bert_mlm", "bert_sent", "albert_mlm", "albert_sent")) < 1e-5
    assert errs["bert transposed W_o"] > 1e-2 and errs["bert tanh gelu"] > 1e-4, errs
