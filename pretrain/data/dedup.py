"""Document-level deduplication: exact (content hash) and near-duplicate (MinHash + LSH).

What this implements: a document is dropped when its cleaned, rendered text equals an earlier
document's (any source), or when the MinHash estimate of the Jaccard similarity of its word
`shingle_words`-grams with an earlier document's is >= `threshold` (LSH finds candidates, the stored
signatures confirm them). The first occurrence in input order is kept, so appending documents never
removes old ones. Duplicates are counted as same-source or cross-source.
Galactica removed repeated *spans* of >= 100 bytes (suffix-array deduplication); span-level removal
is not implemented here: near-duplicate documents are what it mostly removes in a curated corpus.

Memory (grows with the number of kept documents, the only part of gal-prepare that does): about
100 bytes per document for the exact-hash table, plus for near-dedup sources num_perm * 4 bytes of
signature and one LSH bucket entry per band (~100 bytes * bands), ~2 KB per document at the
defaults: 10 million documents ≈ 20 GB. Shard the input by source or time beyond that.
"""
from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

_WORD = re.compile(r"\w+")
SCHEME = "affine32"
SEED = 1


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Signer:
    """Computes MinHash signatures (in the worker processes) with datasketch's affine32 scheme.

    A shingle's 32-bit hash is a polynomial of the CRC32s of its words, computed for all shingles
    of a document at once with numpy; datasketch applies its permutations and takes the minimum.
    """

    def __init__(self, num_perm: int, shingle_words: int):
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        self.permutations = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
        self.multipliers = (np.arange(shingle_words, dtype=np.uint32) * 2 + 1) * np.uint32(0x9E3779B1)

    def shingle_hashes(self, text: str) -> list[int]:
        words = np.array([zlib.crc32(w.encode()) for w in _WORD.findall(text.lower())] or [0], np.uint32)
        k = min(self.shingle_words, len(words))
        n = len(words) - k + 1
        h = np.zeros(n, np.uint32)
        for j in range(k):
            h += words[j:j + n] * self.multipliers[j]
        return np.unique(h).tolist()

    def signature(self, text: str) -> np.ndarray:
        m = MinHash(num_perm=self.num_perm, seed=SEED, permutations=self.permutations, scheme=SCHEME,
                    hashfunc=_identity)
        m.update_batch(self.shingle_hashes(text))
        return m.hashvalues.astype(np.uint32)  # affine32 values fit 32 bits


def _identity(x: int) -> int:
    return x


class Deduplicator:
    """Keeps the state of what was seen; decides in input order (in the main process)."""

    def __init__(self, exact: bool, near: bool, threshold: float, num_perm: int):
        self.exact, self.near, self.threshold = exact, near, threshold
        self.hashes: dict[bytes, int] = {}  # content hash → source number
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if near else None
        self.signatures: list[np.ndarray] = []
        self.signature_sources: list[int] = []
        self.sources: dict[str, int] = {}

    def check(self, source: str, digest: bytes, signature: np.ndarray | None) -> str | None:
        """None when the document is new (and remember it), else the reason it is a duplicate."""
        s = self.sources.setdefault(source, len(self.sources))
        if self.exact:
            seen = self.hashes.get(digest)
            if seen is not None:
                return "exact_duplicate_same_source" if seen == s else "exact_duplicate_cross_source"
        if self.lsh is not None and signature is not None:
            minhash = LeanMinHash(seed=SEED, hashvalues=signature.astype(np.uint64), scheme=SCHEME)
            for key in sorted(self.lsh.query(minhash)):  # earliest match first: deterministic
                if np.mean(self.signatures[key] == signature) >= self.threshold:
                    same = self.signature_sources[key] == s
                    return "near_duplicate_same_source" if same else "near_duplicate_cross_source"
            self.lsh.insert(len(self.signatures), minhash, check_duplication=False)
            self.signatures.append(signature)
            self.signature_sources.append(s)
        if self.exact:
            self.hashes[digest] = s
        return None
