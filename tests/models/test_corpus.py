"""qgraph.models.corpus: prose only, deterministic, and held out for real."""

from __future__ import annotations

import itertools

from qgraph.models import corpus


def test_prose_filter():
    assert corpus.is_prose(
        "Return the number of items in the queue, waiting if it is empty for now."
    )
    assert not corpus.is_prose("Too short to be a paragraph.")
    assert not corpus.is_prose(">>> print(1) is an example and not prose for the model to read.")
    assert not corpus.is_prose("x = foo(a, b) + bar(c, d) * baz[e][f] - qux(g) / h(i, j, k, l, m).")
    assert not corpus.is_prose("This sentence has enough words but never ends with a full stop")


def test_sentences_split_at_full_stops_before_capitals():
    text = "The first one ends here. The second uses os.path.join. third stays. Fourth!"
    assert corpus.sentences(text) == [
        "The first one ends here.",
        "The second uses os.path.join. third stays.",
        "Fourth!",
    ]


def test_split_is_disjoint_deterministic_and_balanced():
    files = corpus.source_files()
    held = [f for f in files if corpus.is_held_out(f)]
    assert 0.35 < len(held) / len(files) < 0.65
    assert held == [f for f in corpus.source_files() if corpus.is_held_out(f)]
    evaluation = list(itertools.islice(corpus.paragraphs(held_out=True), 300))
    calibration = list(itertools.islice(corpus.paragraphs(held_out=False), 300))
    assert len(evaluation) == len(calibration) == 300
    assert not set(evaluation) & set(calibration)
    assert all(corpus.is_prose(p) for p in evaluation)
