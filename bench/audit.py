"""Benchmark `prx-data audit`: captions/s (per core) and peak memory at 10^5 and 10^6 generated captions.

    .venv/bin/python bench/audit.py [--sizes 100000,1000000] [--out bench-out/audit] [--workers 2]
        [--options '{"language_detector": "lingua"}']
    .venv/bin/python bench/audit.py --sizes 100000 --scan-only 20 [--baseline-stats /tmp/old_stats.py]

Each size is a folder of shards (1000 samples per shard, half the captions `txt` ~12 words, half
`caption_long.txt` ~40 words, with 2% exact duplicates, 1% loops, 0.5% refusals, 1% empty, some French), audited
in a fresh subprocess with the Dask executor (a LocalCluster of --workers processes), language identified on
every caption (the default). Reported: wall time; the Dask cluster's start and the load of the detector and of
the compiled kernels (once per worker process), stated apart; captions/s per core end to end without those
(captions / ((wall - start - loads per worker) x workers)); captions per CPU-second of the scan's own phases summed over shards (reading the
tar, language, the other figures); the driver's peak RSS above its baseline after imports (the reduce's state:
the O(n) figures), and the largest worker's peak RSS (one shard at a time: O(shard)).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ADJ = "red blue green small large old young bright dark wooden metal quiet busy tall short soft round".split()
NOUN = ("car dog cat house tree street woman man child table chair window mountain river boat bicycle "
        "flower garden kitchen road bridge beach sky cloud building lamp book cup phone bird horse").split()
VERB = "stands sits lies runs waits rests shines hangs leans walks".split()
PREP = "on near beside under behind in front of next to across".split()
FR = "Une petite maison blanche au bord de la mer avec un jardin plein de fleurs rouges et jaunes."


def phrase(rng: random.Random) -> str:
    return f"a {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} {rng.choice(PREP)} the {rng.choice(ADJ)} {rng.choice(NOUN)}"


def caption(rng: random.Random, sentences: int) -> str:
    r = rng.random()
    if r < 0.01:
        return ""
    if r < 0.02:
        return "a cat " * 4 + "on a mat"
    if r < 0.025:
        return "I'm sorry, but I cannot describe this image."
    if r < 0.03:
        return FR
    return ". ".join(phrase(rng) for _ in range(sentences)).capitalize() + "."


def generate(folder: str, captions: int, seed: int = 0) -> None:
    from contract import ledger
    from contract.shards import ShardWriter

    if os.path.exists(os.path.join(folder, "_done")):
        return
    rng = random.Random(seed)
    samples = captions // 2
    recent: list[tuple[str, str]] = []
    for shard in range(0, samples, 1000):
        w = ShardWriter(folder, shard // 1000, "ingest")
        for i in range(shard, min(shard + 1000, samples)):
            key = f"{i:032x}"
            if recent and rng.random() < 0.02:
                short, long = rng.choice(recent)
            else:
                short, long = caption(rng, 1), caption(rng, 4)
                recent = (recent + [(short, long)])[-50:]
            meta = {"key": key, "source": "gen-a" if i % 2 else "gen-b", "scores": {"clip:bench": rng.random() * 0.4}}
            w.write(key, {"txt": short.encode(), "caption_long.txt": long.encode(),
                          "json": json.dumps(meta).encode()})
            w.add_row(ledger.row(key, key))
        w.close()
    open(os.path.join(folder, "_done"), "w").close()


def child(folder: str, workers: int, extra: list[str]) -> None:
    from pipeline.stages.audit import AuditConfig, run_audit

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = AuditConfig(dirs=[folder], executor="dask", workers=workers, progress=False, **json.loads(extra[0] if extra else "{}"))
    t0 = time.perf_counter()
    report = run_audit(cfg)
    seconds = time.perf_counter() - t0
    print(json.dumps({"captions": report["captions"], "seconds": seconds, "timing": report["timing"],
                      "detector": report["language_detector"],
                      "checked": sum(g["figures"]["wrong_language"].get("checked", 0) for g in report["groups"]),
                      "driver_cpu_s": _cpu(resource.RUSAGE_SELF), "workers_cpu_s": _cpu(resource.RUSAGE_CHILDREN),
                      "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "driver_baseline_mib": base / 1024,
                      "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "near_dup_long": next(g["figures"]["near_dup"]["rate"] for g in report["groups"]
                                            if g["variant"] == "long")}))


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def reduce_memory(captions: int, shard: int = 1000) -> dict:
    """Peak traced memory of the reduce alone (GroupAcc.add over synthetic per-shard partial states shaped like
    real ones: 1000 captions, ~25 words each, 5 LSH bands), then figures(): the driver's O(n) state."""
    import tracemalloc

    import numpy as np

    from pipeline.audit.figures import GroupAcc
    from pipeline.audit.state import AuditParams, GroupState

    params = AuditParams()
    rng = np.random.default_rng(0)
    acc = GroupAcc(params)
    tracemalloc.start()
    t0 = time.perf_counter()
    for _ in range(captions // shard):
        g = GroupState(n=shard)
        g.words.update({25: shard})
        g.ngrams = [25 * shard, 24 * shard, 23 * shard]
        g.arrays = {"uniq1": np.unique(rng.integers(0, 5000, 800).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)),
                    "uniq2": np.unique(rng.integers(0, 2**63, 10_000, dtype=np.uint64)),
                    "uniq3": np.unique(rng.integers(0, 2**63, 20_000, dtype=np.uint64)),
                    "dups": np.unique(rng.integers(0, 2**63, shard, dtype=np.uint64)),
                    "bands": rng.integers(0, 2**63, (shard, 5), dtype=np.uint64)}
        acc.add(g)
    acc.figures([0, 50], None, {}, "")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"captions": captions, "reduce_peak_mib": peak / 2**20, "reduce_s": time.perf_counter() - t0}


