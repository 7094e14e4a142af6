"""Record shapes -> `PreferencePair` / `UnpairedExample`: what each record of a data file means.

    examples = to_examples(read_records(path))              # readers.py gives [(where, record)]
    examples = to_examples(records, fmt)                     # a dataset_info.json entry's format (registry.py)

Each record's shape is recognised from its fields (the first record decides for a file):
  standard        prompt (text), chosen, rejected, optional system
  conversational  prompt = [{role, content}, ...], chosen/rejected = [one assistant message] (TRL)
  full conversation  chosen/rejected = whole conversations, no prompt (UltraFeedback-binarized):
                  the prompt is the shared leading messages, the completion the final assistant one
  implicit prompt chosen/rejected = full texts, no prompt (Anthropic hh-rlhf): the prompt is the
                  shared prefix through the last "\n\nAssistant:" (verbatim text; split into
                  turns for a chat template)
  alpaca          instruction, input, chosen, rejected, optional system/history (LLaMA-Factory)
  sharegpt        conversations + chosen/rejected message objects (LLaMA-Factory); function_call and
                  observation turns become assistant tool calls and tool results, `tools` column
  unpaired        prompt, completion, label (bool): KTO-style, read into `UnpairedExample`
  SFT             prompt/completion, messages, alpaca output, sharegpt (sft: true): pairs whose chosen
                  is the completion; prompt-only records for sampling (prompts: true)
  images          TRL's vision format (conversational with `images` and {"type": "image"} parts), or
                  alpaca / sharegpt with an `images` column and `<image>` placeholders (LLaMA-Factory):
                  pairs whose `images` are checked ImageRefs (data/images.py)
Conversational prompts may hold `tool` messages and assistant `tool_calls`; a completion may be
several messages (tool call, tool result, answer), kept whole in `chosen_messages`/`rejected_messages`.
Every problem names the record (`where`), the field, what was expected and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.images import ImageOptions, llamafactory_pair, vision_pair, vision_sft, vision_unpaired
from preftune.errors import DataError


@dataclass
class PreferencePair:
    """One normalized pair. `messages` holds the prompt as a conversation (user/assistant turns,
    no system) when the data has more than a single user turn; otherwise it is None and the
    prompt is the user turn `prompt`. The completions are the final assistant turn's text."""
    prompt: str
    chosen: str
    rejected: str
    system: str | None = None
    where: str = ""  # "file:line" for messages
    messages: list[dict[str, str]] | None = None
    # True for implicit-prompt text (hh-rlhf): prompt/chosen/rejected are the data's own text, used
    # verbatim without a chat template; `messages` is their parse into turns, used with one
    from_text: bool = False
    # A completion of several messages or with tool calls (assistant call, tool result, assistant
    # answer): the whole completion as messages; `chosen`/`rejected` then hold their text for checks
    chosen_messages: list[dict] | None = None
    rejected_messages: list[dict] | None = None
    tools: list[dict] | None = None  # tool (function) definitions, passed to the chat template
    # The data gave messages (TRL conversational, whole conversations, sharegpt, tool definitions): always
    # rendered with a chat template. Plain strings (standard, alpaca, hh-rlhf text) are raw text unless
    # `template` is set (tokenization.Rendering).
    conversational: bool = False
    # this example's arguments of the chat template (TRL's `chat_template_kwargs` column, e.g.
    # {enable_thinking: false}); they win over the run's
    chat_template_kwargs: dict | None = None
    # how much better chosen is (TRL's `margin` column): a reward model (stage: rm) must separate the pair's
    # rewards by at least this much (`losses.reward_model_loss`); other stages do not read it
    margin: float | None = None
    # TRL's vision format (data/images.py): the prompt's images, in placeholder order; `messages` then holds the
    # prompt with {"type": "image"} content parts. None: a text record
    images: list | None = None


