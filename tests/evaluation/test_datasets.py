import json

import pytest

from tests.helpers import WIKITEXT
from transformers_kvquant.evaluation.datasets import (
    DatasetError,
    load_text,
    parse_documents,
)


def test_wikitext_raw_is_joined_like_the_usual_evaluation_text():
    text = load_text(WIKITEXT)
    assert len(text) == 1_294_336  # "\n\n".join(rows) of the canonical test file
    assert text.startswith("\n\n = Robert Boulter = \n")  # the first row is blank


def test_jsonl_documents_and_slices(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)) + "\n")
    assert load_text(p) == "doc 0\n\ndoc 1\n\ndoc 2\n\ndoc 3\n\ndoc 4"
    assert load_text(p, parse_documents("3:")) == "doc 3\n\ndoc 4"


def test_plain_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello\nworld\n")
    assert load_text(p) == "hello\nworld\n"


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("", "e.txt", "empty"),
        ("\n\n", "e.jsonl", "empty"),
        ('{"text": 3}\n', "bad.jsonl", "string 'text'"),
        ("not json\n", "bad.jsonl", "not valid JSON"),
    ],
)
def test_bad_files(tmp_path, content, name, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_text(p)


def test_missing_file_names_the_remedy(tmp_path):
    with pytest.raises(DatasetError, match="local .raw, .jsonl or .txt"):
        load_text(tmp_path / "nope.txt")


def test_documents_spec():
    assert parse_documents("150:") == slice(150, None)
    with pytest.raises(DatasetError, match="START:END"):
        parse_documents("abc")
