"""Throughput and peak memory of preftune's DPO loop against TRL's DPOTrainer, same model, data and settings.

    python benchmarks/bench_dpo.py                       # CPU defaults, a few minutes on 2 cores
    python benchmarks/bench_dpo.py --bf16 --batch-size 16 --hidden 1024 --layers 8   # on a GPU

The parent process writes a randomly initialised Qwen2-architecture model, a byte-level BPE
tokenizer with a ChatML template and a set of preference pairs to benchmarks/_work/, then trains
each framework in its own child process (this file, run with `--child preftune|trl`), so that each
child's peak memory is its own. A child prints one `BENCH_RESULT {json}` line; the parent prints a
table and the preftune/TRL ratios (`--json-out` also writes them to a file).

What is timed, identically for both: a global `torch.optim` step post-hook timestamps the end of
every optimizer step; the measured window runs from the end of the last warm-up step to the end of
the last step, so model loading, tokenization, the warm-up steps and anything after the last
optimizer step (final logging, saving) are outside it. Tokens are the non-padding tokens
(attention_mask sum) of the chosen + rejected sequences of every batch trained in that window,
counted by wrapping each framework's collator (preftune: `preftune.step.PreferenceStep.collate`; TRL: the
trainer's `data_collator`); batch k of the collator is the batch of optimizer step k
(gradient_accumulation_steps is 1 and there is no evaluation).
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "BENCH_RESULT "
CLEAN_OTHERS_CORES = 0.2  # a run is "contended" when other processes used more CPU than this while it was timed


# --------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per framework (warm-up included)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (each pair = 2 sequences)")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size (intermediate = 2 x hidden)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=16384, help="model vocabulary (LM head rows)")
    p.add_argument("--seq-len", type=int, default=192,
                   help="approximate tokens of prompt + completion per sequence (each drawn in [0.75, 1] x this)")
    p.add_argument("--pairs", type=int, default=None, help="pairs in the data set (default: steps x batch size)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (linear decay, no warmup, both)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (sigmoid loss, both)")
    p.add_argument("--logging-steps", type=int, default=None,
                   help="logging interval of both trainers (default: --steps, i.e. one log row at the end)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights (both); default fp32")
    p.add_argument("--trl-optim", default="adamw_torch",
                   help="TRL `optim`; adamw_torch is torch.optim.AdamW with default settings, as in preftune "
                        "(TRL's own default is adamw_torch_fused)")
    p.add_argument("--only", choices=["preftune", "trl"], help="run one framework only")
    p.add_argument("--retries", type=int, default=2,
                   help="extra runs (at most) for a framework with fewer than --repeats uncontended runs")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads in the children (0: torch's default)")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="before each run, wait up to this many seconds for other processes to leave the CPUs idle")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per framework, alternating (ABBA); the table shows each framework's fastest run")
    p.add_argument("--work", default=str(HERE / "_work"), help="work folder (model, data, outputs, child logs)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model weights and the data")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument("--child", choices=["preftune", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps:
        p.error("need 1 <= --warmup-steps < --steps (the timing starts at the end of a warm-up step)")
    return args


# --------------------------------------------------------------------------------------------
# parent: assets
# --------------------------------------------------------------------------------------------

def _extend(rng, text, bank, target_tokens, count_tokens):
    """Append sentences from `bank` to `text` until it has about `target_tokens` tokens."""
    from preftune import demo

    n = count_tokens(text)
    while n < target_tokens:
        sentence = " " + rng.choice(bank).format(t=rng.choice(demo.TOPICS))
        text += sentence
        n += count_tokens(sentence)
    return text


def make_assets(args) -> dict:
    """Write model/ and train.jsonl to the work folder; return what the children and the report need."""
    from preftune import demo

    work = Path(args.work)
    model_dir, data_path = work / "model", work / "train.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    n_pairs = args.pairs or args.steps * args.batch_size
    pairs = demo.make_pairs(n_pairs, args.seed)

    # A tokenizer trained on every phrase the data can contain, then completions lengthened to the target.
    banks_good = demo.GOOD_OPEN + demo.GOOD_BODY + demo.GOOD_CLOSE
    banks_bad = demo.BAD_OPEN + demo.BAD_BODY + demo.BAD_CLOSE
    corpus = [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")]
    corpus += [s.format(t=t) for s in banks_good + banks_bad + demo.ASKS for t in demo.TOPICS]
    tokenizer = demo.build_tokenizer(corpus, vocab_size=args.vocab)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens > --vocab {args.vocab}")

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(args.seed + 1)
    for p in pairs:
        prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                                    tokenize=False, add_generation_prompt=True)
        prompt_tokens = count(prompt_text) + 2  # + the answer's <|im_end|> and newline
        for key, bank in (("chosen", demo.GOOD_BODY), ("rejected", demo.BAD_BODY)):
            target = int(rng.uniform(0.75, 1.0) * args.seq_len) - prompt_tokens
            p[key] = _extend(rng, p[key], bank, target, count)
    with open(data_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)

    # Exact sequence lengths as both frameworks build them (ChatML turn of the prompt + the answer).
    lengths = []
    for p in pairs:
        for key in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]},
                                                  {"role": "assistant", "content": p[key]}], tokenize=False)
            lengths.append(count(text))

    model = demo.build_model(args.vocab, args.seed, hidden=args.hidden, layers=args.layers)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, 2 * max(lengths))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model_dir": str(model_dir), "data": str(data_path), "pairs": n_pairs, "params": n_params,
            "tokenizer_size": len(tokenizer), "seq_len_mean": sum(lengths) / len(lengths),
            "seq_len_min": min(lengths), "seq_len_max": max(lengths), "max_length": max(lengths)}


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------

def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all cores, all processes) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most max_wait s) until other processes use less than `threshold` cores; returns their last usage."""
    deadline, busy = time.time() + max_wait, 0.0
    while True:
        b0, t0 = machine_busy_seconds(), time.time()
        time.sleep(1.0)
        busy = (machine_busy_seconds() - b0) / (time.time() - t0)
        if busy < threshold or time.time() > deadline:
            return busy
        print(f"[bench] other processes use {busy:.1f} cores; waiting for a quiet machine ...", flush=True)