@dataclass
class UnpairedExample:
    """One KTO-style example: a completion labelled desirable (True) or undesirable (False)."""
    prompt: str
    completion: str
    label: bool
    system: str | None = None
    where: str = ""
    messages: list[dict[str, str]] | None = None
    conversational: bool = False  # as PreferencePair's
    chat_template_kwargs: dict | None = None  # as PreferencePair's
    completion_messages: list[dict] | None = None  # as PreferencePair's chosen_messages
    images: list | None = None  # as PreferencePair's (TRL's unpaired vision format)


ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                  "system": "system", "history": None, "tools": None}
# LLaMA-Factory's defaults (src/llamafactory/data/parser.py DatasetAttr)
SHAREGPT_COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": None,
                    "tools": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
HH_MARKER = "\n\nAssistant:"


# --- fields and messages -----------------------------------------------------------------------

def _text(rec: dict, name: str, where: str, required: bool = True) -> str | None:
    if name not in rec or rec[name] is None:
        if required:
            null = " is null" if name in rec else ""
            raise DataError(f"{where}: missing field '{name}'{null} (expected a string); "
                            f"fields present: {', '.join(sorted(rec)) or 'none'}")
        return None
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}, expected a string"
                        + ("; quote it in the data" if isinstance(value, (int, float)) else ""))
    return value


# kept on a message for the chat template: tool calls, and an assistant turn's reasoning (TRL / transformers'
# `reasoning_content`, which thinking templates write as its <think> block)
TOOL_KEYS = ("tool_calls", "name", "tool_call_id", "reasoning_content")


ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know


def _messages(value: Any, where: str, name: str, role: str = "role", content: str = "content",
              roles: tuple[str, ...] | None = ROLES) -> list[dict]:
    """A list of {role, content} messages, checked (roles among `roles`; sharegpt checks its own tags);
    returned with the keys 'role' and 'content' (and `tool_calls`, `name`, `tool_call_id` where present:
    an assistant's tool call may have no content)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}, expected a list of "
                        f"{{\"{role}\": ..., \"{content}\": ...}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{name}' message {i} is {type(m).__name__}, expected an object "
                            f"with '{role}' and '{content}'")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function", c).get("name"), str) for c in calls)):
            raise DataError(f"{where}: field '{name}' message {i}: 'tool_calls' must be a list of "
                            "{\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}} objects")
        for key in (role, content) if not calls else (role,):
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else f"{type(m[key]).__name__}"
                raise DataError(f"{where}: field '{name}' message {i}: '{key}' is {got}, expected a string "
                                f"(each message needs '{role}' and '{content}'; keys present: "
                                f"{', '.join(sorted(m)) or 'none'})")
        if roles is not None and m[role] not in roles:
            raise DataError(f"{where}: field '{name}' message {i}: role '{m[role]}' is not one of {', '.join(roles)}")
        out.append({"role": m[role], "content": m.get(content) or "",
                    **{k: m[k] for k in TOOL_KEYS if m.get(k) is not None}})
    return out


def _messages_text(msgs: list[dict]) -> str:
    """A completion of several messages (or with its reasoning) as one text (for the empty / chosen ==
    rejected checks and lengths)."""
    return "\n".join(filter(None, (text for m in msgs for text in (
        m.get("reasoning_content"), m["content"] or json.dumps(m.get("tool_calls"), ensure_ascii=False)))))


def _tools(value: Any, where: str, name: str) -> list[dict] | None:
    """Tool definitions: a list of JSON schemas, or that list as a JSON string (LLaMA-Factory)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{name}' is not valid JSON ({e.msg}); expected a list of tool "
                            "definitions") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: field '{name}' must be a list of tool definitions (JSON objects)")
    # bare function definitions (LLaMA-Factory) in the {"type": "function", "function": ...} form templates expect
    return [t if "function" in t else {"type": "function", "function": t} for t in value]


