"""Throughput and peak memory of preftune's DPO loop against TRL's DPOTrainer, same model, data and settings.

    python benchmarks/bench_dpo.py                       # CPU defaults, a few minutes on 2 cores
    python benchmarks/bench_dpo.py --bf16 --batch-size 16 --hidden 1024 --layers 8   # on a GPU
    python benchmarks/bench_dpo.py --arch qwen2.5-1.5b --bf16 --seq-len 1024 --quiet-wait 0 --repeats 1   # Qwen2.5-1.5B's shape

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

On CUDA it also reports torch.cuda.max_memory_allocated and the MFU: model FLOPs per second over
the device's peak dense bf16 FLOP/s. Model FLOPs per trained (non-padding) token are 6N for the
policy's forward and backward (4N with a frozen base: LoRA, QLoRA) plus 2N for a live reference's
forward (0 with --precompute), N being the parameters without the input embedding but with the LM
head (counted once when tied: its matmul costs vocabulary x hidden per token either way); attention's
own FLOPs are left out. benchmarks/gpu_check.sh runs this script for the GPU figures.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
ASSETS_FORMAT = 1  # bump when what make_assets writes changes: cached assets of another format are rebuilt
# --arch: the published shapes of Qwen2.5-0.5B and -1.5B (weights random), and a tiny one for smoke runs
ARCHS = {
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936},
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936},
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048},
}
ARCH_COMMON = {"tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
# peak dense bf16 FLOP/s by device name (datasheet figures; SXM parts), for the MFU
PEAK_BF16_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
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
    p.add_argument("--arch", choices=sorted(ARCHS), default=None,
                   help="a fixed model shape instead of --hidden/--layers/--vocab: Qwen2.5-0.5B's or Qwen2.5-1.5B's "
                        "published config (random weights, tied embeddings, rope theta 1e6) or a tiny one")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the weights are loaded in (both); --bf16 adds autocast")
    p.add_argument("--attn", choices=["sdpa", "flash_attention_2", "flex_attention", "eager"], default=None,
                   help="attention implementation (both; default: transformers' choice, sdpa)")
    p.add_argument("--padding-free", action="store_true",
                   help="preftune's padding_free (TRL 1.16 has disabled its own padding_free: TRL runs padded)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="gradient checkpointing in both (default off in both)")
    p.add_argument("--activation-offloading", action="store_true",
                   help="activation offloading in both (saved activations in CPU memory until the backward)")
    p.add_argument("--precompute", action="store_true",
                   help="precompute_ref_log_probs (both): the reference runs before training and is not kept")
    p.add_argument("--finetuning-type", choices=["full", "lora"], default="full",
                   help="preftune's finetuning_type (lora: rank 8 on every linear layer); lora needs --only preftune")
    p.add_argument("--quantization-bit", type=int, choices=[4, 8], default=None,
                   help="preftune's quantization_bit (QLoRA; CUDA; with --finetuning-type lora, --only preftune)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s of the device, for the MFU (default: 989 for H100/H200, 312 for "
                        "A100, from the device name; else no MFU)")
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
    p.add_argument("--run-name", default=None,
                   help="suffix of the children's output folders and logs (out_<framework>_<name>, "
                        "<framework>_<name>.log), so that runs sharing a work folder keep theirs apart")
    p.add_argument("--assets-only", action="store_true",
                   help="write the model, tokenizer and data to the work folder, print them as one "
                        "BENCH_ASSETS {json} line and stop")
    p.add_argument("--child", choices=["preftune", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps:
        p.error("need 1 <= --warmup-steps < --steps (the timing starts at the end of a warm-up step)")
    if (args.finetuning_type != "full" or args.quantization_bit) and args.only != "preftune" and not args.child:
        p.error("--finetuning-type lora and --quantization-bit are preftune-only settings: add --only preftune")
    if args.quantization_bit and args.finetuning_type != "lora":
        p.error("--quantization-bit needs --finetuning-type lora (QLoRA)")
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


def model_vocab(args) -> int:
    return ARCHS[args.arch]["vocab_size"] if args.arch else args.vocab


def build_model(args):
    """The randomly initialised Qwen2-architecture model: --arch's shape, else --hidden/--layers/--vocab."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from preftune import demo

    if args.arch is None:
        return demo.build_model(args.vocab, args.seed, hidden=args.hidden, layers=args.layers)
    torch.manual_seed(args.seed)
    config = Qwen2Config(**ARCHS[args.arch], **ARCH_COMMON)
    # initialising 1.5B weights takes a while on CPU; on the GPU it is instant
    if torch.cuda.is_available() and args.arch != "tiny":
        try:
            with torch.device("cuda"):
                model = Qwen2ForCausalLM(config).cpu()
            torch.cuda.empty_cache()  # the children, not this process, should hold the GPU's memory
            return model
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # e.g. a busy GPU: CPU is slower but works
            print(f"[bench] initialising on the GPU failed ({str(e).splitlines()[0]}); on CPU instead", flush=True)
            torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(config)


