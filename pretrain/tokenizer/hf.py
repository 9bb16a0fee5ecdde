"""Export a GalacticaTokenizer as a Hugging Face tokenizer folder.

Layout of the folder:
    tokenizer.json           `tokenizers` BPE with byte fallback, the same vocabulary and ids
    tokenizer_config.json    loads with transformers.AutoTokenizer (no bos/eos added on encode)
    special_tokens_map.json  <s> <pad> </s> <unk>
    tokenizer.model          the sentencepiece model (for GalacticaTokenizer.load)
    escape_spans.py          the span escape function (see below)
    README.md                how to use it

The `tokenizers` pipeline reproduces sentencepiece exactly on prose: normalizer " " -> "▁" (no
prefix), the Galactica markers as added tokens at the released ids (4-22, pretrain/tokenizer/vocab.py),
a pre-tokenizer that removes the span split marker and splits digits, then BPE whose merges are
ranked by sentencepiece piece scores. The math rule needs no pre-tokenizer of its own: no piece of the
vocabulary crosses its boundaries (pretrain/tokenizer/tokenizer.py), so no merge can. A plain Hugging
Face tokenizer cannot know it is inside a SMILES / amino-acid / DNA span, so span text must be passed
through `escape_spans` first (as with Galactica's released tokenizer).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from . import escape
from .vocab import CONTROL_TOKENS, GALACTICA_TOKENS, HF_FILE, MATH_OPERATIONS, MODEL_FILE, SPACE, SPECIAL_TOKENS

_README = """# Galactica tokenizer (Hugging Face export)

Exported by galactica-pretrain from `tokenizer.model` (sha256 `{sha}`), vocabulary {vocab} tokens.
Ids: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 (never produced: byte fallback), then the Galactica
markers {markers} (ids 4-{last}, the order of the released Galactica). Every digit is its own token, and
so is every parenthesis; a token with one of the operation characters `` {operations} `` holds only a run
of that one character (the math rule of the Galactica paper, §3.1). No bos/eos is added on encode.

```python
from transformers import AutoTokenizer
from escape_spans import escape_spans   # escape_spans.py in this folder

tok = AutoTokenizer.from_pretrained("{{this folder}}")
ids = tok(escape_spans("Glycine is [START_I_SMILES]C(C(=O)O)N[END_I_SMILES].")) ["input_ids"]
```

Inside `[START_SMILES]`, `[START_I_SMILES]`, `[START_AMINO]` and `[START_DNA]` spans every character
is one token. `escape_spans(text)` inserts the split marker `{marker}` before each span character
and before the span's end marker (as galai does), and the `Split` pre-tokenizer in tokenizer.json
removes it; without escaping, span text is tokenized like prose. With escaping, the ids equal
`GalacticaTokenizer.encode(text)`. Known differences: a literal U+2581 (▁) in text is byte-encoded by
GalacticaTokenizer but read as a space here; `tokenizers` itself (not transformers, which this folder
configures with `split_special_tokens`) reads "</s>" in text as the eos token.
"""


def bpe_merges(proto: spm_pb2.ModelProto, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges in sentencepiece's order: merged pieces by descending score, every split of each."""
    merges = []
    normal = [(p.score, i, p.piece) for i, p in enumerate(proto.pieces)
              if p.type == spm_pb2.ModelProto.SentencePiece.NORMAL and len(p.piece) > 1]
    for _, _, piece in sorted(normal, key=lambda t: (-t[0], t[1])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [s for s in splits if s[0] in vocab and s[1] in vocab]
        merges += sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))
    return merges


def build_hf_tokenizer(model_proto: bytes) -> Tokenizer:
    """A `tokenizers.Tokenizer` that gives the sentencepiece model's ids."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(proto, vocab), byte_fallback=True,
                               unk_token="<unk>", fuse_unk=False))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(escape.SPLIT_MARKER, behavior="removed"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in GALACTICA_TOKENS])
    return tok


def export_hf(tokenizer, out_dir: str | Path) -> Path:
    """Write the folder described in this module's docstring; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_hf_tokenizer(tokenizer.model_proto).save(str(out / HF_FILE))
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # "<s>" or "</s>" in text is text, as in GalacticaTokenizer
        "model_max_length": 2048,
        "galactica_pretrain": {"sha256": tokenizer.sha256, "split_marker": escape.SPLIT_MARKER},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / MODEL_FILE).write_bytes(tokenizer.model_proto)
    shutil.copyfile(escape.__file__, out / "escape_spans.py")
    (out / "README.md").write_text(_README.format(
        sha=tokenizer.sha256, vocab=tokenizer.vocab_size, marker=escape.SPLIT_MARKER, last=len(SPECIAL_TOKENS) - 1,
        markers=" ".join(f"`{t}`" for t in GALACTICA_TOKENS), operations=MATH_OPERATIONS))
    return out
