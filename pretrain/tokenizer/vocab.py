"""The vocabulary's fixed part: the special tokens at fixed ids, and the file and symbol names the
sentencepiece model and its Hugging Face export share. A leaf: imports nothing of the package.

Ids 0-22 are the released Galactica's special tokens, in the released order (`added_tokens` of the
facebook/galactica-* `tokenizer.json`; the same list, ids 0-22, is the `added_tokens_decoder` of every
tokenizer_config.json transformers writes for those checkpoints, e.g. BAAI/OPI-Galactica-6.7B and
RichardErkhov/facebook_-_galactica-125m-8bits, and the special-token list of facebook/nougat, which
reuses Galactica's tokenizer). galai (paperswithcode/galai, galai/model.py `_set_tokenizer`) sets
bos 0, pad 1, eos 2, unk 3; its example notebook describes the markers: `[IMAGE]` an image removed
from the text, `<fragments>` the FragmentedGlass dataset, `[START_SUP]`… digits protected from NFKC.
Our own tokenizer uses the same ids, so its shards and exports line up with released checkpoints.
"""
CONTROL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
GALACTICA_TOKENS = [
    "[START_REF]", "[END_REF]", "[IMAGE]", "<fragments>", "</fragments>", "<work>", "</work>",
    "[START_SUP]", "[END_SUP]", "[START_SUB]", "[END_SUB]",
    "[START_DNA]", "[END_DNA]", "[START_AMINO]", "[END_AMINO]",
    "[START_SMILES]", "[END_SMILES]", "[START_I_SMILES]", "[END_I_SMILES]",
]
SPECIAL_TOKENS = CONTROL_TOKENS + GALACTICA_TOKENS  # index == token id (0-22)
BOS, PAD, EOS, UNK = CONTROL_TOKENS
# The special tokens gal-prepare writes or keeps in documents (eos between documents, pad at the end of a
# split, the markers of pretrain/data/markup.py and clean.py, <work> from the input): a tokenizer used for
# preparing data must have each of them as one token. [IMAGE] and <fragments> never come from gal-prepare.
PIPELINE_TOKENS = [EOS, PAD] + [t for t in GALACTICA_TOKENS if t not in ("[IMAGE]", "<fragments>", "</fragments>")]
MODEL_FILE = "tokenizer.model"  # our sentencepiece model
HF_FILE = "tokenizer.json"  # a Hugging Face `tokenizers` file
SPACE = "\u2581"  # sentencepiece's whitespace symbol; a literal one in text is byte-encoded

# The math rule's characters (Galactica paper §3.1): ASCII operations, each split into single characters
# (a run of one may stay whole), and parentheses, treated like digits. The paper prints the quote
# characters as typographic ’ and ‘: the ASCII ' and ` are meant, as the list is of ASCII operations.
MATH_OPERATIONS = "!\"#$%&'*+,-./:;<=>?\\^_`|"
MATH_PARENTHESES = "()[]{}"