def _completion(value: Any, where: str, name: str) -> tuple[str, list[dict] | None]:
    """A completion: a string, or a list of messages (text, None for a single plain assistant
    message; else text and the messages, which must start and end with the assistant)."""
    if isinstance(value, str):
        return value, None
    if value is None:
        raise DataError(f"{where}: missing field '{name}' (expected a string or a list of assistant messages)")
    msgs = _messages(value, where, name)
    if not msgs or msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant" \
            or msgs[-1].get("tool_calls"):
        raise DataError(f"{where}: field '{name}' must be assistant messages (tool calls and tool results in "
                        f"between) ending on an assistant answer, got roles {[m['role'] for m in msgs] or 'none'}")
    if len(msgs) == 1 and not msgs[0].get("tool_calls") and not msgs[0].get("reasoning_content"):
        return msgs[0]["content"], None
    return _messages_text(msgs), msgs


def _split_system(msgs: list[dict], system: str | None) -> tuple[list[dict], str | None]:
    if msgs and msgs[0]["role"] == "system":
        return msgs[1:], msgs[0]["content"]
    return msgs, system


def _pair(prompt_msgs: list[dict], system, chosen: str | tuple, rejected: str | tuple, where: str,
          tools: list[dict] | None = None, conversational: bool = True) -> PreferencePair:
    """A pair from a prompt conversation; a single user turn is kept as `prompt` text (and still counts
    as conversational: it came as messages). A completion is a text or (text, messages) from `_completion`."""
    if not prompt_msgs:
        raise DataError(f"{where}: the prompt has no messages; it needs at least one user turn")
    if prompt_msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends on an assistant message; it must end on the user (or tool) turn "
                        "that the chosen/rejected answers reply to")
    (chosen, chosen_msgs), (rejected, rejected_msgs) = [c if isinstance(c, tuple) else (c, None)
                                                        for c in (chosen, rejected)]
    single = len(prompt_msgs) == 1 and prompt_msgs[0]["role"] == "user" and set(prompt_msgs[0]) == {"role", "content"}
    return PreferencePair(prompt=prompt_msgs[-1]["content"], chosen=chosen, rejected=rejected, system=system,
                          where=where, messages=None if single else prompt_msgs, chosen_messages=chosen_msgs,
                          rejected_messages=rejected_msgs, tools=tools, conversational=conversational)


# --- record shapes -> normalized examples ------------------------------------------------------

def _standard(rec: dict, where: str) -> PreferencePair:
    system = _text(rec, "system", where, required=False)
    prompt = rec.get("prompt")
    tools = _tools(rec.get("tools"), where, "tools")
    if isinstance(prompt, list):  # conversational (TRL)
        msgs, system = _split_system(_messages(prompt, where, "prompt"), system)
        return _pair(msgs, system, _completion(rec.get("chosen"), where, "chosen"),
                     _completion(rec.get("rejected"), where, "rejected"), where, tools)
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' is {type(prompt).__name__}, expected a string or a list of "
                        "{\"role\": ..., \"content\": ...} messages")
    if isinstance(prompt, str) and _whole_conversation(rec.get("chosen")) and _whole_conversation(rec.get("rejected")):
        return _ultrafeedback(rec, where)
    if tools:  # tool definitions need the prompt as a conversation, so that a template writes them
        return _pair([{"role": "user", "content": _text(rec, "prompt", where)}], system,
                     _completion(rec.get("chosen"), where, "chosen"), _completion(rec.get("rejected"), where,
                                                                                  "rejected"), where, tools)
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _pair([{"role": "user", "content": _text(rec, "prompt", where)}], system,
                     _completion(chosen, where, "chosen"), _completion(rejected, where, "rejected"), where)
    return PreferencePair(prompt=_text(rec, "prompt", where), chosen=_text(rec, "chosen", where),
                          rejected=_text(rec, "rejected", where), system=system, where=where)


