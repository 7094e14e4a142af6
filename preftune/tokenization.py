"""Turning a preference pair into token ids with an exact prompt/completion boundary.

How a pair is rendered (`Rendering`, decided once per run by `setup_rendering`) follows the
convention of TRL and LLaMA-Factory: conversational data (messages) goes through the chat template
(the tokenizer's own, or a built-in named by `template` for a tokenizer without one); plain-string
data is raw text unless `template` is set, so a model is trained on the format it was fine-tuned
on and is sampled in; `template: none` means raw text whatever the tokenizer holds. With a
template, the prompt is the conversation (`pair.messages`, or the single user turn `pair.prompt`)
after an optional system turn, the completion the final assistant turn, and the template supplies
BOS and the end-of-turn token. As raw text, the sequence is prompt + completion, the tokenizer adds
BOS as it normally does, and EOS is appended to the completion (an empty completion is EOS alone).

The boundary is found by tokenizing the whole sequence once and locating the first token
that ends past the prompt's last character (offset mapping), so tokens that merge across the
boundary are not split or duplicated; such a merged token counts as completion, and the
pairs where it happens are counted. Log-probs and losses cover completion tokens only.
`render_prompt` is the one rendering of a prompt: training (`encode_pair`) and generation
(`encode_prompts`, for sample, eval and generate_during_eval) both go through it.

Truncation (`truncate_pair`) splits `cutoff_len` between prompt and completion by LLaMA-Factory's
rule (`infer_seqlen`); completions keep their start, a cut prompt keeps its start or its end
(`truncation_mode`). `tokenize_pairs` runs serially or in a process pool; cache.py stores its output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from preftune.data import PreferencePair
from preftune.errors import ConfigError, DataError

log = logging.getLogger("preftune")

# Built-in chat templates for tokenizers that ship none (LLaMA-Factory `template` names; the
# formats follow LLaMA-Factory's src/llamafactory/data/template.py). Each writes BOS itself where
# the family has one (the text is then tokenized without special tokens, so BOS appears once), and
# ends every assistant turn with the family's end-of-turn token.
# ChatML as Qwen2.5 writes it: plain turns are `<|im_start|>role\ncontent<|im_end|>\n`; with tools,
# their definitions follow the system text inside <tools></tools>, an assistant's tool calls are
# <tool_call> JSON objects, and consecutive tool results share one user turn of <tool_response>s
# (the same format as LLaMA-Factory's `qwen` template).
CHATML = (
    "{% set ns = namespace(first=0) %}"
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set ns.first = 1 %}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}{% endif %}"
    "{% for message in messages[ns.first:] %}"
    "{% if message['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% elif message.get('tool_calls') %}{{ '<|im_start|>' + message['role'] }}"
    "{% if message['content'] %}{{ '\n' + message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] %}{% set call = call.get('function', call) %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' + (call['arguments'] | tojson) "
    "+ '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
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
# Thinking models: LLaMA-Factory's ReasoningTemplate (template.py) as a chat template. Its thought words are
# "<think>\n" and "\n</think>\n\n"; a thought is what lies between them, dropped as its `remove_thought`
# does (re.sub of every non-greedy match, then lstrip("\n")), which `drop_thought` writes without regex.
# - assistant turns of the history lose their thought (LLaMA-Factory's preserve_thinking: false), and so a
#   `reasoning_content` field (TRL / transformers) there is not written either, as Qwen3's own template;
# - the final assistant turn (the completion) keeps it: `reasoning_content` is written in front of the
#   content as Qwen3's template writes it; a completion with no <think> or </think> gets the empty thought
#   "<think>\n\n</think>\n\n" in front, trained on (LLaMA-Factory prepends it to the response ids);
# - enable_thinking: false drops the completion's thought too and puts the empty thought at the end of the
#   prompt (the generation prompt), so it is not trained on, as LLaMA-Factory and Qwen3's template do.
# Tool-call turns are written as CHATML writes them, without this handling.
THINK_OPEN, THINK_CLOSE, EMPTY_THOUGHT = "<think>\n", "\n</think>\n\n", "<think>\n\n</think>\n\n"
DROP_THOUGHT = (
    "{% macro drop_thought(text) %}{% set parts = text.split('<think>\n') %}"
    "{% set ns = namespace(out=parts[0], held='') %}{% for part in parts[1:] %}"
    "{% if '\n</think>\n\n' in part %}{% set ns.out = ns.out + part.split('\n</think>\n\n', 1)[1] %}"
    "{% set ns.held = '' %}{% else %}{% set ns.held = ns.held + '<think>\n' + part %}{% endif %}{% endfor %}"
    "{{ (ns.out + ns.held).lstrip('\n') }}{% endmacro %}")
THINKING_ANSWER = (  # sets `content`: an assistant text turn's content as the template writes it
    "{% set content = message['content'] %}"
    "{% if loop.last and not add_generation_prompt %}"
    "{% if message.get('reasoning_content') %}{% set content = '<think>\n' + message['reasoning_content'].strip('\n') "
    "+ '\n</think>\n\n' + content.lstrip('\n') %}{% endif %}"
    "{% if enable_thinking is defined and enable_thinking is false %}{% set content = drop_thought(content) %}{% endif %}"
    "{% if '<think>' not in content and '</think>' not in content %}{% set content = '<think>\n\n</think>\n\n' "
    "+ content %}{% endif %}"
    "{% elif preserve_thinking is defined and preserve_thinking %}"
    "{% if message.get('reasoning_content') %}{% set content = '<think>\n' + message['reasoning_content'].strip('\n') "
    "+ '\n</think>\n\n' + content.lstrip('\n') %}{% endif %}"
    "{% else %}{% set content = drop_thought(content) %}{% endif %}")
# LLaMA-Factory's `qwen3`: its `qwen` turns (CHATML here) with the thinking block.
QWEN3 = (DROP_THOUGHT + CHATML.replace(
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}",
    "{% elif message['role'] == 'assistant' %}" + THINKING_ANSWER
    + "{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}")
    .replace("{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
             "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
             "{% endif %}{% endif %}"))
# LLaMA-Factory's `deepseek3`: BOS, the system text bare, the user slot ends in the assistant's header
# (so the prompt needs no generation prompt), an answer ends with EOS.
DEEPSEEK3 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
             "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] + '<｜Assistant｜>' }}"
             "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
LLAMA4 = ("{{ bos_token }}{% for m in messages %}{{ '<|header_start|>' + m['role'] + '<|header_end|>\n\n' "
          "+ m['content'] + '<|eot|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}")
# LLaMA-Factory's `glm4`: "[gMASK]<sop>" opens the text (a string, not BOS); an answer is "\n" + content and
# the next <|user|> ends it in the history (efficient_eos), while the trained completion gets EOS appended,
# as LLaMA-Factory appends eos_token_id to the response ids.
GLM4 = ("{{ '[gMASK]<sop>' }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|assistant|>' }}"
        "{% else %}{{ '\n' + m['content'] }}{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}"
        "{% endif %}{% endfor %}")
PHI4 = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
TRUNCATION_MODES = ("keep_start", "keep_end")  # which end of a prompt that is cut is kept
MIN_PAIRS_PER_WORKER = 256  # below this a process pool costs more than it saves (starting one takes seconds)
# LLaMA-Factory's qwen3_nothink is its qwen without thinking handling, gemma3 its gemma (for text)
BUILTIN_TEMPLATES = {"chatml": CHATML, "qwen": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA,
                     "default": DEFAULT, "qwen3": QWEN3, "qwen3_nothink": CHATML, "deepseek3": DEEPSEEK3,
                     "llama4": LLAMA4, "gemma3": GEMMA, "glm4": GLM4, "phi4": PHI4}


@dataclass
class TokenizedPair:
    """Token ids of prompt+chosen and prompt+rejected; completion tokens start at *_start."""
    chosen_ids: list[int]
    chosen_start: int
    rejected_ids: list[int]
    rejected_start: int
    truncated: bool = False
    margin: float | None = None  # the pair's `margin` (stage: rm; `PreferencePair.margin`)


@dataclass
class TokenizedExample:
    """One unpaired (KTO) example: token ids of prompt+completion, completion from `start`, its label, and
    `kl_completion`: the completion of its neighbour in the data (`kl_neighbours`), for a KL row when its
    micro-batch holds no other prompt (a batch of one)."""
    ids: list[int]
    start: int
    label: bool
    kl_completion: list[int] | None = None


@dataclass
class TokenizeReport:
    truncated: int = 0  # pairs cut to fit cutoff_len / max_prompt_length
    dropped: int = 0  # pairs with no completion token left after the cut (left out of the run)
    boundary_merges: int = 0


# `template` values that mean raw text whatever the tokenizer holds. LLaMA-Factory's `empty` template
# writes the turns' text alone too (but neither BOS nor EOS: see docs/tokenization.md).
RAW_TEMPLATES = ("none", "empty", "plain", "raw")
# a chat template's marks -> the built-in of its family, to name in advice (`template: qwen`)
FAMILY_MARKS = {"<|im_start|>": "qwen", "<|start_header_id|>": "llama3", "<start_of_turn>": "gemma",
                "[INST]": "mistral"}


@dataclass(frozen=True)
class Rendering:
    """Which examples a chat template renders: conversational ones whenever one is available, plain-string
    ones only when `template` names one (LLaMA-Factory configs always do); the others are raw text."""
    conversations: bool  # a chat template renders conversational data (messages)
    plain: bool  # ... and plain-string data too
    source: str | None = None  # the chat template: "tokenizer" (its own) or a built-in's name; None: no chat template
    template: str | None = None  # the `template` setting this came from
    # arguments of every apply_chat_template call (config.chat_template_kwargs: enable_thinking, ...);
    # an example's own chat_template_kwargs are added over them
    chat_kwargs: dict = field(default_factory=dict)

    def uses_template(self, pair: PreferencePair) -> bool:
        return self.conversations if pair.conversational else self.plain


RAW_TEXT = Rendering(conversations=False, plain=False)


def setup_rendering(tokenizer, template: str | None, chat_kwargs: dict | None = None) -> Rendering:
    """Prepare the tokenizer for `encode_pair` and decide the rendering (the module docstring's convention):
    install the built-in `template` on a tokenizer without a chat template, and turn off truncation and
    padding that a tokenizer.json may switch on in the Rust tokenizer (encoding calls it directly;
    transformers turns them off on every call too), so no sequence is cut without being counted."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    named = template is not None and template.lower() not in RAW_TEMPLATES
    if template is not None and not named:
        return Rendering(conversations=False, plain=False, template=template)
    chat_kwargs = dict(chat_kwargs or {})
    if tokenizer.chat_template:
        # the tokenizer's own template is the one the model was trained with; a built-in one stands in for
        # a missing one only (once installed, it is recognised as the built-in it is)
        source = template if named and tokenizer.chat_template == BUILTIN_TEMPLATES.get(template) else "tokenizer"
    elif template is None:
        return Rendering(conversations=False, plain=False, chat_kwargs=chat_kwargs)
    elif template not in BUILTIN_TEMPLATES:
        raise ConfigError(f"template: '{template}' is not available for a tokenizer without a chat template "
                          f"(built-ins: {', '.join(BUILTIN_TEMPLATES)}); or unset it for plain text")
    else:
        tokenizer.chat_template = BUILTIN_TEMPLATES[template]
        source = template
    return Rendering(conversations=True, plain=named, source=source, template=template, chat_kwargs=chat_kwargs)


def describe_rendering(tokenizer, template: str | None, examples: list) -> dict[str, str]:
    """What the log and summary.json say about how `examples` are rendered: `used` ("raw", "chat template
    (tokenizer)", "template qwen"; one per kind of data when plain and conversational examples are mixed),
    `why`, and `hint` where plain strings meet a chat template they do not use: how to apply it."""
    rendering = setup_rendering(tokenizer, template)
    kinds = {e.conversational for e in examples} or {False}
    label = "raw" if rendering.source is None else (
        "chat template (tokenizer)" if rendering.source == "tokenizer" else f"template {rendering.source}")
    used, why = {}, []
    if False in kinds:
        used["plain strings"] = label if rendering.plain else "raw"
        if rendering.plain:
            why.append(f"template: {template} is set, so plain-string data goes through the chat template too"
                       + (" (the tokenizer's own: a built-in only stands in for a missing one)"
                          if rendering.source == "tokenizer" else ""))
        elif rendering.template is not None:
            why.append(f"template: {template}: raw text whatever the tokenizer holds")
        else:
            why.append("plain-string data and no template set: raw text (BOS as the tokenizer adds it, EOS after "
                       "each completion), as TRL renders plain strings")
    if True in kinds:
        used["conversations"] = label if rendering.conversations else "raw"
        if rendering.conversations:
            why.append("conversational data (messages) always goes through the chat template")
        elif rendering.template is not None:
            why.append(f"template: {template}: conversations as raw text (a single user turn's text; several "
                       "turns need a chat template)")
        else:
            why.append("conversational data, but the tokenizer has no chat template and template is unset: raw "
                       "text (set template, e.g. chatml or llama3, to render the turns)")
    out = {"used": next(iter(used.values())) if len(set(used.values())) == 1 else
           ", ".join(f"{v} ({k})" for k, v in used.items()), "why": "; ".join(why)}
    if False in kinds and not rendering.plain and rendering.source == "tokenizer":
        family = next((name for mark, name in FAMILY_MARKS.items() if mark in tokenizer.chat_template), "<name>")
        out["hint"] = (f"the tokenizer has a chat template, which plain-string data does not use; if the model was "
                       f"trained with it, set template: {family} (or give prompts as messages)")
    return out


def rendering_text(described: dict[str, str]) -> str:
    """`describe_rendering`'s answer as one line of the log."""
    return f"{described['used']} ({described['why']})" + (f"; hint: {described['hint']}" if "hint" in described else "")


def prompt_messages(pair: PreferencePair) -> list[dict[str, str]]:
    """The prompt as chat messages: the optional system turn, then the conversation (or the single user turn)."""
    turns = pair.messages if pair.messages is not None else [{"role": "user", "content": pair.prompt}]
    return ([{"role": "system", "content": pair.system}] if pair.system else []) + turns


def chat_kwargs(pair: PreferencePair, rendering: Rendering) -> dict:
    """The chat template's arguments for `pair`: the run's (enable_thinking, ...), then the pair's own
    `chat_template_kwargs` (TRL's dataset column), which win."""
    return {**rendering.chat_kwargs, **(pair.chat_template_kwargs or {})}


def render_prompt(tokenizer, pair: PreferencePair, rendering: Rendering) -> str:
    """The prompt as text: rendered once per pair, shared by its chosen and rejected sequences; the one
    rendering of a prompt that training, sampling and evaluation all use."""
    if rendering.uses_template(pair):
        return tokenizer.apply_chat_template(prompt_messages(pair), tokenize=False, add_generation_prompt=True,
                                             tools=pair.tools, **chat_kwargs(pair, rendering))
    if (pair.messages is not None and not pair.from_text) or pair.tools \
            or pair.chosen_messages is not None or pair.rejected_messages is not None:
        if rendering.template is not None:
            fix = f"template: {rendering.template} renders raw text; unset it or name a chat template (e.g. llama3)"
        elif rendering.source is not None:  # the tokenizer has one, and this pair's data is plain strings
            fix = "plain-string data is raw text unless template is set: set it (e.g. qwen, llama3)"
        else:
            fix = "the tokenizer has none; set template (e.g. chatml, llama3) or use a tokenizer with a chat template"
        raise ConfigError(f"{pair.where}: a multi-turn conversation needs a chat template (as do tool calls and "
                          f"completions of several messages); {fix}")
    return (pair.system + "\n\n" if pair.system else "") + pair.prompt


def _tool_texts(messages: list[dict], tools: list | None) -> list[str]:
    """What a template must write for tool turns: tool results, called and defined function names."""
    out = [m["content"] for m in messages if m["role"] == "tool" and m["content"]]
    for m in messages:
        out += [call.get("function", call)["name"] for call in m.get("tool_calls") or []]
    return out + [tool.get("function", tool).get("name", "") for tool in tools or [] if isinstance(tool, dict)]


def _encode(tokenizer, pair: PreferencePair, prompt_text: str, completion: str,
            completion_messages: list[dict] | None, rendering: Rendering) -> tuple[list[int], int, bool]:
    """(ids, completion_start, merged_across_boundary) for one prompt + completion. An empty
    completion is a valid answer: the end-of-turn token (template) or EOS (raw text) alone."""
    use_template = rendering.uses_template(pair)
    if use_template:
        # implicit-prompt text keeps the space after 'Assistant:' in the completion; a turn has none
        content = completion.strip() if pair.from_text else completion
        messages = prompt_messages(pair) + (completion_messages or [{"role": "assistant", "content": content}])
        kwargs = chat_kwargs(pair, rendering)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False, tools=pair.tools, **kwargs)
        missing = [t for t in _tool_texts(messages, pair.tools) if t not in full_text]
        if missing:  # a template without tool support would drop them silently
            raise ConfigError(f"{pair.where}: the chat template does not write the tool calls, results or "
                              f"definitions of this pair (e.g. {missing[0][:40]!r}); use a template that renders "
                              "tools (the model's own, or template: qwen for a tokenizer without one)")
        # the completion's reasoning: a template that does not write it would train on the answer alone
        # (enable_thinking: false drops it on purpose; the history's is dropped by thinking templates by design)
        reasoning = [m["reasoning_content"] for m in completion_messages or [] if m.get("reasoning_content")]
        if reasoning and kwargs.get("enable_thinking") is not False and reasoning[-1].strip() not in full_text:
            raise ConfigError(f"{pair.where}: the chat template does not write the completion's reasoning_content "
                              f"({reasoning[-1][:40]!r}); use a thinking template (the model's own, or template: "
                              "qwen3 for a tokenizer without one), or set enable_thinking: false to train without it")
        add_special = False  # the template writes BOS itself; adding it again would double it
    else:
        full_text = prompt_text + completion
        add_special = True
    # the Rust tokenizer directly: the same ids and offsets as tokenizer(..., return_offsets_mapping=True)
    # (checked in tests), without the Python wrapper that was a third of the time per pair
    enc = tokenizer.backend_tokenizer.encode(full_text, add_special_tokens=add_special)
    ids, offsets = enc.ids, enc.offsets
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


