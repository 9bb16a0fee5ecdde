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
        self.path, self.line, self.reason, self.detail = path, line, reason, detail

    def __reduce__(self):  # raised in a datatrove task, re-raised in gal-prepare's process
        return BadInput, (self.path, self.line, self.reason, self.detail)


@dataclass
class RawLine:
    file_index: int
    line: int  # 1-based
    data: bytes | None  # None when the line has a problem (it was not kept in memory)
    problem: tuple[str, str] | None = None  # (reason, detail) of a line that cannot be read: too long, truncated
    size: int = 0  # bytes read for a line without data


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


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame; EOFError (as gzip's) when the file
    ends inside a frame, so that a truncated file is never read as a shorter complete one."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._frame = None  # the current frame's decompressobj
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            chunk = self._raw.read(1 << 17)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("compressed file ended before the end of its zstd frame")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._frame is None or self._frame.eof:
                self._frame = zstandard.ZstdDecompressor().decompressobj()
            out.append(self._frame.decompress(chunk))
            chunk = self._frame.unused_data if self._frame.eof else b""  # the next frame's start
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    raw = open(path, "rb")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if path.suffix == ".zst":
        return io.BufferedReader(ZstdReader(raw), 1 << 20)  # type: ignore[return-value]
    return raw


def iter_lines(path: Path, file_index: int, max_line_bytes: int, max_lines: int = 0,
               start: int = 0, end: int | None = None) -> Iterator[RawLine]:
    """Yield every non-blank line; a line longer than max_line_bytes is skipped over in chunks and
    yielded as a problem, as is the cut of a truncated .gz or .zst file (after the lines before it).
    With `start`/`end` (plain files only): the lines that *start* in bytes [start, end), numbered from 1
    at the first of them (pretrain/data/pipeline.py turns that into the file's line number)."""
    with open_binary(path) as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before `start`
        number = 0
        while not (max_lines and number >= max_lines) and (end is None or f.tell() < end):
            number += 1  # the line being read
            try:
                data = f.readline(max_line_bytes + 1)
                size = len(data)
                if size > max_line_bytes and not data.endswith(b"\n"):
                    while data and not data.endswith(b"\n"):  # drain the rest of the long line
                        data = f.readline(1 << 20)
                        size += len(data)
                    data = None
            except EOFError:  # gzip's and ZstdReader's sign of a file cut short
                yield RawLine(file_index, number, None, (
                    "truncated", "the compressed file ends in the middle of its data (an interrupted download or "
                    "copy?); the lines before were read; replace it with a complete copy"))
                return
            if data is None:
                yield RawLine(file_index, number, None, ("line_too_long", "line longer than max_line_bytes"), size)
            elif not data:
                return
            elif data.strip():
                yield RawLine(file_index, number, data)


def lines_before(path: Path, offset: int) -> int:
    """How many lines of a plain file start before byte `offset` (for error messages: file:line)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while f.tell() < offset:
            block = f.read(min(1 << 20, offset - f.tell()))
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")  # a line cut by `offset` began before it