def _whole_conversation(value: Any) -> bool:
    """A list of messages that starts before the answer (a user or system turn): the whole
    conversation rather than just the assistant's completion."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and value[0].get("role") in ("user", "system"))


def _ultrafeedback(rec: dict, where: str) -> PreferencePair:
    """HuggingFaceH4/ultrafeedback_binarized: a `prompt` string plus chosen/rejected as whole
    conversations. The conversations are the data; the prompt must be their last user turn
    (it is a copy of it), so a disagreement is an error rather than one of them silently lost."""
    pair = _without_prompt({k: v for k, v in rec.items() if k != "prompt"}, where)
    user_turns = [m["content"] for m in (pair.messages or []) if m["role"] == "user"] or [pair.prompt]
    if rec["prompt"].strip() != user_turns[-1].strip():
        raise DataError(f"{where}: field 'prompt' differs from the last user turn of the chosen/rejected "
                        f"conversations ({rec['prompt'][:40]!r} vs {user_turns[-1][:40]!r}); with whole "
                        "conversations drop the prompt field, or give chosen/rejected as the answers only")
    return pair


def _without_prompt(rec: dict, where: str) -> PreferencePair:
    """No prompt field: whole conversations (UltraFeedback) or full texts (hh-rlhf)."""
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        c = _messages(chosen, where, "chosen")
        r = _messages(rejected, where, "rejected")
        shared = 0
        while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
            shared += 1
        while shared and c[shared - 1]["role"] == "assistant":  # a shared tool call belongs to both completions
            shared -= 1
        msgs, system = _split_system(c[:shared], _text(rec, "system", where, required=False))
        try:
            completions = _completion(c[shared:], where, "chosen"), _completion(r[shared:], where, "rejected")
        except DataError:
            raise DataError(f"{where}: chosen and rejected must be the same conversation up to their final assistant "
                            f"messages; after {shared} shared messages they differ in roles "
                            f"{[m['role'] for m in c[shared:]]} / {[m['role'] for m in r[shared:]]}") from None
        return _pair(msgs, system, *completions, where, _tools(rec.get("tools"), where, "tools"))
    chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_MARKER, 0, n)  # the marker must lie inside the shared prefix
    if cut < 0:
        raise DataError(f"{where}: no 'prompt' field, and chosen/rejected share no {HH_MARKER!r} marker to take "
                        "the prompt from; add a prompt field (or map one with `columns`)")
    cut += len(HH_MARKER)
    return PreferencePair(prompt=chosen[:cut], chosen=chosen[cut:], rejected=rejected[cut:],
                          system=_text(rec, "system", where, required=False), where=where,
                          messages=_hh_turns(chosen[:cut]), from_text=True)


def _hh_turns(prompt: str) -> list[dict[str, str]] | None:
    """'\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:' -> user a, assistant b, user c.
    None when the text does not alternate Human/Assistant turns (a chat template then gets the
    whole text as one user turn)."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)  # ['', 'Human', ' a', ..., 'Assistant', '']
    if parts[0].strip() or len(parts) < 5 or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    roles, contents = parts[1:-2:2], parts[2:-2:2]
    if roles != [("Human", "Assistant")[i % 2] for i in range(len(roles))] or roles[-1] != "Human":
        return None
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(roles, contents)]


def _unpaired(rec: dict, where: str) -> UnpairedExample:
    label = rec.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label' is {type(label).__name__ if label is not None else 'missing'}, "
                        "expected true (desirable) or false (undesirable)")
    system = _text(rec, "system", where, required=False)
    msgs = None
    prompt = rec.get("prompt")
    conversational = isinstance(prompt, list) or isinstance(rec.get("completion"), list)
    if isinstance(prompt, list):
        msgs, system = _split_system(_messages(prompt, where, "prompt"), system)
        prompt = msgs[-1]["content"] if msgs else ""
        msgs = None if len(msgs) == 1 and msgs[0]["role"] == "user" else msgs
    else:
        prompt = _text(rec, "prompt", where)
    completion, completion_msgs = _completion(rec.get("completion"), where, "completion")
    return UnpairedExample(prompt=prompt, completion=completion, label=label, system=system, where=where,
                           messages=msgs, conversational=conversational, completion_messages=completion_msgs)


