"""Batch benchmark: rows/s through the serving runtime against onnxruntime in process, and
the scoring process's peak RSS, for a small file and a large one (at least 1 GB).

    .venv/bin/python -m bench.batch [--large-gb 1.0] [--small-mb 64] [--format csv]
                                    [--chunk-rows 0] [--repeats 3] [--large-repeats 1]

The files are generated under the system's temporary folder at run time (a tabular MLP,
16 -> 64 -> 64 -> 2, and 16 float columns) and removed afterwards unless ``--keep``.
Each job runs in a fresh child process; its peak RSS comes from ``wait4``:

- runtime: ``deployer.batch.run_batch`` with a local serving instance of the model
  (``serving_instance``, the same operation a batch worker runs), V2 REST binary tensors;
  Given no chunk size it first probes the fastest (``probe_chunk_rows``, as a batch job
  does), inside its timed run;
- in-process: the same reader, mapping, chunking and writer, with onnxruntime in the
  process at the same batch size (the one the runtime job chose).

Both produce the same output file; the benchmark checks their digests agree. Target
(issue 15): runtime rows/s at least 80 % of in-process, and a peak RSS that does not
grow with the file. The machine is shared: read the ratio, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1024 * 1024
FEATURES = 16


def generate_csv(path: Path, target_bytes: int) -> int:
    """16 float columns until the file reaches ``target_bytes``; returns the rows."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(0)
    rows = 0
    with path.open("wb") as handle:
        while handle.tell() < target_bytes:
            block = rng.standard_normal((100_000, FEATURES)).astype(np.float32).round(5)
            table = pa.table({f"f{i}": block[:, i] for i in range(FEATURES)})
            pcsv.write_csv(table, handle, pcsv.WriteOptions(include_header=rows == 0))
            rows += block.shape[0]
    return rows


