"""Data-preparation benchmark: tokenization throughput of the Galactica tokenizer against a Hugging Face
`tokenizers` byte-level BPE of the same vocabulary size (issue 3), the whole of gal-prepare with 1 and 2
local workers, and the peak memory of its largest process at 1x, 4x and 16x the corpus (issue 16).

    python bench/prepare.py --corpus ../shared/corpus [--parts tokenizer,pipeline,scale] [--pipeline-scales 1,4]
        [--scales 1,4,16]

Both tokenizers encode the whole corpus (arXiv prose + molecules / proteins / DNA in Galactica markup)
in batches, from a freshly loaded tokenizer (cold caches). Wall-clock MB/s depends on what else runs
on the machine; MB per CPU-second of this process is the per-core number (robust to other load).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def run_prepare(args: list[str]) -> dict:
    """One gal-prepare in a fresh process: its manifest, wall seconds, CPU seconds of every process it ran
    (the pool workers included) and the peak RSS of the largest of them."""
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output=")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.prepare", *args], env=env, cwd=ROOT,
                                stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's processes alone (it waits for its workers)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"gal-prepare {' '.join(args)} failed:\n{Path(f'{out}.log').read_text()[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"manifest": manifest, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_mb": usage.ru_maxrss / 1024}


def bench_pipeline(corpus: Path, vocab_size: int, seed: int, workers: list[int], scales: list[int],
                   tmp: Path) -> list[dict]:
    """The whole of gal-prepare (read, clean, markup, exact + near (datatrove MinHash) + span dedup, split,
    tokenizer training on the default 2% sample, tokenize, pack, shard) on every *.jsonl of the corpus
    (scale 1) and of perturbed copies of it (scale k), with 1 and 2 local workers; the 1-worker run of each
    scale is the reference of its speed-up. Units of 4 MB (16 chunks and 14 buckets at 1x), as a large corpus
    would have thousands of 64 MB units: several per worker, so that the pool stays busy to a stage's end."""
    rows = []
    for k in scales:
        data = corpus if k == 1 else perturbed_corpus(corpus, k, tmp / f"corpus{k}x")
        for w in workers:
            r = run_prepare([f"input={data}/*.jsonl", f"output={tmp}/scale{k}-workers{w}",
                             f"tokenizer.vocab_size={vocab_size}", f"tokenizer.seed={seed}", f"workers={w}",
                             "chunk_mb=4", "bucket_mb=4"])
            m = r["manifest"]
            mb = m["input"]["bytes"] / 1e6
            rows.append({"scale": k, "workers": w, "MB": mb, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                         "MB/s": mb / r["wall_s"], "MB per CPU-s": mb / r["cpu_s"], "max_rss_mb": r["max_rss_mb"],
                         "stages": m["timing"], "units": m["units"], "dedup": m["dedup"],
                         "span_bytes_removed": m["span_dedup"]["bytes_removed"],
                         "train_tokens": m["totals"]["train"]["tokens"]})
            print(f"  {k}x, {w} worker(s): {mb:.1f} MB in {r['wall_s']:.1f} s = {mb / r['wall_s']:.2f} MB/s, "
                  f"{mb / r['cpu_s']:.2f} MB per CPU-second, peak RSS {r['max_rss_mb']:.0f} MB", flush=True)
        if k != 1:
            shutil.rmtree(data)
    return rows


