"""Prefix sharing against the padded layout: the time of one forward + backward of the policy's log-probs
on the same pairs, for prompts of several lengths, and the tokens each layout runs through the model.

    python benchmarks/bench_prefix.py                       # CPU, a random-init Qwen2 (hidden 256, 4 layers)
    python benchmarks/bench_prefix.py --prompt-lens 64,512 --completion-len 64 --repeats 5

The two layouts are timed alternately (A, B, A, B, ...) so that other load on the machine falls on both
alike; the figure is the median. Both compute the same log-probs (checked here to 1e-4, and to 1e-5 in
tests/test_prefix_sharing.py). What sharing saves is the prompt's second pass: with prompt length P and
completions of C tokens, a pair costs 2(P + C) tokens padded and P + 2C shared (plus padding to the
batch's longest row in both), so the gain grows with P / C, less the cost of the explicit attention mask.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preftune.batching import collate, collate_shared  # noqa: E402
from preftune.logps import get_batch_logps, model_inputs  # noqa: E402
from preftune.tokenization import TokenizedPair  # noqa: E402


def pairs(n: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        c = completion_len + int(torch.randint(-completion_len // 4, completion_len // 4 + 1, (1,), generator=g))
        r = completion_len + int(torch.randint(-completion_len // 4, completion_len // 4 + 1, (1,), generator=g))
        out.append(TokenizedPair(prompt + torch.randint(3, vocab, (c,), generator=g).tolist(), prompt_len,
                                 prompt + torch.randint(3, vocab, (r,), generator=g).tolist(), prompt_len))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-lens", default="32,128,512")
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), attn_implementation=args.attn)
    model = Qwen2ForCausalLM(config)
    print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.attn}; "
          f"batch {args.batch} pairs, completions ~{args.completion_len} tokens; torch threads "
          f"{torch.get_num_threads()}; median of {args.repeats} alternating runs")
    print("| prompt tokens | tokens run padded | shared | padded s | shared s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for prompt_len in map(int, args.prompt_lens.split(",")):
        batch = pairs(args.batch, prompt_len, args.completion_len, args.vocab)
        layouts = {"padded": collate(batch, 0), "shared": collate_shared(batch, 0)}
        times = {k: [] for k in layouts}
        logps = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, b in layouts.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                out = get_batch_logps(model, **model_inputs(b))
                out.logps.sum().backward()
                times[name].append(time.perf_counter() - start)
                logps[name] = out.logps.detach()
        assert torch.allclose(logps["padded"], logps["shared"], atol=1e-4), "the layouts disagree"
        padded_s, shared_s = (statistics.median(times[k][1:]) for k in ("padded", "shared"))
        print(f"| {prompt_len} | {layouts['padded']['input_ids'].numel()} | {layouts['shared']['input_ids'].numel()} "
              f"| {padded_s:.3f} | {shared_s:.3f} | {padded_s / shared_s:.2f}x |")


if __name__ == "__main__":
    main()
