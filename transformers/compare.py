"""How much does each generalized language model's pre-training help, against the same model
trained from scratch, on one shared budget? Every file runs at its CPU `quick` preset (its
own model size, context, learning rates, warm-up and task) with these SHARED: the seeds
(the same 2, vmapped), the pre-training budget (500 updates of 16 rows: windows, instances
or sentence pairs), the fine-tuning budget (768 labelled examples, batches of 16, 4 epochs =
192 updates; ELMo and CoVe count their task updates directly: 192 of 16), and the text:
the characters of Python's pydoc reference manual (common.data.text_corpus "pydoc"), 10%
held out, for everything but CoVe. Each file's own: the task and its labels. GPT, BERT and
ULMFiT: is a window of pydoc as written or tampered with (GPT: 62 characters between its
start and extract tokens, shuffled; ULMFiT: 48 characters, shuffled; BERT: its own task, 12
consecutive characters replaced by draws from the text's character frequencies, and only
the [CLS] label is reported); ELMo: tag the replaced characters of a window (F1 of the replaced
class); CoVe: translation of procedural English number phrases into German parts, then the
parity of the number from [GloVe; CoVe] (its own synthetic data: pydoc has no translation
pairs). GPT and BERT "from scratch" are the same command with `--pretrain-steps 0` (the 192
fine-tuning updates only); ULMFiT's, ELMo's and CoVe's baselines are arms of the same run:
ULMFiT's Table 4 arm (no general-domain stage (a); ULMFiT's 500 language-model updates are
400 on the stdlib sources, its general corpus, then 100 on pydoc, and the no-pre-training
arm still gets those 100), ELMo's tagger without the biLM's features, CoVe's GloVe alone and
CoVe from the untrained MT-LSTM. ALBERT runs here without its fine-tuning stage
(--finetune-steps 0; its gain is albert.py's slow gate) and GPT-2 has none: their rows are
what the 500 pre-training updates reach against the baselines their files report (the
unigram guess; 0.5 for sentence order; GPT-2's zero-shot cloze: chance 0.25 and a
word-frequency scorer). Every value is held out: the validation split (pydoc's last 10%)
for the texts, unseen numbers for CoVe."""

from common.compare import Column, Method

PRETRAIN_STEPS = 500
"""pre-training updates (every file's first stage)"""
BATCH = 16
"""rows per pre-training and per fine-tuning update"""
NUM_LABELLED = 768
"""labelled training examples of each file's task"""
EPOCHS = 4
"""fine-tuning epochs over the labelled set"""
FINETUNE_STEPS = EPOCHS * NUM_LABELLED // BATCH
"""fine-tuning updates (192)"""
ULMFIT_TARGET_LM = 100
"""ULMFiT's stage (b) updates on pydoc, part of its pre-training budget"""
SEEDS = 2
"""seeds of the committed command (common.compare's --num-seeds)"""

SETTINGS = {f"pydoc, {PRETRAIN_STEPS} + {FINETUNE_STEPS} updates of {BATCH}": ()}
QUICK = ("--preset", "quick")


def budget(name: str) -> tuple[str, ...]:
    """The shared budget and text under file `name`'s own flag names."""
    P, B, N, E, F = map(str, (PRETRAIN_STEPS, BATCH, NUM_LABELLED, EPOCHS, FINETUNE_STEPS))
    return {
        "gpt": ("--corpus", "pydoc", "--pretrain-steps", P, "--batch-size", B,
                "--num-labelled", N, "--finetune-batch", B, "--finetune-epochs", E),
        "bert": ("--corpus", "pydoc", "--pretrain-steps", P, "--batch-size", B,
                 "--num-labelled", N, "--finetune-batch", B, "--finetune-epochs", E),
        "ulmfit": ("--target-corpus", "pydoc",
                   "--pretrain-steps", str(PRETRAIN_STEPS - ULMFIT_TARGET_LM),
                   "--lm-steps", str(ULMFIT_TARGET_LM), "--batch-size", B,
                   "--num-labelled", N, "--clf-batch", B, "--clf-epochs", E),
        "elmo": ("--corpus", "pydoc", "--pretrain-steps", P, "--batch-size", B,
                 "--num-labelled", N, "--finetune-batch", B, "--finetune-steps", F),
        "cove": ("--mt-steps", P, "--batch-size", B, "--num-labelled", N,
                 "--task-batch", B, "--task-steps", F),
        "albert": ("--corpus", "pydoc", "--train-steps", P, "--batch-size", B,
                   "--finetune-steps", "0"),
        "gpt2": ("--corpus", "pydoc", "--train-steps", P, "--batch-size", B),
    }[name]


