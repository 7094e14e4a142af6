"""The built-in templates named after LLaMA-Factory's (qwen3, qwen3_nothink, deepseek3, llama4, gemma3, glm4,
phi4) render a pair as LLaMA-Factory does, token for token, thinking block included.

LLaMA-Factory cannot be imported here, so the expected renderings are written out from its template
definitions (src/llamafactory/data/template.py at its latest commit; copied in /work/notes/lf/template.py):
each `pieces` list is the elements its `Template._encode` makes from the formatter slots, each tokenized on its
own (`_convert_elements_to_ids`), the prompt from the history and the last user turn, the completion from the
response; `ReasoningTemplate.encode_oneturn` (lines 455-481; remove_thought and add_thought, 100-107) adds or removes the thought, and `PairwiseDatasetProcessor`
(processor/pairwise.py) takes the prompt from the chosen side and appends EOS for efficient_eos templates.
The tokenizer pre-tokenizes as Qwen2's does, with every family's special tokens.
"""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.data.records import to_examples
from preftune.errors import ConfigError
from preftune.tokenization import encode_prompts, tokenize_pairs

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<think>", "</think>",
            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<|begin_of_text|>",
            "<|header_start|>", "<|header_end|>", "<|eot|>", "<bos>", "<start_of_turn>", "<end_of_turn>", "[gMASK]",
            "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]
# template: (BOS, EOS) as LLaMA-Factory leaves the tokenizer (replace_eos makes the first stop word EOS)
FAMILY = {"qwen3": (None, "<|im_end|>"), "qwen3_nothink": (None, "<|im_end|>"),
          "deepseek3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"), "llama4": ("<|begin_of_text|>", "<|eot|>"),
          "gemma3": ("<bos>", "<end_of_turn>"), "glm4": (None, "<|endoftext|>"), "phi4": (None, "<|im_end|>")}


@pytest.fixture(scope="module")
def backend():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = ["Be brief. 2+2? times 3? 12 7 4 add multiply think system user assistant model"] * 4
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def tokenizer(backend, name):
    bos, eos = FAMILY[name]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>")
    assert not tok.chat_template  # the built-in is installed
    return tok


def lf_ids(backend, pieces):
    """LLaMA-Factory's `_convert_elements_to_ids`: every element tokenized on its own (BOS / EOS elements are
    written as their tokens, which tokenize to their ids)."""
    return [i for piece in pieces for i in backend.encode(piece, add_special_tokens=False).ids]


HISTORY = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
           {"role": "user", "content": "times 3?"}]
PAIR = PreferencePair(prompt="times 3?", chosen="12", rejected="7", system="Be brief.", messages=HISTORY, where="a")
# (prompt pieces, chosen pieces, rejected pieces) of PAIR: system + two user turns, no thought anywhere.
# Slots: template.py register_template(name="qwen3" ...) (lines 2058-2073), "qwen3_nothink" (2075-2089),
# "deepseek3" (866-870), "llama4" (1509-1527), "gemma3" (1044-1058, Llama2Template: the system text opens the
# first user turn), "glm4" (1127-1139, efficient_eos), "phi4" (2003-2012).
QWEN_PROMPT = ["<|im_start|>system\nBe brief.<|im_end|>\n", "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
               "4<|im_end|>\n", "<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n"]