def summary(n: int, r: dict, workers: int) -> str:
    """One line: wall (cluster start, detector and kernel load apart), CPU seconds (robust on a shared machine), the
    scan's phases (CPU, summed over shards) and memory."""
    t, c = r["timing"], r["captions"]
    start, load = t.get("executor_start", 0.0), t.get("detector_load", 0.0) + t.get("kernel_load", 0.0)
    steady = r["seconds"] - start - load / workers
    phases = {k: t.get(k, 0.0) for k in ("read", "language", "figures")}
    cpu = r["driver_cpu_s"] + r["workers_cpu_s"]
    return (f"{n:>9} captions ({r['checked']:,} language-checked, {r['detector']['name']}): wall {r['seconds']:.1f}s "
            f"= cluster start {start:.1f}s + detector and kernel load {load:.2f} CPU-s over {workers} workers + {steady:.1f}s "
            f"-> {c / steady / workers:,.0f} captions/s per core (wall); CPU: driver {r['driver_cpu_s']:.1f}s + "
            f"workers {r['workers_cpu_s']:.1f}s -> {c / cpu:,.0f} captions per CPU-second end to end (start-up "
            f"included); scan phases (CPU): read {phases['read']:.1f}s, language {phases['language']:.1f}s "
            f"({c / max(phases['language'], 1e-9):,.0f}/s), other figures {phases['figures']:.1f}s -> "
            f"{c / sum(phases.values()):,.0f}/s with reading, {c / (phases['language'] + phases['figures']):,.0f}/s "
            f"without; driver peak {r['driver_peak_mib']:.0f} MiB (baseline {r['driver_baseline_mib']:.0f}, +"
            f"{r['driver_peak_mib'] - r['driver_baseline_mib']:.0f}); largest worker {r['worker_peak_mib']:.0f} MiB "
            f"(generation {r['generate_s']:.0f}s)")


