"""Document-level deduplication: exact (content hash) and near-duplicate (datatrove's MinHash LSH).

Exact: a document whose cleaned, rendered text equals another's (any source) is dropped; the copy kept
is the first in document order (source priority, then bucket and id; pretrain/data/stages.py), and the
drop is counted as same-source or cross-source. Near: datatrove's four MinHash stages (signatures per
bucket of documents, duplicate pairs per LSH band, clusters, filter) over word `shingle_words`-grams of
the sources with `near_dedup: true`; `minhash_bands` bands of `minhash_rows` hashes, so documents whose
estimated Jaccard similarity is above about (1/bands)**(1/rows) (0.72 at 14 x 8) are clustered and one
document of each cluster is kept. Every table of both lives on disk, bucketed by hash.
"""
from __future__ import annotations

import hashlib
import re

from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

_WORD = re.compile(r"\w+")


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ScienceWords(WordTokenizer):
    """Words as \\w+ runs, for any language and for formulas (datatrove's English default wants spaCy)."""

    def __init__(self):
        super().__init__("science")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in text.split("\n") if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _WORD.finditer(text)]


def minhash_config(shingle_words: int, bands: int, rows: int) -> MinhashConfig:
    # datatrove's FineWeb normalisation (lowercase, numbers → 0, no punctuation) without its per-character
    # diacritic stripping: the text is NFKC-clean already, and that loop was 40% of the signature time
    return MinhashConfig(n_grams=shingle_words, num_buckets=bands, hashes_per_bucket=rows, seed=1,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"),
                         norm_config=TextNormConfig(norm_unicode_diacritics=False))
