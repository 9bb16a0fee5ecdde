"""Bad input: each kind raises an error naming file and line (on_error=raise), or is skipped and counted."""
from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from helpers import make_cfg, run_cli, write_jsonl

from pretrain.data.pipeline import builtin_sample_files, prepare
from pretrain.data.read import BadInput
from pretrain.tokenizer import GalacticaTokenizer

BAD_LINES = {  # reason → the bad line
    "invalid_json": b'{"id": "j1", "source": "docstrings", "text": "an unterminated object"\n',
    "missing_field": json.dumps({"id": "m1", "source": "docstrings", "title": "no text field"}).encode() + b"\n",
    "non_utf8": b'{"id": "u1", "source": "docstrings", "text": "caf\xe9 au lait, a Latin-1 byte"}\n',
    "empty_document": json.dumps({"id": "e1", "source": "docstrings", "text": " \n\t "}).encode() + b"\n",
    "line_too_long": json.dumps({"id": "big", "source": "docstrings", "text": "x" * 10_000_000}).encode() + b"\n",
    "unknown_source": json.dumps({"id": "s1", "source": "patents", "text": "a source without a template"}).encode() + b"\n",
}


@pytest.fixture(scope="module")
def good():
    path = [f for f in builtin_sample_files() if f.name.startswith("docstrings")][0]
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for _, line in zip(range(40), f)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, good):
    out = tmp_path_factory.mktemp("tok")
    GalacticaTokenizer.train((d["text"] for d in good), out, vocab_size=500, progress=False)
    return out / "tokenizer.model"


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_raises_naming_file_and_line(tmp_path, good, reason):
    path = write_jsonl(tmp_path / "in.jsonl", good[:6] + [BAD_LINES[reason]] + good[6:10])
    with pytest.raises(BadInput) as e:
        prepare(make_cfg(f"input={path}", f"output={tmp_path}/out"), progress=False)
    assert str(e.value).startswith(f"{path}:7: ") and f"({reason};" in str(e.value)
    assert (e.value.path, e.value.line, e.value.reason) == (str(path), 7, reason)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


def test_bad_line_in_compressed_input_through_the_cli(tmp_path, good):
    raw = b"".join(json.dumps(d).encode() + b"\n" for d in good[:3]) + BAD_LINES["unknown_source"]
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    proc = run_cli(f"input={path}", f"output={tmp_path}/out", check=False)
    assert proc.returncode == 2
    assert f"{path}:4: source 'patents' has no template in the corpus config" in proc.stderr


def test_skip_counts_every_bad_line(tmp_path, good, tokenizer_path):
    lines = list(good[:20])
    for k, reason in enumerate(sorted(BAD_LINES)):
        lines.insert(3 * k + 1, BAD_LINES[reason])
    lines.append(BAD_LINES["invalid_json"])
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    gz = tmp_path / "more.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(BAD_LINES["non_utf8"] + json.dumps(dict(good[20], id="gz1")).encode() + b"\n")
    m = prepare(make_cfg(f"input=[{path},{gz}]", f"output={tmp_path}/out", "on_error=skip",
                         f"tokenizer.path={tokenizer_path}", "shards.seq_len=127", "dedup.near=false"), progress=False)
    assert m["errors"] == {"empty_document": 1, "invalid_json": 2, "line_too_long": 1, "missing_field": 1,
                           "non_utf8": 2, "unknown_source": 1}
    assert m["input"]["lines"] == len(lines) + 2
    assert m["totals"]["train"]["documents"] + m["totals"]["valid"]["documents"] == 21