def scan_only(folder: str, shards: int, baseline: str | None) -> None:
    """In one process, no Dask: CPU (thread) seconds per caption of the scan's phases over `shards` shards (the
    first, which loads the detector, untimed); with `baseline`, a stats module file (e.g. the previous
    implementation, from `git show REV:pipeline/audit/stats.py`), whose scan_group runs interleaved on the same
    captions without a detector: the figures' side-by-side ratio."""
    import importlib.util

    from pipeline.audit import scan as stats
    from pipeline.audit.state import from_bytes
    from pipeline.stages.audit import AuditConfig, AuditStage

    stage = AuditStage(AuditConfig(dirs=[folder]))
    tasks = stage.plan()[:shards + 1]
    stage.scan(tasks[0])
    total: dict[str, float] = {}
    captions = 0
    for t in tasks[1:]:
        groups, extra = from_bytes(stage.scan(t))
        captions += sum(g.n for g in groups.values())
        for k, v in extra["seconds"].items():
            total[k] = total.get(k, 0.0) + v
    per = ", ".join(f"{k} {v / captions * 1e6:.1f}" for k, v in total.items())
    print(f"{captions} captions, CPU us/caption: {per}")
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_stats", baseline)
        old = importlib.util.module_from_spec(spec)
        sys.modules["baseline_stats"] = old
        spec.loader.exec_module(old)
        texts = _captions(tasks[1:])
        for rep in range(3):
            row = []
            for name, mod in (("baseline", old), ("now", stats)):
                t0 = time.thread_time()
                for tx in texts:
                    mod.scan_group(tx, mod.AuditParams(language_sample=0))
                row.append(f"{name} {(time.thread_time() - t0) / captions * 1e6:.1f}")
            print(f"repeat {rep}: figures without language, CPU us/caption: " + ", ".join(row))


def _captions(tasks) -> list[list[str]]:
    """Each shard's captions per (source, member), as the audit groups them by default."""
    from contract.shards import read_shard

    out = []
    for t in tasks:
        groups: dict = {}
        for item in read_shard(t.inputs[0]):
            source = item.meta().get("source")
            for member in item.members:
                if member.endswith("txt"):
                    groups.setdefault((source, member), []).append(item.text(member))
        out.extend(groups.values())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--out", default="bench-out/audit")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--options", default="{}", help="AuditConfig options as JSON, e.g. '{\"language_sample\": 100}'")
    ap.add_argument("--reduce-only", action="store_true", help="only the reduce's memory on synthetic partials")
    ap.add_argument("--scan-only", type=int, metavar="SHARDS", help="only the scan's phases, in-process, on SHARDS "
                                                                      "shards of the first --sizes folder")
    ap.add_argument("--baseline-stats", help="with --scan-only: a stats.py file to compare scan_group with")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), [args.options])
        return 0
    if args.scan_only:
        n = int(args.sizes.split(",")[0])
        folder = os.path.join(args.out, f"captions-{n}")
        generate(folder, n)
        scan_only(folder, args.scan_only, args.baseline_stats)
        return 0
    if args.reduce_only:
        for n in [int(x) for x in args.sizes.split(",")]:
            r = reduce_memory(n)
            print(f"{n:>9} captions: reduce peak {r['reduce_peak_mib']:.1f} MiB "
                  f"({r['reduce_peak_mib'] * 2**20 / n:.0f} bytes/caption), {r['reduce_s']:.1f}s", flush=True)
        return 0
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        folder = os.path.join(args.out, f"captions-{n}")
        t0 = time.perf_counter()
        generate(folder, n)
        gen_s = time.perf_counter() - t0
        res = subprocess.run([sys.executable, __file__, "--child", folder, str(args.workers), "--options", args.options],
                             capture_output=True, text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        if res.returncode:
            sys.exit(f"the audit of {folder} exited with {res.returncode}:\n{res.stderr[-4000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["generate_s"] = gen_s
        rows.append(r)
        print(summary(n, r, args.workers), flush=True)
    if len(rows) == 2:
        a, b = rows
        ratio = (b["driver_peak_mib"] - b["driver_baseline_mib"]) / max(a["driver_peak_mib"] - a["driver_baseline_mib"], 1)
        print(f"driver state growth x{ratio:.1f} for x{b['captions'] / a['captions']:.0f} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
