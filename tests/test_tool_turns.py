"""Tool turns: TRL `tool` messages and tool calls, LLaMA-Factory sharegpt function_call/observation
with a `tools` column, and completions of several messages, rendered through the tiny ChatML
(Qwen2.5-style) template."""

import copy
import json

import pytest

from preftune.data import read_dataset
from preftune.errors import ConfigError, DataError
from preftune.tokenization import Rendering, TokenizeReport, tokenize_pair

CHAT = Rendering(conversations=True, plain=True, source="tokenizer")

TOOLS_BLOCK = ('# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with '
               'function signatures within <tools></tools> XML tags:\n<tools>\n')


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TRL_RECORD = {
    "prompt": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "tool_calls": [call("get_weather", city="Paris")]},
               {"role": "tool", "content": "18C, sunny"}, {"role": "user", "content": "And tomorrow?"}],
    "chosen": [{"role": "assistant", "content": "", "tool_calls": [call("get_forecast", city="Paris", days=1)]},
               {"role": "tool", "content": "20C"}, {"role": "assistant", "content": "20C tomorrow."}],
    "rejected": [{"role": "assistant", "content": "No idea."}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
}


def encode(tokenizer, pair):
    t = tokenize_pair(tokenizer, pair, 4096, rendering=CHAT, report=TokenizeReport())
    decode = tokenizer.decode
    return (decode(t.chosen_ids[:t.chosen_start]), decode(t.chosen_ids[t.chosen_start:]),
            decode(t.rejected_ids[:t.rejected_start]), decode(t.rejected_ids[t.rejected_start:]))


def test_trl_tool_messages_land_in_the_prompt_and_a_multi_message_completion_is_scored_whole(tmp_path,
                                                                                             tiny_tokenizer):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TRL_RECORD) + "\n")
    (pair,) = read_dataset(str(path), str(tmp_path))
    assert [m["role"] for m in pair.messages] == ["user", "assistant", "tool", "user"] and pair.system == "Use tools."
    prompt, chosen, rejected_prompt, rejected = encode(tiny_tokenizer, pair)
    assert prompt == rejected_prompt
    assert prompt.startswith("<|im_start|>system\nUse tools.\n\n" + TOOLS_BLOCK
                             + '{"type": "function", "function": {"name": "get_weather", "parameters": {}}}\n</tools>')
    assert prompt.endswith(
        '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18C, sunny\n'
        '</tool_response><|im_end|>\n<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n')
    # everything after the prompt is the completion: the call, its result and the answer
    assert chosen == ('<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>'
                      '<|im_end|>\n<|im_start|>user\n<tool_response>\n20C\n</tool_response><|im_end|>\n'
                      '<|im_start|>assistant\n20C tomorrow.<|im_end|>\n')
    assert rejected == "No idea.<|im_end|>\n"


def test_whole_conversations_with_tool_calls_split_before_the_first_differing_assistant_turn(tmp_path,
                                                                                             tiny_tokenizer):
    shared = [{"role": "user", "content": "Weather?"},
              {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
              {"role": "tool", "content": "18C"}]
    record = {"chosen": shared + [{"role": "assistant", "content": "18C and sunny."}],
              "rejected": shared[:1] + [{"role": "assistant", "content": "Sunny."}]}
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (pair,) = read_dataset(str(path), str(tmp_path))
    assert pair.messages is None and pair.prompt == "Weather?"  # the shared user turn only
    assert [m["role"] for m in pair.chosen_messages] == ["assistant", "tool", "assistant"]
    prompt, chosen, _, rejected = encode(tiny_tokenizer, pair)
    assert prompt == "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    assert chosen.startswith("<tool_call>") and chosen.endswith("<|im_start|>assistant\n18C and sunny.<|im_end|>\n")
    assert rejected == "Sunny.<|im_end|>\n"


def write_sharegpt(tmp_path, records):
    (tmp_path / "sg.json").write_text(json.dumps(records))
    info = {"fc": {"file_name": "sg.json", "formatting": "sharegpt", "ranking": True,
                   "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                               "tools": "tools"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))


def test_llama_factory_function_call_observation_and_tools_column(tmp_path, tiny_tokenizer):
    write_sharegpt(tmp_path, [{
        "conversations": [{"from": "human", "value": "Weather in Paris?"},
                          {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                         "arguments": {"city": "Paris"}})},
                          {"from": "observation", "value": "18C"}],
        "chosen": {"from": "gpt", "value": "It is 18C."},
        "rejected": {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                   "arguments": {"city": "Rome"}})},
        "tools": json.dumps([{"name": "get_weather", "description": "Current weather", "parameters": {}}])}])
    (pair,) = read_dataset("fc", str(tmp_path))
    assert [m["role"] for m in pair.messages] == ["user", "assistant", "tool"]
    prompt, chosen, _, rejected = encode(tiny_tokenizer, pair)
    assert prompt == (
        "<|im_start|>system\n" + TOOLS_BLOCK + '{"type": "function", "function": {"name": "get_weather", '
        '"description": "Current weather", "parameters": {}}}\n</tools>\n\nFor each function call, return a json '
        'object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18C\n'
        '</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert chosen == "It is 18C.<|im_end|>\n"
    assert rejected == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'


def test_a_function_call_that_is_not_json_names_the_record(tmp_path):
    write_sharegpt(tmp_path, [{"conversations": [{"from": "human", "value": "Q"},
                                                 {"from": "function_call", "value": "get_weather(Paris)"},
                                                 {"from": "observation", "value": "18C"}],
                               "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}])
    with pytest.raises(DataError, match=r"sg.json record 0: 'conversations' message 1 \(function_call\) is not "
                                        r"valid JSON .*expected \{\"name\": \.\.\., \"arguments\""):
        read_dataset("fc", str(tmp_path))


def test_a_template_that_drops_tool_turns_is_refused_not_trusted(tmp_path, tiny_tokenizer):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TRL_RECORD) + "\n")
    (pair,) = read_dataset(str(path), str(tmp_path))
    plain_chatml = copy.deepcopy(tiny_tokenizer)
    plain_chatml.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
                                  "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                                  "{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ConfigError, match=r"tools.jsonl:1: the chat template does not write the tool calls, results "
                                          r"or definitions of this pair \(e.g. 'get_weather'\)"):
        tokenize_pair(plain_chatml, pair, 4096, rendering=CHAT, report=TokenizeReport())
