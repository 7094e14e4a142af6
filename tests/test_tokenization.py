"""The prompt/completion boundary, BOS/EOS, chat templates and truncation."""

import copy

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from preftune.data import PreferencePair
from preftune.errors import ConfigError
from preftune.tokenization import (RAW_TEXT, Rendering, TokenizeReport, infer_seqlen, tokenize_pair,
                                   tokenize_pairs)

CHAT = Rendering(conversations=True, plain=True, source="tokenizer")  # a chat template for every pair

PAIR = PreferencePair(prompt="How should I learn chess?", chosen=" Start with the basics of chess.",
                      rejected=" Whatever.", where="t.jsonl:1")


@pytest.fixture
def plain(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    return tok


@pytest.fixture
def with_bos(plain):
    """Llama-like: the tokenizer itself prepends <s>."""
    backend = copy.deepcopy(plain.backend_tokenizer)
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def test_a_prompt_with_no_token_of_its_own_is_an_error_that_says_why(plain):
    """Without a chat template or BOS the first completion token needs a prompt token before it:
    an empty prompt, or one that merges whole into the completion's first token ('Wh' + 'at' ->
    'What'), leaves none."""
    from preftune.errors import DataError

    assert plain.convert_ids_to_tokens(plain("What")["input_ids"]) == ["What"]
    merged = PreferencePair(prompt="Wh", chosen="at now?", rejected="at?", where="m.jsonl:1")
    with pytest.raises(DataError, match=r"^m.jsonl:1: the prompt 'Wh' tokenizes into one token with the start of a "
                                        r"completion.*end the prompt with a space or newline"):
        tokenize_pair(plain, merged, 512, rendering=RAW_TEXT, report=TokenizeReport())
    empty = PreferencePair(prompt="", chosen="Yes.", rejected="No.", where="e.jsonl:1")
    with pytest.raises(DataError, match=r"^e.jsonl:1: the prompt is empty and the tokenizer adds no BOS"):
        tokenize_pair(plain, empty, 512, rendering=RAW_TEXT, report=TokenizeReport())


def test_plain_text_boundary_and_single_eos(plain):
    t = tokenize_pair(plain, PAIR, 512, rendering=RAW_TEXT, report=TokenizeReport())
    eos = plain.eos_token_id
    assert plain.decode(t.chosen_ids[:t.chosen_start]) == PAIR.prompt
    assert plain.decode(t.chosen_ids[t.chosen_start:-1]) == PAIR.chosen
    assert t.chosen_ids[-1] == eos and t.chosen_ids.count(eos) == 1
    assert plain.decode(t.rejected_ids[t.rejected_start:-1]) == PAIR.rejected and t.rejected_ids[-1] == eos
    # joint tokenization: the sequence is exactly the tokenizer's encoding of the whole text, plus EOS
    assert t.chosen_ids[:-1] == plain(PAIR.prompt + PAIR.chosen)["input_ids"]


def test_exactly_one_bos(with_bos):
    t = tokenize_pair(with_bos, PAIR, 512, rendering=RAW_TEXT, report=TokenizeReport())
    assert t.chosen_ids[0] == with_bos.bos_token_id and t.chosen_ids.count(with_bos.bos_token_id) == 1
    assert with_bos.decode(t.chosen_ids[1:t.chosen_start]) == PAIR.prompt
    # a template that writes BOS itself must not produce a second one
    with_bos.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                              "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    t = tokenize_pair(with_bos, PAIR, 512, rendering=CHAT, report=TokenizeReport())
    assert t.chosen_ids.count(with_bos.bos_token_id) == 1 and t.chosen_ids[0] == with_bos.bos_token_id


def test_chat_template_prompt_is_user_turn_and_completion_ends_with_end_of_turn(tiny_tokenizer):
    pair = PreferencePair(prompt=PAIR.prompt, chosen="Start with the basics.", rejected="Whatever.",
                          system="You are kind.")
    t = tokenize_pair(tiny_tokenizer, pair, 512, rendering=CHAT, report=TokenizeReport())
    prompt = tiny_tokenizer.decode(t.chosen_ids[:t.chosen_start])
    assert prompt == ("<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\n"
                      "How should I learn chess?<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(t.chosen_ids[t.chosen_start:]) == "Start with the basics.<|im_end|>\n"
    assert t.chosen_ids.count(tiny_tokenizer.eos_token_id) == 3  # one per turn, one after the completion


def test_merge_across_boundary_is_counted_and_scored_as_completion(plain):
    # "chess" + "?" style merges: prompt ends mid-word, the completion continues it
    pair = PreferencePair(prompt="How should I learn ch", chosen="ess today.", rejected="ess never.", where="x")
    report = TokenizeReport()
    t = tokenize_pairs(plain, [pair], 512, None, report)[0]
    assert report.boundary_merges == 1
    completion = plain.decode(t.chosen_ids[t.chosen_start:-1])
    assert completion.endswith("ess today.") and plain.decode(t.chosen_ids) == "How should I learn chess today.<|im_end|>"


@pytest.mark.parametrize("source, target, cutoff, expected", [
    (100, 10, 64, (54, 10)),   # completion under half the budget: whole; the prompt gets the rest
    (10, 100, 64, (10, 54)),   # prompt under half: whole; the completion gets the rest
    (100, 300, 64, (16, 48)),  # both long: in proportion, int(64 * 300 / 400) = 48 for the completion
    (1000, 1, 2, (2, 0)),      # int(2 * 1 / 1001) = 0 completion tokens: the pair cannot be used
    (5, 5, 64, (5, 5)),        # fits: untouched
])
def test_infer_seqlen_is_llama_factorys_split(source, target, cutoff, expected):
    assert infer_seqlen(source, target, cutoff) == expected


LONG_PROMPT = PreferencePair(prompt="first words " + "word " * 200 + "final question?", chosen=" Short answer.",
                             rejected=" No.", where="x")


def test_truncation_keep_start_keeps_the_prompt_start_and_the_whole_short_completion(with_bos):
    report = TokenizeReport()
    t = tokenize_pair(with_bos, LONG_PROMPT, 32, rendering=RAW_TEXT, report=report)
    bos, eos = with_bos.bos_token_id, with_bos.eos_token_id
    assert len(t.chosen_ids) <= 32 and len(t.rejected_ids) <= 32 and t.truncated and report.truncated == 1
    assert with_bos.decode(t.chosen_ids[t.chosen_start:-1]) == " Short answer."  # completion whole
    assert t.chosen_ids[-1] == eos and t.rejected_ids[-1] == eos and t.chosen_ids.count(eos) == 1
    assert t.chosen_ids[0] == bos and t.chosen_ids.count(bos) == 1  # exactly one BOS
    assert with_bos.decode(t.chosen_ids[1:t.chosen_start]).startswith("first words word")  # LLaMA-Factory keeps it
    assert t.chosen_ids[:t.chosen_start] == t.rejected_ids[:t.rejected_start]
    # LLaMA-Factory's budgets: completion 5 < 16 stays whole, the prompt gets 32 - 5 (its EOS included)
    assert t.chosen_start == 32 - (len(t.chosen_ids) - t.chosen_start)


def test_truncation_keep_end_keeps_bos_and_the_prompt_end(with_bos):
    t = tokenize_pair(with_bos, LONG_PROMPT, 32, rendering=RAW_TEXT, report=TokenizeReport(),
                      truncation_mode="keep_end")
    bos, eos = with_bos.bos_token_id, with_bos.eos_token_id
    assert len(t.chosen_ids) == 32 and t.chosen_ids[0] == bos and t.chosen_ids.count(bos) == 1
    assert with_bos.decode(t.chosen_ids[1:t.chosen_start]).endswith("final question?")
    assert with_bos.decode(t.chosen_ids[t.chosen_start:-1]) == " Short answer." and t.chosen_ids[-1] == eos


def test_truncation_keep_end_through_a_chat_template_keeps_the_generation_prompt(tiny_tokenizer):
    pair = PreferencePair(prompt="word " * 200 + "final question?", chosen="Short.", rejected="No.", system="Be kind.")
    t = tokenize_pair(tiny_tokenizer, pair, 40, rendering=CHAT, report=TokenizeReport(),
                      truncation_mode="keep_end")
    assert len(t.chosen_ids) <= 40
    assert tiny_tokenizer.decode(t.chosen_ids[:t.chosen_start]).endswith(
        "final question?<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(t.chosen_ids[t.chosen_start:]) == "Short.<|im_end|>\n"


def test_long_completion_keeps_its_start_and_the_prompt_stays_whole(plain):
    long_answer = PreferencePair(prompt="Q?", chosen=" yes" * 100, rejected=" no", where="x")
    report = TokenizeReport()
    t = tokenize_pair(plain, long_answer, 16, rendering=RAW_TEXT, report=report)
    assert len(t.chosen_ids) == 16 and plain.decode(t.chosen_ids[:t.chosen_start]) == "Q?"  # prompt whole
    assert plain.decode(t.chosen_ids[t.chosen_start:]).startswith(" yes yes")
    assert plain.eos_token_id not in t.chosen_ids  # a cut completion does not end: no EOS is invented
    assert t.rejected_ids[-1] == plain.eos_token_id  # the short one is untouched
    assert report.truncated == 1


def test_max_prompt_length_cuts_the_prompt_first(plain):
    for mode, check in (("keep_start", str.startswith), ("keep_end", str.endswith)):
        t = tokenize_pair(plain, LONG_PROMPT, 10_000, rendering=RAW_TEXT, report=TokenizeReport(),
                          truncation_mode=mode, max_prompt_length=8)
        assert t.truncated and t.chosen_start == t.rejected_start == 8
        prompt = plain.decode(t.chosen_ids[:8])
        assert check(LONG_PROMPT.prompt, prompt)
        assert plain.decode(t.chosen_ids[8:-1]) == " Short answer."


def test_a_pair_that_cannot_fit_is_dropped_and_counted(plain):
    report = TokenizeReport()
    pairs = [LONG_PROMPT, PreferencePair(prompt="Q", chosen="A", rejected="B", where="y")]
    # cutoff 2: the long prompt leaves int(2 * c / (p + c)) = 0 completion tokens: dropped. "Q" | "A" EOS: the
    # completion (2 tokens) is not under half of 2, the prompt (1 token) is: the completion gets 2 - 1 = 1 token
    toks = tokenize_pairs(plain, pairs, 2, None, report)
    assert report.dropped == 1 and len(toks) == 1 and report.truncated == 1
    assert len(toks[0].chosen_ids) == 2 and toks[0].chosen_start == 1
    assert tokenize_pair(plain, LONG_PROMPT, 2, rendering=RAW_TEXT, report=TokenizeReport()) is None


def test_unknown_template_for_a_tokenizer_without_one(plain):
    with pytest.raises(ConfigError, match="template: 'llama9' is not available"):
        tokenize_pairs(plain, [PAIR], 64, "llama9")
    chatml = copy.deepcopy(plain)
    t = tokenize_pairs(chatml, [PAIR], 128, "qwen")[0]
    assert chatml.decode(t.chosen_ids[:t.chosen_start]).endswith("<|im_start|>assistant\n")


def test_multi_turn_conversation_renders_history_and_system_through_the_template(tiny_tokenizer):
    history = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
               {"role": "user", "content": "times 3?"}]
    pair = PreferencePair(prompt="times 3?", chosen="12", rejected="7", system="Be brief.", messages=history)
    t = tokenize_pair(tiny_tokenizer, pair, 512, rendering=CHAT, report=TokenizeReport())
    assert tiny_tokenizer.decode(t.chosen_ids[:t.chosen_start]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(t.chosen_ids[t.chosen_start:]) == "12<|im_end|>\n"
    assert tiny_tokenizer.decode(t.rejected_ids[t.rejected_start:]) == "7<|im_end|>\n"
    # the joint sequence is exactly the template's rendering of the whole conversation
    full = tiny_tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}] + history
                                              + [{"role": "assistant", "content": "12"}], tokenize=False)
    assert t.chosen_ids == tiny_tokenizer(full, add_special_tokens=False)["input_ids"]


