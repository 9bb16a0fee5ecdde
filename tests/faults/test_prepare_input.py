"""Bad input: each kind raises an error naming file and line (on_error=raise), or is skipped and counted."""
from __future__ import annotations

import gzip
import io
import json
import zlib

import pytest
import zstandard

from helpers import make_cfg, run_cli, write_jsonl

from pretrain.config import ConfigError
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
    "invalid_field": json.dumps({"id": "f1", "source": "docstrings", "text": ["a", "JSON", "list"]}).encode() + b"\n",
    "invalid_unicode": b'{"id": "x1", "source": "docstrings", "text": "bad \\ud800 here"}\n',  # a lone surrogate
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
    assert m["errors"] == {"empty_document": 1, "invalid_field": 1, "invalid_json": 2, "invalid_unicode": 1,
                           "line_too_long": 1, "missing_field": 1, "non_utf8": 2, "unknown_source": 1}
    assert m["input"]["lines"] == len(lines) + 2
    assert m["totals"]["train"]["documents"] + m["totals"]["valid"]["documents"] == 21


# ----------------------------------------------------------------------------- truncated compressed files
def _compress(kind: str, raw: bytes) -> bytes:
    """gzip, or zstd in many blocks (as a streaming writer makes them), so that a cut keeps some lines."""
    if kind == "gz":
        return gzip.compress(raw)
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as w:
        for i in range(0, len(raw), 4096):
            w.write(raw[i:i + 4096])
            w.flush(zstandard.FLUSH_BLOCK)
    return out.getvalue()


def _lines_before_cut(kind: str, data: bytes) -> int:
    """The complete lines a truncated file's readable part holds (decompressed independently)."""
    d = zlib.decompressobj(31) if kind == "gz" else zstandard.ZstdDecompressor().decompressobj()
    return d.decompress(data).count(b"\n")


