"""Built-in chat templates on tiny local tokenizers that mimic each family's special tokens and
BOS handling: exactly one BOS, and the completion ends with exactly one end-of-turn token."""

import copy

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from preftune.data import PreferencePair
from preftune.tokenization import tokenize_pairs

# family: (bos, eos, end-of-turn ending the completion, extra special tokens, adds BOS itself)
FAMILIES = {
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], True),
    "mistral": ("<s>", "</s>", "</s>", [], True),
    "gemma": ("<bos>", "<eos>", "<end_of_turn>", ["<start_of_turn>", "<end_of_turn>"], True),
    "default": ("<s>", "</s>", "</s>", [], True),
    "qwen": (None, "<|im_end|>", "<|im_end|>", [], False),
}
HISTORY = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
           {"role": "user", "content": "times 3?"}]
PAIRS = [PreferencePair(prompt="How should I learn chess?", chosen="Start with the basics.", rejected="Whatever.",
                        where="a"),
         PreferencePair(prompt="times 3?", chosen="12", rejected="7", system="Be brief.", messages=HISTORY,
                        where="b")]
RENDERED = {  # the multi-turn pair's prompt, as each template writes it
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
              "\n\n4<|eot_id|><|start_header_id|>user<|end_header_id|>\n\ntimes 3?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\n2+2?[/INST] 4</s>[INST] times 3?[/INST]",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
             "<start_of_turn>user\ntimes 3?<end_of_turn>\n<start_of_turn>model\n",
    "default": "<s>System: Be brief.</s>\nHuman: 2+2?</s>\nAssistant:4</s>\nHuman: times 3?</s>\nAssistant:",
    "qwen": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4"
            "<|im_end|>\n<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n",
}


def family_tokenizer(tiny_tokenizer, name):
    bos, eos, _, extra, adds_bos = FAMILIES[name]
    backend = copy.deepcopy(tiny_tokenizer.backend_tokenizer)
    backend.add_special_tokens([t for t in [bos, eos, *extra] if t])
    if adds_bos:  # Llama/Mistral/Gemma tokenizers prepend BOS themselves
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos)
    assert not tok.chat_template
    return tok


@pytest.mark.parametrize("name", list(FAMILIES))
def test_builtin_template_bos_once_and_one_end_of_turn(tiny_tokenizer, name):
    tok = family_tokenizer(tiny_tokenizer, name)
    bos, _, end, _, _ = FAMILIES[name]
    single, multi = tokenize_pairs(tok, PAIRS, 512, name)
    assert tok.decode(multi.chosen_ids[:multi.chosen_start]) == RENDERED[name]
    end_id = tok.convert_tokens_to_ids(end)
    for t in (single, multi):
        for ids, start in ((t.chosen_ids, t.chosen_start), (t.rejected_ids, t.rejected_start)):
            if bos:
                assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
            else:
                assert tok.bos_token_id is None or tok.bos_token_id not in ids
            completion = ids[start:]
            assert completion.count(end_id) == 1
            tail = tok.decode(completion[completion.index(end_id) + 1:])
            assert tail in ("", "\n")  # only the template's newline may follow the end-of-turn token
    assert tok.decode(multi.chosen_ids[multi.chosen_start:]).strip() in (
        "12<|eot_id|>", "12</s>", "12<end_of_turn>", "12<|im_end|>")


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_truncated_prompt_keeps_one_bos_and_the_whole_completion_ends_its_turn(tiny_tokenizer, name, mode):
    tok = family_tokenizer(tiny_tokenizer, name)
    bos, _, end, _, _ = FAMILIES[name]
    long = PreferencePair(prompt="first " + "word " * 150 + "last question?", chosen="Start small.", rejected="No.",
                          system="Be brief.", where="long")
    (t,) = tokenize_pairs(tok, [long], 48, name, truncation_mode=mode)
    end_id = tok.convert_tokens_to_ids(end)
    assert t.truncated
    for ids, start in ((t.chosen_ids, t.chosen_start), (t.rejected_ids, t.rejected_start)):
        assert len(ids) <= 48
        if bos:  # keep_start keeps it with the prompt's start; keep_end puts it back in front
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[start:].count(end_id) == 1  # the short completion is whole, ended by its end-of-turn
    prompt = tok.decode(t.chosen_ids[:t.chosen_start])
    assert ("last question?" in prompt) == (mode == "keep_end") and ("first" in prompt) == (mode == "keep_start")
