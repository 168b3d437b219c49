"""Shard-stage throughput, measured side by side in one run; prints a markdown table.

Build: the shards stage (scan, checks, tar writing over Ray, manifest) in images/s, against
plain ``tar cf`` of the same files (images and masks), to local disk and to an S3 server
(the tar then uploaded whole). Read: the training loader's path (webdataset stream ->
decode -> resize/crop 224, ``pipeline.data.iter_decoded``) against decoding and resizing
the same samples from memory, from local disk and through the S3 server.

    python bench/shard_io.py [--samples 60] [--size 512] [--repeats 3]

The data is synthetic Real-IAD (JPEG images, 5 views, PNG masks) from ``shards.synth``;
the S3 server is moto's, started on 127.0.0.1 in a separate process. Every figure is the
best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_s3() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the S3 server did not start")


def best(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=60, help="physical samples per class (x5 views), 2 classes")
    ap.add_argument("--size", type=int, default=512, help="image side")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    server = start_s3()
    import boto3
    import ray

    from pipeline.config import load_config
    from pipeline.data import decode_sample, iter_decoded
    from shards import storage
    from pipeline.stages import Context, shards as shards_stage
    from shards.manifest import shard_urls
    from shards.sources import scan_source
    from shards.synth import generate

    storage.register_webdataset_schemes()
    import torch
    import webdataset as wds

    torch.set_num_threads(1)  # both read paths decode in one thread: the ratio is the streaming overhead

    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        root = work / "realiad"
        normal = max(1, args.samples * 3 // 4)
        generate("realiad", root, classes=2, normal=normal, abnormal=args.samples - normal, size=args.size, views=5)
        boto3.client("s3").create_bucket(Bucket="bench")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

        def cfg(url: str):
            return load_config({
                "name": "bench", "backbone": {"levels": [1], "weights": "random"},
                "train": {"steps": 1, "storage": str(work / "train")},
                "sources": [{"name": "iad", "layout": "realiad", "root": str(root), "split": "pretrain"}],
                "shards": {"url": url, "max_samples_per_shard": 64},
            })

        scan = scan_source(cfg(str(work)).sources[0])
        files = [r.path for r in scan.records] + [r.mask_path for r in scan.records if r.mask_path]
        n = len(scan.records)
        mb = sum((root / f).stat().st_size for f in files) / 1e6
        (work / "files.txt").write_text("\n".join(files) + "\n")
        shards_stage.run(cfg(str(work / "warmup")), Context())  # Ray workers started, with their S3 clients
        shards_stage.run(cfg("s3://bench/warmup"), Context())

        rows = []
        t_build = best(lambda i: shards_stage.run(cfg(str(work / f"out{i}")), Context()), args.repeats)
        t_tar = best(lambda i: subprocess.run(["tar", "cf", str(work / f"plain{i}.tar"), "-C", str(root), "-T",
                                               str(work / "files.txt")], check=True), args.repeats)
        rows.append(("build -> local disk", n / t_build, "tar cf", n / t_tar, 0.8))

        def tar_to_s3(i: int) -> None:
            subprocess.run(["tar", "cf", str(work / "up.tar"), "-C", str(root), "-T", str(work / "files.txt")],
                           check=True)
            storage.put_file(str(work / "up.tar"), f"s3://bench/plain{i}.tar")

        t_build_s3 = best(lambda i: shards_stage.run(cfg(f"s3://bench/out{i}"), Context()), args.repeats)
        t_tar_s3 = best(tar_to_s3, args.repeats)
        rows.append(("build -> S3", n / t_build_s3, "tar cf + upload", n / t_tar_s3, 0.8))

        for where, url in (("local disk", str(work / "out0")), ("S3", "s3://bench/out0")):
            manifest = shards_stage.run(cfg(url), Context())
            urls = shard_urls(manifest, url)
            samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
            t_stream = best(lambda i: sum(1 for _ in iter_decoded(urls, 224)), args.repeats)
            t_memory = best(lambda i: [decode_sample(s, 224) for s in samples], args.repeats)
            rows.append((f"read {where}: stream->decode->224", len(samples) / t_stream,
                         "decode->224 from memory", len(samples) / t_memory, 0.9))

        print(f"{n} images ({args.size}px JPEG, {mb:.1f} MB with masks), {os.cpu_count()} CPUs, "
              f"best of {args.repeats}; S3 = moto server on 127.0.0.1\n")
        print("| path | images/s | baseline | images/s | ratio | goal |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for name, ours, base, theirs, goal in rows:
            print(f"| {name} | {ours:.0f} | {base} | {theirs:.0f} | {ours / theirs:.2f} | >= {goal:.2f} |")
    finally:
        ray.shutdown()
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