def flops_params(model) -> int:
    """N of the MFU: the parameters without the input embedding, with the LM head (once, tied or not)."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head is the embedding, counted once here
    return total - embedding.numel() + (head.numel() if head is embedding else 0)


def make_assets(args) -> dict:
    """Write model/ and train.jsonl to the work folder; return what the children and the report need.
    A work folder that already holds the assets of the same settings (assets.json) is reused."""
    work = Path(args.work)
    model_dir, data_path, record = work / "model", work / "train.jsonl", work / "assets.json"
    work.mkdir(parents=True, exist_ok=True)
    n_pairs = args.pairs or args.steps * args.batch_size
    key = {"format": ASSETS_FORMAT, "arch": args.arch, "hidden": args.hidden, "layers": args.layers,
           "vocab": model_vocab(args), "seq_len": args.seq_len, "pairs": n_pairs, "seed": args.seed}
    if record.is_file() and data_path.is_file() and (model_dir / "config.json").is_file():
        cached = json.loads(record.read_text())
        if cached["key"] == key:
            return cached["assets"]
    record.unlink(missing_ok=True)
    assets = _write_assets(args, model_dir, data_path, n_pairs)
    record.write_text(json.dumps({"key": key, "assets": assets}, indent=1))
    return assets


def _write_assets(args, model_dir: Path, data_path: Path, n_pairs: int) -> dict:
    import torch

    from preftune import demo

    pairs = demo.make_pairs(n_pairs, args.seed)

    # A tokenizer trained on every phrase the data can contain, then completions lengthened to the target.
    banks_good = demo.GOOD_OPEN + demo.GOOD_BODY + demo.GOOD_CLOSE
    banks_bad = demo.BAD_OPEN + demo.BAD_BODY + demo.BAD_CLOSE
    corpus = [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")]
    corpus += [s.format(t=t) for s in banks_good + banks_bad + demo.ASKS for t in demo.TOPICS]
    # The corpus holds fewer merges than 16k tokens: a larger model vocabulary (Qwen's 151936) is unused rows,
    # which cost what they cost in a real run (the LM head projects onto every row).
    vocab = model_vocab(args)
    tokenizer = demo.build_tokenizer(corpus, vocab_size=min(vocab, 16384))
    if len(tokenizer) > vocab:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens > model vocabulary {vocab}")

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

    model = build_model(args)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, 2 * max(lengths))
    n_params, n_flops = sum(p.numel() for p in model.parameters()), flops_params(model)
    if args.arch and args.arch != "tiny":
        model = model.to(torch.bfloat16)  # half the bytes to write and read; --dtype decides what is loaded
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model_dir": str(model_dir), "data": str(data_path), "pairs": n_pairs, "params": n_params,
            "flops_params": n_flops, "arch": args.arch or f"hidden {args.hidden}, {args.layers} layers, vocab {vocab}",
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
        mask = batch.get("attention_mask")
        if mask is None:  # padding-free: the sequences back to back in one row, no padding
            n = batch["input_ids"].numel()
            self.batches.append((n, n))
        else:
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

    import preftune.step as step_module
    import preftune.train as pt
    from preftune.config import from_dict
    from preftune.step import PreferenceStep

    import_rss = _rss_mib()
    cfg = from_dict({
        "model_name_or_path": assets["model_dir"], "dataset": assets["data"],
        "output_dir": str(Path(args.work) / run_file("out_preftune", args)),
        "pref_beta": args.beta, "pref_loss": "sigmoid", "learning_rate": args.lr,
        "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "max_steps": args.steps, "logging_steps": args.logging_steps or args.steps,
        "cutoff_len": assets["max_length"] + 8,  # no truncation
        "template": "chatml",  # plain-string pairs through the ChatML template, as TRL renders the conversational rows
        "torch_dtype": args.dtype, "bf16": args.bf16, "disable_dropout": True,
        "progress_bar": False, "eval_strategy": "no", "plot_loss": False, "seed": 42,
        "attn_implementation": args.attn, "padding_free": args.padding_free,
        "gradient_checkpointing": args.gradient_checkpointing, "activation_offloading": args.activation_offloading,
        "precompute_ref_log_probs": args.precompute, "ref_logps_cache_dir": str(Path(args.work) / "ref_logps"),
        "finetuning_type": args.finetuning_type, "quantization_bit": args.quantization_bit,
    }, "bench")
    clock = StepClock()
    if args.padding_free:  # the step picks collate_packed from its module when it is built
        counter = TokenCounter(step_module.collate_packed)
        step_module.collate_packed = counter
    else:  # train() collates through the step class of its objective
        counter = TokenCounter(PreferenceStep.collate)
        PreferenceStep.collate = staticmethod(counter)
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
    result["output_files"] = sorted(f.name for f in Path(cfg.output_dir).iterdir())
    return result


def child_trl(args, assets) -> dict:
    import dataclasses

    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_rss = _rss_mib()
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(assets["model_dir"])
    load = {"dtype": getattr(torch, args.dtype)}
    if args.attn:
        load["attn_implementation"] = args.attn
    model = AutoModelForCausalLM.from_pretrained(assets["model_dir"], **load)
    # with precomputed log-probs TRL scores the data with the starting policy and keeps no reference
    ref_model = None if args.precompute else AutoModelForCausalLM.from_pretrained(assets["model_dir"], **load)
    rows = [json.loads(line) for line in open(assets["data"], encoding="utf-8")]
    # conversational form, so TRL applies the same ChatML template preftune applies
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    # TRL turns activation checkpointing on by default; transformers >= 5.2x names it activation_checkpointing,
    # earlier releases (GPU images lag) gradient_checkpointing: turn off whichever the installed one has
    fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    no_checkpointing = {k: args.gradient_checkpointing for k in ("activation_checkpointing", "gradient_checkpointing")
                        if k in fields}
    config = trl.DPOConfig(
        output_dir=str(Path(args.work) / run_file("out_trl", args)), report_to="none", use_cpu=not cuda,
        bf16=args.bf16, fp16=False, **no_checkpointing, activation_offloading=args.activation_offloading,
        disable_dropout=True,
        beta=args.beta, loss_type=["sigmoid"], learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim=args.trl_optim,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        logging_steps=args.logging_steps or args.steps, save_strategy="no", eval_strategy="no", max_length=None,
        precompute_ref_log_probs=args.precompute, dataloader_num_workers=0, disable_tqdm=True, seed=42,
    )
    assert not any(getattr(config, k) for k in no_checkpointing)
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

def run_file(stem: str, args) -> str:
    return f"{stem}_{args.run_name}" if args.run_name else stem


def run_child(framework, args, assets) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", framework]
    for key in ("steps", "warmup_steps", "batch_size", "hidden", "layers", "vocab", "seq_len", "lr", "beta",
                "trl_optim", "work", "seed", "threads", "logging_steps", "arch", "dtype", "attn", "finetuning_type",
                "quantization_bit", "run_name"):
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key in ("bf16", "padding_free", "precompute", "gradient_checkpointing", "activation_offloading"):
        if getattr(args, key):
            cmd.append(f"--{key.replace('_', '-')}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "BENCH_ASSETS": json.dumps(assets)}
    log_path = Path(args.work) / (run_file(framework, args) + ".log")
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


def model_flops_per_token(args, n: int) -> int:
    """Model FLOPs per trained token (module docstring): the policy's forward 2N and backward 4N (2N when
    the base is frozen: no weight gradients), plus a live reference's forward 2N."""
    policy = 6 if args.finetuning_type == "full" else 4
    return (policy + (0 if args.precompute else 2)) * n