EXPECTED = {
    # ReasoningTemplate, enable_thinking true: no thought in the response, so the empty one is prepended to it
    "qwen3": (QWEN_PROMPT, ["<think>\n\n</think>\n\n", "12<|im_end|>\n"], ["<think>\n\n</think>\n\n", "7<|im_end|>\n"]),
    "qwen3_nothink": (QWEN_PROMPT, ["12<|im_end|>\n"], ["7<|im_end|>\n"]),
    "deepseek3": (["<｜begin▁of▁sentence｜>", "Be brief.", "<｜User｜>2+2?<｜Assistant｜>", "4", "<｜end▁of▁sentence｜>",
                   "<｜User｜>times 3?<｜Assistant｜>"], ["12", "<｜end▁of▁sentence｜>"], ["7", "<｜end▁of▁sentence｜>"]),
    "llama4": (["<|begin_of_text|>", "<|header_start|>system<|header_end|>\n\nBe brief.<|eot|>",
                "<|header_start|>user<|header_end|>\n\n2+2?<|eot|><|header_start|>assistant<|header_end|>\n\n", "4<|eot|>",
                "<|header_start|>user<|header_end|>\n\ntimes 3?<|eot|><|header_start|>assistant<|header_end|>\n\n"],
               ["12<|eot|>"], ["7<|eot|>"]),
    "gemma3": (["<bos>", "<start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n",
                "4<end_of_turn>\n", "<start_of_turn>user\ntimes 3?<end_of_turn>\n<start_of_turn>model\n"],
               ["12<end_of_turn>\n"], ["7<end_of_turn>\n"]),
    # the assistant slot is "\n{{content}}"; pairwise.py appends eos_token_id to the response (efficient_eos)
    "glm4": (["[gMASK]<sop>", "<|system|>\nBe brief.", "<|user|>\n2+2?<|assistant|>", "\n4", "<|user|>\ntimes 3?<|assistant|>"],
             ["\n12", "<|endoftext|>"], ["\n7", "<|endoftext|>"]),
    "phi4": (["<|im_start|>system<|im_sep|>Be brief.<|im_end|>",
              "<|im_start|>user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>", "4<|im_end|>",
              "<|im_start|>user<|im_sep|>times 3?<|im_end|><|im_start|>assistant<|im_sep|>"], ["12<|im_end|>"], ["7<|im_end|>"]),
}


def assert_as_llamafactory(backend, tok, t, prompt, chosen, rejected):
    """Token ids and text of both sequences equal LLaMA-Factory's, the boundary where its labels start."""
    for ids, start, completion in ((t.chosen_ids, t.chosen_start, chosen), (t.rejected_ids, t.rejected_start, rejected)):
        assert tok.decode(ids[:start]) == "".join(prompt)
        assert tok.decode(ids[start:]) == "".join(completion)
        assert ids[:start] == lf_ids(backend, prompt) and ids[start:] == lf_ids(backend, completion)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_multi_turn_pair_renders_as_llamafactory(backend, name):
    tok = tokenizer(backend, name)
    (t,) = tokenize_pairs(tok, [PAIR], 512, name)
    assert_as_llamafactory(backend, tok, t, *EXPECTED[name])
    # generation starts where training's completion starts (sample, eval, generate_during_eval)
    assert encode_prompts(tok, [PAIR], name) == [t.chosen_ids[:t.chosen_start]]