def _llamafactory_vision(rec: dict, where: str, fmt: dict | None, sft: bool, state: dict, column: str,
                         images: ImageOptions | None):
    """A LLaMA-Factory record with an images column: read as text (a ranking pair, an SFT record, a kto_tag
    example), then each `<image>` placeholder takes the next image (`images.llamafactory_pair`)."""
    text = {k: v for k, v in rec.items() if k != column}
    if fmt is not None and fmt.get("kto_tag"):
        example = _kto_tagged(text, where, fmt)
        pair = llamafactory_pair(_sft_pair(text, where, fmt["formatting"], fmt["columns"], fmt["tags"]),
                                 rec.get(column), where, column, images)
        return dataclasses.replace(example, prompt=pair.prompt, messages=pair.messages, conversational=True,
                                   images=pair.images)
    if fmt is not None and not fmt["ranking"]:  # an SFT entry of dataset_info.json
        pair = _sft_pair(text, where, fmt["formatting"], fmt["columns"], fmt["tags"])
    else:
        pair = _record(text, where, fmt, sft, False, state)
    return llamafactory_pair(pair, rec.get(column), where, column, images)


def _kto_tagged(rec: dict, where: str, fmt: dict) -> UnpairedExample:
    """A dataset_info.json entry with a `kto_tag` column (LLaMA-Factory's KTO data, e.g. kto_en_demo):
    an SFT-shaped record whose answer is desirable (tag true) or undesirable (false)."""
    tag = fmt["kto_tag"]
    label = rec.get(tag)
    if not isinstance(label, bool):  # LLaMA-Factory drops such a record with a warning; here it is named
        raise DataError(f"{where}: field '{tag}' (the kto_tag column) is "
                        f"{type(label).__name__ if label is not None else 'missing'}, expected true (desirable) or "
                        "false (undesirable)")
    pair = _sft_pair(rec, where, fmt["formatting"], fmt["columns"], fmt["tags"])
    return UnpairedExample(prompt=pair.prompt, completion=pair.chosen, label=label, system=pair.system, where=where,
                           messages=pair.messages, conversational=pair.conversational,
                           completion_messages=pair.chosen_messages)


def _template_kwargs(rec: dict, where: str) -> dict | None:
    """TRL's `chat_template_kwargs` column: the chat template's arguments for this example."""
    value = rec.get("chat_template_kwargs")
    if value is None or value == {}:
        return None
    if isinstance(value, str):  # a JSON string, as CSV or Parquet may hold it
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise DataError(f"{where}: field 'chat_template_kwargs' must be an object of chat template arguments, "
                        "e.g. {\"enable_thinking\": false}")
    return value


