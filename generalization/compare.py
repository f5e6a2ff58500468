"""True against random labels, through every lens of the overfitting experiments: each
experiment file runs at its own CPU `quick` preset (its own network, optimiser and budget)
on the same data, scikit-learn's 8x8 digits with the same 1,000 training images (the first
1,000 of the same seeded split in every file; test sets: the other 797, of which the
lottery ticket holds 300 out for early stopping), and the same seeds; the "random labels"
setting replaces every training label by a class drawn uniformly from the 10 (Zhang et al.
2017's label corruption p = 1, drawn once per seed at init; test labels stay true), the
"true labels" setting keeps them. Each row is the experiment's own measure. Random labels
(Zhang et al. 2017): accuracy on the training set against its own labels, on the test set
against the true labels, and SGD steps until the training accuracy first reached 100%.
MDL (Blier & Ollivier 2018): prequential code length of the training labels in bits per
label, without and with a stopping time per block (the uniform code is log2 10 = 3.32).
Intrinsic dimension (Li et al. 2018): d_int90 measured on TRAINING accuracy in both
settings (the smallest d of the grid whose subspace training reaches 90% of the directly
trained network's training accuracy: test accuracy is chance under random labels; Li et
al.'s shuffled-label MNIST runs use training accuracy too [M: from memory, the paper's text
was not at hand]), FC 64-256-10 (D = 19,210),
sparse P, 150 epochs. Lottery tickets (Frankle & Carbin 2019): accuracy of the winning
ticket and of the same mask re-initialised, after 5 rounds of pruning (8.3% of the weights
left). Layer robustness (Zhang, Bengio & Singer 2019): error of the trained network and
after resetting the first layer to its initial weights (digits upsampled to 32x32, the
file's quick preset: at 8x8 no layer is critical)."""

import numpy as np

from common.compare import Column, Method

SETTINGS = {
    "true labels": ("--num-train", "1000"),
    "random labels": ("--num-train", "1000"),
}
CORRUPTION = {"true labels": "0.0", "random labels": "1.0"}
"""the label-corruption probability p of each setting"""
QUICK = ("--preset", "quick")
LT_ROUND = 5
"""the lottery-ticket round reported (0: dense; 5 rounds at 40/40/20%: 8.3% of weights)"""


def per_setting(flag: str) -> dict[str, tuple[str, ...]]:
    """The setting's label corruption under the file's own flag name."""
    return {s: (flag, p) for s, p in CORRUPTION.items()}


def arm(prefix: str):
    """The per-seed values of the one evaluate() key `prefix<arm>` (files with a label-
    corruption arm per value name their keys by the arm: true_labels, random_labels)."""

    def read(result):
        keys = [k for k in result.final if k.startswith(prefix)]
        if len(keys) != 1:
            raise ValueError(f"expected one key {prefix}<arm>, found {keys}")
        return result.final[keys[0]]

    return read


def at_round(key: str, r: int = LT_ROUND):
    """The per-seed value of the logged metric `key` after round r (update r + 1)."""
    return lambda result: np.asarray(result.history[key])[:, r]


def worst_later_layer(result):
    """The largest train error over layers 2.. when one of them is reset to theta_0."""
    m = np.asarray(result.final["train_err_matrix"])  # (seeds, L, 1 + T); column 1: theta_0
    return m[:, 1:, 1].max(1)


METHODS = {
    "random labels": Method(
        "generalization.overfit_random_labels", (*QUICK, "--variants"),
        per_setting("--corruptions"),
        columns=(Column(arm("train_acc_"), "train accuracy", ".3f"),
                 Column(arm("test_acc_"), "test accuracy", ".3f"),
                 Column(arm("steps_to_fit_"), "SGD steps to 100% train acc.", ".0f"))),
    "MDL": Method(
        "generalization.overfit_mdl", (*QUICK, "--num-test", "797"),
        per_setting("--corruptions"),
        columns=(Column(arm("preq_bpl_"), "prequential bits / label", ".2f"),
                 Column(arm("preq_stop_bpl_"), "prequential + stopping, bits / label",
                        ".2f"))),
    "intrinsic dimension": Method(
        "generalization.overfit_intrinsic_dim",
        (*QUICK, "--d-int-on", "train", "--hidden", "256", "--num-epochs", "150",
         "--projection", "sparse", "--dims", "10", "40", "160", "640", "2560", "5120",
         "10240"),
        per_setting("--label-corruption"),
        columns=(Column("d_int90", "d_int90 (train accuracy)", ",.0f", never=0),
                 Column("train_acc_direct", "direct: train accuracy", ".3f"),
                 Column("test_acc_direct", "direct: test accuracy", ".3f"))),
    "lottery ticket": Method(
        "generalization.overfit_lottery_ticket", QUICK,
        per_setting("--label-corruption"),
        columns=(Column(at_round("charts/train_acc_ticket"), "ticket: train accuracy", ".3f"),
                 Column(at_round("charts/train_acc_reinit"), "reinit: train accuracy", ".3f"),
                 Column(at_round("charts/test_acc_ticket"), "ticket: test accuracy", ".3f"),
                 Column(at_round("charts/test_acc_reinit"), "reinit: test accuracy",
                        ".3f"))),
    "layer robustness": Method(
        "generalization.overfit_layer_robustness", QUICK,
        per_setting("--label-corruption"),
        columns=(Column("train_err", "trained: train error", ".3f"),
                 Column("test_err", "trained: test error", ".3f"),
                 Column("reinit0_train_err_L0", "layer 1 reset to init: train error", ".3f"),
                 Column("reinit0_test_err_L0", "layer 1 reset to init: test error", ".3f"),
                 Column(worst_later_layer, "layers 2-4 reset to init: worst train error",
                        ".3f"))),
}
