"""An existing Hugging Face tokenizer (a folder with `tokenizer.json`), used as it is: the tokenizer of a
released Galactica (facebook/galactica-*: byte-level BPE, 50,000 tokens) or of any checkpoint one
continues to train. `gal-prepare tokenizer.from_hf=<folder>` prepares shards with it; nothing is trained.

Encoding follows galai (paperswithcode/galai, galai/model.py): the text, already in Galactica markup,
is escaped with `escape_spans` (galai's `escape_custom_split_sequence`: the split marker around every
character of a SMILES / amino-acid / DNA span), then encoded with the tokenizer, no special tokens
added (gal-prepare appends eos between documents itself). The special ids are the tokenizer's own
(`token_to_id`), never assumed; :meth:`HFTokenizer.load` refuses a tokenizer without one of the tokens
gal-prepare writes (vocab.PIPELINE_TOKENS) as a single token, or whose pre-tokenizer does not remove
the split marker (spans would not be one token per character).

Unlike GalacticaTokenizer, a control string in the text ("</s>", "<pad>") is read as that token, as the
`tokenizers` library and galai read it; corpus text rarely holds one.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from pretrain.config import ConfigError

from .escape import SPLIT_MARKER, escape_spans
from .vocab import BOS, EOS, HF_FILE, PAD, PIPELINE_TOKENS, SPECIAL_TOKENS, UNK

# Copied beside tokenizer.json when present, so that the copy loads with transformers.AutoTokenizer too.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_SPAN_PROBE = "[START_DNA]ACGT[END_DNA]"  # must become [START_DNA] A C G T [END_DNA]: six tokens


class HFTokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json with the interface of GalacticaTokenizer."""

    kind, file_name = "hf", HF_FILE

    def __init__(self, json_bytes: bytes, source: str = "tokenizer.json"):
        self.json_bytes = json_bytes
        self.source = source  # where it was loaded from, for messages
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        try:
            self._tok = Tokenizer.from_str(json_bytes.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise ConfigError(f"{source}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # every special token it has (the released ones are all there), by the tokenizer's own ids
        self.special_ids = {t: i for t in SPECIAL_TOKENS if (i := self._tok.token_to_id(t)) is not None}
        self._check()
        self.bos_id, self.unk_id = self.special_ids.get(BOS), self.special_ids.get(UNK)
        self.pad_id, self.eos_id = self.special_ids[PAD], self.special_ids[EOS]

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """From a folder holding tokenizer.json (a downloaded facebook/galactica-1.3b, say) or the file."""
        path = Path(path).expanduser()
        file = path / HF_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{path}: no {HF_FILE} there; give a Hugging Face tokenizer folder "
                              "(e.g. a downloaded facebook/galactica-1.3b)")
        return cls(file.read_bytes(), source=str(file))

    def _check(self) -> None:
        """The tokens gal-prepare writes must each be one token; the split marker must be removed."""
        single = {t for t, i in self.special_ids.items() if self._tok.encode(t, add_special_tokens=False).ids == [i]}
        missing = [t for t in PIPELINE_TOKENS if t not in single]
        if missing:
            raise ConfigError(f"{self.source} lacks {', '.join(missing)} as single tokens (needed by gal-prepare's "
                              "markup); use a Galactica tokenizer, or add them as added tokens")
        too_big = [t for t, i in self.special_ids.items() if i >= self.vocab_size]
        if too_big:
            raise ConfigError(f"{self.source}: ids of {', '.join(too_big)} are beyond its vocabulary of "
                              f"{self.vocab_size}")
        if len(self.encode(_SPAN_PROBE)) != 6:
            raise ConfigError(f"{self.source}: its pre-tokenizer does not remove galai's split marker, so SMILES / "
                              "amino-acid / DNA spans would not be one token per character; it needs "
                              f"Split({SPLIT_MARKER!r}, behavior='removed') first, as the released Galactica's has")

    # ---------------------------------------------------------------- the shared interface
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, spans escaped as galai does (no bos/eos added)."""
        return self._tok.encode(escape_spans(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch([escape_spans(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens included as text."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def save(self, out_dir: str | Path) -> Path:
        """Write out_dir/tokenizer.json (the exact bytes `sha256` hashes) and, when they were beside the
        loaded file, its tokenizer_config.json and special_tokens_map.json; returns tokenizer.json's path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / HF_FILE).write_bytes(self.json_bytes)
        folder = Path(self.source).parent
        for name in COMPANION_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out_dir / name)
        return out_dir / HF_FILE

    def export_hf(self, out_dir: str | Path) -> Path:
        """The Hugging Face tokenizer folder (as GalacticaTokenizer.export_hf): the file as it is, with its
        companions; returns out_dir."""
        self.save(out_dir)
        return Path(out_dir)

    def __reduce__(self):  # picklable: rebuilt from the file's bytes
        return type(self), (self.json_bytes, self.source)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