# end-of-turn tokens of common chat templates: generation stops at the first of them (or EOS)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def stop_ids(tokenizer) -> list[int]:
    """EOS and the end-of-turn tokens the tokenizer knows: where a completion ends."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    return ids + [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]


def encode_prompt(tokenizer, pair: PreferencePair, rendering: Rendering) -> list[int]:
    """The token ids that precede a completion of `pair` in training (`encode_pair`), for generation:
    the rendered prompt, with BOS as the tokenizer or the template writes it, once."""
    ids = tokenizer.backend_tokenizer.encode(render_prompt(tokenizer, pair, rendering),
                                             add_special_tokens=not rendering.uses_template(pair)).ids
    if len(ids) > 1 and tokenizer.bos_token_id is not None and ids[0] == ids[1] == tokenizer.bos_token_id:
        ids = ids[1:]  # a template that writes BOS, on a tokenizer that also adds it
    return ids


def encode_prompts(tokenizer, pairs: list[PreferencePair], template: str | None,
                   chat_kwargs: dict | None = None) -> list[list[int]]:
    """The prompts of `pairs` as generation gets them (sample, eval, generate_during_eval), rendered as
    training renders them with the same `template` and chat template arguments. A prompt with images is
    refused: only a vision-language model's processor renders it (`vision.encode_vision_prompts`)."""
    with_images = next((p for p in pairs if p.images), None)
    if with_images is not None:
        raise DataError(f"{with_images.where}: a prompt with images, for a text-only model (or a command that does "
                        "not sample images: preftune sample and eval do, with a vision-language model; docs/vision.md); "
                        "remove its images or use a vision-language model")
    rendering = setup_rendering(tokenizer, template, chat_kwargs)
    return [encode_prompt(tokenizer, p, rendering) for p in pairs]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """(prompt, completion) token budgets within `cutoff_len`: LLaMA-Factory's rule
    (src/llamafactory/data/processor/processor_utils.py `infer_seqlen`), so its YAML truncates alike.

    A completion shorter than half the budget stays whole and the prompt gets the rest; else a
    prompt shorter than half stays whole and the completion gets the rest; else both are cut in
    proportion to their lengths. For a pair, `target_len` is the longer completion's length.
    """
    if 2 * target_len < cutoff_len:
        max_target = cutoff_len
    elif 2 * source_len < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    target = min(max_target, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


def _cut(ids: list[int], start: int, keep_prompt: int, keep_completion: int, truncation_mode: str,
         bos_id) -> tuple[list[int], int]:
    """One sequence cut to its budgets: the completion keeps its start; the prompt keeps its start
    (keep_start) or its end (keep_end, with BOS kept in front so there is still exactly one)."""
    prompt, completion = ids[:start], ids[start:start + keep_completion]
    if len(prompt) > keep_prompt:
        if truncation_mode == "keep_start":
            prompt = prompt[:keep_prompt]
        elif prompt[0] == bos_id and keep_prompt >= 2:
            prompt = prompt[:1] + prompt[len(prompt) - keep_prompt + 1:]
        else:
            prompt = prompt[len(prompt) - keep_prompt:]
    return prompt + completion, len(prompt)


def truncate_pair(t: TokenizedPair, cutoff_len: int, truncation_mode: str = "keep_start",
                  max_prompt_length: int | None = None, bos_id=None) -> TokenizedPair | None:
    """`t` cut to `cutoff_len` tokens per sequence (and its prompt to `max_prompt_length` first);
    None when nothing of a completion would be left (the pair is dropped and counted)."""
    prompt_len = max(t.chosen_start, t.rejected_start)  # they differ only by a token merged across the boundary
    completion_len = max(len(t.chosen_ids) - t.chosen_start, len(t.rejected_ids) - t.rejected_start)
    budget = prompt_len if max_prompt_length is None else min(prompt_len, max_prompt_length)
    keep_prompt, keep_completion = infer_seqlen(budget, completion_len, cutoff_len)
    if keep_prompt >= prompt_len and keep_completion >= completion_len:
        return t
    if keep_prompt < 1 or keep_completion < 1:
        return None
    chosen_ids, chosen_start = _cut(t.chosen_ids, t.chosen_start, keep_prompt, keep_completion, truncation_mode,
                                    bos_id)
    rejected_ids, rejected_start = _cut(t.rejected_ids, t.rejected_start, keep_prompt, keep_completion,
                                        truncation_mode, bos_id)
    return TokenizedPair(chosen_ids, chosen_start, rejected_ids, rejected_start, truncated=True)


def encode_pair(tokenizer, pair: PreferencePair, rendering: Rendering, report: TokenizeReport) -> TokenizedPair:
    """The untruncated token ids of a pair, with its completion boundaries."""
    if pair.images:  # a vision-language model's pairs go through its processor (vision.py)
        raise DataError(f"{pair.where}: a pair with {len(pair.images)} image(s), read as text: the model is a "
                        "text-only one (or this command takes no images yet: docs/vision.md); train a vision-language "
                        "model (its config has a vision_config), or drop the images")
    prompt_text = render_prompt(tokenizer, pair, rendering)
    chosen_ids, chosen_start, m1 = _encode(tokenizer, pair, prompt_text, pair.chosen, pair.chosen_messages,
                                           rendering)
    rejected_ids, rejected_start, m2 = _encode(tokenizer, pair, prompt_text, pair.rejected, pair.rejected_messages,
                                               rendering)
    if m1 or m2:
        report.boundary_merges += 1
    if min(chosen_start, rejected_start) == 0:
        if prompt_text.strip():  # a short prompt merged whole into the completion's first token
            raise DataError(f"{pair.where}: the prompt {prompt_text[:40]!r} tokenizes into one token with the start "
                            "of a completion, so no prompt token is left to score the completion from; end the "
                            "prompt with a space or newline (or use a chat template)")
        raise DataError(f"{pair.where}: the prompt is empty and the tokenizer adds no BOS, so the first completion "
                        "token has no context to be scored from; give every pair a prompt")
    if chosen_start >= len(chosen_ids) or rejected_start >= len(rejected_ids):
        raise DataError(f"{pair.where}: a completion produced no tokens after the prompt")
    return TokenizedPair(chosen_ids, chosen_start, rejected_ids, rejected_start)


def tokenize_pair(tokenizer, pair: PreferencePair, cutoff_len: int, rendering: Rendering,
                  report: TokenizeReport, truncation_mode: str = "keep_start",
                  max_prompt_length: int | None = None) -> TokenizedPair | None:
    """One pair, encoded and truncated; None (counted in `report.dropped`) when it cannot fit."""
    t = truncate_pair(encode_pair(tokenizer, pair, rendering, report), cutoff_len, truncation_mode,
                      max_prompt_length, tokenizer.bos_token_id)
    if t is None:
        report.dropped += 1
        return None
    if t.truncated:
        report.truncated += 1
    t.margin = pair.margin
    return t


def _tokenize_chunk(tokenizer, pairs: list[PreferencePair], settings: dict) -> tuple[list, TokenizeReport]:
    """(tokenized pairs, None for a dropped one; their counts) for a run of pairs."""
    report = TokenizeReport()
    return [tokenize_pair(tokenizer, p, report=report, **settings) for p in pairs], report


_worker_tokenizer = None  # a pool worker's copy of the tokenizer, sent once when the worker starts


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _worker_chunk(args: tuple[list[PreferencePair], dict]) -> tuple[list, TokenizeReport]:
    return _tokenize_chunk(_worker_tokenizer, *args)


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], cutoff_len: int, template: str | None,
                   report: TokenizeReport | None = None, truncation_mode: str = "keep_start",
                   max_prompt_length: int | None = None, num_workers: int | None = None,
                   chat_kwargs: dict | None = None) -> list[TokenizedPair]:
    """Every pair tokenized and truncated, in order; dropped pairs are left out and counted in `report`.
    With num_workers > 1 the pairs are split into chunks tokenized by a pool of processes."""
    if not tokenizer.is_fast:
        raise ConfigError("preftune needs a fast tokenizer (offset mapping finds the prompt boundary); "
                          "the model's tokenizer.json is missing")
    report = report if report is not None else TokenizeReport()
    settings = {"cutoff_len": cutoff_len, "rendering": setup_rendering(tokenizer, template, chat_kwargs),
                "truncation_mode": truncation_mode, "max_prompt_length": max_prompt_length}
    workers = min(num_workers or 1, len(pairs) // MIN_PAIRS_PER_WORKER)
    if workers > 1:
        import multiprocessing

        # fork where there is one (as datasets.map(num_proc) does): a worker starts in milliseconds and
        # only runs tokenizers' code; spawn re-imports transformers in each worker (seconds)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        size = -(-len(pairs) // (workers * 4))  # a few chunks per worker evens out long and short pairs
        chunks = [(pairs[i:i + size], settings) for i in range(0, len(pairs), size)]
        with multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer,)) as pool:
            results = pool.map(_worker_chunk, chunks)
    else:
        results = [_tokenize_chunk(tokenizer, pairs, settings)]
    out = []
    merges = 0
    for chunk, part in results:
        out.extend(t for t in chunk if t is not None)
        report.truncated += part.truncated
        report.dropped += part.dropped
        merges += part.boundary_merges
    report.boundary_merges += merges
    if merges:
        log.warning("%d of %d pairs have a token that spans the prompt/completion boundary; it is scored as "
                    "completion", merges, len(pairs))
    return out


