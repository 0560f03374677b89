"""Preparing cpt data from a large local corpus: peak memory and time, streamed vs loaded.

    .venv/bin/python bench/stream_memory.py [--gigabytes 1.0] [--max-samples 20000]

Writes a FineWeb-shaped corpus (text, id, url, dump, score; jsonl files of ~100 MB) once under
bench/out/stream-memory/, then selects `--max-samples` rows from it through upstack's data
pipeline (the same rows either way), each in its own subprocess so its peak RSS is its own:
`streaming: true` reads the files as a stream and keeps only the selected rows; the default
loads the corpus (datasets converts it to Arrow on disk first) and selects from that. The number
to watch is the streamed run's peak RSS staying flat as the corpus grows.
Writes bench/out/stream_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from upstack.core.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORK = OUT / "stream-memory"
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
]


def write_corpus(gigabytes: float) -> Path:
    corpus = WORK / f"corpus-{gigabytes:g}gb"
    if (corpus / "done").is_file():
        return corpus
    corpus.mkdir(parents=True, exist_ok=True)
    rng, target, written, shard = random.Random(0), gigabytes * 1e9, 0, 0
    while written < target:
        with (corpus / f"train-{shard:05d}.jsonl").open("w") as handle:
            for i in range(20_000):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 1200)))
                row = {
                    "text": text,
                    "id": f"{shard}-{i}",
                    "url": f"https://example.org/{shard}/{i}",
                    "dump": "CC-MAIN-2024-10",
                    "score": rng.random(),
                }
                line = json.dumps(row) + "\n"
                handle.write(line)
                written += len(line)
        shard += 1
    (corpus / "done").write_text(str(written))
    return corpus


def worker(corpus: str, streaming: bool, max_samples: int) -> dict:
    from upstack.core.context import StageContext
    from upstack.core.recipe import Recipe
    from upstack.train.data import Source, build_mixture

    work = WORK / f"run-{'stream' if streaming else 'load'}"
    recipe = Recipe(name="bench", seed=42, output_dir=str(work), stages={})
    ctx = StageContext(recipe, "cpt", work / "out", work / "work", "bench")
    started = time.perf_counter()
    train, _ = build_mixture(
        [Source(path=corpus, streaming=streaming, max_samples=max_samples)], "text", ctx
    )
    return {
        "rows": len(train),
        "seconds": time.perf_counter() - started,
        "first": sorted(train["text"][:50])[0][:40],
    }


def measure(corpus: Path, streaming: bool, max_samples: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(corpus), "--max-samples", str(max_samples)]
    cmd += ["--streaming"] if streaming else []
    env = {**os.environ, "HF_DATASETS_CACHE": str(WORK / f"cache-{streaming}")}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--max-samples", type=int, default=20_000)
    parser.add_argument("--worker")
    parser.add_argument("--streaming", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.streaming, args.max_samples)))
        return
    import shutil

    corpus = write_corpus(args.gigabytes)
    size = sum(p.stat().st_size for p in corpus.glob("*.jsonl")) / 1e9
    for streaming in (False, True):
        shutil.rmtree(WORK / f"cache-{streaming}", ignore_errors=True)  # each run from cold
        shutil.rmtree(WORK / f"run-{'stream' if streaming else 'load'}", ignore_errors=True)
    loaded, streamed = (
        measure(corpus, False, args.max_samples),
        measure(corpus, True, args.max_samples),
    )
    rows = [
        [name, r["rows"], f"{r['peak_rss_mb']:.0f}", f"{r['seconds']:.1f}"]
        for name, r in (("loaded (default)", loaded), ("streaming: true", streamed))
    ]
    print(
        f"corpus {size:.2f} GB in {len(list(corpus.glob('*.jsonl')))} files, max_samples {args.max_samples}"
    )
    print(markdown_table(["mode", "rows", "peak RSS MB", "seconds"], rows))
    print(
        f"same rows: {loaded['first'] == streamed['first']}; peak RSS streamed / loaded: {streamed['peak_rss_mb'] / loaded['peak_rss_mb']:.2f}"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "stream_memory.json").write_text(
        json.dumps(
            {
                "corpus_gb": size,
                "max_samples": args.max_samples,
                "loaded": loaded,
                "streamed": streamed,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