def _rss_mib(field: str = "VmRSS") -> float:
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """Timestamps the end of every optimizer step (a global torch.optim hook: same for both frameworks)."""

    def __init__(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.cuda = torch.cuda.is_available()
        self.stamps: list[float] = []
        self.cpu: list[float] = []  # process CPU time (all threads), to see contention from other processes
        self.machine: list[float] = []  # busy CPU time of the whole machine
        self.hwm = float("nan")
        self._torch = torch
        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        if self.cuda:
            self._torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.machine.append(machine_busy_seconds())
        self.hwm = _rss_mib("VmHWM")  # peak resident memory up to the end of this optimizer step


class TokenCounter:
    """Wraps a collate function; records (non-padding tokens, padded tokens) of every batch it builds."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, *a, **kw):
        batch = self.fn(*a, **kw)
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), int(mask.numel())))
        return batch


def measure(clock: StepClock, counter: TokenCounter, args) -> dict:
    import torch

    steps = len(clock.stamps)
    w = args.warmup_steps
    if steps <= w:
        raise RuntimeError(f"only {steps} optimizer steps ran; need more than --warmup-steps {w}")
    if len(counter.batches) < steps:
        raise RuntimeError(f"{len(counter.batches)} batches collated for {steps} steps")
    seconds = clock.stamps[-1] - clock.stamps[w - 1]  # end of the last warm-up step -> end of the last step
    timed = counter.batches[w:steps]  # batch k (0-based) is trained in step k+1
    real, padded = sum(r for r, _ in timed), sum(p for _, p in timed)
    per_step = [b - a for a, b in zip(clock.stamps[w - 1:-1], clock.stamps[w:])]
    cpu_util = (clock.cpu[-1] - clock.cpu[w - 1]) / (seconds * torch.get_num_threads())
    own = clock.cpu[-1] - clock.cpu[w - 1]
    others = max(0.0, (clock.machine[-1] - clock.machine[w - 1] - own) / seconds)
    return {"steps": steps, "timed_steps": steps - w, "seconds": seconds,
            "pairs_per_s": (steps - w) * args.batch_size / seconds, "tokens_per_s": real / seconds,
            "padded_tokens_per_s": padded / seconds, "tokens": real, "padded_tokens": padded,
            "step_seconds": [round(x, 3) for x in per_step], "cpu_util": cpu_util,
            "other_processes_cores": others, "peak_rss_to_last_step_mib": clock.hwm}


def memory(import_rss: float) -> dict:
    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mib": peak, "import_rss_mib": import_rss, "peak_rss_over_imports_mib": peak - import_rss}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_preftune(args, assets) -> dict:
    import torch

    import preftune.train as pt
    from preftune.config import from_dict
    from preftune.step import PreferenceStep

    import_rss = _rss_mib()
    cfg = from_dict({
        "model_name_or_path": assets["model_dir"], "dataset": assets["data"],
        "output_dir": str(Path(args.work) / "out_preftune"),
        "pref_beta": args.beta, "pref_loss": "sigmoid", "learning_rate": args.lr,
        "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "max_steps": args.steps, "logging_steps": args.logging_steps or args.steps,
        "cutoff_len": assets["max_length"] + 8,  # no truncation
        "torch_dtype": "float32", "bf16": args.bf16, "disable_dropout": True,
        "progress_bar": False, "eval_strategy": "no", "plot_loss": False, "seed": 42,
    }, "bench")
    clock = StepClock()
    counter = TokenCounter(PreferenceStep.collate)
    PreferenceStep.collate = staticmethod(counter)  # train() collates through the step class of its objective
    summary = pt.train(cfg)
    mem = memory(import_rss)  # before anything below allocates more
    result = {**measure(clock, counter, args), **mem}
    # mean train loss over all steps (each log row is the mean over its logging window), as TRL's training_loss
    history = json.loads((Path(cfg.output_dir) / "dpo_metrics" / "log_history.json").read_text())
    rows, prev, total = [r for r in history if "loss" in r], 0, 0.0
    for r in rows:
        total, prev = total + r["loss"] * (r["step"] - prev), r["step"]
    result["loss_mean"] = total / prev if prev else None
    result["self_reported_tokens_per_s"] = summary["timings"]["mean_tokens_per_second"]
    result["truncated"] = summary["data"].get("truncated")
    # the sequences preftune built, to check that both frameworks train on the same tokens
    from preftune.data import load_pairs
    from preftune.models import load_tokenizer
    from preftune.tokenization import tokenize_pairs
    tok = tokenize_pairs(load_tokenizer(cfg.model_name_or_path), load_pairs(cfg)[0], cfg.cutoff_len, cfg.template)
    result["dataset_tokens"] = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in tok)
    result["dataset_completion_tokens"] = sum(len(p.chosen_ids) - p.chosen_start + len(p.rejected_ids)
                                              - p.rejected_start for p in tok)
    result["threads"] = torch.get_num_threads()
    return result


def child_trl(args, assets) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_rss = _rss_mib()
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(assets["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(assets["model_dir"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(assets["model_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(assets["data"], encoding="utf-8")]
    # conversational form, so TRL applies the same ChatML template preftune applies
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    config = trl.DPOConfig(
        output_dir=str(Path(args.work) / "out_trl"), report_to="none", use_cpu=not cuda,
        bf16=args.bf16, fp16=False, activation_checkpointing=False, disable_dropout=True,
        beta=args.beta, loss_type=["sigmoid"], learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim=args.trl_optim,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        logging_steps=args.logging_steps or args.steps, save_strategy="no", eval_strategy="no", max_length=None,
        precompute_ref_log_probs=False, dataloader_num_workers=0, disable_tqdm=True, seed=42,
    )
    assert not config.gradient_checkpointing and not config.activation_checkpointing
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=config,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    clock = StepClock()
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    output = trainer.train()
    mem = memory(import_rss)
    result = {**measure(clock, counter, args), **mem}
    result["loss_mean"] = output.training_loss
    result["self_reported_tokens_per_s"] = None
    if trainer._total_train_tokens != sum(r for r, _ in counter.batches[:len(clock.stamps)]):
        result["warning"] = "collator token count differs from TRL's own num_tokens"
    ds = trainer.train_dataset
    result["dataset_tokens"] = sum(2 * len(p) + len(c) + len(r) for p, c, r in
                                   zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    result["dataset_completion_tokens"] = sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"]))
    result["threads"] = torch.get_num_threads()
    return result


# --------------------------------------------------------------------------------------------
# parent: run and report
# --------------------------------------------------------------------------------------------

def run_child(framework, args, assets) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", framework]
    for key in ("steps", "warmup_steps", "batch_size", "hidden", "layers", "vocab", "seq_len", "lr", "beta",
                "trl_optim", "work", "seed", "threads", "logging_steps"):
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.bf16:
        cmd.append("--bf16")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "BENCH_ASSETS": json.dumps(assets)}
    log_path = Path(args.work) / f"{framework}.log"
    if args.quiet_wait > 0:
        wait_for_quiet(args.quiet_wait)
    print(f"[bench] {framework}: running (log: {log_path}) ...", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=str(ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = "".join(open(log_path).readlines()[-30:])
        raise SystemExit(f"[bench] {framework} child failed (exit {proc.returncode}); log tail:\n{tail}")
    result = json.loads(lines[-1][len(MARK):])
    result["child_wall_s"] = time.time() - t0
    return result


def report(results: dict, assets: dict, args) -> str:
    rows = [
        ("pairs/s", "pairs_per_s", "{:.2f}"),
        ("tokens/s (non-padding)", "tokens_per_s", "{:.0f}"),
        ("padded tokens/s", "padded_tokens_per_s", "{:.0f}"),
        ("peak RSS, whole child (MiB)", "peak_rss_mib", "{:.0f}"),
        ("peak RSS up to the last optimizer step (MiB)", "peak_rss_to_last_step_mib", "{:.0f}"),
        ("RSS after imports (MiB)", "import_rss_mib", "{:.0f}"),
        ("peak RSS - imports (MiB)", "peak_rss_over_imports_mib", "{:.0f}"),
        ("CUDA max allocated (MiB)", "cuda_peak_mib", "{:.0f}"),
        ("CPU utilisation (1.0 = all threads busy)", "cpu_util", "{:.2f}"),
        ("other processes' CPU during timing (cores)", "other_processes_cores", "{:.2f}"),
        ("timed steps / seconds", None, None),
        ("mean train loss", "loss_mean", "{:.4f}"),
    ]
    names = [n for n in ("preftune", "trl") if n in results]
    lines = ["| metric | " + " | ".join("TRL" if n == "trl" else n for n in names)
             + (" | preftune / TRL |" if len(names) == 2 else " |"),
             "|---|" + "---:|" * len(names) + ("---:|" if len(names) == 2 else "")]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{results[n]['timed_steps']} / {results[n]['seconds']:.1f}" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + (" | |" if len(names) == 2 else " |"))
            continue
        if not any(results[n].get(key) is not None for n in names):
            continue
        cells = [fmt.format(results[n][key]) if results[n].get(key) is not None else "-" for n in names]
        ratio = ""
        if len(names) == 2 and results["trl"].get(key) and results["preftune"].get(key) is not None \
                and key not in ("loss_mean", "cpu_util", "other_processes_cores"):
            ratio = f"{results['preftune'][key] / results['trl'][key]:.2f}x"
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if len(names) == 2 else " |"))
    cells = [", ".join(f"{x:.0f}" + ("" if c else "*") for x, c in
                       zip(results[n]["all_tokens_per_s"], results[n]["all_clean"])) for n in names]
    lines.append("| tokens/s of every run (* = contended) | " + " | ".join(cells) + (" | |" if len(names) == 2 else " |"))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        assets = json.loads(os.environ["BENCH_ASSETS"])
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        result = (child_preftune if args.child == "preftune" else child_trl)(args, assets)
        print(MARK + json.dumps(result), flush=True)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    t0 = time.time()
    assets = make_assets(args)
    import torch
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"[bench] model: Qwen2 hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
          f"({assets['params'] / 1e6:.1f}M params, tokenizer {assets['tokenizer_size']} tokens); "
          f"{assets['pairs']} pairs, sequence length mean {assets['seq_len_mean']:.0f} "
          f"[{assets['seq_len_min']}, {assets['seq_len_max']}]; batch {args.batch_size} pairs, "
          f"{args.steps} steps ({args.warmup_steps} warm-up); {'bf16 autocast' if args.bf16 else 'fp32'} on "
          f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}",
          flush=True)
    names = [n for n in ("preftune", "trl") if args.only in (None, n)]
    runs: dict[str, list[dict]] = {n: [] for n in names}

    def clean(r):  # no other process took a noticeable share of the CPUs while this run was timed
        return r["other_processes_cores"] < CLEAN_OTHERS_CORES

    for rep in range(args.repeats + args.retries):
        todo = [n for n in (names if rep % 2 == 0 else names[::-1])  # ABBA order evens out drift
                if rep < args.repeats or sum(map(clean, runs[n])) < args.repeats]
        if not todo:
            break
        for name in todo:
            r = run_child(name, args, assets)
            runs[name].append(r)
            print(f"[bench] {name}: {r['pairs_per_s']:.2f} pairs/s, {r['tokens_per_s']:.0f} tokens/s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB, CPU utilisation {r['cpu_util']:.2f}, other processes "
                  f"{r['other_processes_cores']:.2f} cores{'' if clean(r) else ' (contended)'} "
                  f"({r['child_wall_s']:.0f} s in all)", flush=True)
    # best run per framework, among the uncontended ones when there are any: other processes only slow a run down
    results = {}
    for n in names:
        pool = [r for r in runs[n] if clean(r)] or runs[n]
        results[n] = {**max(pool, key=lambda r: r["tokens_per_s"]),
                      "all_tokens_per_s": [r["tokens_per_s"] for r in runs[n]],
                      "all_clean": [clean(r) for r in runs[n]],
                      "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs[n])}
        if not clean(results[n]):
            print(f"[bench] WARNING ({n}): every run shared the CPUs with other processes; numbers are low")
    if len(results) == 2 and results["preftune"]["dataset_tokens"] != results["trl"]["dataset_tokens"]:
        print(f"[bench] WARNING: the frameworks tokenized the data differently: preftune "
              f"{results['preftune']['dataset_tokens']} tokens, TRL {results['trl']['dataset_tokens']}")
    for name, r in results.items():
        if r.get("warning"):
            print(f"[bench] WARNING ({name}): {r['warning']}")
    print()
    print(report(results, assets, args))
    print(f"\n[bench] total {time.time() - t0:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "assets": assets, "results": results,
                                                   "torch": torch.__version__,
                                                   "transformers": transformers.__version__, "trl": trl_version,
                                                   "device": device}, indent=1))


if __name__ == "__main__":
    main()
