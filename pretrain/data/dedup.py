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

import numpy as np
import xxhash
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
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


_MERSENNE_61 = np.uint64((1 << 61) - 1)


class Signatures(MinhashDedupSignature):
    """datatrove's MinHash signature step, with the same shingles and signatures computed in fewer
    Python steps (tests/test_prepare_scale.py compares both with datatrove's own methods): n-grams joined
    and hashed by map() over C functions instead of a Python call per shingle, and the permutation's
    modulo 2**61 - 1 by shifts and masks instead of numpy's uint64 division (the two were 60% of the
    step's time). Reading, writing and sorting the signature files stay datatrove's."""

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config, ScienceWords())
        assert config.hash_config.precision == 64 and config.hash_config.hash_fc == "xxhash"

    def get_shingles(self, text: str) -> np.ndarray:
        words = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
        n = self.config.n_grams
        grams = map(" ".join, zip(*(words[i:] for i in range(n))))
        return np.fromiter(map(xxhash.xxh64_intdigest, grams), np.uint64, max(0, len(words) - n + 1)).reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        a, b = self.parameters
        x = shingles * a  # modulo 2**64, as datatrove's
        x += b
        r = x & _MERSENNE_61  # x mod (2**61 - 1) = (x & m) + (x >> 61), less m once if that is >= m
        x >>= np.uint64(61)
        r += x
        np.subtract(r, _MERSENNE_61, out=r, where=r >= _MERSENNE_61)
        return r.min(axis=0).reshape(self.config.num_buckets, -1).tolist()
