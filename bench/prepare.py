"""Data-preparation benchmark (issue 3): tokenization throughput of the Galactica tokenizer against a
Hugging Face `tokenizers` byte-level BPE of the same vocabulary size, trained on the same sample.

    python bench/prepare.py --corpus ../shared/corpus [--vocab-size 32000] [--sample-fraction 0.1]

Both tokenizers encode the whole corpus (arXiv prose + molecules / proteins / DNA in Galactica markup)
in batches, from a freshly loaded tokenizer (cold caches). Wall-clock MB/s depends on what else runs
on the machine; MB per CPU-second of this process is the per-core number (robust to other load).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.tokenizer import SPECIAL_TOKENS, GalacticaTokenizer, escape_spans  # noqa: E402

BATCH_DOCS = 512


def markup(doc: dict, where: str) -> str:
    """Galactica markup of one shared-corpus record."""
    if "text" in doc:
        return f"{doc.get('title', '')}\n\n{doc['text']}".strip()
    if "smiles" in doc:
        return f"{doc.get('name', '')}\n[START_I_SMILES]{doc['smiles']}[END_I_SMILES]\n"
    if "sequence" in doc:
        kind = "DNA" if doc.get("source") == "dna" else "AMINO"
        return f"{doc.get('description', '')}\n[START_{kind}]{doc['sequence']}[END_{kind}]\n"
    raise ValueError(f"{where}: no text, smiles or sequence field")


def load_corpus(corpus: Path) -> list[str]:
    files = sorted(corpus.glob("*.jsonl"))
    if not files:
        sys.exit(f"error: no *.jsonl files in --corpus {corpus} (the shared corpus is ../shared/corpus)")
    texts = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            texts += [markup(json.loads(line), f"{path}:{i}") for i, line in enumerate(f, 1) if line.strip()]
    return texts


def train_hf_bpe(sample: list[str], vocab_size: int):
    """The reference: byte-level BPE (GPT-2 style pre-tokenization), digits split, same specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer=trainer)
    return tok


def throughput(encode_batch, texts: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, tokens) to encode all texts in batches."""
    tokens = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), BATCH_DOCS):
        tokens += sum(map(len, encode_batch(texts[i:i + BATCH_DOCS])))
    return time.perf_counter() - start, time.process_time() - start_cpu, tokens


def bench_tokenization(corpus: Path, vocab_size: int, sample_fraction: float, seed: int) -> list[dict]:
    texts = load_corpus(corpus)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    sample = random.Random(seed).sample(texts, max(1, int(len(texts) * sample_fraction)))
    print(f"corpus {corpus}: {len(texts)} documents, {mb:.1f} MB; training sample {len(sample)} documents, "
          f"vocab {vocab_size}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        GalacticaTokenizer.train(sample, tmp, vocab_size=vocab_size, seed=seed, progress=False)
        train_ours_s = time.perf_counter() - t
        t = time.perf_counter()
        hf = train_hf_bpe(sample, vocab_size)
        train_hf_s = time.perf_counter() - t
        print(f"training: sentencepiece {train_ours_s:.1f} s, tokenizers BpeTrainer {train_hf_s:.1f} s", flush=True)
        export = GalacticaTokenizer.load(tmp).export_hf(Path(tmp) / "hf")
        from tokenizers import Tokenizer

        ours_hf = Tokenizer.from_file(str(export / "tokenizer.json"))
        rows = []
        for threads in (1, 2):
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
            ours = GalacticaTokenizer.load(tmp, num_threads=threads)  # fresh: cold word cache
            cases = [
                ("galactica (sentencepiece + markup)", ours.encode_batch, texts),
                ("hf tokenizers byte-level BPE (reference)",
                 lambda b: [e.ids for e in hf.encode_batch(b, add_special_tokens=False)], texts),
                ("galactica HF export (tokenizers, escaped)",
                 lambda b: [e.ids for e in ours_hf.encode_batch(b, add_special_tokens=False)],
                 [escape_spans(t) for t in texts]),
            ]
            for name, encode_batch, inputs in cases[:2] if threads > 1 else cases:
                seconds, cpu_seconds, tokens = throughput(encode_batch, inputs)
                rows.append({"tokenizer": name, "threads": threads, "MB/s": mb / seconds,
                             "MB per CPU-s": mb / cpu_seconds, "tokens": tokens, "bytes/token": mb * 1e6 / tokens})
                print(f"  {name}, {threads} thread(s): {mb / seconds:.2f} MB/s, "
                      f"{mb / cpu_seconds:.2f} MB per CPU-second", flush=True)
    return rows


def bench_pipeline(corpus: Path, vocab_size: int, seed: int) -> dict:
    """The whole of gal-prepare (read, clean, dedup, split, tokenizer training on the default 2% sample,
    tokenize, pack, shard) on every *.jsonl of the corpus, with all cores; MB/s of input JSONL."""
    import resource

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pretrain.prepare  # noqa: F401  (registers the config schema)
    from pretrain.data.pipeline import prepare

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("prepare", overrides=[
                f"input={corpus}/*.jsonl", f"output={tmp}/shards", f"tokenizer.vocab_size={vocab_size}",
                f"tokenizer.seed={seed}"]))
        cpu = lambda: sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime  # noqa: E731
                          for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        cpu0 = cpu()
        m = prepare(cfg, progress=False)
        cpu_s = cpu() - cpu0
    mb, t = m["input"]["bytes"] / 1e6, m["timing"]
    print(f"\nwhole pipeline (gal-prepare, {m['workers']} workers, vocab {m['vocab_size']}): {mb:.1f} MB in "
          f"{t['total_s']:.1f} s = {t['input_mb_per_s']:.2f} MB/s wall, {mb / cpu_s:.2f} MB per CPU-second; "
          f"clean+dedup+split {mb / t['clean_dedup_split_s']:.2f} MB/s, tokenizer training "
          f"{t['tokenizer_train_s']:.1f} s ({m['tokenizer']['trained_on_documents']} docs), tokenize+pack "
          f"{mb / t['tokenize_pack_s']:.2f} MB/s; {m['totals']['train']['tokens']:,} train tokens, "
          f"{m['splits']['train']['samples']:,} samples; dedup {m['dedup']}", flush=True)
    return m


def print_table(rows: list[dict]) -> None:
    ref = {r["threads"]: r for r in rows if "reference" in r["tokenizer"]}
    print("\n| tokenizer | threads | MB/s (wall) | MB per CPU-second (per core) | per core vs reference "
          "| bytes/token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["MB per CPU-s"] / ref[r["threads"]]["MB per CPU-s"]
        print(f"| {r['tokenizer']} | {r['threads']} | {r['MB/s']:.2f} | {r['MB per CPU-s']:.2f} | "
              f"{ratio:.2f}× | {r['bytes/token']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("/work/shared/corpus"),
                        help="folder of *.jsonl documents (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--sample-fraction", type=float, default=0.1,
                        help="fraction of documents both tokenizers are trained on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.corpus.is_dir():
        sys.exit(f"error: --corpus {args.corpus} does not exist (the shared corpus is ../shared/corpus)")
    print_table(bench_tokenization(args.corpus, args.vocab_size, args.sample_fraction, args.seed))
    bench_pipeline(args.corpus, args.vocab_size, args.seed)


if __name__ == "__main__":
    main()
