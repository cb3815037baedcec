"""Sampling: greedy, Meta's nucleus top-p against hand-computed distributions, top-k, temperature, seeds."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.sampling import CANDIDATES, _sorted_nucleus, check_sampling, nucleus, sample

PROBS = [0.1, 0.4, 0.2, 0.3]


@pytest.mark.parametrize(
    ("top_p", "top_k", "tokens", "expected"),
    [
        # sorted 0.4, 0.3, 0.2, 0.1; mass before each: 0, 0.4, 0.7, 0.9
        (0.75, 0, [1, 3, 2], [4 / 9, 3 / 9, 2 / 9]),  # 0.1 dropped (0.9 > 0.75); 0.2 kept although it crosses
        (0.5, 0, [1, 3], [4 / 7, 3 / 7]),
        (0.3, 0, [1], [1.0]),  # mass before the 2nd token (0.4) exceeds 0.3
        (1.0, 2, [1, 3], [4 / 7, 3 / 7]),
        (0.95, 3, [1, 3, 2], [4 / 9, 3 / 9, 2 / 9]),
    ],
)
def test_nucleus_hand_computed(top_p, top_k, tokens, expected):
    kept, order = nucleus(mx.array([PROBS]), top_p, top_k)
    kept, order = np.array(kept)[0], np.array(order)[0]
    assert order.tolist()[: len(tokens)] == tokens
    np.testing.assert_allclose(kept[: len(tokens)], expected, rtol=1e-6)
    assert not kept[len(tokens) :].any()


def _frequencies(tokens: mx.array, vocab: int) -> np.ndarray:
    return np.bincount(np.array(tokens), minlength=vocab) / tokens.size


def test_sampled_frequencies_follow_top_p():
    logits = mx.log(mx.array([PROBS] * 20000))
    tokens = sample(logits, temperature=1.0, top_p=0.75, key=mx.random.key(0))
    np.testing.assert_allclose(_frequencies(tokens, 4), [0.0, 4 / 9, 2 / 9, 3 / 9], atol=0.015)


def test_temperature_reshapes_the_distribution():
    logits = mx.log(mx.array([PROBS] * 20000))
    tokens = sample(logits, temperature=2.0, key=mx.random.key(1))
    soft = np.sqrt(PROBS) / np.sqrt(PROBS).sum()  # softmax(log p / 2) = sqrt(p) / sum sqrt(p)
    np.testing.assert_allclose(_frequencies(tokens, 4), soft, atol=0.015)


def test_greedy_and_seeds():
    logits = mx.array([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    assert sample(logits).tolist() == [1, 0]
    wide = mx.random.normal((64, 50), key=mx.random.key(3))
    a = sample(wide, temperature=1.0, top_p=0.9, key=mx.random.key(7))
    b = sample(wide, temperature=1.0, top_p=0.9, key=mx.random.key(7))
    c = sample(wide, temperature=1.0, top_p=0.9, key=mx.random.key(8))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert a.dtype == mx.uint32 and a.shape == (64,)


def test_top_k_one_is_greedy():
    wide = mx.random.normal((32, 50), key=mx.random.key(4))
    picked = sample(wide, temperature=1.5, top_k=1, key=mx.random.key(0))
    assert picked.tolist() == mx.argmax(wide, axis=-1).tolist()


@pytest.mark.parametrize(("t", "p", "k", "word"), [(-1, 0.9, 0, "temperature"), (0.6, 0, 0, "top_p"),
                                                   (0.6, 1.5, 0, "top_p"), (0.6, 0.9, -2, "top_k"),
                                                   (math.nan, 0.9, 0, "temperature")])  # fmt: skip
def test_bad_settings(t, p, k, word):
    with pytest.raises(Llama2MLXError, match=word):
        check_sampling(t, p, k)


def _as_dict(kept: mx.array, order: mx.array) -> list[dict[int, float]]:
    return [{int(t): float(p) for t, p in zip(ids, probs, strict=True) if p > 0}
            for ids, probs in zip(np.array(order), np.array(kept), strict=True)]  # fmt: skip


@pytest.mark.parametrize(
    ("scale", "top_p", "top_k", "fast"),
    [(6.0, 0.9, 0, True), (0.5, 0.9, 0, False), (0.5, 0.9, 40, True), (6.0, 0.999, 0, True)],
)
def test_candidate_shortcut_is_exact(scale, top_p, top_k, fast):
    """Sorting only the top CANDIDATES (when they hold more than top_p) keeps exactly what a full sort keeps."""
    probs = mx.softmax(mx.random.normal((3, 5000), key=mx.random.key(2)) * scale, axis=-1)
    top_mass = mx.sort(probs, axis=-1)[:, -CANDIDATES:].sum(axis=-1)
    if top_k == 0:  # the shortcut applies exactly when the candidates hold more than top_p
        assert bool(mx.all(top_mass > top_p).item()) == fast
    kept, order = nucleus(probs, top_p, top_k)
    assert (kept.shape[-1] < 5000) == fast
    expected = _as_dict(*_sorted_nucleus(probs, top_p, top_k))
    got = _as_dict(kept, order)
    assert [set(row) for row in got] == [set(row) for row in expected]
    for row_got, row_expected in zip(got, expected, strict=True):
        np.testing.assert_allclose([row_got[t] for t in row_expected], list(row_expected.values()), rtol=1e-5)


def nucleus_by_hand(logits: list[float], temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """Meta's recipe in numpy: softmax(logits / T), keep the sorted prefix whose mass before each token is <= top_p,
    at most top_k tokens, renormalise; returned in vocabulary order."""
    probs = np.exp(np.array(logits) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    keep = np.cumsum(ranked) - ranked <= top_p
    if top_k:
        keep &= np.arange(len(ranked)) < top_k
    kept = np.zeros_like(probs)
    kept[order[keep]] = ranked[keep]
    return kept / kept.sum()


def chi_square_threshold(dof: int, z: float = 3.72) -> float:
    """Upper quantile of chi-square(dof) at about 1e-4 (Wilson-Hilferty; z is the normal quantile)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_frequencies_match(tokens: np.ndarray, expected: np.ndarray) -> None:
    """Pearson chi-square goodness of fit over the tokens that `expected` allows; no other token may appear."""
    counts = np.bincount(tokens.ravel(), minlength=len(expected))
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, f"tokens outside the nucleus were drawn: {counts}"
    n = counts.sum()
    statistic = float((((counts - n * expected) ** 2)[allowed] / (n * expected[allowed])).sum())
    assert statistic < chi_square_threshold(int(allowed.sum()) - 1), (statistic, counts / n, expected)


