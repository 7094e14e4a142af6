"""Turning a preference pair into token ids with an exact prompt/completion boundary.

With a chat template (the tokenizer's own, or a built-in named by `template`), the prompt is
the conversation (`pair.messages`, or the single user turn `pair.prompt`) after an optional
system turn, and the completion is the final assistant turn; the
template supplies BOS and the end-of-turn token. Without one, the text is prompt + completion,
the tokenizer adds BOS as it normally does, and EOS is appended to the completion.

The boundary is found by tokenizing the whole sequence once and locating the first token
that ends past the prompt's last character (offset mapping), so tokens that merge across the
boundary are not split or duplicated; such a merged token counts as completion, and the
pairs where it happens are counted. Log-probs and losses cover completion tokens only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from preftune.data import PreferencePair
from preftune.errors import ConfigError, DataError

log = logging.getLogger("preftune")

# Built-in chat templates for tokenizers that ship none (LLaMA-Factory `template` names; the
# formats follow LLaMA-Factory's src/llamafactory/data/template.py). Each writes BOS itself where
# the family has one (the text is then tokenized without special tokens, so BOS appears once), and
# ends every assistant turn with the family's end-of-turn token.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral and Gemma have no system turn: as in LLaMA-Factory, the system text opens the first user turn.
MISTRAL = ("{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
           "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
           "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + '[/INST]' }}{% set ns.system = '' %}"
           "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
         "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
         "{% elif m['role'] == 'user' %}{{ '<start_of_turn>user\n' + ns.system + m['content'] + '<end_of_turn>\n' }}"
         "{% set ns.system = '' %}"
         "{% else %}{{ '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# LLaMA-Factory's `default`. It writes no BOS; here a tokenizer's BOS (when it has one) opens the
# text, since a model pretrained with BOS expects it.
DEFAULT = ("{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
           "{% if m['role'] == 'system' %}{{ 'System: ' + m['content'] + eos_token + '\n' }}"
           "{% elif m['role'] == 'user' %}{{ 'Human: ' + m['content'] + eos_token + '\nAssistant:' }}"
           "{% else %}{{ m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}")
BUILTIN_TEMPLATES = {"chatml": CHATML, "qwen": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA,
                     "default": DEFAULT}


@dataclass
class TokenizedPair:
    """Token ids of prompt+chosen and prompt+rejected; completion tokens start at *_start."""
    chosen_ids: list[int]
    chosen_start: int
    rejected_ids: list[int]
    rejected_start: int
    truncated: bool = False


@dataclass
class TokenizedExample:
    """One unpaired (KTO) example: token ids of prompt+completion, completion from `start`, its label."""
    ids: list[int]
    start: int
    label: bool


@dataclass
class TokenizeReport:
    truncated: int = 0
    boundary_merges: int = 0


def setup_chat_template(tokenizer, template: str | None) -> bool:
    """Decide whether to use a chat template; returns True when one is used."""
    if tokenizer.chat_template:
        return True  # the tokenizer's own template is the one the model was trained with
    if template is None or template in ("empty", "plain", "none"):
        return False
    if template not in BUILTIN_TEMPLATES:
        raise ConfigError(f"template: '{template}' is not available for a tokenizer without a chat template "
                          f"(built-ins: {', '.join(BUILTIN_TEMPLATES)}); or unset it for plain text")
    tokenizer.chat_template = BUILTIN_TEMPLATES[template]
    return True


def prompt_messages(pair: PreferencePair) -> list[dict[str, str]]:
    """The prompt as chat messages: the optional system turn, then the conversation (or the single user turn)."""
    turns = pair.messages if pair.messages is not None else [{"role": "user", "content": pair.prompt}]
    return ([{"role": "system", "content": pair.system}] if pair.system else []) + turns


def _encode(tokenizer, pair: PreferencePair, completion: str, use_template: bool) -> tuple[list[int], int, bool]:
    """(ids, completion_start, merged_across_boundary) for one prompt + completion."""
    if use_template:
        messages = prompt_messages(pair)
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # implicit-prompt text keeps the space after 'Assistant:' in the completion; a turn has none
        content = completion.strip() if pair.from_text else completion
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": content}],
                                                  tokenize=False)
        add_special = False  # the template writes BOS itself; adding it again would double it
    else:
        if pair.messages is not None and not pair.from_text:
            raise ConfigError(f"{pair.where}: a multi-turn conversation needs a chat template, and the tokenizer has "
                              "none; set template (e.g. chatml, llama3) or use a tokenizer with a chat template")
        prompt_text = (pair.system + "\n\n" if pair.system else "") + pair.prompt
        full_text = prompt_text + completion
        add_special = True
    enc = tokenizer(full_text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # Some templates render the prompt alone differently from the prompt inside the conversation;
    # the boundary is then the end of what both renderings share.
    boundary = len(prompt_text)
    if not full_text.startswith(prompt_text):
        boundary = next((i for i, (a, b) in enumerate(zip(prompt_text, full_text)) if a != b), len(prompt_text))
    start = next((i for i, (s, e) in enumerate(offsets) if e > boundary and e > s), len(ids))
    merged = start < len(ids) and offsets[start][0] < boundary
    if not use_template:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token and no chat template: completions cannot be ended")
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
    if len(ids) > 1 and tokenizer.bos_token_id is not None and ids[0] == ids[1] == tokenizer.bos_token_id:
        ids, start = ids[1:], start - 1  # a template that writes BOS, on a tokenizer that also adds it
    return ids, start, merged


def _truncate(ids: list[int], start: int, keep_prompt: int, keep_completion: int, bos_id) -> tuple[list[int], int]:
    prompt, completion = ids[:start], ids[start:]
    if len(prompt) > keep_prompt:
        # the prompt keeps its end (the words right before the answer) and its BOS
        if prompt and prompt[0] == bos_id and keep_prompt >= 2:
            prompt = prompt[:1] + prompt[len(prompt) - keep_prompt + 1:]
        else:
            prompt = prompt[len(prompt) - keep_prompt:]
    return prompt + completion[:keep_completion], len(prompt)


def tokenize_pair(tokenizer, pair: PreferencePair, cutoff_len: int, use_template: bool,
                  report: TokenizeReport) -> TokenizedPair:
    chosen_ids, chosen_start, m1 = _encode(tokenizer, pair, pair.chosen, use_template)
    rejected_ids, rejected_start, m2 = _encode(tokenizer, pair, pair.rejected, use_template)
    if m1 or m2:
        report.boundary_merges += 1
    prompt_len = min(chosen_start, rejected_start)
    if prompt_len == 0:
        raise DataError(f"{pair.where}: the prompt is empty and the tokenizer adds no BOS, so the first completion "
                        "token has no context to be scored from; give every pair a prompt")
    if chosen_start >= len(chosen_ids) or rejected_start >= len(rejected_ids):
        raise DataError(f"{pair.where}: a completion produced no tokens after the prompt")
    completion_len = max(len(chosen_ids) - chosen_start, len(rejected_ids) - rejected_start)
    truncated = prompt_len + completion_len > cutoff_len
    if truncated:
        # Keep the completion whole when the prompt can give way; otherwise the prompt keeps at
        # least half the budget (its end) and the completions keep their start.
        keep_prompt = max(cutoff_len - completion_len, min(prompt_len, cutoff_len // 2))
        keep_completion = cutoff_len - keep_prompt
        chosen_ids, chosen_start = _truncate(chosen_ids, chosen_start, keep_prompt, keep_completion,
                                             tokenizer.bos_token_id)
        rejected_ids, rejected_start = _truncate(rejected_ids, rejected_start, keep_prompt, keep_completion,
                                                 tokenizer.bos_token_id)
        report.truncated += 1
    return TokenizedPair(chosen_ids, chosen_start, rejected_ids, rejected_start, truncated)


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], cutoff_len: int, template: str | None,
                   report: TokenizeReport | None = None) -> list[TokenizedPair]:
    if not tokenizer.is_fast:
        raise ConfigError("preftune needs a fast tokenizer (offset mapping finds the prompt boundary); "
                          "the model's tokenizer.json is missing")
    report = report if report is not None else TokenizeReport()
    use_template = setup_chat_template(tokenizer, template)
    out = [tokenize_pair(tokenizer, p, cutoff_len, use_template, report) for p in pairs]
    if report.boundary_merges:
        log.warning("%d of %d pairs have a token that spans the prompt/completion boundary; it is scored as "
                    "completion", report.boundary_merges, len(pairs))
    return out


def tokenize_examples(tokenizer, examples: list, cutoff_len: int, template: str | None,
                      report: TokenizeReport | None = None) -> list[TokenizedExample]:
    """Unpaired examples for kto: an `UnpairedExample` gives one, a `PreferencePair` two (chosen
    desirable, rejected undesirable), tokenized and truncated exactly as pairs are."""
    as_pairs = [e if isinstance(e, PreferencePair) else
                PreferencePair(prompt=e.prompt, chosen=e.completion, rejected=e.completion, system=e.system,
                               where=e.where, messages=e.messages) for e in examples]
    out = []
    for example, tokenized in zip(examples, tokenize_pairs(tokenizer, as_pairs, cutoff_len, template, report)):
        if isinstance(example, PreferencePair):
            out += [TokenizedExample(tokenized.chosen_ids, tokenized.chosen_start, True),
                    TokenizedExample(tokenized.rejected_ids, tokenized.rejected_start, False)]
        else:
            out.append(TokenizedExample(tokenized.chosen_ids, tokenized.chosen_start, example.label))
    return out
