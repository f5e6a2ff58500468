"""Byte pair encoding: Sennrich's word-level BPE and GPT-2's byte-level BPE.

[1] Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with Subword
    Units", arXiv:1508.07909 (Algorithm 1: learn merges on a word-frequency dictionary whose
    words end with the marker `</w>`).
[2] Radford, Wu, Child, Luan, Amodei & Sutskever 2019, "Language Models are Unsupervised
    Multitask Learners" (OpenAI report), Sec. 2.2: BPE on UTF-8 bytes, base vocabulary the
    256 byte values, and no merges across character categories.

The algorithm ([1] Alg. 1). Start from symbols = the base units (characters in [1], bytes in
[2]). Repeat: count every adjacent symbol pair over the corpus, weighted by how often its word
occurs; take the most frequent pair (a, b); replace every occurrence of (a, b), left to right
and without overlap, by the new symbol ab; record the merge. The vocabulary grows by one per
merge, so vocab_size = base + number of merges. Encoding a new word applies the recorded
merges in their order (equivalently: repeatedly merge the adjacent pair of lowest rank).

GPT-2's variant [2]: the text is first split into pre-tokens by a regex that keeps letters,
digits, other symbols and whitespace apart (`GPT2_PATTERN`: contractions, an optional leading
space plus a run of \\p{L}, of \\p{N}, or of other non-space symbols, then whitespace); BPE
runs inside each pre-token's UTF-8 bytes, so "dog." becomes "dog" + "." and the vocabulary
holds one "dog" rather than "dog.", "dog!" and "dog?" ([2] Sec. 2.2, which adds "an exception
for spaces": the optional leading space joins the word). Every string has an
encoding (there is no unknown token) and `decode(encode(s)) == s` for every str that UTF-8
can encode.

Checked against the released code: GPT2_PATTERN and `bytes_to_unicode` are the ones of
openai/gpt-2 `src/encoder.py` (commit 9b63575ef42771a015060c964af2c3da4cf7c8ab, read with
git show), where the byte-to-unicode table maps the 188 printable bytes ! .. ~, ¡ .. ¬,
® .. ÿ to themselves and the other 68 bytes, in increasing order, to chr(256), chr(257), ...
The table is only the spelling of merges in the saved file (GPT-2's `vocab.bpe` format, "Ġ t"
for b" " + b"t"); ids, training and encoding work on bytes.

Tested (tests/transformers/test_bpe.py): the merge list equals tiktoken's educational trainer
(`tiktoken._educational.bpe_train`, tiktoken 0.14.0, whose tie-break among equally frequent
pairs is the first one met when scanning the corpus: we keep that order); encodings equal
Hugging Face `tokenizers` (BPE model loaded with our merges, ByteLevel pre-tokenizer and
decoder); [1]'s Algorithm 1 toy dictionary gives the merges of the paper's code.

Use: `merges = train(text, 1024)`, `tok = Tokenizer(merges)`, `tok.encode(s)` -> ids,
`tok.decode(ids)`, `tok.save(path)` / `Tokenizer.load(path)` (also reads GPT-2's vocab.bpe),
`encode_corpus(tok, text)` -> uint16 array.

Reproduce: `python -m transformers.bpe --vocab-size 512 --corpus python-docs`
Measured (loaded 2-core CPU, load ~2-11; corpus python-docs = pydoc topics + stdlib
docstrings, 1,151,835 UTF-8 bytes, trained on the first 90%, compression in UTF-8 bytes per
token on the held-out last 10% (train part in brackets)): vocab 512: 1.91 (2.02); vocab 1024:
2.48 (2.68); vocab 4096: 3.34 (3.77). Training (regex split included) 0.40 s / 0.48 s / 0.97 s.
Training cost with many ties (a versioned heap keyed by count, then first occurrence; 2-core
CPU, loaded, CPU seconds): python-docs at vocab 8192 / 16384 1.2 s / 1.4 s, and 4,096 merges on
20,000 random words over four letters (a tie at almost every step) 0.7 s, where re-popping
every tied pair per merge took 5.7 s / ~63 s / 29 s; the merges are identical.

Differences from the papers:
- [1] learns on words split at whitespace with `</w>` marking the end; [2] (and `train`) has
  no end-of-word symbol: the leading space is part of the pre-token (" the"). `sennrich_train`
  is [1]'s version, kept small and separate.
- [1]'s Figure 1 (from memory: merges r·, lo, low, er· on {low, lowest, newer, wider}) lists
  pairs that all occur twice; Algorithm 1's first-maximum rule orders that tie lo, low, er, er·.
- Ties between equally frequent pairs: [1]'s code takes the first maximum of a dict filled
  while scanning its word dictionary, tiktoken's trainer the first maximum of a Counter filled
  while scanning the corpus; `train` takes the pair whose first occurrence in the corpus comes
  first, as tiktoken (same merges, tested). [2] does not say.
- GPT-2's 50,000 merges were learned on WebText by code that was not released (only the
  encoder was); here the merges are learned by `train` on offline text. The `<|endoftext|>`
  token and other special tokens are not handled here.
- Encoding one pre-token costs O(length^2) (as GPT-2's encoder); results are cached per
  distinct pre-token, which keeps a corpus pass fast.
- If a merge creates a byte string that an earlier merge created already (possible, rare),
  both merges are kept, and encoding maps the string to the first id (tiktoken's `ranks` dict
  and a Hugging Face vocabulary built from the merges keep the last one).
- `Tokenizer.load` reads GPT-2's `vocab.bpe` merges, but ids here are byte b -> b and merge i
  -> 256 + i, whereas GPT-2's `encoder.json` numbers the bytes in `bytes_to_unicode`'s
  printable-first order (" " is 220 there, 32 here) and adds `<|endoftext|>` = 50256; the
  merge ids agree. To reproduce GPT-2's ids, permute the byte ids with that order.
- `sennrich_train` follows the paper's listing (Algorithm 1), not the released subword-nmt,
  which fuses `</w>` onto the last character (so ("low", "</w>") is never a merge), takes the
  lexicographically greatest pair on ties over a frequency-sorted vocabulary, and stops when
  the best pair occurs fewer than 2 times (learn_bpe.py).
"""

