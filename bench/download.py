"""Plain `img2dataset` vs `prx-data download`: same loopback server, same URLs, same settings.

    .venv/bin/python bench/download.py --n 10000 --delays 0,0.05 --processes 2 --threads 32

A loopback HTTP server (its own process) serves N distinct JPEGs (256x256 crops of scikit-image photos; each
URL's bytes differ by a JPEG comment, so nothing is a duplicate), optionally after a delay per response to
mimic a network. Both tools run as their command lines, cold (import and process start included), with
identical settings: no resize and no re-encoding, the same processes x threads, timeout, shard size
(1000), no EXIF extraction, sha256 computed, img2dataset's default X-Robots-Tag directives. img2dataset
writes webdataset shards; prx-data download writes its raw shards and ledgers (Dask LocalCluster, the
default executor, with --allow-private-network since the server is on loopback). The order of the two runs
alternates between repeats. Prints wall times and the prx/img2dataset ratio per delay, as markdown.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

VENV_BIN = os.path.dirname(sys.executable)


def make_bodies(k: int, size: int = 256, seed: int = 0) -> list[bytes]:
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    out = []
    for i in range(k):
        base = bases[i % len(bases)]
        y = rng.integers(0, base.shape[0] - size)
        x = rng.integers(0, base.shape[1] - size)
        buf = io.BytesIO()
        Image.fromarray(base[y:y + size, x:x + size]).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def unique(body: bytes, n: int) -> bytes:
    """The same JPEG with a comment segment carrying n: distinct bytes, same pixels, same decode cost."""
    text = f"prx bench image {n}".encode()
    return body[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + body[2:]


def serve(delay: float, k: int, ready) -> None:
    from pipeline.download.serve import ImageServer, Route

    bodies = make_bodies(k)
    srv = ImageServer(delay=delay)
    srv.add_pattern(r"/img/(\d+)\.jpg", lambda m: Route(body=unique(bodies[int(m.group(1)) % k], int(m.group(1))),
                                                        headers={"Content-Type": "image/jpeg"}))
    ready.send(srv.port)
    srv.httpd.serve_forever(poll_interval=0.05)


def start_server(delay: float, k: int):
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(delay, k, child), daemon=True)
    proc.start()
    return proc, parent.recv()


def write_list(path: str, port: int, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(n)]}), path)


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return seconds


def img2dataset_cmd(urls: str, out: str, a) -> list[str]:
    return [os.path.join(VENV_BIN, "img2dataset"), f"--url_list={urls}", f"--output_folder={out}",
            "--input_format=parquet", "--url_col=url", "--caption_col=caption", "--output_format=webdataset",
            f"--processes_count={a.processes}", f"--thread_count={a.threads}", "--resize_mode=no",
            "--disable_all_reencoding=True", "--extract_exif=False", "--compute_hash=sha256",
            f"--number_sample_per_shard={a.shard_size}", f"--timeout={a.timeout}", "--enable_wandb=False"]


def prx_cmd(urls: str, out: str, a) -> list[str]:
    return [os.path.join(VENV_BIN, "prx-data"), "download", "--urls", urls, "--out", out,
            "--processes", str(a.processes), "--threads", str(a.threads), "--resize-mode", "no",
            "--shard-size", str(a.shard_size), "--timeout", str(a.timeout), "--allow-private-network",
            "--no-progress", "--source", "bench"]


def count_kept_img2dataset(out: str) -> int:
    import json

    total = 0
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            with open(os.path.join(out, name)) as fh:
                total += json.load(fh)["successes"]
    return total


def count_kept_prx(out: str) -> int:
    from contract import ledger

    return ledger.read_folder(out).column("outcome").to_pylist().count(ledger.KEPT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="URLs")
    p.add_argument("--delays", default="0,0.05", help="served delays in seconds, comma-separated")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--timeout", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--distinct", type=int, default=200, help="distinct base images behind the URLs")
    a = p.parse_args()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    tmp = tempfile.mkdtemp(prefix="prx-bench-download-")
    rows = []
    try:
        for delay in [float(d) for d in a.delays.split(",")]:
            proc, port = start_server(delay, a.distinct)
            try:
                urls = os.path.join(tmp, "urls.parquet")
                write_list(urls, port, a.n)
                times: dict[str, list[float]] = {"img2dataset": [], "prx": []}
                kept = {}
                for r in range(a.repeat):
                    order = ["img2dataset", "prx"] if r % 2 == 0 else ["prx", "img2dataset"]
                    for tool in order:
                        out = os.path.join(tmp, f"{tool}-{delay}-{r}")
                        shutil.rmtree(out, ignore_errors=True)
                        cmd = img2dataset_cmd(urls, out, a) if tool == "img2dataset" else prx_cmd(urls, out, a)
                        times[tool].append(timed(cmd, env))
                        kept[tool] = count_kept_img2dataset(out) if tool == "img2dataset" else count_kept_prx(out)
                        print(f"delay {delay * 1000:.0f} ms, {tool}: {times[tool][-1]:.1f} s, {kept[tool]} kept",
                              flush=True)
                        shutil.rmtree(out, ignore_errors=True)
            finally:
                proc.terminate()
                proc.join()
            t_i, t_p = min(times["img2dataset"]), min(times["prx"])
            rows.append((delay, t_i, t_p, kept["img2dataset"], kept["prx"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {a.n} URLs, {a.processes} processes x "
          f"{a.threads} threads, shard size {a.shard_size}, best of {a.repeat}")
    print("| served delay | img2dataset | prx-data download | prx / img2dataset | kept (img2dataset / prx) |")
    print("|---|---|---|---|---|")
    for delay, t_i, t_p, k_i, k_p in rows:
        print(f"| {delay * 1000:.0f} ms | {t_i:.1f} s ({a.n / t_i:.0f} URL/s) | {t_p:.1f} s ({a.n / t_p:.0f} URL/s) "
              f"| {t_p / t_i:.2f} | {k_i} / {k_p} |")


if __name__ == "__main__":
    main()
