"""Collections: colbert-ai's TSV semantics, JSONL, lists; bad input names the file and line."""

import json

import numpy as np
import pytest

from colbert_jax.indexing.collection import Collection, CollectionError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_tsv_reads_like_colbert_ai(tmp_path):
    p = write(
        tmp_path, "c.tsv", "id\ttext\ttitle\n0\tfirst passage\n1\tsecond\tA Title\n2\tthird\t\n3\t  spaced  \t t \n"
    )
    c = Collection.load(p)
    assert c.pids.tolist() == [0, 1, 2, 3]
    # a third column becomes "title | text" (even when empty); line ends are stripped of spaces
    assert c.texts([0, 1, 2, 3]) == ["first passage", "A Title | second", " | third", " t |   spaced  "]
    assert c.text_range(2, 10) == [" | third", " t |   spaced  "]


def test_jsonl_ids_titles(tmp_path):
    rows = [{"id": 7, "text": "seven"}, {"_id": "12", "title": "T", "text": "twelve"}, {"pid": 3, "text": "three"}]
    p = write(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    c = Collection.load(p)
    assert c.pids.tolist() == [7, 12, 3]
    assert c.texts([1, 0]) == ["T | twelve", "seven"]


def test_list_of_texts():
    c = Collection.load(["a b", "c"])
    assert c.pids.tolist() == [0, 1] and c.texts([1]) == ["c"]
    assert Collection.load(["a b", "c"]).fingerprint == c.fingerprint != Collection.load(["a b", "d"]).fingerprint


@pytest.mark.parametrize(
    "content,message",
    [
        ("0\ta\n1\tb\n0\tc\n", r"c.tsv:3: duplicate pid 0 \(first on line 1\)"),
        ("0\ta\nx1\tb\n", r"c.tsv:2: pid must be an integer, got 'x1'"),
        ("0\ta\n1\t   \n", r"c.tsv:2: passage 1 is empty"),
        ("0\ta\n1 no tab here\n", r"c.tsv:2: expected 'pid<TAB>passage\[<TAB>title\]', found no tab"),
        ("\n\n", r"the collection .*c.tsv is empty"),
        ("1\tline a\r2\tline b\r", r"c.tsv:1: a carriage return inside the line"),  # else pid 2 vanished
        # bare OverflowError / ValueError without a line before; "²" passed isdigit()
        (f"{2**63}\tbig\n", r"c.tsv:1: pid 9223372036854775808 is beyond 64-bit integers"),
        ("²\tsquare\n", r"c.tsv:1: pid must be an integer, got '²'"),
        ("--5\tdashes\n", r"c.tsv:1: pid must be an integer, got '--5'"),
    ],
)
def test_bad_tsv(tmp_path, content, message):
    with pytest.raises(CollectionError, match=message):
        Collection.load(write(tmp_path, "c.tsv", content))


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r"c.jsonl:2: not valid JSON"),
        ('{"text": "no id"}', r"c.jsonl:2: no id"),
        ('{"id": 1.5, "text": "x"}', r"c.jsonl:2: pid must be an integer, got 1.5"),
        ('{"id": "doc-3", "text": "x"}', r"c.jsonl:2: pid must be an integer, got 'doc-3'"),
        ('{"id": 2}', r"c.jsonl:2: no 'text' string"),
        ("[1, 2]", r"c.jsonl:2: expected a JSON object"),
        # each was accepted, then failed once every passage was encoded, naming no line
        ('{"id": 2, "text": "lone \\ud800 surrogate"}', r"c.jsonl:2: not valid Unicode \(a lone surrogate"),
        ('{"id": 2, "text": "x", "n": 18446744073709551616}', r"c.jsonl:2: passage field 'n' holds an integer beyond"),
        ('{"id": 2, "text": "x", "tag": "\\udfff"}', r"c.jsonl:2: passage field 'tag' holds text that is not valid"),
        ('{"id": 2, "text": "x", "score": NaN}', r"c.jsonl:2: passage field 'score' holds nan \(SQLite stores NaN"),
        ('{"id": 100000000000000000000, "text": "x"}', r"c.jsonl:2: pid 100000000000000000000 is beyond 64-bit"),
    ],
)
def test_bad_jsonl(tmp_path, line, message):
    p = write(tmp_path, "c.jsonl", '{"id": 1, "text": "fine"}\n' + line + "\n")
    with pytest.raises(CollectionError, match=message):
        Collection.load(p)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CollectionError, match="not found"):
        Collection.load(tmp_path / "missing.tsv")
    bad = tmp_path / "bin.tsv"
    bad.write_bytes(b"0\tok\n1\t\xff\xfe\n")
    with pytest.raises(CollectionError, match=r"bin.tsv:2: not valid UTF-8"):
        Collection.load(bad)
    with pytest.raises(CollectionError, match="empty"):
        Collection.load([])
    with pytest.raises(CollectionError, match="passage 1 is empty"):
        Collection.load(["ok", ""])
    with pytest.raises(TypeError, match="file path or a list"):
        Collection.load(42)


def test_large_file_is_read_back_by_offset(tmp_path):
    lines = [f"{i}\tpassage number {i} " + "x" * (i % 50) for i in range(5000)]
    c = Collection.load(write(tmp_path, "big.tsv", "\n".join(lines) + "\n"))
    assert len(c) == 5000 and c._texts is None  # not held in memory
    idx = np.array([4999, 0, 1234])
    assert c.texts(idx) == [lines[i].split("\t")[1].strip(" ") for i in idx]


def test_a_collection_edited_while_in_use_is_refused_not_misread(tmp_path):
    """Two lines of equal length swapped after loading: the offsets still land on line starts, and the texts
    once went to each other's pids."""
    path = write(tmp_path, "c.tsv", "0\talpha\n1\tgamma\n2\tdelta\n")
    c = Collection.load(path)
    path.write_text("0\talpha\n2\tdelta\n1\tgamma\n")
    with pytest.raises(
        CollectionError, match="changed while in use: passage 1 should be pid 1, the file now has pid 2"
    ):
        c.texts([1])


def test_a_lone_surrogate_in_a_list_of_texts_is_named():
    with pytest.raises(CollectionError, match=r"passage 1: not valid Unicode"):
        Collection.load(["fine", "lone \ud800"])


def test_a_collection_edited_during_a_build_is_noticed(tmp_path):
    """Texts are read back by offset once every passage is encoded: an edit that kept the lines' places gave
    the index other texts than it encoded. The build checks the file's sha256 before finishing."""
    path = write(tmp_path, "c.tsv", "0\talpha\n1\tgamma\n")
    c = Collection.load(path)
    c.check_unchanged()
    path.write_text("0\talpha\n1\tGAMMA\n")
    assert c.texts([1]) == ["GAMMA"]  # the same places: read back without a word
    with pytest.raises(CollectionError, match="changed while it was being indexed"):
        c.check_unchanged()