import argparse
import heapq
import json
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The pre-tokenisation regex of openai/gpt-2 src/encoder.py (checked, see the docstring)."""

END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible spelling of bytes as printable characters (openai/gpt-2 encoder.py):
    printable Latin-1 bytes stand for themselves, the 68 others map to chr(256 + n) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


# --- SENNRICH BPE ([1] Algorithm 1) ---


def sennrich_train(words: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
    """[1] Algorithm 1 on a {word: frequency} dictionary: each word is its characters plus
    `</w>`; `num_merges` times, merge the most frequent adjacent pair (first maximum in the
    dictionary's order on ties, as the paper's `max(pairs, key=pairs.get)`). Stops early when
    no pair is left. Returns the merges in order."""
    if not isinstance(num_merges, int) or num_merges < 0:
        raise ValueError(f"num_merges must be an int >= 0, got {num_merges!r}")
    vocab = {}
    for w, f in words.items():
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(f"words must be non-empty strings without whitespace, got {w!r}")
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"frequencies must be ints >= 1, got {w!r}: {f!r}")
        vocab[(*w, END_OF_WORD)] = vocab.get((*w, END_OF_WORD), 0) + f
    merges = []
    for _ in range(num_merges):
        pairs = defaultdict(int)  # get_stats
        for symbols, f in vocab.items():
            for pair in pairwise(symbols):
                pairs[pair] += f
        if not pairs:
            break
        best = max(pairs, key=pairs.get)
        merges.append(best)
        vocab = {_merge(s, best, best[0] + best[1]): f for s, f in vocab.items()}  # merge_vocab
    return merges


def sennrich_segment(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Segment one word with [1]'s merges (applied in their learned order)."""
    symbols = (*word, END_OF_WORD)
    for pair in merges:
        symbols = _merge(symbols, pair, pair[0] + pair[1])
    return list(symbols)


