"""`gal-verify DATA_PATH`: every shard of a gal-prepare output against its recorded sha256, size and
per-sample checksums, with a progress bar; exit 0 when all agree, 1 with the damaged shards named.

Training checks what is cheap on every read (pretrain/data/shards.py); this is the full check, for
shards just copied to a cluster's filesystem or suspected after a storage incident.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.cli import fail
from pretrain.data.shards import MANIFEST


def split_dirs(data_path: Path) -> list[Path]:
    return sorted(p.parent for p in data_path.glob("*/*/index.json"))


def verify_split(directory: Path, bar: tqdm) -> list[str]:
    """Problems found in one split directory (each names the shard, and the sample where it can)."""
    info = json.loads((directory / "index.json").read_text())
    index = np.load(directory / "index.npy", mmap_mode="r")
    problems = []
    for number, shard in enumerate(info["shards"]):
        path = directory / shard["name"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                bar.update(len(chunk))
        if h.hexdigest() != shard["sha256"]:
            problems.append(f"{path}: sha256 {h.hexdigest()[:12]}…, index.json records {shard['sha256'][:12]}…")
        if "crc32" in (index.dtype.names or ()):
            rows = np.flatnonzero(index["shard"] == number)
            with open(path, "rb") as f:
                for i in rows:
                    f.seek(int(index["tokens_offset"][i]))
                    if zlib.crc32(f.read(int(info["token_bytes"]))) != int(index["crc32"][i]):
                        problems.append(f"{path}: sample {int(i)} does not match its checksum in index.npy")
                        break
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gal-verify", description="Check every shard of a gal-prepare output "
                                     "against the sha256s and per-sample checksums its index records.")
    parser.add_argument("data_path", type=Path, help="a gal-prepare output directory (manifest.json, train/, valid/)")
    args = parser.parse_args(argv)
    if not (args.data_path / MANIFEST).exists():
        fail("gal-verify", f"{args.data_path}: no {MANIFEST}; not a gal-prepare output directory")
    dirs = split_dirs(args.data_path)
    total = sum(s["bytes"] for d in dirs for s in json.loads((d / "index.json").read_text())["shards"])
    with tqdm(total=total, unit="B", unit_scale=True, desc="gal-verify", file=sys.stderr) as bar:
        problems = [p for d in dirs for p in verify_split(d, bar)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(f"gal-verify: {len(problems)} damaged shard(s) in {args.data_path}: re-prepare them")
    print(f"gal-verify: {len(dirs)} splits, {total:,} bytes: every shard matches its sha256 and checksums")


if __name__ == "__main__":
    main()
