"""Span-level deduplication (Galactica §A.2): spans of >= `min_bytes` repeated across the corpus are
removed from every document but the first one, the cuts moved to paragraph boundaries.

How, at scale: every document's UTF-8 bytes are fingerprinted by *winnowing* (Schleimer et al. 2003):
hash every k-byte window, keep the smallest hash of each run of w consecutive windows. Any string of
k + w - 1 = `min_bytes` bytes or more that two documents share yields at least one shared fingerprint in
both, a string shorter than k bytes never does, and about 2 / (w + 1) of the positions are kept. The
fingerprints (hash, document, offset) are bucketed by hash on disk, so the owner of each repeated
fingerprint (the first document in source-priority order) is found one bucket at a time in bounded memory
(pretrain/data/stages.py). A document then learns which of its fingerprints are repeats of an earlier
one; each covers k bytes, and consecutive kept windows are at most w <= k bytes apart, so their union is
the repeated region less at most w - 1 bytes at either end. A paragraph (text between blank lines) is cut
when repeats cover at least half of its bytes: a repeated paragraph of >= min_bytes always is, a repeat
shorter than k bytes never is.
"""
from __future__ import annotations

import numpy as np

_P = np.uint64(0x100000001B3)  # the rolling hash's base (odd, so invertible modulo 2**64)
_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_MIX = np.uint64(0x9E3779B97F4A7C15)
PARAGRAPH = b"\n\n"


def window_sizes(min_bytes: int) -> tuple[int, int]:
    """(k, w): k-byte windows, winnowed w at a time, k + w - 1 == min_bytes and w < k."""
    w = max(1, (min_bytes * 2) // 7)
    return min_bytes - w + 1, w


def fingerprints(data: bytes, min_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """The winnowed fingerprints of `data`: (hashes uint64, byte offsets uint32), offsets increasing;
    none for a text shorter than min_bytes."""
    return fingerprints_many([data], min_bytes)[0]


def fingerprints_many(texts: list[bytes], min_bytes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """fingerprints() of each text, computed for all of them in one pass of numpy (a bucket's documents
    in batches: per-document calls cost more in numpy's overhead than in arithmetic)."""
    if not texts:
        return []
    k, w = window_sizes(min_bytes)
    starts = np.cumsum([0] + [len(t) for t in texts])
    data = b"".join(texts)
    n = len(data) - k + 1  # windows, counted from every position of the joined texts
    if n < w:
        return [(np.zeros(0, np.uint64), np.zeros(0, np.uint32)) for _ in texts]
    valid = np.zeros(n, np.uint8)  # windows inside one text
    for a, b in zip(starts[:-1], starts[1:]):
        if b - a >= k:
            valid[a:b - k + 1] = 1
    with np.errstate(over="ignore"):
        x = np.frombuffer(data, np.uint8).astype(np.uint64) + np.uint64(1)
        pw = np.cumprod(np.full(len(data), _P, np.uint64))  # P**(t+1)
        ipw = np.cumprod(np.concatenate([[np.uint64(1)], np.full(len(data) - 1, _P_INV, np.uint64)]))  # P**-t
        s = np.concatenate([[np.uint64(0)], np.cumsum(x * ipw)])
        h = (s[k:] - s[:n]) * pw[k - 1:k - 1 + n]  # sum_j x[i+j] P**(k-j): the window at i
        h ^= h >> np.uint64(29)
        h *= _MIX
        h ^= h >> np.uint64(32)
    # runs of w windows inside one text, and the minimum of each
    run_min = np.where(_sliding(np.minimum, valid, w) == 1, _sliding(np.minimum, h, w), np.uint64(0))
    # window i is kept when it is the minimum of a run that contains it: h[i] == the largest of the minima
    # of the runs i-w+1 .. i (ties, from repeated text, keep all the tied windows)
    pad = np.zeros(w - 1, np.uint64)
    picks = np.flatnonzero((h == _sliding(np.maximum, np.concatenate([pad, run_min, pad]), w)) & (valid == 1))
    doc = np.searchsorted(starts, picks, side="right") - 1
    cuts = np.searchsorted(doc, np.arange(len(texts) + 1))
    return [(h[picks[a:b]], (picks[a:b] - starts[i]).astype(np.uint32))
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


def _sliding(op, a: np.ndarray, w: int) -> np.ndarray:
    """op (np.minimum or np.maximum) over each run a[i:i+w], in O(len(a) log w) (a sparse table)."""
    out, span = a, 1
    while 2 * span <= w:
        out = op(out[:-span], out[span:])
        span *= 2
    return op(out[:len(a) - w + 1], out[w - span:w - span + len(a) - w + 1])


def paragraphs(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the blank-line-separated paragraphs of `data`."""
    out, start = [], 0
    while True:
        end = data.find(PARAGRAPH, start)
        if end < 0:
            out.append((start, len(data)))
            return out
        out.append((start, end))
        start = end + len(PARAGRAPH)


def cut_repeats(text: str, repeated_offsets: np.ndarray, min_bytes: int) -> tuple[str, int]:
    """`text` without the paragraphs that repeated fingerprints (their byte offsets) cover at least
    half of; returns (the rest, bytes removed)."""
    if len(repeated_offsets) == 0:
        return text, 0
    data = text.encode("utf-8")
    k, _ = window_sizes(min_bytes)
    covered = np.zeros(len(data) + 1, np.int32)
    np.add.at(covered, repeated_offsets.astype(np.int64), 1)
    np.add.at(covered, np.minimum(repeated_offsets.astype(np.int64) + k, len(data)), -1)
    mask = np.cumsum(covered[:-1]) > 0
    kept = [data[a:b] for a, b in paragraphs(data) if b == a or 2 * int(mask[a:b].sum()) < (b - a)]
    rest = PARAGRAPH.join(p for p in kept if p.strip())
    return rest.decode("utf-8"), len(data) - len(rest)
