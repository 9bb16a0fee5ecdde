"""Packed token samples in webdataset `.tar` shards, with an index for O(1) random access.

On disk, one directory per split and source (`train/<source>/`, `valid/<source>/`):
  shard-000000.tar …  webdataset shards; sample i is the members `{i:09d}.meta.json` and
                      `{i:09d}.tokens.npy` (a 1-D array of `sample_len` tokens, uint16 or uint32)
  index.npy           one record per sample: shard number, byte offset of the token data inside
                      that tar (past the .npy header), byte offset and size of the meta JSON, and the
                      CRC-32 of the token bytes (checked on every read)
  index.json          dtype, sample_len, num_samples, token_bytes and the shards (name, samples,
                      bytes, sha256)
Meta of a sample: {"doc_ids": [...], "sources": [...], "doc_starts": [...], "pad_tokens": n}: the
documents whose tokens it holds, in order, and where each one's piece starts in the sample (0 for
a document continued from the previous sample). Only the last sample of a split has padding.

`ShardReader(dir)[i]` reads sample i with one `os.pread` (files opened lazily per process, so it is
safe to use after fork and from threads); `ShardReader.webdataset()` streams the same samples
sequentially through `webdataset.WebDataset`. What is cheap is verified: at open, that every shard has
the size index.json records; on every read, the sample's CRC-32 (a flipped bit, or an index off by a
byte, is an error naming shard and sample) and, given the vocabulary, that its ids are below it.
`gal-verify DATA_PATH` checks every shard's sha256 (pretrain/verify.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    import webdataset

INDEX_DTYPE = np.dtype([("shard", "<u4"), ("tokens_offset", "<u8"), ("meta_offset", "<u8"), ("meta_size", "<u4"),
                        ("crc32", "<u4")])
MANIFEST = "manifest.json"  # a shard set's description: vocabulary, tokenizer, sources, probes (gal-prepare)


def read_manifest(data_path: str | Path) -> dict[str, Any]:
    """The manifest of a gal-prepare output directory; a missing one is a ConfigError naming data.path."""
    from pretrain.config import ConfigError

    path = Path(data_path) / MANIFEST
    if not path.exists():
        raise ConfigError(f"data.path={data_path}: no {MANIFEST} there; prepare shards with gal-prepare")
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(f"{path}: not valid JSON ({e})") from None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def data_identity(data_path: str | Path, manifest: dict[str, Any]) -> str:
    """What the training data *is*, not where it lies: a digest of the training shards' sha256s (their
    index.json files), the vocabulary and the tokenizer's hash. Moving or copying the shards keeps it."""
    train = TrainSplit(data_path)
    shards = [(name, s["samples"], s["sha256"]) for name, r in train.readers.items() for s in r.info["shards"]]
    ident = {"shards": shards, "vocab_size": manifest.get("vocab_size"),
             "pad_id": manifest.get("pad_id"), "tokenizer": manifest.get("tokenizer", {}).get("sha256")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class ShardWriter:
    """Writes samples of `sample_len` tokens into numbered shards, then the index (on close)."""

    def __init__(self, directory: str | Path, sample_len: int, dtype: np.dtype, samples_per_shard: int = 8192):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sample_len, self.dtype, self.samples_per_shard = sample_len, np.dtype(dtype), samples_per_shard
        self.num_samples = 0
        self.shards: list[dict[str, Any]] = []
        self.index: list[np.ndarray] = []
        self._tar: webdataset.TarWriter | None = None
        self._in_shard = 0
        self._crcs: list[int] = []

    def write(self, tokens: np.ndarray, meta: dict[str, Any]) -> None:
        if tokens.shape != (self.sample_len,):
            raise ValueError(f"sample {self.num_samples}: expected {self.sample_len} tokens, got {tokens.shape}")
        if self._tar is None:
            import webdataset  # here, not at the top: it imports torch (1 s, 220 MB), which the other
            # gal-prepare stages do not need
            name = f"shard-{len(self.shards):06d}.tar"
            self.shards.append({"name": name, "samples": 0})
            self._tar = webdataset.TarWriter(str(self.dir / name), mtime=0, user="gal", group="gal", mode=0o444)
        data = np.ascontiguousarray(tokens.astype(self.dtype, copy=False))
        self._tar.write({"__key__": f"{self.num_samples:09d}", "tokens.npy": data,
                         "meta.json": json.dumps(meta, separators=(",", ":"))})
        self._crcs.append(zlib.crc32(data.tobytes()))
        self.num_samples += 1
        self._in_shard += 1
        self.shards[-1]["samples"] += 1
        if self._in_shard == self.samples_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._tar.close()
        self._tar, self._in_shard = None, 0
        number, shard = len(self.shards) - 1, self.shards[-1]
        path = self.dir / shard["name"]
        token_bytes = self.sample_len * self.dtype.itemsize
        rows = np.zeros(shard["samples"], INDEX_DTYPE)
        first = self.num_samples - shard["samples"]
        with tarfile.open(path) as tar:  # read back the member offsets (headers only)
            for member in tar:
                key, _, ext = member.name.partition(".")
                j = int(key) - first
                if ext == "tokens.npy":  # the array's bytes end the member, after the .npy header
                    rows["tokens_offset"][j] = member.offset_data + member.size - token_bytes
                elif ext == "meta.json":
                    rows["meta_offset"][j], rows["meta_size"][j] = member.offset_data, member.size
        rows["shard"] = number
        rows["crc32"], self._crcs = self._crcs, []
        self.index.append(rows)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        shard.update(bytes=path.stat().st_size, sha256=h.hexdigest())

    def close(self) -> dict[str, Any]:
        """Finish the last shard, write index.npy and index.json; returns the index.json content."""
        if self._tar is not None:
            self._close_shard()
        index = np.concatenate(self.index) if self.index else np.zeros(0, INDEX_DTYPE)
        np.save(self.dir / "index.npy", index)
        info = {"dtype": self.dtype.name, "sample_len": self.sample_len, "num_samples": self.num_samples,
                "token_bytes": self.sample_len * self.dtype.itemsize, "shards": self.shards}
        (self.dir / "index.json").write_text(json.dumps(info, indent=1))
        return info


class Packer:
    """Packs documents (tokens ending in eos) into consecutive samples of sample_len tokens."""

    def __init__(self, writer: ShardWriter, pad_id: int):
        self.writer, self.pad_id = writer, pad_id
        self.buf = np.empty(writer.sample_len, np.int64)
        self.fill = 0
        self.meta: dict[str, list] = {"doc_ids": [], "sources": [], "doc_starts": []}
        self.pad_tokens = 0

    def add(self, doc_id: str, source: str, tokens: np.ndarray) -> None:
        pos, n = 0, len(tokens)
        while pos < n:
            take = min(len(self.buf) - self.fill, n - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.meta["doc_ids"].append(doc_id)
            self.meta["sources"].append(source)
            self.meta["doc_starts"].append(self.fill)
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self._emit(0)

    def _emit(self, pad: int) -> None:
        self.writer.write(self.buf, {**self.meta, "pad_tokens": pad})
        self.fill = 0
        self.meta = {"doc_ids": [], "sources": [], "doc_starts": []}

    def finish(self) -> dict[str, Any]:
        if self.fill:
            pad = len(self.buf) - self.fill
            self.buf[self.fill:] = self.pad_id
            self.pad_tokens = pad
            self._emit(pad)
        return {**self.writer.close(), "pad_tokens": self.pad_tokens}


def _corrupt(what: str):
    from pretrain.config import ConfigError

    return ConfigError(f"{what}: the shards are damaged; check them all with gal-verify, and re-prepare them")


class ShardReader:
    """Random access to the samples of one split directory (`train/<source>/` or `valid/<source>/`)."""

    def __init__(self, directory: str | Path, vocab_size: int | None = None):
        self.dir = Path(directory)
        for name in ("index.json", "index.npy"):
            if not (self.dir / name).is_file():
                raise _corrupt(f"{self.dir / name} is missing")
        self.info = _read_json(self.dir / "index.json")
        self.dtype = np.dtype(self.info["dtype"])
        self.sample_len = int(self.info["sample_len"])
        self.token_bytes = int(self.info["token_bytes"])
        self.paths = [str(self.dir / s["name"]) for s in self.info["shards"]]
        try:
            self.index = np.load(self.dir / "index.npy", mmap_mode="r")
        except (ValueError, OSError) as e:
            raise _corrupt(f"{self.dir / 'index.npy'}: unreadable ({e})") from None
        if len(self.index) != self.info["num_samples"]:
            raise _corrupt(f"{self.dir / 'index.npy'}: {len(self.index)} rows, index.json says {self.info['num_samples']}")
        for path, shard in zip(self.paths, self.info["shards"]):
            size = os.path.getsize(path) if os.path.exists(path) else None
            if "bytes" in shard and size != shard["bytes"]:
                raise _corrupt(f"{path}: {'missing' if size is None else f'{size} bytes'}, index.json records "
                               f"{shard['bytes']}")
        self.check_crc = "crc32" in (self.index.dtype.names or ())  # indexes written before checksums: skip
        self.vocab_size = vocab_size
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors share a file offset; reopen
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def _row(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range: {self.dir} has {len(self)} samples")
        return self.index[i]

    def __getitem__(self, i: int) -> np.ndarray:
        row = self._row(i)
        data = os.pread(self._fd(int(row["shard"])), self.token_bytes, int(row["tokens_offset"]))
        if len(data) != self.token_bytes:
            raise IOError(f"{self.paths[int(row['shard'])]}: short read for sample {i} (truncated shard?)")
        if self.check_crc and zlib.crc32(data) != int(row["crc32"]):
            raise _corrupt(f"{self.paths[int(row['shard'])]}: sample {i} does not match its checksum in index.npy")
        tokens = np.frombuffer(data, self.dtype)
        if self.vocab_size is not None and tokens.max() >= self.vocab_size:
            raise _corrupt(f"{self.paths[int(row['shard'])]}: sample {i} holds token id {int(tokens.max())}, "
                           f"not below the vocabulary's {self.vocab_size}")
        return tokens

    def meta(self, i: int) -> dict[str, Any]:
        row = self._row(i)
        return json.loads(os.pread(self._fd(int(row["shard"])), int(row["meta_size"]), int(row["meta_offset"])))

    def documents(self) -> Iterator[tuple[str, np.ndarray]]:
        """The documents in order, each (id, its tokens, ending in the eos the packer put after it): the
        samples' pieces joined (a document continues at the start of the next sample), padding cut."""
        doc_id, parts = None, []
        for i in range(len(self)):
            tokens, meta = self[i], self.meta(i)
            ends = meta["doc_starts"][1:] + [len(tokens) - meta["pad_tokens"]]
            for piece_id, start, end in zip(meta["doc_ids"], meta["doc_starts"], ends):
                if not (start == 0 and piece_id == doc_id):  # not the rest of the previous sample's last one
                    if parts:
                        yield doc_id, np.concatenate(parts)
                    doc_id, parts = piece_id, []
                parts.append(tokens[start:end])
        if parts:
            yield doc_id, np.concatenate(parts)

    def webdataset(self) -> Iterator[dict[str, Any]]:
        """The samples in order through webdataset's streaming reader: {"__key__", "tokens.npy", "meta.json"}."""
        import webdataset
        return iter(webdataset.WebDataset(self.paths, shardshuffle=False, empty_check=False).decode())

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TrainSplit:
    """The training samples of all sources (``train/<source>/``), in one index space: sources in name
    order, so sample ``offsets[s] + i`` is sample ``i`` of source ``s``. Shard sets of the old layout (one
    ``train/`` for all sources) are refused with the command that re-prepares them."""

    def __init__(self, data_path: str | Path, vocab_size: int | None = None):
        from pretrain.config import ConfigError

        train = Path(data_path) / "train"
        if (train / "index.json").exists():
            raise ConfigError(f"data.path={data_path}: shards of the old layout (one train/ for all sources); "
                              f"re-prepare them per source: gal-prepare input=<your JSONL> output={data_path} overwrite=true")
        dirs = sorted(d for d in train.iterdir() if (d / "index.json").exists()) if train.is_dir() else []
        if not dirs:
            raise ConfigError(f"data.path={data_path}: no training shards under train/<source>/; prepare them with gal-prepare")
        self.readers = {d.name: ShardReader(d, vocab_size) for d in dirs}
        self.sample_len = next(iter(self.readers.values())).sample_len
        self.offsets, start = {}, 0
        for name, r in self.readers.items():
            if r.sample_len != self.sample_len:
                raise ConfigError(f"{r.dir}: samples of {r.sample_len} tokens, the other sources have {self.sample_len}")
            self.offsets[name], start = start, start + len(r)
        self._starts = np.array(list(self.offsets.values()))
        self._names = list(self.readers)
        self.num_samples = start

    @property
    def sources(self) -> list[str]:
        return self._names

    def sizes(self) -> dict[str, int]:
        return {name: len(r) for name, r in self.readers.items()}

    def ids(self, source: str) -> np.ndarray:
        """The global indices of one source's samples."""
        return self.offsets[source] + np.arange(len(self.readers[source]))

    def locate(self, i: int) -> tuple[str, int]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._names[k], i - int(self._starts[k])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"training sample {i} out of range: {self.num_samples} samples")
        source, j = self.locate(int(i))
        return self.readers[source][j]
