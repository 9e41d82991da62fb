"""`colbert-jax` run as a user runs it: subprocesses, relative paths, other working directories, Ctrl-C.

Every point here is something a user met: `--overwrite` deleting a directory that was not an index, a server
or search that only works from the directory the index was built in, messages naming Python arguments
instead of flags, a `--set` swallowing the query, a Ctrl-C that printed a traceback and lost the work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import COLLECTIONS
from tests.helpers import write_tiny_checkpoint

TIMEOUT = 300


def run(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """`colbert-jax ARGS` in `cwd`, as a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", "colbert_jax.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"colbert-jax {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's directory: a checkpoint and a collection, and an index built there with relative paths."""
    work = tmp_path_factory.mktemp("user")
    write_tiny_checkpoint(work / "ckpt", seed=0)
    lines = (COLLECTIONS / "stdlib_2k.tsv").read_text().splitlines()[:200]
    (work / "coll.tsv").write_text("\n".join(lines) + "\n")
    run(
        "index",
        "--checkpoint",
        "ckpt",
        "--collection",
        "coll.tsv",
        "--index",
        "idx",
        "--chunksize",
        "64",
        cwd=work,
        check=True,
    )
    return work


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    other = tmp_path / "elsewhere"
    other.mkdir()
    return other


def test_overwrite_refuses_what_is_not_ours(workdir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years")
    afile = tmp_path / "afile2"
    afile.write_text("notes")
    for target in (precious, afile):
        r = run("index", "--checkpoint", str(workdir / "ckpt"), "--collection", str(workdir / "coll.tsv"),
                "--index", str(target), "--overwrite", cwd=tmp_path)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "refusing to replace" in r.stderr and "Traceback" not in r.stderr
    assert "thesis.txt" in r.stderr or "is a file" in r.stderr
    assert (precious / "thesis.txt").read_text() == "four years" and afile.read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile2", "precious"]  # no hidden .old copies
    r = run("convert", str(workdir / "ckpt"), str(precious), "--overwrite", cwd=tmp_path)
    assert r.returncode == 2 and "refusing to replace" in r.stderr
    r = run("train", "--config", "configs/tiny.yaml", "--out", str(precious), cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and "not a colbert-jax training run" in r.stderr
    assert (precious / "thesis.txt").read_text() == "four years"


def test_existing_index_needs_the_overwrite_flag(workdir):
    r = run("index", "--checkpoint", "ckpt", "--collection", "coll.tsv", "--index", "idx", cwd=workdir)
    assert r.returncode == 2
    assert "add --overwrite to replace it" in r.stderr and "overwrite=True" not in r.stderr


def test_search_from_another_directory_with_texts_and_formats(workdir, elsewhere):
    index = str(workdir / "idx")
    r = run("search", "--index", index, "--show-text", "read a file line by line", cwd=elsewhere, check=True)
    assert "1. pid" in r.stdout and "queries/s" not in r.stdout  # results on stdout, timing on stderr
    assert "1 query in" in r.stderr and "ms each" in r.stderr
    r = run("search", "--index", index, "--format", "jsonl", "--show-text", "--k", "3", "base64", "gzip",
            cwd=elsewhere, check=True)  # fmt: skip
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["query"] for row in rows] == ["base64", "gzip"]
    assert all(len(row["results"]) == 3 and row["results"][0]["text"] for row in rows)
    r = run("search", "--index", index, "--format", "tsv", "--out", "run.tsv", "base64", cwd=elsewhere, check=True)
    fields = (elsewhere / "run.tsv").read_text().splitlines()[0].split("\t")
    assert fields[0] == "0" and fields[2] == "1" and "written to run.tsv" in r.stderr


def test_set_takes_one_value_and_names_itself(workdir):
    r = run("search", "--index", "idx", "--set", "ncells=2", "sleep for seconds", cwd=workdir, check=True)
    assert "0: sleep for seconds" in r.stdout  # the query was not swallowed by --set
    r = run("search", "--index", "idx", "--set", "ncells=two", "x", cwd=workdir)
    assert r.returncode == 2 and "--set ncells=two" in r.stderr
    r = run(
        "train", "--config", "configs/tiny.yaml", "--out", "unused", "--set", "lr=-1", cwd=Path(__file__).parents[1]
    )
    assert r.returncode == 2 and "--set lr=-1" in r.stderr and "tiny.yaml" not in r.stderr.split("error:")[-1]


def test_queries_twice_and_long_queries_name_the_flag(workdir):
    (workdir / "q.tsv").write_text("1\tbase64\n")
    r = run("search", "--index", "idx", "--queries", "q.tsv", "extra", cwd=workdir)
    assert r.returncode == 2 and "not both" in r.stderr
    long_query = " ".join(["word"] * 40)
    r = run("search", "--index", "idx", "--no-truncate", long_query, cwd=workdir)
    assert r.returncode == 2 and "add --truncate" in r.stderr and "truncate=True" not in r.stderr
    r = run("search", "--index", "idx", long_query, cwd=workdir)  # cut by default, as colbert-ai does, and said
    assert r.returncode == 0 and "1 of 1 queries are longer than query_maxlen" in r.stderr


def test_other_checkpoint_and_other_collection_are_refused(workdir, tmp_path):
    write_tiny_checkpoint(tmp_path / "other", seed=1)
    r = run("search", "--index", str(workdir / "idx"), "--checkpoint", str(tmp_path / "other"), "x", cwd=tmp_path)
    assert r.returncode == 2 and "add --allow-other-checkpoint" in r.stderr
    r = run("search", "--index", str(workdir / "idx"), "--checkpoint", str(tmp_path / "other"),
            "--allow-other-checkpoint", "x", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # same length, other texts: the fingerprint recorded in the index tells them apart
    lines = (workdir / "coll.tsv").read_text().splitlines()
    swapped = tmp_path / "swapped.tsv"
    swapped.write_text("\n".join(line.split("\t")[0] + "\tsomething else entirely" for line in lines) + "\n")
    r = run("search", "--index", str(workdir / "idx"), "--show-text", "--collection", str(swapped), "x", cwd=tmp_path)
    assert r.returncode == 2 and "not the collection" in r.stderr


def test_index_carries_its_texts_and_an_older_one_says_which_flag_gives_them(workdir, tmp_path):
    script = (
        "import colbert_jax, sys; colbert_jax.Indexer(sys.argv[1], show_progress=False)"
        ".index(sys.argv[2], ['first passage about files', 'second passage about sockets'])"
    )
    subprocess.run([sys.executable, "-c", script, str(workdir / "ckpt"), "listidx"], cwd=tmp_path, check=True,
                   env=_env(), timeout=TIMEOUT)  # fmt: skip
    r = run("search", "--index", "listidx", "--show-text", "--format", "jsonl", "--k", "2", "files", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    texts = {hit["text"] for hit in json.loads(r.stdout)["results"]}
    assert texts == {"first passage about files", "second passage about sockets"}
    # an index from before texts were stored (or an imported colbert-ai one) has only a collection path
    meta_path = tmp_path / "listidx" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for name in ("texts", "text_offsets"):
        del meta["arrays"][name]
        shutil.rmtree(tmp_path / "listidx" / name)
    meta_path.write_text(json.dumps(meta))
    r = run("search", "--index", "listidx", "--show-text", "files", cwd=tmp_path)
    assert r.returncode == 2 and "records no collection file" in r.stderr and "--collection FILE" in r.stderr


def test_help_version_and_exit_codes(workdir):
    root = Path(__file__).parents[1]
    for command in ("convert", "index", "search", "serve", "evaluate", "train", "quickstart"):
        r = run(command, "--help", cwd=root)
        assert r.returncode == 0 and "usage: colbert-jax" in r.stdout, (command, r.stderr)
    assert "(default: 10)" in run("search", "--help", cwd=root).stdout
    assert "(default: 25000)" in run("index", "--help", cwd=root).stdout
    r = run("--version", cwd=root)
    assert r.returncode == 0 and r.stdout.startswith("colbert-jax ")
    assert run("search", "--index", str(workdir / "missing"), "x", cwd=root).returncode == 2


def test_evaluate_refuses_swapped_files(workdir, tmp_path):
    run("search", "--index", str(workdir / "idx"), "--out", str(tmp_path / "run.tsv"), "base64", "gzip",
        cwd=tmp_path, check=True)  # fmt: skip
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("0\t0\t5\t1\n1\t0\t9\t1\n")
    assert run("evaluate", "--ranking", "run.tsv", "--qrels", "qrels.tsv", cwd=tmp_path).returncode == 0
    r = run("evaluate", "--ranking", "qrels.tsv", "--qrels", "run.tsv", cwd=tmp_path)
    assert r.returncode == 2 and "looks like a ranking" in r.stderr
    (tmp_path / "msmarco_qrels.tsv").write_text("0\t0\t5\t1\n1\t0\t9\t1\n0\t0\t7\t1\n")
    r = run("evaluate", "--ranking", "msmarco_qrels.tsv", "--qrels", "qrels.tsv", cwd=tmp_path)
    assert r.returncode == 2 and "swapped" in r.stderr


def test_ctrl_c_prints_one_line_and_the_build_resumes(workdir, tmp_path):
    """SIGINT while the k-means sample is encoded: exit 130, one line, and the rerun keeps the saved pieces."""
    coll = tmp_path / "coll2k.tsv"
    shutil.copyfile(COLLECTIONS / "stdlib_2k.tsv", coll)
    args = ["index", "--checkpoint", str(workdir / "ckpt"), "--collection", str(coll), "--index", "idx",
            "--chunksize", "64"]  # fmt: skip
    # The CLI's own main(), with reading each piece's texts slowed down so that the signal surely lands while
    # the sample is being encoded (an idle machine encodes this collection in about a second).
    # A shell that starts jobs in the background (CI may) leaves SIGINT ignored in them; a terminal does not.
    slowed = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from colbert_jax.indexing import collection\n"
        "texts = collection.Collection.texts\n"
        "collection.Collection.texts = lambda self, indices: (time.sleep(0.5), texts(self, indices))[1]\n"
        "from colbert_jax.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slowed, *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    piece = tmp_path / ".idx.partial" / "sample" / "0.json"
    deadline = time.monotonic() + TIMEOUT
    while not piece.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    assert (
        stderr.strip().splitlines()[-1] == ("colbert-jax index: interrupted; run the same command again to resume")
        and "Traceback" not in stderr
    )
    pieces = list((tmp_path / ".idx.partial" / "sample").glob("*.json"))
    saved = sum(json.loads(p.read_text())["num_passages"] for p in pieces)
    assert 1 <= len(pieces) < 32  # interrupted while sampling, with at least one piece kept
    r = run(*args, cwd=tmp_path, check=True)
    assert "resuming the build" in r.stdout + r.stderr
    build = json.loads((tmp_path / "idx" / "metadata.json").read_text())["build"]
    assert build["stats"]["passages_encoded"] == 2000 - saved  # the saved pieces were not encoded again
    run(*args[:-4], "--index", "fresh", "--chunksize", "64", cwd=tmp_path, check=True)
    ours = json.loads((tmp_path / "idx" / "metadata.json").read_text())["arrays"]
    theirs = json.loads((tmp_path / "fresh" / "metadata.json").read_text())["arrays"]
    assert ours == theirs  # bit-identical arrays (sha256 of every array)


def test_bom_in_collection_and_queries(workdir, tmp_path):
    lines = (workdir / "coll.tsv").read_text().splitlines()[:20]
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    (tmp_path / "q.tsv").write_bytes(b"\xef\xbb\xbf7\tread a file\n")
    run("index", "--checkpoint", str(workdir / "ckpt"), "--collection", "bom.tsv", "--index", "bomidx", cwd=tmp_path,
        check=True)  # fmt: skip
    r = run("search", "--index", "bomidx", "--queries", "q.tsv", "--format", "jsonl", "--show-text", "--k", "20",
            cwd=tmp_path, check=True)  # fmt: skip
    row = json.loads(r.stdout)
    assert row["qid"] == 7
    first_pid = int(lines[0].split("\t")[0])
    assert first_pid in {hit["pid"] for hit in row["results"]}


def test_serve_from_another_directory_answers_with_texts(workdir, elsewhere):
    """The index was built in `workdir` with relative paths; the server starts elsewhere and answers 200."""
    import threading

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "colbert_jax.cli", "serve", "--index", str(workdir / "idx"), "--port", "0"],
        cwd=elsewhere,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + TIMEOUT
        url = None
        while url is None and proc.poll() is None and time.monotonic() < deadline:
            url = next((line.split(" at ")[1].split("/ ")[0] for line in lines if line.startswith("serving")), None)
            time.sleep(0.1)
        assert url, "".join(lines)
        r = httpx.get(f"{url}/api/search", params={"query": "read a file", "k": 3}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text + "".join(lines)
        hits = r.json()["topk"]
        lines_by_pid = {int(line.split("\t")[0]): line for line in (workdir / "coll.tsv").read_text().splitlines()}
        assert len(hits) == 3 and all(hit["text"] and hit["pid"] in lines_by_pid for hit in hits)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert "Traceback" not in "".join(lines)