def _merge(symbols, pair, new):
    """Replace each occurrence of `pair` in `symbols` by `new`, left to right, no overlap."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return type(symbols)(out) if isinstance(symbols, tuple) else out


# --- BYTE-LEVEL BPE ([2] Sec. 2.2) ---


def _check_pattern(pattern: str):
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError) as e:
        raise ValueError(f"pattern is not a valid `regex` pattern: {pattern!r} ({e})") from e


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not encodable as UTF-8 (lone surrogate?): {e}") from e


def _chunks(text: str, pattern: str) -> tuple[list[list[int]], list[int]]:
    """Unique pre-tokens as byte-id lists, in order of first appearance, with their counts."""
    _utf8(text)
    count: dict[str, int] = {}
    for piece in _check_pattern(pattern).findall(text):
        count[piece] = count.get(piece, 0) + 1
    return [list(p.encode("utf-8")) for p in count], list(count.values())


def train(text: str, vocab_size: int, pattern: str = GPT2_PATTERN) -> list[tuple[bytes, bytes]]:
    """Learn byte-level BPE merges on `text` until the vocabulary (256 bytes + merges) has
    `vocab_size` entries, or no pair is left. Pairs are counted once per unique pre-token,
    weighted by its count, and only the pre-tokens that hold the merged pair are updated (their
    pairs re-enter the heap with fresh counts and tie keys), so each merge costs the size of
    its occurrences, not of the corpus or of the number of tied pairs."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(
            f"vocab_size must be an int >= 256 (the byte alphabet), got {vocab_size!r}"
        )
    chunks, freqs = _chunks(text, pattern)
    stats: dict[tuple[int, int], int] = defaultdict(int)  # pair -> weighted count
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks holding it
    for c, (ids, f) in enumerate(zip(chunks, freqs, strict=True)):
        for pair in pairwise(ids):
            stats[pair] += f
            where[pair].add(c)

    def first_seen(pair):  # tie-break: where a scan of the corpus meets the pair first
        c = min(where[pair])
        ids = chunks[c]
        return c, next(i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) == pair)

    # Max-heap of (-count, first_seen, pair, version): the top is the most frequent pair, the
    # first met on ties. A pair's count and first occurrence change only when a chunk holding
    # it changes, and then it is pushed again with a new version; older entries are skipped.
    version: dict[tuple[int, int], int] = defaultdict(int)
    heap = [(-n, first_seen(pair), pair, 0) for pair, n in stats.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        while heap and (heap[0][2] not in stats or heap[0][3] != version[heap[0][2]]):
            heapq.heappop(heap)
        if not heap:
            break
        best = heapq.heappop(heap)[2]
        new = len(vocab)
        merges.append((vocab[best[0]], vocab[best[1]]))
        vocab.append(vocab[best[0]] + vocab[best[1]])
        changed = set()
        for c in where.pop(best):
            ids, f = chunks[c], freqs[c]
            for pair in pairwise(ids):
                stats[pair] -= f
                where.get(pair, set()).discard(c)
                changed.add(pair)
            ids = chunks[c] = _merge(ids, best, new)
            for pair in pairwise(ids):
                stats[pair] += f
                where[pair].add(c)
                changed.add(pair)
        for pair in changed:
            if stats[pair] > 0:
                version[pair] += 1
                heapq.heappush(heap, (-stats[pair], first_seen(pair), pair, version[pair]))
            else:
                del stats[pair]
                where.pop(pair, None)
    return merges


class Tokenizer:
    """Byte-level BPE tokenizer: ids 0..255 are the bytes, id 256 + i is merge i."""

    def __init__(self, merges, pattern: str = GPT2_PATTERN):
        self.pattern = pattern
        self._regex = _check_pattern(pattern)
        self.vocab = [bytes([b]) for b in range(256)]
        self._id: dict[bytes, int] = {v: i for i, v in enumerate(self.vocab)}
        self._rank: dict[tuple[int, int], int] = {}  # (left id, right id) -> merge index
        self.merges = []
        for i, m in enumerate(merges):
            if not (isinstance(m, (tuple, list)) and len(m) == 2):
                raise ValueError(f"merge {i} must be a pair (bytes, bytes), got {m!r}")
            a, b = m
            if not (
                isinstance(a, bytes) and isinstance(b, bytes) and a in self._id and b in self._id
            ):
                raise ValueError(
                    f"merge {i} {m!r}: both parts must be bytes already in the vocabulary "
                    "(single bytes or products of earlier merges)"
                )
            self.merges.append((a, b))
            self._rank.setdefault((self._id[a], self._id[b]), i)
            self.vocab.append(a + b)
            self._id.setdefault(a + b, 256 + i)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _bpe(self, piece: str) -> list[int]:
        """Merge the lowest-ranked adjacent pair until none is a merge (encoder.py's `bpe`)."""
        ids = self._cache.get(piece)
        if ids is None:
            ids = list(piece.encode("utf-8"))
            while len(ids) > 1:
                ranks = [self._rank.get(p) for p in pairwise(ids)]
                r = min((r for r in ranks if r is not None), default=None)
                if r is None:
                    break
                a, b = self.merges[r]
                ids = _merge(ids, (self._id[a], self._id[b]), self._id[a + b])
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return [i for piece in self._regex.findall(text) for i in self._bpe(piece)]

    def decode_bytes(self, ids) -> bytes:
        ids = list(ids)
        bad = [
            i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < len(self.vocab))
        ]
        if bad:
            raise ValueError(f"token ids must be ints in [0, {len(self.vocab)}), got {bad[:5]}")
        return b"".join(self.vocab[i] for i in ids)

    def decode(self, ids) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a cut inside a character) become
        U+FFFD, as GPT-2's decoder (errors='replace')."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path) -> None:
        """A JSON file: the pattern and the merges spelled as in GPT-2's vocab.bpe ("Ġ t")."""
        b2u = bytes_to_unicode()
        spell = lambda s: "".join(b2u[b] for b in s)  # noqa: E731
        merges = [f"{spell(a)} {spell(b)}" for a, b in self.merges]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": "byte-level-bpe", "pattern": self.pattern, "merges": merges})
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read `save`'s JSON, or a GPT-2 `vocab.bpe` text file (merges, GPT-2's pattern)."""
        text = Path(path).read_text(encoding="utf-8")
        u2b = {u: b for b, u in bytes_to_unicode().items()}
        if text.lstrip().startswith("{"):
            data = json.loads(text)
            if data.get("format") != "byte-level-bpe":
                raise ValueError(f"{path}: not a tokenizer saved by bpe.py")
            lines, pattern = data["merges"], data["pattern"]
        else:
            lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#version")]
            pattern = GPT2_PATTERN
        merges = []
        for ln in lines:
            parts = ln.split(" ")
            if len(parts) != 2 or any(ch not in u2b for ch in parts[0] + parts[1]):
                raise ValueError(f"{path}: bad merge line {ln!r}")
            merges.append(tuple(bytes(u2b[ch] for ch in p) for p in parts))
        return cls(merges, pattern)


def encode_corpus(tok: Tokenizer, text: str) -> np.ndarray:
    """All of `text` as ids: uint16 when the vocabulary fits (<= 65536), else int32."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
    return np.asarray(tok.encode(text), dtype=dtype)