def _alpaca(rec: dict, where: str, columns: dict) -> PreferencePair:
    prompt = _text(rec, columns["prompt"], where)
    query = _text(rec, columns["query"], where, required=False) if columns.get("query") else None
    if query:  # LLaMA-Factory joins instruction and input with a newline
        prompt = f"{prompt}\n{query}" if prompt else query
    msgs = []
    history = rec.get(columns["history"]) if columns.get("history") else None
    if history:
        if not isinstance(history, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
            raise DataError(f"{where}: field '{columns['history']}' must be a list of [user, assistant] string pairs")
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": prompt})
    system = _text(rec, columns["system"], where, required=False) if columns.get("system") else None
    tools = _tools(rec.get(columns["tools"]), where, columns["tools"]) if columns.get("tools") else None
    return _pair(msgs, system, _text(rec, columns["chosen"], where), _text(rec, columns["rejected"], where), where,
                 tools, conversational=False)  # strings, as LLaMA-Factory's alpaca: raw unless template is set


def _sharegpt(rec: dict, where: str, columns: dict, tags: dict) -> PreferencePair:
    name = columns["messages"]
    if name not in rec or rec[name] is None:
        raise DataError(f"{where}: missing field '{name}' (expected a list of messages); "
                        f"fields present: {', '.join(sorted(rec)) or 'none'}")
    role, content = tags["role_tag"], tags["content_tag"]
    raw = _messages(rec[name], where, name, role, content, roles=None)
    system = _text(rec, columns["system"], where, required=False) if columns.get("system") else None
    if raw and raw[0]["role"] == tags["system_tag"]:
        system, raw = raw[0]["content"], raw[1:]
    # as LLaMA-Factory: even turns are the user's (or a tool's result, observation), odd turns the
    # assistant's (or its function call)
    turn_tags = ((tags["user_tag"], tags["observation_tag"]), (tags["assistant_tag"], tags["function_tag"]))
    msgs = []
    for i, m in enumerate(raw):
        if m["role"] not in turn_tags[i % 2]:
            raise DataError(f"{where}: '{name}' message {i} has {role} '{m['role']}', expected "
                            f"{' or '.join(repr(t) for t in turn_tags[i % 2])} (turns alternate "
                            f"{tags['user_tag']}/{tags['assistant_tag']}, starting with {tags['user_tag']}; set `tags` "
                            "in dataset_info.json if your names differ)")
        msgs.append(_sharegpt_message(m, tags, where, f"'{name}' message {i}"))
    if not msgs or msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: '{name}' ends on {'an assistant' if msgs else 'no'} turn; for ranking data the "
                        f"conversation ends on the {tags['user_tag']} turn and '{columns['chosen']}'/"
                        f"'{columns['rejected']}' hold the competing {tags['assistant_tag']} answers")
    answers = []
    for key in ("chosen", "rejected"):
        col = columns[key]
        value = rec.get(col)
        if not isinstance(value, dict):
            raise DataError(f"{where}: field '{col}' is {type(value).__name__ if value is not None else 'missing'}, "
                            f"expected a message object {{\"{role}\": \"{tags['assistant_tag']}\", \"{content}\": ...}}")
        (m,) = _messages([value], where, col, role, content, roles=None)
        if m["role"] not in turn_tags[1]:
            raise DataError(f"{where}: field '{col}' has {role} '{m['role']}', expected '{tags['assistant_tag']}' "
                            f"or '{tags['function_tag']}'")
        m = _sharegpt_message(m, tags, where, f"field '{col}'")
        answers.append((_messages_text([m]), [m]) if m.get("tool_calls") else m["content"])
    tools = _tools(rec.get(columns["tools"]), where, columns["tools"]) if columns.get("tools") else None
    return _pair(msgs, system, answers[0], answers[1], where, tools)


def _sharegpt_message(m: dict, tags: dict, where: str, what: str) -> dict:
    """A sharegpt message as a chat message: an observation is a `tool` result, a function call an
    assistant message with `tool_calls` (its value is the call as JSON: {"name", "arguments"} or a list)."""
    if m["role"] == tags["observation_tag"]:
        return {"role": "tool", "content": m["content"]}
    if m["role"] != tags["function_tag"]:
        return {"role": "user" if m["role"] == tags["user_tag"] else "assistant", "content": m["content"]}
    try:
        calls = json.loads(m["content"])
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {what} ({tags['function_tag']}) is not valid JSON ({e.msg}); expected "
                        "{\"name\": ..., \"arguments\": {...}} or a list of them") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(f"{where}: {what} ({tags['function_tag']}) must be {{\"name\": ..., \"arguments\": "
                        "{...}} or a list of them")
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]}


# --- SFT records: (prompt, completion) as a pair whose chosen is the completion --------------------
# The SFT objective trains on `chosen` only (step.SFTStep); giving an SFT example the pair shape reuses
# every prompt form, chat template, tool turn and truncation rule of the pairs. `rejected` repeats
# the completion and is never scored.

def _sft_shape(rec: dict) -> str | None:
    """The SFT-only shape of a plain record, or None for a preference shape (its chosen is used)."""
    if "chosen" in rec or "rejected" in rec:
        return None
    if set(rec) <= {"prompt", "system", "tools", "id"} and "prompt" in rec:
        return "prompt_only"  # prompts to sample from (preftune sample, eval)
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "messages" in rec:
        return "messages"
    if "completion" in rec and "label" not in rec:
        return "completion"
    return None