def peak_flops(args, device: str) -> float | None:
    """Peak dense bf16 FLOP/s: --peak-tflops, else the datasheet figure for a known device name."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in device), None)


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
        ("MFU (model FLOP/s / peak bf16 FLOP/s)", "mfu", "{:.1%}"),
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
                and key not in ("loss_mean", "cpu_util", "other_processes_cores", "mfu"):
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
    if args.assets_only:
        print("BENCH_ASSETS " + json.dumps(assets), flush=True)
        return
    import torch
    import transformers
    try:  # the version only: importing trl here would cost every run seconds
        trl_version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        trl_version = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"[bench] model: Qwen2 {assets['arch']} "
          f"({assets['params'] / 1e6:.1f}M params, N = {assets['flops_params'] / 1e6:.1f}M for the MFU; "
          f"tokenizer {assets['tokenizer_size']} tokens); "
          f"{assets['pairs']} pairs, sequence length mean {assets['seq_len_mean']:.0f} "
          f"[{assets['seq_len_min']}, {assets['seq_len_max']}]; batch {args.batch_size} pairs, "
          f"{args.steps} steps ({args.warmup_steps} warm-up); {args.dtype} weights"
          f"{', bf16 autocast' if args.bf16 else ''}; attention {args.attn or 'default'}"
          f"{', padding-free (preftune)' if args.padding_free else ''}"
          f"{', precomputed reference' if args.precompute else ''}"
          f"{'' if args.finetuning_type == 'full' else '; ' + args.finetuning_type}"
          f"{f' {args.quantization_bit}-bit' if args.quantization_bit else ''}; on "
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
    peak, per_token = peak_flops(args, device), model_flops_per_token(args, assets["flops_params"])
    for r in results.values():
        r["model_flops_per_token"] = per_token
        r["mfu"] = per_token * r["tokens_per_s"] / peak if peak else None
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
                                                   "device": device, "peak_flops": peak}, indent=1))


if __name__ == "__main__":
    main()
