"""Run every side-by-side benchmark, each in its own process, and print one markdown table of the results.

    python bench/run_all.py [--repeats 5] [--out bench/results.jsonl]

The JSON lines (one per benchmark, with the conditions: CPU, threads, torch and transformers versions) go to --out;
the table is what bench/README.md records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_train.py", "bench_decode.py", "bench_data.py")


def table(results: list[dict]) -> str:
    lines = ["| benchmark | lmforge | transformers / tokenizers | ratio | notes |", "|---|---|---|---|---|"]
    for result in results:
        kind = result["benchmark"]
        if kind == "train":
            hf = next(r for r in result["rows"] if r["name"] == "transformers")
            for row in result["rows"]:
                if row["name"] != "transformers":
                    lines.append(f"| training, {row['name']} | {row['tok_s']:.0f} tok/s, MFU {row['mfu']:.1%} | "
                                 f"{hf['tok_s']:.0f} tok/s, MFU {hf['mfu']:.1%} | {row['ratio']:.2f}x | matmul peak "
                                 f"{result['peak_flops'] / 1e9:.1f} GFLOP/s |")
            for name, parts in result.get("profile_s", {}).items():
                lines.append(f"| profile of a step, {name} | " + ", ".join(
                    f"{part} {seconds:.2f} s" for part, seconds in parts.items()) + " | | | torch.profiler |")
        if kind in ("train", "memory"):
            for mem in result.get("memory", []):
                lines.append(f"| peak memory, {mem['name']}, checkpointing {'on' if mem['checkpointing'] else 'off'}"
                             f" | {mem['peak_rss_mib']:.0f} MiB | | | of which the steps: "
                             f"{mem['peak_rss_mib'] - mem['rss_before_mib']:.0f} MiB |")
        if kind == "decode":
            for row in result["rows"]:
                if "lmforge_ms" in row:
                    lines.append(f"| {row['name']} tokens, time to first token | {row['lmforge_ms']:.0f} ms | "
                                 f"{row['transformers_ms']:.0f} ms | {row['ratio']:.2f}x | same token: "
                                 f"{row['identical']} |")
                else:
                    lines.append(f"| {row['name']}, greedy, 128 new tokens | {row['lmforge_tok_s']:.1f} tok/s | "
                                 f"{row['transformers_tok_s']:.1f} tok/s | {row['ratio']:.2f}x | same ids: "
                                 f"{row['identical']}"
                                 + (f"; compiled once, {row['compile_s']:.0f} s" if "compile_s" in row else "")
                                 + (f" (loads in {row['load_s']:.1f} s)" if "load_s" in row else "")
                                 + " |")
        elif kind == "data":
            lines.append(f"| data prep, encoding ({result['corpus']}, {result['text_mb']:.1f} MB) | "
                         f"{result['lmforge_encode_mb_s']:.2f} MB/s | {result['plain_tokenizers_mb_s']:.2f} MB/s | "
                         f"{result['ratio']:.2f}x | same ids: {result['identical_ids']} |")
            if "prepare_mb_s" in result:
                prepare = result["prepare_mb_s"]
                lines.append(f"| data prep, whole `data prepare` command | {prepare['auto']:.2f} MB/s | "
                             f"{prepare['tokenizers']:.2f} MB/s (its tokenizers encoder) | "
                             f"{prepare['auto'] / prepare['tokenizers']:.2f}x | same shards: "
                             f"{result['prepare_identical_shards']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of an existing --out file")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table_only:
        print(table([json.loads(line) for line in out.read_text().splitlines() if line.strip()]))
        return
    out.unlink(missing_ok=True)
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        extra = {"bench_train.py": ["--compile", "--profile"], "bench_decode.py": ["--compile"]}.get(script, [])
        subprocess.run([sys.executable, str(HERE / script), "--repeats", str(args.repeats), "--json", str(out), *extra],
                       check=True)
    results = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    print(table(results))


if __name__ == "__main__":
    main()