LOGITS = [2.0, 0.5, 1.2, -0.3, 0.9, 0.0]


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(0.5, 0.9, 0), (2.0, 0.8, 0), (0.7, 1.0, 3), (1.5, 0.85, 4)]
)
def test_tempered_top_p_top_k_frequencies_follow_the_renormalised_softmax(temperature, top_p, top_k):
    """Sampled frequencies at temperature T with top-p/top-k equal softmax(logits / T) cut and renormalised.

    Guards against: the temperature applied twice on the top-p/top-k path (softmax(logits / T^2)), and top-k or
    the top-p rule ignored or applied to the untempered distribution.
    """
    expected = nucleus_by_hand(LOGITS, temperature, top_p, top_k)
    assert 2 <= (expected > 0).sum() < len(LOGITS)  # each case cuts some tokens and keeps several
    logits = mx.array([LOGITS] * 20000)
    tokens = sample(logits, temperature=temperature, top_p=top_p, top_k=top_k, key=mx.random.key(11))
    assert_frequencies_match(np.array(tokens), expected)


def test_rows_of_different_peakedness_keep_their_own_nucleus():
    """A peaked row (its top candidates hold the mass) batched with a flat one (they do not): each row's nucleus
    is the one it gets alone, and the flat row keeps tokens beyond the first CANDIDATES.

    Guards against: the candidate shortcut taken when ANY row holds the mass instead of ALL rows (the flat row
    would lose every token outside its top CANDIDATES).
    """
    noise = mx.random.normal((2, 5000), key=mx.random.key(6))
    probs = mx.softmax(noise * mx.array([[6.0], [0.5]]), axis=-1)
    batched = _as_dict(*nucleus(probs, 0.9))
    for row in range(2):
        alone = _as_dict(*nucleus(probs[row : row + 1], 0.9))[0]
        assert set(batched[row]) == set(alone)
        np.testing.assert_allclose([batched[row][t] for t in alone], list(alone.values()), rtol=1e-5)
    assert len(batched[0]) < CANDIDATES < len(batched[1])
