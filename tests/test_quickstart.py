"""The README's main command: the default model on the built-in corpus, end to end."""

from colbert_jax import quickstart

EXPECTED = {  # obvious answers the untrained default model finds
    "compute the greatest common divisor of two integers": "math.gcd",
    "get the current working directory": "os.getcwd",
    "encode bytes with base64": "base64.b64encode",
    "square root of x": "math.sqrt",
    "compress data with gzip": "gzip.compress",
    "sleep for the given number of seconds": "time.sleep",
}


def test_quickstart_builds_then_reuses_and_finds_the_answers(capsys):
    assert quickstart.main([]) == 0
    first = capsys.readouterr().out
    assert "standard-library docstrings" in first and "; built in" in first
    for query in EXPECTED:
        assert f"Q: {query}" in first
    assert "--checkpoint colbert-ir/colbertv2.0" in first and "colbert-jax index --collection" in first

    searcher, built = quickstart.prepare(show_progress=False)
    assert not built and searcher.index.num_passages > 3000
    for query, title in EXPECTED.items():
        results = searcher.search(query, k=10)
        titles = [text.split(" | ")[0] for text in searcher.passages([pid for pid, _, _ in results])]
        assert title in titles, (query, titles)

    assert quickstart.main(["read a file line by line"]) == 0
    second = capsys.readouterr().out
    assert "; reused in" in second and "Q: read a file line by line" in second
