"""The Galactica tokenizer: sentencepiece BPE plus Galactica markup.

Rules (Galactica paper, arXiv 2211.09085, §3.1), all enforced here and in the Hugging Face export:
- fixed ids: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then the 19 Galactica markers (ids 4-22, the
  released order: pretrain/tokenizer/vocab.py), each a single token wherever it appears in text;
- byte fallback: a character that is not a piece becomes its UTF-8 byte pieces, `<unk>` never appears;
- numbers: every digit is its own token (sentencepiece `split_digits`), "737612.62" -> 7,3,7,6,1,2,.,6,2;
- mathematics (the math rule, :data:`MATH_SPLIT_RE`): "we split ASCII operations into individual
  characters. Parentheses are treated like digits. The rest of the operations allow for unsplit
  repetitions. Operation characters are !"#$%&'*+,-./:;<=>?\\^_`| and parentheses are ()[]{}" (§3.1).
  So `(`, `)`, `[`, `]`, `{`, `}` are always single tokens, and a token holding an operation character
  holds nothing else: one of them, or a run of the same one ("--", "=="). The paper applies it to
  "mathematical content, with or without LaTeX": math without LaTeX has no delimiters to find it by,
  so the rule applies to all prose (everything outside the sequence spans below), not only to `$…$`;
- inside `[START_SMILES]`, `[START_I_SMILES]`, `[START_AMINO]` and `[START_DNA]` spans every character
  is its own token (the span content never reaches the BPE merges);
- exact round trip: identity normalization, no dummy prefix, whitespace kept, so
  `decode(encode(x)) == x` for any text.

The digit and math rules are rules of the vocabulary: no piece crosses their boundaries (sentencepiece's
`split_digits`, and its `pretokenization_delimiter` at training for the math rule; :meth:`GalacticaTokenizer.load`
checks it), so BPE cannot merge across them, here or in the exported tokenizer.json.

The four control strings `<s>`, `<pad>`, `</s>`, `<unk>` are not recognized in text (they are encoded
as plain characters); the data pipeline appends `eos_id` between documents itself.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from pretrain.config import ConfigError

from .escape import SPAN_RE
from .vocab import GALACTICA_TOKENS, MATH_OPERATIONS, MATH_PARENTHESES, MODEL_FILE, SPACE, SPECIAL_TOKENS

# The math rule (§3.1, quoted in the module docstring; its characters in vocab.py): a parenthesis alone, or a
# run of one operation character. Every match is a piece boundary on both sides.
MATH_SPLIT_RE = re.compile("[" + re.escape(MATH_PARENTHESES) + "]|([" + re.escape(MATH_OPERATIONS) + r"])\1*")
# Marks the math rule's boundaries in the training text: sentencepiece's `pretokenization_delimiter`, which
# no piece crosses and which is removed. A private-use character, taken out of the text beforehand.
_PRETOKENIZE = "\U0010FFFD"
# The Galactica markers hold brackets and underscores: they stay whole (user-defined symbols).
_TRAINING_SPLIT_RE = re.compile("|".join(re.escape(t) for t in GALACTICA_TOKENS) + "|" + MATH_SPLIT_RE.pattern)
_MARKERS = frozenset(GALACTICA_TOKENS)

# One pass finds everything that is not plain prose: a span (group 1: its kind, group 2: content),
# a Galactica marker, or a literal U+2581.
_MARKUP_RE = re.compile(
    SPAN_RE.pattern + "|" + "|".join(re.escape(t) for t in GALACTICA_TOKENS) + "|" + SPACE, re.DOTALL
)
# sentencepiece's training words (split_by_whitespace with whitespace-only pieces allowed): every
# piece lies inside one of them, so encoding word by word is exact.
_WORD_RE = re.compile(r"[^ ]+| +[^ ]*")
# Characters that are always single pieces (never byte-fallback): printable ASCII, tab and newline.
_REQUIRED_CHARS = "".join(chr(c) for c in range(0x21, 0x7F)) + "\t\n"


class GalacticaTokenizer:
    """A trained Galactica tokenizer. Create it with `train` or `load`.

    Its interface, shared with :class:`pretrain.tokenizer.from_hf.HFTokenizer` (gal-prepare and the
    probes take either, see :func:`pretrain.tokenizer.load_tokenizer`): `kind`, `file_name` (the file
    `sha256` hashes, written by `save`), `vocab_size`, `bos_id` / `pad_id` / `eos_id` / `unk_id`,
    `special_ids` (token -> id), `encode`, `encode_batch`, `decode`, `piece_to_id`.
    """

    kind, file_name = "sentencepiece", MODEL_FILE
    bos_id, pad_id, eos_id, unk_id = 0, 1, 2, 3
    special_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

    def __init__(self, model_proto: bytes, num_threads: int = 1, word_cache_size: int = 500_000):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto  # the bytes of tokenizer.model
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self.num_threads = num_threads  # threads for `encode_batch` (sentencepiece's C++ pool)
        self.vocab_size = self._sp.get_piece_size()
        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        if pieces[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ConfigError(f"not a Galactica tokenizer: ids 0-{len(SPECIAL_TOKENS) - 1} are "
                             f"{pieces[:len(SPECIAL_TOKENS)]}, expected {SPECIAL_TOKENS} (the released order; "
                             "a tokenizer trained before it cannot be used: re-prepare the shards)")
        crossing = [p for i, p in enumerate(pieces) if i >= len(SPECIAL_TOKENS) and not self._sp.is_byte(i)
                    and not _obeys_math_rule(p)]
        if crossing:
            raise ConfigError(f"not a Galactica tokenizer: pieces {crossing[:5]} cross the math rule's boundaries "
                              "(trained without it); re-prepare the shards to train a new one")
        self._byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._char_ids: dict[str, list[int]] = {}
        self._word_ids: dict[str, list[int]] = {}  # prose word -> ids, cleared past word_cache_size
        self.word_cache_size = word_cache_size
        # decode table: id -> bytes (byte pieces are raw bytes, U+2581 is a space, markers are text)
        self._id_bytes = [p.replace(SPACE, " ").encode() for p in pieces]
        for b, i in enumerate(self._byte_ids):
            self._id_bytes[i] = bytes([b])

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | Path, num_threads: int = 1) -> GalacticaTokenizer:
        """Load from a directory holding tokenizer.model, or from the .model file itself."""
        path = Path(path)
        model_file = path / MODEL_FILE if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(f"no tokenizer model at {model_file}")
        try:
            return cls(model_file.read_bytes(), num_threads=num_threads)
        except (ConfigError, RuntimeError) as e:  # RuntimeError: sentencepiece cannot parse the file
            raise ConfigError(f"{model_file}: {e}") from None

    @classmethod
    def train(cls, texts: Iterable[str], out_dir: str | Path, vocab_size: int = 50000, *,
              seed: int = 0, max_sentences: int = 1_000_000, max_sentence_bytes: int = 4096,
              num_threads: int = 2, progress: bool = True) -> GalacticaTokenizer:
        """Train on `texts` (documents already in Galactica markup); write out_dir/tokenizer.model.

        The rarest characters (beyond 99.99 % character coverage) are left to byte fallback. Span
        contents (SMILES, amino acids, DNA) are left out of training: they are encoded character
        by character, so only their characters are made pieces. Documents are cut at line breaks
        into chunks of at most `max_sentence_bytes` UTF-8 bytes (sentencepiece drops longer
        sentences). At most `max_sentences` chunks are kept, a uniform reservoir sample seeded by
        `seed`, which bounds memory; the result is a deterministic function of (texts, options).
        The math rule's boundaries are marked in the chunks for sentencepiece, which then learns no
        piece across them (see the module docstring).
        """
        rng = random.Random(seed)
        chunks: list[str] = []
        span_chars: set[str] = set()
        seen = 0

        def strip_span(m: re.Match) -> str:
            span_chars.update(m.group(2))
            return f"[START_{m.group(1)}][END_{m.group(1)}]"

        for text in tqdm(texts, desc="tokenizer sample", unit=" docs", disable=not progress):
            text = SPAN_RE.sub(strip_span, text).replace(SPACE, " ")
            for chunk in _chunks(text, max_sentence_bytes):
                seen += 1
                if len(chunks) < max_sentences:
                    chunks.append(chunk)
                elif (j := rng.randrange(seen)) < max_sentences:
                    chunks[j] = chunk
        if not chunks:
            raise ValueError("cannot train a tokenizer on no text")
        required = "".join(sorted(set(_REQUIRED_CHARS) | (span_chars - {" ", SPACE})))
        spm.set_random_generator_seed(seed)
        model = io.BytesIO()
        chunks = [_TRAINING_SPLIT_RE.sub(_delimit, c.replace(_PRETOKENIZE, "")) for c in chunks]
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(chunks), model_writer=model, model_type="bpe",
                vocab_size=vocab_size, character_coverage=0.9999, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", add_dummy_prefix=False,
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                bos_id=0, pad_id=1, eos_id=2, unk_id=3,
                bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                user_defined_symbols=GALACTICA_TOKENS, required_chars=required, pretokenization_delimiter=_PRETOKENIZE,
                input_sentence_size=0, shuffle_input_sentence=False,
                # a chunk grows by the delimiters around its math characters (4 UTF-8 bytes each)
                max_sentence_length=9 * max_sentence_bytes, train_extremely_large_corpus=False,
                num_threads=num_threads, minloglevel=0 if progress else 2,
            )
        except RuntimeError as e:
            raise ConfigError(f"tokenizer.vocab_size={vocab_size}: sentencepiece training failed on "
                              f"{len(chunks)} training chunks ({e}); a smaller vocabulary or more text") from e
        tok = cls(model.getvalue())
        tok.save(out_dir)
        return tok

    def save(self, out_dir: str | Path) -> Path:
        """Write out_dir/tokenizer.model (the file `sha256` hashes); returns its path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MODEL_FILE).write_bytes(self.model_proto)
        return out_dir / MODEL_FILE

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text.

        Prose is cut into sentencepiece's own training words (` *[^ ]*`: no piece crosses their
        boundaries, so BPE per word gives exactly sentencepiece's ids for the whole string); words
        are looked up in a cache, and the unseen ones go to sentencepiece in one C++ call.
        """
        prose: list[str] = []
        plans = [self._plan(text, prose) for text in texts]
        words_of = [_WORD_RE.findall(p) for p in prose]
        cache = self._word_ids
        if len(cache) > self.word_cache_size:
            cache.clear()
        unseen = list({w for words in words_of for w in words if w not in cache})
        if unseen:
            cache.update(zip(unseen, self._sp.encode(unseen, num_threads=self.num_threads)))
        out = []
        for plan in plans:
            ids: list[int] = []
            for item in plan:
                if type(item) is int:
                    for w in words_of[item]:
                        ids += cache[w]
                else:
                    ids += item
            out.append(ids)
        return out

    def _plan(self, text: str, prose: list[str]) -> list:
        """Split text into prose (an index into `prose`) and ready id lists (markers, spans)."""
        plan: list = []
        pos = 0
        for m in _MARKUP_RE.finditer(text):
            start = m.start()
            if start > pos:
                plan.append(len(prose))
                prose.append(text[pos:start])
            kind = m.group(1)
            if kind:  # a span: markers + one token per character
                ids = [self.special_ids[f"[START_{kind}]"]]
                char_ids = self._char_ids
                for c in m.group(2):
                    ids += char_ids.get(c) or self._char_to_ids(c)
                ids.append(self.special_ids[f"[END_{kind}]"])
                plan.append(ids)
            elif m.group(0) == SPACE:
                plan.append([self._byte_ids[b] for b in SPACE.encode()])
            else:
                plan.append([self.special_ids[m.group(0)]])
            pos = m.end()
        if pos < len(text):
            plan.append(len(prose))
            prose.append(text[pos:])
        return plan

    def _char_to_ids(self, c: str) -> list[int]:
        """One character inside a span: its piece, else its UTF-8 byte pieces (cached)."""
        i = self._sp.piece_to_id(SPACE if c == " " else c)
        ids = [i] if i != self.unk_id and c != SPACE else [self._byte_ids[b] for b in c.encode()]
        self._char_ids[c] = ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; every special token is rendered as its own text (e.g. `</s>`)."""
        table = self._id_bytes
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def export_hf(self, out_dir: str | Path) -> Path:
        """Write a Hugging Face tokenizer folder (see pretrain.tokenizer.hf)."""
        from .hf import export_hf

        return export_hf(self, out_dir)

    def __reduce__(self):  # picklable for multiprocessing workers: rebuilt from the model bytes
        return type(self), (self.model_proto, self.num_threads, self.word_cache_size)

    def __repr__(self) -> str:
        return f"GalacticaTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def _delimit(m: re.Match) -> str:
    """A math-rule match between two boundaries; a Galactica marker as it is."""
    return m.group(0) if m.group(0) in _MARKERS else f"{_PRETOKENIZE}{m.group(0)}{_PRETOKENIZE}"


def _obeys_math_rule(piece: str) -> bool:
    """No math-rule boundary inside the piece: it holds no parenthesis or operation character, or is
    exactly one parenthesis or one run of one operation character."""
    text = piece.replace(SPACE, " ")
    return MATH_SPLIT_RE.search(text) is None or MATH_SPLIT_RE.fullmatch(text) is not None


def _chunks(text: str, max_bytes: int) -> Iterable[str]:
    """Cut text at line breaks (kept) into chunks of at most max_bytes UTF-8 bytes."""
    if len(text.encode()) <= max_bytes:
        if text:
            yield text
        return
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        if n > max_bytes:  # a single over-long line: hard cuts (characters, at most max_bytes / 4)
            step = max_bytes // 4
            for i in range(0, len(line), step):
                yield line[i:i + step]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)
