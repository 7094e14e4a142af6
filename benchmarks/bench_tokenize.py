"""Tokenization throughput: serial, with a process pool, and a warm cache load, on generated pairs.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_tokenize.py            # 100k pairs
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_tokenize.py --pairs 10000 --workers 4

The pairs are the demo's (`preftune.demo.make_pairs`), tokenized with the demo's tokenizer (byte-level
BPE trained on them, ChatML template) through the chat template (`template: chatml`: the pairs are
plain strings), cutoff_len 128, as `preftune train` does. Timed, each from the list of normalized pairs to the list of token ids:
  serial       tokenize_pairs in this process
  N workers    tokenize_pairs(num_workers=N), process start-up included
  cold cache   tokenize_cached on an empty cache folder: key + serial tokenization + writing the file
  warm cache   tokenize_cached again: key + reading and checking the file
Prints one line per measurement and a JSON summary (with the load average, since the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import tempfile
import time

from preftune.cache import cache_key, tokenize_cached
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.demo import build_tokenizer, make_pairs
from preftune.tokenization import TokenizeReport, tokenize_pairs


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cutoff-len", type=int, default=128)
    opts = parser.parse_args()

    raw = make_pairs(opts.pairs, seed=0)
    tokenizer = build_tokenizer([p[k] for p in raw[:2000] for k in ("prompt", "chosen", "rejected")])
    pairs = [PreferencePair(**p, where=f"bench:{i}") for i, p in enumerate(raw)]
    folder = tempfile.mkdtemp(prefix="preftune-bench-cache-")
    cfg = from_dict({"cutoff_len": opts.cutoff_len, "tokenized_cache_dir": folder, "template": "chatml"})
    results = {"pairs": opts.pairs, "workers": opts.workers, "cutoff_len": opts.cutoff_len,
               "cpu_count": os.cpu_count(), "loadavg_before": os.getloadavg()}
    try:
        serial, seconds, cpu = timed(lambda: tokenize_pairs(copy.deepcopy(tokenizer), pairs, opts.cutoff_len, "chatml"))
        results["serial"] = {"seconds": seconds, "pairs_per_s": opts.pairs / seconds, "cpu_s": cpu}
        children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        parallel, seconds, cpu = timed(lambda: tokenize_pairs(copy.deepcopy(tokenizer), pairs, opts.cutoff_len, "chatml",
                                                              num_workers=opts.workers))
        assert parallel == serial, "parallel output differs from serial"
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        workers_cpu = after.ru_utime + after.ru_stime - children_cpu.ru_utime - children_cpu.ru_stime
        results[f"{opts.workers}_workers"] = {"seconds": seconds, "pairs_per_s": opts.pairs / seconds,
                                              "cpu_s_parent": cpu, "cpu_s_workers": workers_cpu}
        _, seconds, _ = timed(lambda: cache_key(tokenizer, pairs, cfg))
        results["cache_key_only"] = {"seconds": seconds}
        cold, seconds, _ = timed(lambda: tokenize_cached(copy.deepcopy(tokenizer), pairs, cfg, TokenizeReport()))
        results["cold_cache"] = {"seconds": seconds, "pairs_per_s": opts.pairs / seconds}
        warm, seconds, _ = timed(lambda: tokenize_cached(copy.deepcopy(tokenizer), pairs, cfg, TokenizeReport()))
        assert warm == cold == serial, "cached output differs"
        results["warm_cache"] = {"seconds": seconds, "pairs_per_s": opts.pairs / seconds}
        results["cache_file_mib"] = sum(f.stat().st_size for f in os.scandir(folder)) / 2**20
        results["tokens_per_pair"] = sum(len(t.chosen_ids) + len(t.rejected_ids) for t in serial) / len(serial)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["loadavg_after"] = os.getloadavg()
    for name in ("serial", f"{opts.workers}_workers", "cold_cache", "warm_cache"):
        r = results[name]
        cpu = r.get("cpu_s", r.get("cpu_s_workers"))
        print(f"{name:12s} {r['seconds']:7.2f} s  {r['pairs_per_s']:9.0f} pairs/s"
              + (f"  ({cpu:.1f} CPU s)" if cpu is not None else ""))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
