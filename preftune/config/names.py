"""The values config keys take, as plain data: loss, optimizer and schedule names, templates, trackers.

Some of these names belong to modules that import torch (losses.py, optim.py). Config keeps its own
copy so that reading a config, and `preftune <command> --help`, never import torch;
tests/test_config.py keeps each copy equal to its owner's.
"""

from __future__ import annotations

# losses.py: LOSSES (paired, in its order), UNPAIRED_LOSSES, REFERENCE_FREE, and the losses whose
# function takes label_smoothing (losses.loss_options)
LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
          "apo_zero", "apo_down", "discopop", "sigmoid_norm", "kto_pair", "simpo", "orpo", "sft")
UNPAIRED_LOSSES = ("kto",)
REFERENCE_FREE = ("simpo", "orpo", "sft")
LABEL_SMOOTHING_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
# ... and the losses whose function takes f_divergence_type: those built on DPO's margin h, where f-DPO puts
# f'(pi/pi_ref) in place of the log-ratios (TRL 1.16 allows it with these, and sft)
F_DIVERGENCE_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm")
LOSS_NAMES = (*LOSSES, *UNPAIRED_LOSSES)  # every pref_loss value

# optim.py: OPTIMIZERS and SCHEDULERS
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
# LLaMA-Factory's flash_attn values -> transformers' attn_implementation (None: transformers' default)
FLASH_ATTN = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
# `template` values: the built-in chat templates (tokenization.BUILTIN_TEMPLATES, kept equal by a test)
# and the names that mean raw text, no template
TEMPLATE_NAMES = ("chatml", "qwen", "llama3", "mistral", "gemma", "default", "qwen3", "qwen3_nothink", "deepseek3",
                  "llama4", "gemma3", "glm4", "phi4")
RAW_TEMPLATE_NAMES = ("none", "empty", "plain")
# LLaMA-Factory's templates for vision-language models, with the model types each is for: such a model's
# processor renders the pairs (vision.py), as the template does; the name is refused with any other model
VISION_TEMPLATES = {"qwen2_vl": ("qwen2_vl", "qwen2_5_vl")}
# pref_loss values Liger's fused linear DPO loss (liger-kernel 0.8.5) computes as losses.py does, under
# the same names: enable_liger_kernel takes these. Not ipo (Liger refuses it), sigmoid_norm (no length
# average in Liger), aot / aot_unpaired (sorted over the batch), kto_pair, and the reference-free ones.
LIGER_LOSSES = ("sigmoid", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                "discopop")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # report_to values (accelerate's trackers), besides all/none