def accuracy_of_error(key: str):
    """Per-seed held-out accuracy 1 - err from an evaluate() error key."""
    return lambda result: 1.0 - result.final[key]


def method(name: str, *extra: str, columns=()) -> Method:
    """transformers/<name>.py at its quick preset, the shared budget, then `extra`."""
    return Method(f"transformers.{name}", (*QUICK, *budget(name), *extra), columns=columns)


ACC = ".3f"
SCRATCH = ("--pretrain-steps", "0")
METHODS = {
    "CoVe": method("cove", columns=(
        Column("val_acc_cove", "parity accuracy, [GloVe; CoVe]", ACC),
        Column("val_acc_random_cove", "parity accuracy, CoVe of the untrained MT-LSTM", ACC),
        Column("val_acc_glove", "parity accuracy, GloVe alone", ACC),
        Column("val_exact_match", "EN->DE exact match (pre-training task)", ACC))),
    "ELMo": method("elmo", columns=(
        Column("val_f1", "replaced-char F1, tagger + ELMo", ACC),
        Column("val_f1_baseline", "replaced-char F1, tagger alone", ACC),
        Column("val_lm_loss", "biLM nats/char (unigram: next row)", ".2f"),
        Column("unigram_entropy", "unigram entropy, nats/char", ".2f"))),
    "ULMFiT": method("ulmfit", columns=(
        Column(accuracy_of_error("val_err_ulmfit"), "shuffled? accuracy, pre-trained", ACC),
        Column(accuracy_of_error("val_err_scratch"), "shuffled? accuracy, no stage (a)", ACC),
        Column(accuracy_of_error("val_err_no_tricks"), "shuffled? accuracy, no tricks",
               ACC))),
    "GPT": method("gpt", columns=(
        Column("val_acc", "shuffled? accuracy, pre-trained", ACC),
        Column("val_bits_per_char", "bits/char after fine-tuning", ".2f"))),
    "GPT from scratch": method("gpt", *SCRATCH, columns=(
        Column("val_acc", "shuffled? accuracy, from scratch", ACC),
        Column("val_bits_per_char", "bits/char (aux. LM loss only)", ".2f"))),
    "BERT": method("bert", columns=(
        Column("val_acc", "replaced? accuracy, pre-trained", ACC),
        Column("val_mlm_acc", "MLM accuracy after fine-tuning", ACC),
        Column("val_unigram_acc", "unigram guess, same positions", ACC))),
    "BERT from scratch": method("bert", *SCRATCH, columns=(
        Column("val_acc", "replaced? accuracy, from scratch", ACC),)),
    "ALBERT": method("albert", columns=(
        Column("val_mlm_acc", "MLM accuracy", ACC),
        Column("val_unigram_acc", "unigram guess, same positions", ACC),
        Column("val_sop_acc", "sentence-order accuracy (chance 0.5)", ACC))),
    "GPT-2": method("gpt2", columns=(
        Column("val_bits_per_byte", "bits/byte", ".2f"),
        Column("unigram_bits_per_byte", "unigram bits/byte", ".2f"),
        Column("cloze_acc", "zero-shot cloze accuracy (chance 0.25)", ACC),
        Column("cloze_freq_acc", "word-frequency scorer, same cloze", ACC))),
    # CVT (transformers/cvt.py) is not a row yet: its task is semi-supervised tagging of a
    # synthetic HMM (50 labelled + 5,000 unlabelled sentences), not pre-training then
    # fine-tuning on pydoc; its own run compares CVT with a supervised-only twin.
}
