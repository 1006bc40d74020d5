"""modulora.finetune.rouge, .tasks, .data (user data) and .encoding: the data side of finetuning."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from modulora.finetune.data import Example, docstring_splits, read_examples, split_examples
from modulora.finetune.encoding import IGNORE_INDEX, encode_example, render_prompt
from modulora.finetune.rouge import corpus_rouge, lcs_length, rouge_scores
from modulora.finetune.tasks import (
    DOCMODULE_MODULES,
    accuracy,
    data_task,
    docmodule,
    docsum,
    get_task,
    normalize_label,
)
from modulora_core.errors import DataError


# -- ROUGE ------------------------------------------------------------------------------------------------
def test_rouge_known_values():
    s = rouge_scores("The cat sat.", "the CAT")
    assert s["rouge1"] == pytest.approx(0.8)  # P 1, R 2/3
    assert s["rouge2"] == pytest.approx(2 / 3)  # P 1, R 1/2
    assert s["rougeL"] == pytest.approx(0.8)
    assert rouge_scores("a b c", "a b c") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores("a b c", "") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_lcs_and_corpus_average():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert lcs_length([], ["a"]) == 0
    r = corpus_rouge(["a b", "c d"], ["a b", "x y"])
    assert r["rouge1"] == pytest.approx(50.0) and r["rougeL"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        corpus_rouge(["a"], [])


# -- built-in tasks ---------------------------------------------------------------------------------------
def test_docsum_is_deterministic_and_disjoint():
    a, b = docsum(), docsum()
    assert a.splits == b.splits
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sizes["train"] > 300 and sizes["validation"] > 30 and sizes["test"] > 30, sizes
    prompts = {k: {e.prompt for e in v} for k, v in a.splits.items()}
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    ex = a.splits["validation"][0]
    assert ex.prompt.startswith("Summarize") and "\n" not in ex.completion and ex.completion
    assert a.metric == "rougeL" and set(a.score([ex.completion], [ex.completion])) == {"rouge1", "rouge2", "rougeL"}


def test_no_validation_or_test_text_equals_a_training_text():
    # inspect.getdoc hands an undocumented override its base class's docstring: split by name, such copies
    # leaked training text into validation and test
    splits = docstring_splits()
    train_docs = {d.doc for d in splits["train"]}
    train_summaries = {d.summary_paragraph for d in splits["train"]}
    for held_out in ("validation", "test"):
        assert not any(d.doc in train_docs for d in splits[held_out]), held_out
        assert not any(d.summary_paragraph in train_summaries for d in splits[held_out]), held_out
    for task in (docsum(), docmodule()):
        train_prompts = {e.prompt for e in task.examples("train")}
        assert not any(e.prompt in train_prompts for e in task.examples("test") + task.examples("validation"))
    answers = {e.completion for e in docsum().examples("train")}
    assert not any(e.completion in answers for e in docsum().examples("test") + docsum().examples("validation"))


def test_docmodule_labels_and_accuracy():
    t = docmodule()
    labels = {e.completion for v in t.splits.values() for e in v}
    assert labels == set(DOCMODULE_MODULES)
    assert len(t.splits["validation"]) > 20
    assert accuracy(["`logging`.", "ast\nmore", "os"], ["logging", "ast", "inspect"])["accuracy"] == pytest.approx(200 / 3)
    assert normalize_label(' "Pathlib" ') == "pathlib"


def test_unknown_task_names_the_known_ones():
    with pytest.raises(DataError, match="docsum, docmodule"):
        get_task("samsum")


# -- user data --------------------------------------------------------------------------------------------
def test_read_every_format(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"instruction": "Add", "input": "2 3", "output": "5"}\n\n'
                  '{"prompt": "Hi", "completion": "there"}\n{"text": "plain words"}\n')
    ex = read_examples(jl)["train"]
    assert ex == [Example("Add\n\n2 3", "5"), Example("Hi", "there"), Example(None, "plain words")]
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"train": [{"prompt": "a", "completion": "b"}], "validation": ["c d"]}))
    assert read_examples(js) == {"train": [Example("a", "b")], "validation": [Example(None, "c d")]}
    cs = tmp_path / "d.csv"
    cs.write_text("prompt,completion\n\"q, 1\",a1\nq2,a2\n")
    assert read_examples(cs)["train"][0] == Example("q, 1", "a1")
    tx = tmp_path / "d.txt"
    tx.write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert [e.completion for e in read_examples(tx)["train"]] == ["first paragraph\nstill first", "second"]


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{oops\n', "line 3"),
    ("", "no training examples"),
    ('{"question": "a", "answer": "b"}\n', "expected instruction/input/output"),
    ('{"prompt": "a", "completion": "  "}\n', "empty"),
])
def test_bad_data_is_a_clear_error(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        read_examples(p)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        read_examples(tmp_path / "x.parquet")


def test_data_task_split_is_stable(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(50)))
    t1, t2 = data_task(p), data_task(p)
    assert t1.splits == t2.splits and t1.splits["validation"] and len(t1.splits["train"]) + len(t1.splits["validation"]) == 50
    assert split_examples([Example("a", "b"), Example("c", "d")])["validation"]  # tiny data: one held out


# -- encoding ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from transformers import ByT5Tokenizer

    from modulora.finetune.tiny import CHAT_TEMPLATE

    t = ByT5Tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def test_prompt_tokens_are_masked(tok):
    e = encode_example(tok, Example("say hi", "hi"), 64)
    n_prompt = len(tok(render_prompt(tok, "say hi"), add_special_tokens=False)["input_ids"])
    assert e.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert e.labels[n_prompt:] == e.input_ids[n_prompt:] == [*tok("hi", add_special_tokens=False)["input_ids"],
                                                             tok.eos_token_id]
    plain = encode_example(tok, Example(None, "abc"), 64)
    assert plain.labels == plain.input_ids and not plain.truncated
    assert render_prompt(tok, "x", chat=False) == "x\n"


def test_long_examples_are_cut_keeping_the_answer_and_the_prompt_tail(tok):
    e = encode_example(tok, Example("x" * 300, "answer"), 64)
    assert e.truncated and len(e.input_ids) == 64
    tail = tok(render_prompt(tok, "x" * 300), add_special_tokens=False)["input_ids"][-8:]
    answer = [*tok("answer", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert e.input_ids[-len(answer):] == answer and e.labels[-len(answer):] == answer
    assert e.input_ids[-len(answer) - 8:-len(answer)] == tail  # the "<|assistant|>" header survives


def test_docstring_text_is_the_same_in_every_process():
    """Signatures whose defaults print memory addresses (logging.shutdown's handler list) and methods that
    libraries patch into stdlib classes (transformers' logging.Logger.warning_once) would make the data, and
    so every benchmark's held-out text, differ from one process to the next."""
    code = ("import hashlib, logging, logging.handlers, transformers.utils.logging; "
            "from modulora.finetune.data import docstring_splits; "
            "d = docstring_splits(); logging.getLogger('x').addHandler(logging.StreamHandler()); "
            "print(hashlib.sha256(repr(sorted((k, [(x.qualname, x.signature, x.doc) for x in v]) "
            "for k, v in d.items())).encode()).hexdigest())")
    here = hashlib.sha256(repr(sorted((k, [(x.qualname, x.signature, x.doc) for x in v])
                                      for k, v in docstring_splits().items())).encode()).hexdigest()
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here
    assert not any(" at 0x" in x.signature for v in docstring_splits().values() for x in v)