def perturbed_corpus(corpus: Path, copies: int, out: Path) -> Path:
    """`copies` copies of every *.jsonl record: copy 0 as it is, copy j > 0 with a new id and, for text
    records, every 8th word replaced (so the copies are neither exact nor near duplicates, and span
    dedup finds few repeats); molecules, proteins and DNA copies are exact duplicates (dedup drops them)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path) as f, open(out / path.name, "w") as w:
            for line in f:
                record = json.loads(line)
                w.write(line if line.endswith("\n") else line + "\n")
                for j in range(1, copies):
                    copy = dict(record, id=f"{record['id']}~{j}")
                    if "text" in copy:
                        words = copy["text"].split(" ")
                        copy["text"] = " ".join(f"{x}{j}" if i % 8 == j % 8 else x for i, x in enumerate(words))
                    w.write(json.dumps(copy, ensure_ascii=False) + "\n")
    return out


def bench_scale(corpus: Path, scales: list[int], tokenizer: Path, tmp: Path) -> list[dict]:
    """Peak RSS of the largest process (a task: 2 local workers) as the corpus grows: bucket count and
    chunk count grow with it, their size does not. The tokenizer is given (trained at 1x), so that the one
    stage whose input is a fraction of the corpus by design, tokenizer training, is not what is measured."""
    rows = []
    for k in scales:
        data = perturbed_corpus(corpus, k, tmp / f"corpus{k}x")
        r = run_prepare([f"input={data}/*.jsonl", f"output={tmp}/scale{k}", f"tokenizer.path={tokenizer}",
                         "workers=2", "chunk_mb=16", "bucket_mb=32"])
        m = r["manifest"]
        mb = m["input"]["bytes"] / 1e6
        rows.append({"scale": k, "MB": mb, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "MB/s": mb / r["wall_s"],
                     "MB per CPU-s": mb / r["cpu_s"], "max_rss_mb": r["max_rss_mb"], "units": m["units"],
                     "dedup": m["dedup"], "span_bytes_removed": m["span_dedup"]["bytes_removed"]})
        print(f"  {k}x: {mb:.0f} MB ({m['units']['chunks']} chunks, {m['units']['buckets']} buckets) in "
              f"{r['wall_s']:.0f} s, peak RSS {r['max_rss_mb']:.0f} MB; dedup {m['dedup']}", flush=True)
        shutil.rmtree(data)
        shutil.rmtree(tmp / f"scale{k}")
    return rows


def plot(pipeline: list[dict], scale: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    stages = [k[:-2] for k in pipeline[0]["stages"] if k.endswith("_s") and k not in ("total_s", "input_mb_per_s")]
    labels = [f"{r['scale']}x ({r['MB']:.0f} MB)\n{r['workers']} worker(s)" for r in pipeline]
    bottom = [0.0] * len(pipeline)
    colors = plt.get_cmap("tab20").colors
    for i, stage in enumerate(stages):
        values = [r["stages"][f"{stage}_s"] for r in pipeline]
        a.bar(labels, values, bottom=bottom, label=stage, color=colors[i])
        bottom = [x + y for x, y in zip(bottom, values)]
    for i, r in enumerate(pipeline):  # the whole process: start-up and the manifest included
        ref = next(o for o in pipeline if o["scale"] == r["scale"] and o["workers"] == 1)
        a.annotate(f"{r['wall_s']:.0f} s" + (f", {ref['wall_s'] / r['wall_s']:.2f}x" if r is not ref else ""),
                   (i, r["wall_s"]), ha="center", va="bottom", fontsize=8)
    a.set_ylabel("wall seconds (bars: the stages)")
    a.set_title("gal-prepare, shared corpus and a 4x perturbed copy")
    a.tick_params(axis="x", labelsize=8)
    a.legend(fontsize=7, ncol=2)
    if scale:
        b.plot([r["MB"] for r in scale], [r["max_rss_mb"] for r in scale], "o-")
        for r in scale:
            b.annotate(f"{r['scale']}x", (r["MB"], r["max_rss_mb"]), textcoords="offset points", xytext=(4, 4))
        b.set_xscale("log")
        b.set_ylim(0, max(r["max_rss_mb"] for r in scale) * 1.5)
        b.set_xlabel("input MB (log)")
        b.set_ylabel("peak RSS of the largest process, MB")
        b.set_title("memory as the corpus grows (2 workers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    parser.add_argument("--parts", default="tokenizer,pipeline,scale", help="which benchmarks (default: %(default)s)")
    parser.add_argument("--workers", default="1,2", help="local workers of the pipeline runs")
    parser.add_argument("--pipeline-scales", default="1,4", help="copies of the corpus for the speed runs")
    parser.add_argument("--scales", default="1,4,16", help="copies of the corpus for the memory runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prepare.json")
    args = parser.parse_args(argv)
    if not args.corpus.is_dir():
        sys.exit(f"error: --corpus {args.corpus} does not exist (the shared corpus is ../shared/corpus)")
    parts = args.parts.split(",")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    if "tokenizer" in parts:
        results["tokenizer"] = bench_tokenization(args.corpus, args.vocab_size, args.sample_fraction, args.seed)
        print_table(results["tokenizer"])
    with tempfile.TemporaryDirectory(dir=ROOT.parent if os.access(ROOT.parent, os.W_OK) else None) as tmp:
        if "pipeline" in parts or "scale" in parts:
            print("\nwhole pipeline (gal-prepare):", flush=True)
            results["pipeline"] = bench_pipeline(args.corpus, args.vocab_size, args.seed,
                                                 [int(w) for w in args.workers.split(",")],
                                                 [int(k) for k in args.pipeline_scales.split(",")], Path(tmp))
            for one, r in zip(results["pipeline"], results["pipeline"][1:]):
                if one["scale"] == r["scale"] and one["workers"] == 1:
                    print(f"  speed-up at {r['scale']}x, {r['workers']} vs 1 worker: {one['wall_s'] / r['wall_s']:.2f}x")
        if "scale" in parts:
            print("\nmemory as the corpus grows (2 workers, perturbed copies):", flush=True)
            first = results["pipeline"][0]
            tokenizer = Path(tmp) / f"scale{first['scale']}-workers{first['workers']}" / "tokenizer" / "tokenizer.model"
            results["scale"] = bench_scale(args.corpus, [int(k) for k in args.scales.split(",")], tokenizer, Path(tmp))
        if "pipeline" in results:
            plot(results["pipeline"], results.get("scale", []), ROOT / "docs" / "images" / "prepare_bench.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {args.out}; plot: docs/images/prepare_bench.png")


if __name__ == "__main__":
    main()
