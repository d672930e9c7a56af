from __future__ import annotations

import numpy as np
import pytest

from rnnserve.errors import DataError
from rnnserve.training.data import is_validation, load_text_corpus, unigram_entropy_bits


def test_split_is_deterministic_disjoint_and_about_ten_percent(small_corpus) -> None:
    again = load_text_corpus(("pydoc_topics",))
    assert again.sha256 == small_corpus.sha256
    assert np.array_equal(again.val, small_corpus.val)
    n_train, n_val = small_corpus.documents
    assert 0.03 < n_val / (n_train + n_val) < 0.2
    # a validation document never appears in the training bytes
    from pydoc_data.topics import topics

    val_keys = [k for k in sorted(topics) if is_validation(f"pydoc:{k}", 10)]
    assert val_keys
    sample = topics[val_keys[0]].strip().encode()[:400]
    assert sample in small_corpus.val.tobytes()
    assert sample not in small_corpus.train.tobytes()


def test_adding_a_source_never_moves_a_document_between_splits(small_corpus) -> None:
    from pydoc_data.topics import topics

    both = load_text_corpus(("pydoc_topics", "idle_docs"))
    assert both.documents[0] > small_corpus.documents[0]
    for key in sorted(topics)[:40]:
        sample = topics[key].strip().encode()[:200]
        in_val = is_validation(f"pydoc:{key}", 10)
        assert (sample in both.val.tobytes()) == in_val, key
        assert (sample in small_corpus.val.tobytes()) == in_val, key


def test_english_text_has_the_expected_unigram_entropy(small_corpus) -> None:
    assert 4.4 < unigram_entropy_bits(small_corpus.val) < 5.0
    assert small_corpus.train.dtype == np.uint8


def test_unknown_source_is_refused() -> None:
    with pytest.raises(DataError, match="unknown text sources"):
        load_text_corpus(("wikipedia",))


def test_no_validation_passage_is_in_the_training_text(small_corpus) -> None:
    # pydoc topics nest: 'compound' holds 'try' and 'with', 'specialnames' holds
    # 'customization'. A passage of a validation document must not be trained on.
    n = 64
    val = small_corpus.val.tobytes()
    seen = {val[i:i + n] for i in range(len(val) - n + 1)}
    train = small_corpus.train.tobytes()
    leaked = sum(train[i:i + n] in seen for i in range(0, len(train) - n + 1, 16))
    assert leaked == 0, f"{leaked} training windows of {n} bytes are validation text"
