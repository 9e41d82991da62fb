"""Search over several processes (issue 11): `colbert-jax search` under scripts/launch_local.sh with 2 and 3
processes of 2 fake devices each ranks exactly as one process does (pids and order; scores within 1e-5), every
process reading from disk only the codes and residuals of its own shards; `colbert-jax serve` over 2 processes
answers /api/search as one process ranks, refuses what would read other shards (501), and stops every process
cleanly on SIGTERM. Every run is bounded in time and leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import COLLECTIONS
from tests.helpers import assert_same_ranking_up_to_ties, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
DEVICES = 2  # fake CPU devices per process
K = 100

# The CLI with every read of the index's codes and residuals recorded: memory-mapped row ranges and whole-array
# reads, written to reads-<process id>.json when the command returns.
RECORDING = (
    "import json, os, sys\n"
    "import numpy as np\n"
    "from colbert_jax import index, io\n"
    "reads = {'ranges': [], 'whole': []}\n"
    "init, getitem, read_array = index.ChunkedMemmap.__init__, index.ChunkedMemmap.__getitem__, io.read_array\n"
    "def record_init(self, path):\n"
    "    self.recorded_name = path.name\n"
    "    init(self, path)\n"
    "def record_getitem(self, key):\n"
    "    if isinstance(key, slice):\n"
    "        lo, hi, _ = key.indices(self.shape[0])\n"
    "    else:\n"
    "        rows = np.asarray(key).reshape(-1)\n"
    "        lo, hi = (int(rows.min()), int(rows.max()) + 1) if rows.size else (0, 0)\n"
    "    reads['ranges'].append([self.recorded_name, lo, hi])\n"
    "    return getitem(self, key)\n"
    "def record_read_array(path, *args, **kwargs):\n"
    "    reads['whole'].append(os.path.basename(str(path).rstrip('/')))\n"
    "    return read_array(path, *args, **kwargs)\n"
    "index.ChunkedMemmap.__init__, index.ChunkedMemmap.__getitem__ = record_init, record_getitem\n"
    "io.read_array = record_read_array\n"
    "from colbert_jax.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "with open(f\"reads-{os.environ.get('COLBERT_JAX_PROCESS_ID', '0')}.json\", 'w') as f:\n"
    "    json.dump(reads, f)\n"
    "sys.exit(code)\n"
)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
        "PYTHON": sys.executable,
    }


def _command(processes: int, args: list[str], record: bool = False) -> list[str]:
    cli = [sys.executable, *(["-c", RECORDING] if record else ["-m", "colbert_jax.cli"]), *args]
    return ["bash", str(REPO / "scripts" / "launch_local.sh"), str(processes), *cli] if processes > 1 else cli


def run(processes: int, args: list[str], cwd: Path, record: bool = False) -> str:
    """Runs `colbert-jax ARGS` as `processes` processes; returns the output (stdout and stderr)."""
    proc = subprocess.Popen(
        _command(processes, args, record),
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{processes}-process {args[0]} timed out:\n{out[-3000:]}") from None
    assert proc.returncode == 0, f"{processes}-process {args[0]} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def ranking(path: Path) -> dict[str, list[tuple[int, float]]]:
    """A ranking TSV (qid, pid, rank, score) -> {qid: [(pid, score), ...]} in rank order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        qid, pid, rank, score = line.split("\t")
        out.setdefault(qid, []).append((int(pid), float(score)))
        assert len(out[qid]) == int(rank)
    return out