def _truncated(tmp_path, kind: str, docs: list) -> tuple:
    """A .jsonl.gz / .jsonl.zst of `docs` cut to its first 60% of bytes; its path and lines before the cut."""
    data = _compress(kind, b"".join(json.dumps(d).encode() + b"\n" for d in docs))
    data = data[:len(data) * 6 // 10]
    path = tmp_path / f"cut.jsonl.{kind}"
    path.write_bytes(data)
    return path, _lines_before_cut(kind, data)


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_file_raises_naming_file_and_line(tmp_path, good, kind):
    path, before = _truncated(tmp_path, kind, good[:30])
    assert 0 < before < 30
    with pytest.raises(BadInput) as e:
        prepare(make_cfg(f"input={path}", f"output={tmp_path}/out"), progress=False)
    assert (e.value.path, e.value.line, e.value.reason) == (str(path), before + 1, "truncated")
    assert str(e.value).startswith(f"{path}:{before + 1}: ") and "complete copy" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_truncated_files_skipped_keeping_the_lines_before_the_cut(tmp_path, good, tokenizer_path):
    gz, gz_before = _truncated(tmp_path, "gz", good[:15])
    (tmp_path / "zst").mkdir()
    zst, zst_before = _truncated(tmp_path / "zst", "zst", good[15:30])
    rest = write_jsonl(tmp_path / "rest.jsonl", good[30:40])
    m = prepare(make_cfg(f"input=[{gz},{zst},{rest}]", f"output={tmp_path}/out", "on_error=skip",
                         f"tokenizer.path={tokenizer_path}", "shards.seq_len=127", "dedup.near=false"), progress=False)
    assert m["errors"] == {"truncated": 2}
    assert m["totals"]["train"]["documents"] + m["totals"]["valid"]["documents"] == gz_before + zst_before + 10
    assert m["bad_lines"] == [{"file": str(gz), "line": gz_before + 1, "reason": "truncated"},
                              {"file": str(zst), "line": zst_before + 1, "reason": "truncated"}]


# ----------------------------------------------------------------------------- field types and Unicode
INVALID_FIELDS = [  # (fields of a record, the message)
    ({"text": {"a": "JSON object"}}, "field 'text' is a JSON object, not a string"),
    ({"text": 42}, "field 'text' is a JSON number, not a string"),
    ({"text": "fine", "title": ["a", "list"]}, "field 'title' is a JSON array, not a string"),
    ({"source": "molecules", "smiles": ["CCO"]}, "field 'smiles' is a JSON array, not a string"),
    ({"source": "proteins", "sequence": True}, "field 'sequence' is a JSON boolean, not a string"),
    ({"source": "molecules", "smiles": "CCO", "properties": {"mw": [46.07]}},
     "field 'properties': property 'mw' is a JSON array, not a string or number"),
]


@pytest.mark.parametrize("record, message", INVALID_FIELDS)
def test_non_string_field_is_an_invalid_field(tmp_path, good, record, message):
    path = write_jsonl(tmp_path / "in.jsonl", good[:2] + [{"id": "t1", "source": "docstrings", **record}])
    with pytest.raises(BadInput) as e:
        prepare(make_cfg(f"input={path}", f"output={tmp_path}/out"), progress=False)
    assert str(e.value).startswith(f"{path}:3: document 't1': {message} (invalid_field;")


def test_invalid_fields_skipped_and_numeric_properties_kept(tmp_path, good, tokenizer_path):
    bad = [{"id": f"t{k}", "source": "docstrings", **record} for k, (record, _) in enumerate(INVALID_FIELDS)]
    mol = {"id": "m1", "source": "molecules", "name": "ethanol", "smiles": "CCO",
           "properties": {"molecular weight": 46.07, "heavy atoms": 3, "aromatic": False}}
    path = write_jsonl(tmp_path / "in.jsonl", good[:20] + bad + [mol])
    m = prepare(make_cfg(f"input={path}", f"output={tmp_path}/out", "on_error=skip", f"tokenizer.path={tokenizer_path}",
                         "shards.seq_len=127", "split.valid_fraction=0"), progress=False)
    assert m["errors"] == {"invalid_field": len(INVALID_FIELDS)}
    assert m["sources"]["molecules"]["train"]["documents"] == 1


def test_lone_surrogate_names_the_character_position(tmp_path, good, tokenizer_path):
    path = write_jsonl(tmp_path / "in.jsonl", good[:3] + [BAD_LINES["invalid_unicode"]])
    with pytest.raises(BadInput, match=r"lone surrogate U\+D800 at character 4 of field 'text'") as e:
        prepare(make_cfg(f"input={path}", f"output={tmp_path}/out"), progress=False)
    assert (e.value.path, e.value.line, e.value.reason) == (str(path), 4, "invalid_unicode")
    # a valid surrogate pair (an escaped emoji) is fine
    path = write_jsonl(tmp_path / "ok.jsonl", [b'{"id": "e1", "source": "docstrings", "text": "a smile \\ud83d\\ude00 '
                                                b'in an otherwise long enough document"}\n'] + good[:20])
    m = prepare(make_cfg(f"input={path}", f"output={tmp_path}/out", f"tokenizer.path={tokenizer_path}",
                         "shards.seq_len=127"), progress=False)
    assert m["errors"] == {}


# ----------------------------------------------------------------------------- nothing left to train on
@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank"])
def test_empty_input_is_a_config_error(tmp_path, tokenizer_path, content):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"^input: no training documents left .* 0 lines read") as e:
        prepare(make_cfg(f"input={path}", f"output={tmp_path}/out", f"tokenizer.path={tokenizer_path}"), progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_all_documents_bad_or_dropped_is_a_config_error_through_the_cli(tmp_path, tokenizer_path):
    short = {"id": "s", "source": "docstrings", "text": "too short"}
    path = write_jsonl(tmp_path / "in.jsonl", [BAD_LINES["invalid_json"], short, BAD_LINES["unknown_source"]])
    proc = run_cli(f"input={path}", f"output={tmp_path}/out", "on_error=skip", f"tokenizer.path={tokenizer_path}",
                   check=False)
    assert proc.returncode != 0
    line = [x for x in proc.stderr.splitlines() if "no training documents left" in x]
    assert line and "3 lines read" in line[0] and "invalid_json 1, unknown_source 1" in line[0]
    assert "too_short 1" in line[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# ----------------------------------------------------------------------------- where skipped lines came from
def test_skipped_bad_lines_are_recorded_with_file_and_line(tmp_path, good, tokenizer_path):
    a = write_jsonl(tmp_path / "a.jsonl", good[:10] + [BAD_LINES["invalid_json"]] + good[10:20])
    b = write_jsonl(tmp_path / "b.jsonl", [BAD_LINES["missing_field"], BAD_LINES["invalid_json"]] + good[20:25])
    m = prepare(make_cfg(f"input=[{a},{b}]", f"output={tmp_path}/out", "on_error=skip",
                         f"tokenizer.path={tokenizer_path}", "shards.seq_len=127"), progress=False)
    assert m["errors_by_file"] == {str(a): {"invalid_json": 1}, str(b): {"invalid_json": 1, "missing_field": 1}}
    assert m["bad_lines"] == [{"file": str(a), "line": 11, "reason": "invalid_json"},
                              {"file": str(b), "line": 1, "reason": "missing_field"},
                              {"file": str(b), "line": 2, "reason": "invalid_json"}]