# --- MAIN ---

DOC_MODULES = (
    "abc argparse array ast asyncio base64 bisect builtins calendar collections contextlib "
    "copy csv dataclasses datetime decimal difflib email enum fractions functools glob gzip "
    "hashlib heapq html http.client inspect io itertools json logging math operator os "
    "pathlib pickle pprint random re shutil socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading time timeit typing unittest urllib.parse "
    "uuid warnings weakref xml.etree.ElementTree zipfile"
).split()


def python_docs() -> str:
    """Offline English text: pydoc's reference-manual topics, then the docstrings (module,
    classes, functions, methods) of the standard-library modules in DOC_MODULES, gathered
    with `inspect`. About 1.15 MB (Python 3.11); the exact text depends on the version."""
    import importlib
    import inspect
    from pydoc_data.topics import topics

    parts, seen = [topics[k] for k in sorted(topics)], set()
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        objs = [mod]
        for _, obj in sorted(vars(mod).items()):
            if inspect.isclass(obj) or inspect.isroutine(obj):
                objs.append(obj)
                if inspect.isclass(obj):
                    objs += [v for _, v in sorted(vars(obj).items()) if inspect.isroutine(v)]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts)


def load_corpus(corpus: str) -> str:
    if corpus == "python-docs":
        return python_docs()
    if not Path(corpus).is_file():
        raise ValueError(f"--corpus must be 'python-docs' or a text file, got {corpus!r}")
    return Path(corpus).read_text(encoding="utf-8", errors="replace")  # bad bytes -> U+FFFD


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m transformers.bpe",
        description="Train GPT-2 byte-level BPE merges on offline text, report compression "
        "(UTF-8 bytes per token) and save the tokenizer.",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="vocabulary size = 256 byte tokens + number of merges (>= 256)",
    )
    p.add_argument(
        "--corpus",
        default="python-docs",
        help="'python-docs' (pydoc topics + stdlib docstrings) or a UTF-8 text file (bytes that "
        "are not UTF-8 are read as U+FFFD)",
    )
    p.add_argument(
        "--max-chars",
        type=int,
        default=None,
        help="use only the first this many characters of the corpus",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="train on the first 1 - f of the text, report compression on the rest",
    )
    p.add_argument("--show-merges", type=int, default=20, help="print this many first merges")
    p.add_argument(
        "--out",
        default=None,
        help="where to save the tokenizer JSON (default runs/bpe/bpe_<vocab>.json)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_chars is not None and args.max_chars < 1:
        p.error(f"--max-chars must be >= 1, got {args.max_chars}")
    if args.show_merges < 0:
        p.error(f"--show-merges must be >= 0, got {args.show_merges}")
    if args.vocab_size < 256:
        p.error(f"--vocab-size must be >= 256 (the byte alphabet), got {args.vocab_size}")
    try:
        text = load_corpus(args.corpus)
    except ValueError as e:
        p.error(str(e))
    text = text[: args.max_chars]
    cut = len(text) - int(len(text) * args.val_fraction)
    fit, held = text[:cut], text[cut:]
    t0 = time.perf_counter()
    merges = train(fit, args.vocab_size)
    seconds = time.perf_counter() - t0
    tok = Tokenizer(merges)
    print(f"corpus {args.corpus}: {len(_utf8(text)):,} bytes, trained on {len(_utf8(fit)):,}")
    print(f"vocab {tok.vocab_size} ({len(merges)} merges) in {seconds:.2f} s")
    for name, part in (("train", fit), ("held-out", held)):
        if part:
            ids = encode_corpus(tok, part)
            rate = len(_utf8(part)) / max(len(ids), 1)
            print(f"{name}: {rate:.3f} bytes/token ({len(ids):,} tokens)")
    b2u = bytes_to_unicode()
    shown = [f"{''.join(b2u[x] for x in a)} {''.join(b2u[x] for x in b)}" for a, b in merges]
    print("first merges:", " | ".join(shown[: args.show_merges]))
    out = args.out or f"runs/bpe/bpe_{args.vocab_size}.json"
    tok.save(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