def generate_parquet(path: Path, target_bytes: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = 0
    schema = pa.schema([(f"f{i}", pa.float32()) for i in range(FEATURES)])
    with pq.ParquetWriter(path, schema) as writer:
        while path.stat().st_size < target_bytes:
            block = rng.standard_normal((500_000, FEATURES)).astype(np.float32)
            writer.write_table(pa.table({f"f{i}": block[:, i] for i in range(FEATURES)}))
            rows += block.shape[0]
    return rows


CHILD = """
import dataclasses, json, sys, time
from pathlib import Path
from deployer.batch import (BatchRequest, InputFormat, InstanceRequest, OnnxScorer, V2Scorer,
                            probe_chunk_rows, run_batch, serving_instance)
from deployer.runtimes.local import LocalProcessRuntime
mode, source, fmt, model, work, out, chunk = sys.argv[1:8]
request = BatchRequest(Path(source), InputFormat(fmt), Path(work), Path(out),
                       chunk_rows=int(chunk) or 1, max_errors=0)
local = OnnxScorer(Path(model))
probe = {}
started = time.monotonic()
if mode == "inprocess":
    result = run_batch(request, local)
else:
    runtime = LocalProcessRuntime(Path(work).parent / "runtime")
    spec = InstanceRequest(job_id=1, model_name="mlp", model_version="1",
                           model_path=Path(model), image="", work_dir=Path(work).parent / "inst")
    with serving_instance(runtime, spec) as (launch, headers):
        scorer = V2Scorer(launch.url, "mlp", local.signature, headers=headers)
        started = time.monotonic()
        if not int(chunk):  # as a batch job given no chunk size: the probe is in its time
            chosen = probe_chunk_rows(request, scorer)
            probe = {"chosen": chosen.chosen, "rows_per_s": chosen.rows_per_s}
            request = dataclasses.replace(request, chunk_rows=chosen.chosen)
        result = run_batch(request, scorer)
seconds = time.monotonic() - started
print(json.dumps({"rows": result.rows, "seconds": seconds, "rows_per_s": result.rows / seconds,
                  "chunk_rows": request.chunk_rows, "probe": probe,
                  "sha256": result.output_sha256}))
"""


def run_child(mode: str, source: Path, fmt: str, model: Path, folder: Path, chunk: int) -> dict:
    """One job in a fresh process; its report plus its peak RSS (MiB)."""
    work = folder / f"work-{mode}"
    out = folder / f"out-{mode}{source.suffix}"
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(source), fmt, str(model), str(work), str(out),
         str(chunk)],
        stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{mode} job failed (status {status})")
    report = json.loads(output.decode().strip().splitlines()[-1])
    report["peak_rss_mib"] = usage.ru_maxrss / 1024
    out.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _median(pairs: list[tuple[dict, dict]], side: int) -> dict:
    """The run of median rate on one side, with the highest peak RSS seen on that side."""
    runs = sorted((pair[side] for pair in pairs), key=lambda r: r["rows_per_s"])
    chosen = dict(runs[len(runs) // 2])
    chosen["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-gb", type=float, default=1.0)
    parser.add_argument("--small-mb", type=float, default=64)
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument(
        "--chunk-rows", type=int, default=0,
        help="rows per chunk; 0: the runtime job probes (as a batch job given none), and the "
        "in-process job runs at the size it chose",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs of the small file")
    parser.add_argument("--large-repeats", type=int, default=1, help="runs of the large file")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from bench.serving.models import build_mlp

    folder = Path(tempfile.mkdtemp(prefix="modelport-bench-batch-"))
    model = build_mlp(folder / "mlp.onnx", sizes=(FEATURES, 64, 64, 2))
    generate = generate_csv if args.format == "csv" else generate_parquet
    sizes = [("small", int(args.small_mb * MB)), ("large", int(args.large_gb * 1024 * MB))]
    rows_out = []
    try:
        for label, target in sizes:
            source = folder / f"{label}.{args.format}"
            started = time.monotonic()
            rows = generate(source, target)
            size_mb = source.stat().st_size / MB
            print(
                f"{label}: {source.name} {size_mb:.0f} MiB, {rows} rows "
                f"(generated in {time.monotonic() - started:.0f} s)",
                flush=True,
            )
            repeats = args.repeats if label == "small" else args.large_repeats
            pairs = []
            for _ in range(repeats):  # alternating, so both see the same load
                runtime = run_child("runtime", source, args.format, model, folder, args.chunk_rows)
                chunk = runtime["chunk_rows"]
                local = run_child("inprocess", source, args.format, model, folder, chunk)
                if runtime["sha256"] != local["sha256"]:
                    raise SystemExit(f"{label}: the two outputs differ")
                pairs.append((runtime, local))
                tried = ", ".join(
                    f"{rows}: {rate:.0f}"
                    for rows, rate in runtime["probe"].get("rows_per_s", {}).items()
                )
                print(
                    f"  runtime {runtime['rows_per_s']:.0f} rows/s, in-process "
                    f"{local['rows_per_s']:.0f} rows/s, chunk {chunk} rows"
                    + (f" (probed rows/s: {tried})" if tried else ""),
                    flush=True,
                )
            rows_out.append((label, size_mb, rows, _median(pairs, 0), _median(pairs, 1)))
            source.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    chunking = f"chunk {args.chunk_rows} rows" if args.chunk_rows else "chunk size probed"
    print(
        f"format {args.format}, {chunking}, model MLP 16-64-64-2; "
        "median rows/s of the repeats, highest peak RSS"
    )
    header = (
        f"{'file':<6} {'MiB':>6} {'rows':>9} | {'runtime r/s':>11} {'in-proc r/s':>11} "
        f"{'ratio':>6} | {'RSS runtime':>11} {'RSS in-proc':>11}"
    )
    print(header)
    print("-" * len(header))
    for label, size_mb, rows, runtime, local in rows_out:
        ratio = runtime["rows_per_s"] / local["rows_per_s"]
        print(
            f"{label:<6} {size_mb:>6.0f} {rows:>9} | {runtime['rows_per_s']:>11.0f} "
            f"{local['rows_per_s']:>11.0f} {ratio:>6.0%} | "
            f"{runtime['peak_rss_mib']:>8.0f} MiB {local['peak_rss_mib']:>7.0f} MiB"
        )


if __name__ == "__main__":
    main()