def assert_same_ranking(got: dict, want: dict) -> None:
    """The same passages in the same order, scores within 1e-5, but for the order of passages whose scores tie
    (seen: two passages at exactly the same float32 score, in the other order)."""
    assert got.keys() == want.keys()
    for qid in want:
        as_ranking = lambda r: [(p, i, s) for i, (p, s) in enumerate(r, start=1)]  # noqa: E731
        assert_same_ranking_up_to_ties(as_ranking(got[qid]), as_ranking(want[qid]), atol=1e-5)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A 300-passage index built by one process, and 24 queries."""
    root = tmp_path_factory.mktemp("mpsearch")
    write_tiny_checkpoint(root / "ckpt", seed=3)
    lines = (COLLECTIONS / "stdlib_2k.tsv").read_text().splitlines()[:300]
    (root / "coll.tsv").write_text("\n".join(lines) + "\n")
    queries = dict(line.split("\t", 1) for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()[:24])
    (root / "queries.tsv").write_text("".join(f"{q}\t{text}\n" for q, text in queries.items()))
    run(1, ["index", "--checkpoint", "ckpt", "--collection", "coll.tsv", "--index", "idx", "--chunksize", "64"], root)
    return root, queries


@pytest.fixture(scope="module")
def single(inputs) -> dict:
    root, _ = inputs
    run(1, ["search", "--index", "idx", "--queries", "queries.tsv", "--k", str(K), "--out", "single.tsv"], root)
    return ranking(root / "single.tsv")


@pytest.mark.parametrize("processes", [2, 3])
def test_several_processes_rank_as_one_reading_only_their_shards(inputs, single, processes):
    from colbert_jax import Index
    from colbert_jax.search.placement import shard_bounds

    root, _ = inputs
    work = root / f"p{processes}"
    work.mkdir()
    args = ["search", "--index", str(root / "idx"), "--queries", str(root / "queries.tsv"), "--k", str(K)]
    args += ["--out", "ranking.tsv"]
    out = run(processes, args, work, record=True)
    assert_same_ranking(ranking(work / "ranking.tsv"), single)
    assert out.count("written to ranking.tsv") == 1, out[-2000:]  # process 0 alone writes

    index = Index.open(root / "idx", verify=False)
    offsets = np.concatenate([[0], np.cumsum(index.doclens)])
    bounds = shard_bounds(index.doclens, processes * DEVICES)
    for rank in range(processes):
        reads = json.loads((work / f"reads-{rank}.json").read_text())
        assert not {"codes", "residuals"} & set(reads["whole"]), reads["whole"]  # never a whole array
        own = (offsets[bounds[rank * DEVICES]], offsets[bounds[(rank + 1) * DEVICES]])  # its shards' embeddings
        for name in ("codes", "residuals"):
            ranges = [(lo, hi) for n, lo, hi in reads["ranges"] if n == name and hi > lo]
            assert ranges, f"process {rank} read no {name}"
            assert all(own[0] <= lo and hi <= own[1] for lo, hi in ranges), (rank, name, own, ranges)
            covered = np.zeros(int(offsets[-1]), bool)
            for lo, hi in ranges:
                covered[lo:hi] = True
            assert covered[own[0] : own[1]].all()  # and all of its own rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_over_two_processes_answers_as_one_ranks(inputs, single):
    """... and after passages are added to the index, as one process ranks the updated index."""
    root, queries = inputs
    shutil.copytree(root / "idx", root / "served")  # the other tests' index stays as it is
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "serve.log", "w")  # noqa: SIM115 - read after the job ends
    command = _command(2, ["serve", "--index", "served", "--port", str(port), "--max-batch", "4"])
    proc = subprocess.Popen(command, cwd=root, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None and time.monotonic() < deadline, (root / "serve.log").read_text()[-3000:]
        qids = list(queries)[:6]

        def check(answer: dict, qid: str, k: int, reference: dict = single) -> None:
            assert answer["query"] == queries[qid]
            want = reference[qid][:k]  # the server searches at k=100 and cuts
            assert [h["pid"] for h in answer["topk"]] == [p for p, _ in want]
            np.testing.assert_allclose([h["score"] for h in answer["topk"]], [s for _, s in want], atol=1e-5)

        for qid in qids[:2]:
            r = httpx.get(f"{url}/api/search", params={"query": queries[qid], "k": 7}, timeout=60)
            assert r.status_code == 200, r.text
            check(r.json(), qid, 7)
        r = httpx.post(f"{url}/api/search", json={"queries": [queries[q] for q in qids[2:]], "k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        for qid, answer in zip(qids[2:], r.json()["results"], strict=True):
            check(answer, qid, 5)
        # what would read other processes' shards is refused, and the server goes on
        explain = httpx.get(f"{url}/api/explain", params={"query": "x", "pid": single[qids[0]][0][0]}, timeout=60)
        filtered = httpx.get(f"{url}/api/search", params={"query": "x", "pids": "1,2"}, timeout=60)
        for r in (explain, filtered):
            assert r.status_code == 501 and "split over several processes" in r.json()["error"], r.text
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"

        # an update: every process moves to the new version at the next batch
        added = (COLLECTIONS / "stdlib_2k.tsv").read_text().splitlines()[300:340]
        (root / "added.tsv").write_text("\n".join(added) + "\n")
        run(1, ["add", "--index", "served", "--collection", "added.tsv", "--quiet"], root)
        args = ["search", "--index", "served", "--queries", "queries.tsv", "--k", str(K), "--out", "updated.tsv"]
        run(1, args, root)
        updated = ranking(root / "updated.tsv")
        assert updated != single  # the added passages change some rankings
        r = httpx.post(f"{url}/api/search", json={"queries": [queries[q] for q in qids[:4]], "k": 10}, timeout=120)
        assert r.status_code == 200, r.text
        for qid, answer in zip(qids[:4], r.json()["results"], strict=True):
            check(answer, qid, 10, updated)
        assert httpx.get(f"{url}/health", timeout=5).json()["passages"] == 340
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # launch_local passes it on; process 0 stops the other one
        try:
            proc.wait(timeout=60)
            for _ in range(100):  # the job's processes (output prefixers included) end with it
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
            raise AssertionError("processes of the server's job outlived it")
        except ProcessLookupError:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left (nothing, if all went well)
            log.close()
    out = (root / "serve.log").read_text()
    assert "[1] colbert-jax serve: process 1 stopped with process 0 after" in out, out[-3000:]
    assert "Aborted" not in out and "Traceback" not in out and "exited with status" not in out, out[-3000:]
