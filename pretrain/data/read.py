"""Read JSONL inputs (plain, .gz, .zst) line by line with bounded memory, naming file and line."""
from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard


class BadInput(ValueError):
    """A line of the input that cannot become a document; the message names file and line."""

    def __init__(self, path: str, line: int, reason: str, detail: str):
        super().__init__(f"{path}:{line}: {detail} ({reason}; on_error=skip skips and counts such lines)")
        self.path, self.line, self.reason = path, line, reason


@dataclass
class RawLine:
    file_index: int
    line: int  # 1-based
    data: bytes | None  # None when the line exceeded max_line_bytes (it was not kept in memory)


def expand_inputs(spec) -> list[Path]:
    """A path, glob or comma-free list of them → the sorted, existing input files."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[Path] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        matches = sorted(glob.glob(s)) if glob.has_magic(s) else [s]
        if not matches:
            raise FileNotFoundError(f"input={s!r} matches no file")
        for m in matches:
            if not os.path.isfile(m):
                raise FileNotFoundError(f"input: {m} is not a file")
            files.append(Path(m))
    return files


def open_binary(path: Path) -> BinaryIO:
    raw = open(path, "rb")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if path.suffix == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore[return-value]
    return raw


def iter_lines(path: Path, file_index: int, max_line_bytes: int, max_lines: int = 0) -> Iterator[RawLine]:
    """Yield every non-blank line; a line longer than max_line_bytes is skipped over in chunks."""
    with open_binary(path) as f:
        number = 0
        while True:
            data = f.readline(max_line_bytes + 1)
            if not data:
                return
            number += 1
            if max_lines and number > max_lines:
                return
            if len(data) > max_line_bytes and not data.endswith(b"\n"):
                while data and not data.endswith(b"\n"):  # drain the rest of the long line
                    data = f.readline(1 << 20)
                yield RawLine(file_index, number, None)
                continue
            if data.strip():
                yield RawLine(file_index, number, data)
