"""The vocabulary's fixed part: the special tokens at fixed ids, and the file and symbol names the
sentencepiece model and its Hugging Face export share. A leaf: imports nothing of the package.

Ids 0-3 are the control tokens, as in the released Galactica (bos 0, pad 1, eos 2, unk 3); the
paper's markup tokens (arXiv 2211.09085, §3.1) follow from id 4.
"""
CONTROL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
GALACTICA_TOKENS = [
    "[START_REF]", "[END_REF]", "<work>", "</work>",
    "[START_SMILES]", "[END_SMILES]", "[START_I_SMILES]", "[END_I_SMILES]",
    "[START_AMINO]", "[END_AMINO]", "[START_DNA]", "[END_DNA]",
    "[START_SUP]", "[END_SUP]", "[START_SUB]", "[END_SUB]",
]
SPECIAL_TOKENS = CONTROL_TOKENS + GALACTICA_TOKENS  # index == token id
MODEL_FILE = "tokenizer.model"
SPACE = "\u2581"  # sentencepiece's whitespace symbol; a literal one in text is byte-encoded