def test_implicit_prompt_text_is_verbatim_without_a_template_and_turns_with_one(plain, tiny_tokenizer):
    hh = PreferencePair(prompt="\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: times 3?\n\nAssistant:", chosen=" 12",
                        rejected=" 7", where="hh.jsonl:1", from_text=True,
                        messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                  {"role": "user", "content": "times 3?"}])
    t = tokenize_pair(plain, hh, 512, rendering=RAW_TEXT, report=TokenizeReport())
    assert plain.decode(t.chosen_ids[:-1]) == hh.prompt + hh.chosen  # the data's own text, then EOS
    t = tokenize_pair(tiny_tokenizer, hh, 512, rendering=CHAT, report=TokenizeReport())
    assert tiny_tokenizer.decode(t.chosen_ids[:t.chosen_start]).endswith(
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(t.chosen_ids[t.chosen_start:]) == "12<|im_end|>\n"


def test_truncation_or_padding_switched_on_in_tokenizer_json_does_not_cut_silently(plain):
    tok = copy.deepcopy(plain)
    tok.backend_tokenizer.enable_truncation(max_length=4)
    tok.backend_tokenizer.enable_padding(length=300, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    report = TokenizeReport()
    (t,) = tokenize_pairs(tok, [LONG_PROMPT], 10_000, None, report)
    (expected,) = tokenize_pairs(copy.deepcopy(plain), [LONG_PROMPT], 10_000, None)
    assert t == expected and not t.truncated and report.truncated == 0
    assert tok.pad_token_id not in t.chosen_ids and len(t.chosen_ids) > 4
