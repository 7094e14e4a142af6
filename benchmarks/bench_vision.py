"""Each pair's images encoded once against once per row (chosen and rejected): the time of the passes of a DPO
step on the same batch, for a tiny LLaVA and a tiny Qwen2-VL whose prompts are mostly image tokens, as real ones are.

    python benchmarks/bench_vision.py                      # CPU, both families, 4 pairs of one image each
    python benchmarks/bench_vision.py --families qwen2_vl --repeats 5

Timed per pass, alternately (once, twice, once, twice, ...) so that other load on the machine falls on both alike;
the figure is the median. Three passes: the policy's forward + backward with the vision tower frozen
(LLaMA-Factory's default, freeze_vision_tower), the same with it trained, and a reference's forward (no gradients).
"twice" is every row's images through the vision tower, what preftune did before, what TRL does, and what a
backbone without `mm_encoder_outputs` still gets (logps._rows_media); both give the same log-probs (checked here
to 1e-5, and in tests/test_vision_encode_once.py).

The shapes keep the proportions of the real models, scaled down: the vision tower about as wide as the language
model for Qwen2-VL-2B (ViT 1280 wide, 32 blocks, on 4 patches per image token; the LM 1536 wide, 28 layers), a
narrower one for LLaVA-1.5 (CLIP ViT-L 1024 wide, 24 blocks, one patch per image token; the LM 4096 wide, 32 layers).
The prompt is one 224x224 image (256 patches of 14x14: 256 image tokens for LLaVA, 64 for Qwen2-VL after its 2x2
merge) and 16 text tokens, each completion about 32 tokens; the language model is 128 wide, 4 layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preftune import logps as logps_mod  # noqa: E402
from preftune.logps import get_batch_logps  # noqa: E402

VOCAB, IMAGE_TOKEN, PAD = 4096, 4000, 0


def build(family: str):
    """A random-init model and what a batch's images give it: (model, vision module, per-image tensors of one
    image, image tokens per image)."""
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=None)
    if family == "llava":
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=224, patch_size=14, projection_dim=32)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=Qwen2Config(**text),
                                                          image_token_id=IMAGE_TOKEN,
                                                          vision_feature_select_strategy="default"))
        return model, model.model.vision_tower, {"pixel_values": torch.randn(1, 3, 224, 224)}, 256
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
    vision = {"depth": 4, "embed_dim": 112, "hidden_size": 128, "num_heads": 4, "mlp_ratio": 4, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text,
                                                          image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
                                                          vision_start_token_id=IMAGE_TOKEN + 2,
                                                          vision_end_token_id=IMAGE_TOKEN + 3))
    return model, model.model.visual, {"pixel_values": torch.randn(16 * 16, 3 * 2 * 14 * 14),
                                       "image_grid_thw": torch.tensor([[1, 16, 16]])}, 64


def batch(pairs: int, image_tokens: int, one_image: dict, family: str, text_len: int = 16,
          completion_len: int = 32) -> dict:
    """`pairs` pairs, each prompt one image and text_len text tokens: 2B rows [chosen; rejected], right-padded."""
    g = torch.Generator().manual_seed(0)
    rows, starts = [[], []], []
    for _ in range(pairs):
        prompt = [IMAGE_TOKEN + 2] + [IMAGE_TOKEN] * image_tokens + [IMAGE_TOKEN + 3] + \
            torch.randint(3, 3000, (text_len,), generator=g).tolist()
        starts.append(len(prompt))
        for side in rows:
            n = completion_len + int(torch.randint(-8, 9, (1,), generator=g))
            side.append(prompt + torch.randint(3, 3000, (n,), generator=g).tolist())
    rows = rows[0] + rows[1]
    T = max(map(len, rows))
    input_ids = torch.full((len(rows), T), PAD)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        completion_mask[i, starts[i % pairs]:len(row)] = 1
    media = {k: torch.cat([v] * pairs) for k, v in one_image.items()}  # the pairs' images, once
    if family == "qwen2_vl":
        media["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "media": media}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="llava,qwen2_vl")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds measure this work alone)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    real_takes = logps_mod._takes_encoder_outputs
    print(f"torch threads {torch.get_num_threads()}; {args.pairs} pairs of one image; median of {args.repeats} "
          "alternating runs; CPU seconds of this process (wall seconds in brackets)")
    print("| model | pass | image tokens / row tokens | images encoded once / twice | once s | twice s | saved |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for family in args.families.split(","):
        model, vision, one_image, image_tokens = build(family)
        b = batch(args.pairs, image_tokens, one_image, family)
        share = f"{int((b['input_ids'] == IMAGE_TOKEN).sum())} / {int(b['attention_mask'].sum())}"
        encoded = []
        vision.register_forward_pre_hook(lambda m, a, kw: encoded.append(1), with_kwargs=True)
        for name in ("policy, vision frozen", "policy, vision trained", "reference (no grad)"):
            for p in vision.parameters():
                p.requires_grad_(name != "policy, vision frozen")
            times, walls, logps, calls = {"once": [], "twice": []}, {"once": [], "twice": []}, {}, {}
            for _ in range(args.repeats + 1):  # the first round warms up
                for way in ("once", "twice"):
                    logps_mod._takes_encoder_outputs = real_takes if way == "once" else (lambda backbone: False)
                    model.zero_grad(set_to_none=True)
                    encoded.clear()
                    start, wall = time.process_time(), time.perf_counter()
                    with torch.no_grad() if name.startswith("reference") else torch.enable_grad():
                        out = get_batch_logps(model, **b)
                        if out.logps.requires_grad:
                            out.logps.sum().backward()
                    times[way].append(time.process_time() - start)
                    walls[way].append(time.perf_counter() - wall)
                    logps[way], calls[way] = out.logps.detach(), len(encoded)
            logps_mod._takes_encoder_outputs = real_takes
            torch.testing.assert_close(logps["once"], logps["twice"], rtol=1e-5, atol=1e-5)
            assert calls["once"] == calls["twice"] == 1  # one batched call of the vision tower either way
            once_s, twice_s = (statistics.median(times[k][1:]) for k in ("once", "twice"))
            once_w, twice_w = (statistics.median(walls[k][1:]) for k in ("once", "twice"))
            print(f"| {family} | {name} | {share} | {args.pairs} / {2 * args.pairs} | {once_s:.3f} ({once_w:.2f}) "
                  f"| {twice_s:.3f} ({twice_w:.2f}) | {1 - once_s / twice_s:.0%} ({1 - once_w / twice_w:.0%}) |")


if __name__ == "__main__":
    main()