def _sft_pair(rec: dict, where: str, shape: str, columns: dict | None = None, tags: dict | None = None) -> PreferencePair:
    if shape == "prompt_only":  # no completion (read_prompts only): empty ones, never trained on
        return _standard({k: v for k, v in rec.items() if k != "id"} | {"chosen": "", "rejected": ""}, where)
    if shape == "completion":
        return _standard({**rec, "chosen": rec["completion"], "rejected": rec["completion"]}, where)
    if shape == "alpaca":
        columns = columns or {**ALPACA_COLUMNS, "response": "output", "history": "history"}
        response = columns.get("response") or "output"
        return _alpaca(rec, where, {**columns, "chosen": response, "rejected": response})
    name = columns["messages"] if shape == "sharegpt" and columns else "conversations" if shape == "sharegpt" \
        else "messages"
    turns = rec.get(name)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of messages ending on the assistant's "
                        "answer (the completion trained on)")
    if shape == "messages":  # a chat conversation: its last message is the completion
        last = turns[-1].get("role") if isinstance(turns[-1], dict) else None
        if last != "assistant" or len(turns) < 2:
            raise DataError(f"{where}: field '{name}': SFT trains on the last message, which must be the assistant's "
                            f"answer after at least one user turn; got {len(turns)} message(s), the last from "
                            f"{last!r}")
        return _standard({**{k: v for k, v in rec.items() if k != name}, "prompt": turns[:-1],
                          "chosen": [turns[-1]], "rejected": [turns[-1]]}, where)
    columns = {**(columns or SHAREGPT_COLUMNS), "chosen": "chosen", "rejected": "chosen"}
    return _sharegpt({**rec, name: turns[:-1], "chosen": turns[-1]}, where, columns, tags or SHAREGPT_TAGS)


def _shape(rec: dict) -> str:
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "prompt" not in rec:
        return "alpaca"
    if "label" in rec and "completion" in rec:
        return "unpaired"
    if "prompt" not in rec and "chosen" in rec and "rejected" in rec:
        return "no_prompt"
    return "standard"


def to_examples(records: list[tuple[str, Any]], fmt: dict | None = None, columns: dict[str, str] | None = None,
                sft: bool = False, prompts: bool = False, base_dir: Path | None = None,
                images: ImageOptions | None = None) -> list[PreferencePair | UnpairedExample]:
    """Records -> examples. `fmt` comes from a dataset_info.json entry; `columns` (the config key)
    renames fields of plain files to the standard names first. sft: prompt/completion records of
    every SFT shape are read too, as pairs whose chosen is the completion. prompts: prompt-only
    records too (for sampling; an empty completion is an answer, so training refuses them).
    A record with `images` (or `image`) is TRL's vision format, or LLaMA-Factory's where it is a sharegpt or
    alpaca record or its entry names an `images` column (data/images.py); `base_dir` is the folder TRL's
    relative image paths are read from, `images` the config's media_dir and pixel bounds."""
    out: list[PreferencePair | UnpairedExample] = []
    state: dict = {}  # the file's shape, decided by its first record
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if columns:
            missing = [user for user in columns.values() if user not in rec]
            if missing:
                raise DataError(f"{where}: missing field '{missing[0]}' (named in `columns`); "
                                f"fields present: {', '.join(sorted(rec)) or 'none'}")
            rec = {**{k: v for k, v in rec.items() if k not in columns.values()},
                   **{canon: rec[user] for canon, user in columns.items()}}
        kwargs = _template_kwargs(rec, where)
        if kwargs is not None:
            rec = {k: v for k, v in rec.items() if k != "chat_template_kwargs"}
        margin = _margin(rec, where) if fmt is None or fmt["ranking"] else None
        if margin is not None:
            rec = {k: v for k, v in rec.items() if k != "margin"}
        for media in ("videos", "audios"):
            if rec.get(media) and (fmt is None or fmt.get("images")):
                raise DataError(f"{where}: field '{media}': {media} are not supported (images are: docs/vision.md); "
                                "remove it")
        # LLaMA-Factory's images: its entry's images column, or a sharegpt / alpaca record of a plain file
        if fmt is not None:
            llamafactory = fmt.get("images")
        elif "images" in rec and ("conversations" in rec or "instruction" in rec):
            llamafactory = "images"
        else:
            llamafactory = None
        if llamafactory or "images" in rec or "image" in rec:  # preference pairs only, for now
            if fmt is not None and not llamafactory:
                raise DataError(f"{where}: has an images field, but its dataset_info.json entry names no images "
                                "column; add \"images\": \"images\" to the entry's columns")
            if llamafactory and prompts:
                raise DataError(f"{where}: images are read in TRL's prompt records, not in LLaMA-Factory prompt files "
                                "yet; write the prompts as TRL's vision format (docs/vision.md)")
            if llamafactory:  # the record as text first, then its <image> placeholders (data/images.py)
                out.append(_llamafactory_vision(rec, where, fmt, sft, state, llamafactory, images))
            elif "label" in rec:  # TRL's unpaired vision format: prompt, completion, label, images
                out.append(vision_unpaired(rec, where, base_dir, images))
            elif sft and not prompts:  # TRL's SFT vision formats: prompt/completion or messages, with images
                out.append(vision_sft(rec, where, base_dir, images))
            elif prompts:  # sampling's prompts (sample, eval): a prompt-only record has no answers
                out.append(vision_pair({"chosen": "", "rejected": "", **rec}, where, base_dir, images))
            else:
                out.append(vision_pair(rec, where, base_dir, images))
        elif fmt is not None and fmt.get("kto_tag"):  # KTO data of dataset_info.json
            out.append(_kto_tagged(rec, where, fmt))
        elif fmt is not None and not fmt["ranking"]:  # an SFT entry of dataset_info.json
            out.append(_sft_pair(rec, where, fmt["formatting"], fmt["columns"], fmt["tags"]))
        else:
            out.append(_record(rec, where, fmt, sft, prompts, state))
        if kwargs is not None:
            out[-1].chat_template_kwargs = kwargs
        if margin is not None and isinstance(out[-1], PreferencePair):
            out[-1].margin = margin
    return out