def as_pair(example) -> PreferencePair:
    """An unpaired example as a pair whose two completions are its one completion, so that it is
    tokenized and truncated by exactly the pair code (a pair is returned as it is)."""
    if isinstance(example, PreferencePair):
        return example
    return PreferencePair(prompt=example.prompt, chosen=example.completion, rejected=example.completion,
                          system=example.system, where=example.where, messages=example.messages,
                          conversational=example.conversational, chat_template_kwargs=example.chat_template_kwargs,
                          images=example.images)


def tokenize_examples(tokenizer, examples: list, cutoff_len: int, template: str | None,
                      report: TokenizeReport | None = None, truncation_mode: str = "keep_start",
                      max_prompt_length: int | None = None, chat_kwargs: dict | None = None) -> list[TokenizedExample]:
    """Unpaired examples for kto: an `UnpairedExample` gives one, a `PreferencePair` two (chosen
    desirable, rejected undesirable), tokenized and truncated exactly as pairs are; an example that
    cannot fit is left out and counted in `report.dropped`, as a pair is."""
    if not tokenizer.is_fast:
        raise ConfigError("preftune needs a fast tokenizer (offset mapping finds the prompt boundary); "
                          "the model's tokenizer.json is missing")
    report = report if report is not None else TokenizeReport()
    as_pairs = [as_pair(e) for e in examples]
    settings = {"cutoff_len": cutoff_len, "rendering": setup_rendering(tokenizer, template, chat_kwargs),
                "truncation_mode": truncation_mode, "max_prompt_length": max_prompt_length}
    tokenized, part = _tokenize_chunk(tokenizer, as_pairs, settings)  # None where one was dropped, so zip aligns
    report.truncated += part.truncated
    report.dropped += part.dropped
    report.boundary_merges += part.boundary_merges
    out = []
    for example, t in zip(examples, tokenized):
        if t is None:
            continue
        if isinstance(example, PreferencePair):
            out += [TokenizedExample(t.chosen_ids, t.chosen_start, True),
                    TokenizedExample(t.rejected_ids, t.rejected_start, False)]
        else:
            out.append(TokenizedExample(t.chosen_ids, t.chosen_start, example.label))
    return kl_neighbours(out)


def prompt_key(example) -> tuple:
    """What makes two examples' prompts the same: their ids, and their images (a VLM's image tokens are the same ids
    for every image: vision.VisionExample), by their pixels' digests."""
    return tuple(example.ids[:example.start]), tuple(ref.digest for ref in getattr(example, "images", None) or ())


def kl_neighbours(examples: list[TokenizedExample]) -> list[TokenizedExample]:
    """Each example's `kl_completion`: the completion of the nearest earlier example (cyclically) whose prompt
    differs, in data order, as LLaMA-Factory forms KTO's mismatched pairs (processor/feedback.py: example i
    with the response of example i - 1). Used where a micro-batch cannot pair within itself (a batch of one)."""
    prompts = [prompt_key(e) for e in examples]
    for i, e in enumerate(examples):
        back = next((b for b in range(1, len(examples)) if prompts[i - b] != prompts[i]), None)
        if back is not None:
            other = examples[i - back]
            e.kl_completion = other.ids[other.start:]
    return examples
