"""The package comparison (transformers/compare.py) is a declaration: every cell's command
line must parse and validate in its file; the shared budget (pre-training updates, rows per
update, labelled examples, fine-tuning updates), the seeds and the text must reach every
file's Config (the from-scratch rows: no pre-training, the same fine-tuning); and every
column must read one value per seed from what the file's init / update / evaluate produce
(jax.eval_shape: traced, nothing compiled). A broken table (a file without the budget flag,
a from-scratch row that still pre-trains, a column naming a key the file does not produce)
fails these tests."""

import importlib

import jax
import numpy as np
import pytest

from common import compare, run
from transformers import compare as package

SEEDS = package.SEEDS
SETTING = next(iter(package.SETTINGS))

# per file: (pre-training updates, fine-tuning rows per update, fine-tuning updates, text);
# None where the file has no such stage (ALBERT and GPT-2 pre-train only; CoVe's text is
# its own number phrases)
STAGES = {
    "gpt": lambda c: (c.pretrain_steps, c.finetune_batch, c.finetune_steps, c.corpus),
    "bert": lambda c: (c.pretrain_steps, c.finetune_batch, c.finetune_steps, c.corpus),
    "ulmfit": lambda c: (c.pretrain_steps + c.lm_steps, c.clf_batch, c.clf_steps,
                         c.target_corpus),
    "elmo": lambda c: (c.pretrain_steps, c.finetune_batch, c.finetune_steps, c.corpus),
    "cove": lambda c: (c.mt_steps, c.task_batch, c.task_steps, None),
    "albert": lambda c: (c.train_steps, None, None, c.corpus),
    "gpt2": lambda c: (c.train_steps, None, None, c.corpus),
}


def name_of(label: str) -> str:
    return package.METHODS[label].module.rsplit(".", 1)[1]


def cell_config(label: str):
    method = package.METHODS[label]
    module = importlib.import_module(method.module)
    argv = compare.argv_of(method, SETTING, package.SETTINGS[SETTING], SEEDS, 0, "/tmp/x")
    cfg, opts = run.parse(module.Config, module.PRESETS, argv)
    run.check_config(cfg)
    return module, cfg, opts


@pytest.mark.parametrize("label", list(package.METHODS))
def test_every_cell_validates_with_the_shared_budget_seeds_and_text(label):
    """Each cell's Config (through run.parse + run.check_config, as its main() does) has the
    shared pre-training updates (0 in the from-scratch rows), 16 rows per pre-training and
    fine-tuning update, 768 labelled examples, 192 fine-tuning updates, the pydoc text, and
    its total num_updates is their sum; the command line asks for the shared seeds. Broken
    tables tried: GPT without `--pretrain-steps` (its preset's 1500): fails; BERT from
    scratch without `--pretrain-steps 0`: fails; ELMo without `--finetune-steps` (its
    preset's 300): fails; ULMFiT's `--lm-steps` left at its preset's 100 with all 500
    updates in stage (a): fails."""
    module, cfg, opts = cell_config(label)
    assert opts.num_seeds == SEEDS and opts.seed == 0
    pre, ft_batch, ft_steps, text = STAGES[name_of(label)](cfg)
    want_pre = 0 if label.endswith("from scratch") else package.PRETRAIN_STEPS
    assert pre == want_pre, (label, pre)
    assert cfg.batch_size == package.BATCH, (label, cfg.batch_size)
    if ft_steps is None:
        assert cfg.num_updates == want_pre, label
    else:
        assert (ft_batch, ft_steps) == (package.BATCH, package.FINETUNE_STEPS), label
        assert cfg.num_labelled == package.NUM_LABELLED, label
        assert cfg.num_updates == want_pre + package.FINETUNE_STEPS, label
    assert text in ("pydoc", None), (label, text)
    if name_of(label) == "ulmfit":  # stage (b) on pydoc, the rest general-domain (a)
        assert cfg.lm_steps == package.ULMFIT_TARGET_LM


def test_scratch_rows_are_their_pretrained_rows_without_pre_training():
    """GPT / BERT from scratch differ from their pre-trained rows in pretrain_steps only."""
    for label in ("GPT", "BERT"):
        a, b = (cell_config(x)[1].__dict__ for x in (label, f"{label} from scratch"))
        assert {k for k in a if a[k] != b[k]} == {"pretrain_steps"}, label


@pytest.fixture(scope="module")
def traced():
    """{module name: (init, update, evaluate) output shapes at its first cell's Config}:
    traced once per file (the from-scratch rows share their file's keys)."""
    out = {}
    for label in package.METHODS:
        module, cfg, _ = cell_config(label)
        name = name_of(label)
        if name in out:
            continue
        state = jax.eval_shape(lambda k, m=module, c=cfg: m.init(k, c), jax.random.PRNGKey(0))
        _, metrics = jax.eval_shape(lambda s, m=module, c=cfg: m.update(s, c), state)
        final = jax.eval_shape(lambda s, m=module, c=cfg: m.evaluate(s, c), state)
        out[name] = (metrics, final)
    return out


@pytest.mark.parametrize("label", list(package.METHODS))
def test_every_column_reads_a_value_per_seed(label, traced):
    """Each column finds its evaluate() key (or its function's input) in what the file
    produces (traced, not run), one value per seed. Broken: a column named "val_acc" for
    ULMFiT (its keys are val_err_<arm>): fails."""
    metrics, final = traced[name_of(label)]
    res = run.RunResult(None, {k: np.zeros((SEEDS, 3)) for k in metrics}, None,
                        {k: np.zeros((SEEDS, *v.shape)) for k, v in final.items()})
    cols = package.METHODS[label].columns
    assert cols, label
    for col in cols:
        v = compare.values(res, col.key)
        assert v is not None and v.shape == (SEEDS,), (label, col.header)


def test_accuracy_reader_and_table_layout():
    """accuracy_of_error turns per-seed errors into accuracies; the table has one row per
    (method, measure) and the setting as its one value column (the median over seeds)."""
    res = run.RunResult(None, {}, None, {"val_err_ulmfit": np.array([0.25, 0.5]),
                                         "val_err_scratch": np.array([0.5, 0.5]),
                                         "val_err_no_tricks": np.array([0.0, 0.1])})
    np.testing.assert_allclose(package.accuracy_of_error("val_err_ulmfit")(res), [0.75, 0.5])
    methods = {"ULMFiT": package.METHODS["ULMFiT"]}
    text = compare.table({"ULMFiT": {SETTING: res}}, [SETTING], (), methods)
    lines = text.splitlines()
    assert SETTING in lines[0] and len(lines) == 2 + 3
    assert lines[2].endswith("| 0.625 |") and lines[4].endswith("| 0.950 |")