def _margin(rec: dict, where: str) -> float | None:
    """A pair's `margin` (TRL's reward-model column): a finite number, or None where the record has none."""
    value = rec.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field 'margin' is {value!r:.40}, expected a finite number (how much better chosen "
                        "is; a reward model's rewards must differ by at least this much); fix or drop it")
    return float(value)


def _record(rec: dict, where: str, fmt: dict | None, sft: bool, prompts: bool, state: dict):
    """One record of a ranking entry of dataset_info.json or of a plain file (whose first record's shape,
    kept in `state`, decides the file's)."""
    if fmt is not None:
        if fmt["formatting"] == "sharegpt":
            return _sharegpt(rec, where, fmt["columns"], fmt["tags"])
        return _alpaca(rec, where, fmt["columns"])
    sft_shape = _sft_shape(rec) if sft else None
    if sft_shape == "prompt_only" and not prompts:
        raise DataError(f"{where}: a prompt without a completion; SFT trains on a completion ('completion', "
                        "'output' or the last assistant message). Prompt-only records are for preftune sample "
                        "and eval")
    if sft_shape:
        return _sft_pair(rec, where, sft_shape)
    if "shape" not in state:  # the first record decides, so a bad record gets a field error
        state["shape"], state["first"] = _shape(rec), where
    elif state["shape"] == "no_prompt" and "prompt" in rec:
        # the file is read as whole conversations / full texts: this prompt would be ignored
        raise DataError(f"{where}: has a 'prompt' field, but the first record ({state['first']}) has none, so the "
                        "prompt is taken from chosen/rejected; give every record a prompt, or none")
    shape = state["shape"]
    if shape == "sharegpt":
        return _sharegpt(rec, where, SHAREGPT_COLUMNS, SHAREGPT_TAGS)
    if shape == "alpaca":
        return _alpaca(rec, where, ALPACA_COLUMNS)
    if shape == "unpaired":
        return _unpaired(rec, where)
    if shape == "no_prompt":
        return _without_prompt(rec, where)
    return _standard(rec, where)