# Thoughts inline, as LLaMA-Factory's data has them: in the history (dropped by qwen3 unless
# preserve_thinking; written as they are by qwen3_nothink, a plain Template) and in the chosen answer.
THINKING = PreferencePair(prompt="times 3?", chosen="<think>\nmultiply\n</think>\n\n12", rejected="7", system="Be brief.",
                          messages=[HISTORY[0], {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, HISTORY[2]],
                          where="b")
THOUGHT = "<think>\n\n</think>\n\n"  # ReasoningTemplate.add_thought() with the default thought_words
THINKING_EXPECTED = {
    # encode_oneturn: history thoughts removed (remove_thought); the chosen keeps its thought, the rejected has
    # none and gets the empty one in front (trained on)
    (None, False): (QWEN_PROMPT, ["<think>\nmultiply\n</think>\n\n12<|im_end|>\n"], [THOUGHT, "7<|im_end|>\n"]),
    (True, False): (QWEN_PROMPT, ["<think>\nmultiply\n</think>\n\n12<|im_end|>\n"], [THOUGHT, "7<|im_end|>\n"]),
    # enable_thinking false: the response's thought removed too, the empty one goes to the prompt (not trained on)
    (False, False): (QWEN_PROMPT + [THOUGHT], ["12<|im_end|>\n"], ["7<|im_end|>\n"]),
    # preserve_thinking: the history's thought stays
    (None, True): (QWEN_PROMPT[:2] + ["<think>\nadd\n</think>\n\n4<|im_end|>\n", QWEN_PROMPT[3]],
                   ["<think>\nmultiply\n</think>\n\n12<|im_end|>\n"], [THOUGHT, "7<|im_end|>\n"]),
}


@pytest.mark.parametrize("enable_thinking,preserve_thinking", list(THINKING_EXPECTED))
def test_qwen3_thinking_block_as_llamafactory(backend, enable_thinking, preserve_thinking):
    tok = tokenizer(backend, "qwen3")
    cfg = from_dict({"template": "qwen3", "preserve_thinking": preserve_thinking,
                     **({} if enable_thinking is None else {"enable_thinking": enable_thinking})})
    (t,) = tokenize_pairs(tok, [THINKING], 512, "qwen3", chat_kwargs=cfg.chat_template_kwargs)
    assert_as_llamafactory(backend, tok, t, *THINKING_EXPECTED[(enable_thinking, preserve_thinking)])
    assert encode_prompts(tok, [THINKING], "qwen3", cfg.chat_template_kwargs) == [t.chosen_ids[:t.chosen_start]]
    if enable_thinking is False:  # the pair without thoughts renders the same: nothing of them is left
        (plain,) = tokenize_pairs(tok, [PAIR], 512, "qwen3", chat_kwargs=cfg.chat_template_kwargs)
        assert plain == t


def test_qwen3_nothink_writes_thoughts_as_they_are(backend):
    tok = tokenizer(backend, "qwen3_nothink")
    (t,) = tokenize_pairs(tok, [THINKING], 512, "qwen3_nothink")
    prompt = QWEN_PROMPT[:2] + ["<think>\nadd\n</think>\n\n4<|im_end|>\n", QWEN_PROMPT[3]]
    assert_as_llamafactory(backend, tok, t, prompt, ["<think>\nmultiply\n</think>\n\n12<|im_end|>\n"], ["7<|im_end|>\n"])


def reasoning_pair(**kwargs):
    """THINKING as TRL / transformers data: the thoughts in `reasoning_content` fields."""
    (pair,) = to_examples([("r:1", {
        "prompt": [{"role": "system", "content": "Be brief."}, HISTORY[0],
                   {"role": "assistant", "content": "4", "reasoning_content": "add"}, HISTORY[2]],
        "chosen": [{"role": "assistant", "content": "12", "reasoning_content": "multiply"}],
        "rejected": [{"role": "assistant", "content": "7"}], **kwargs})])
    return pair


def test_reasoning_content_renders_as_the_inline_thought(backend):
    tok = tokenizer(backend, "qwen3")
    pair = reasoning_pair()
    assert pair.chosen_messages[0]["reasoning_content"] == "multiply" and pair.chosen != pair.rejected
    assert tokenize_pairs(tok, [pair], 512, "qwen3") == tokenize_pairs(tok, [THINKING], 512, "qwen3")
    # a template that does not write it would train on the answer alone: refused, naming the pair
    with pytest.raises(ConfigError, match=r"^r:1: the chat template does not write the completion's reasoning_content"):
        tokenize_pairs(tokenizer(backend, "qwen3_nothink"), [pair], 512, "qwen3_nothink")
    # ... unless thinking is off, which drops it on purpose
    (off,) = tokenize_pairs(tokenizer(backend, "qwen3_nothink"), [pair], 512, "qwen3_nothink",
                            chat_kwargs={"enable_thinking": False})
    assert "multiply" not in tok.decode(off.chosen_ids)


def test_chat_template_kwargs_column_wins_over_the_config(backend):
    """TRL's per-example column reaches the chat template, over the run's enable_thinking."""
    tok = tokenizer(backend, "qwen3")
    off = reasoning_pair(chat_template_kwargs={"enable_thinking": False})
    assert off.chat_template_kwargs == {"enable_thinking": False}
    (t,) = tokenize_pairs(tok, [off], 512, "qwen3", chat_kwargs={"enable_thinking": True})
    assert_as_llamafactory(backend, tok, t, *THINKING_EXPECTED[(False, False)])
    with pytest.raises(Exception, match="chat_template_kwargs' must be an object"):
        reasoning_pair(chat_template_kwargs=["enable_thinking"])


def test_template_arguments_reach_the_tokenizers_own_template(tiny_tokenizer):
    """A tokenizer's own chat template (not a built-in) gets enable_thinking and an example's other arguments."""
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                  chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                                                "{{ 'think=' ~ enable_thinking ~ ',' ~ (flavour or '') ~ '|' }}")
    pair = PreferencePair(prompt="Say hi", chosen="hi", rejected="no", where="c", conversational=True,
                          chat_template_kwargs={"flavour": "mild"})
    (t,) = tokenize_pairs(tok, [pair], 512, None, chat_kwargs={"enable_thinking": False})
    assert tok.decode(t.chosen_ids) == "Say hi|hi|think=False,mild|"
