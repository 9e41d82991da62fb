"""Kill -9 at chosen points: a fork server that runs colbert-jax operations in children and kills them.

Run as `python -m tests.reliability.crashpoint`: it imports everything the operations need once (JAX, the
tokenizers, transformers, Orbax, ...) but never starts a JAX backend, so forking it is safe; each job then
runs in a fresh forked child in about a second instead of the five a new interpreter takes. Jobs arrive as
JSON lines on stdin and are answered with one JSON line each on stdout.

A job is killed with SIGKILL either

- at a filesystem event: an audit hook (`sys.addaudithook`, no tracing) counts the child's writes, renames,
  removals and directory creations under `root`, and the child sends itself SIGKILL just before event
  `kill_at_event`. Between two such events the files under `root` do not change (TensorStore's own writes
  aside), so killing before each event reaches every state a kill at any moment can leave; or
- after `kill_after_s` seconds, sent by this server: for the moments inside TensorStore's C++ writes.

An uninterrupted job (neither set) reports how many events it made, from which the tests choose their points.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate")


def _path(p, dir_fd=None) -> str | None:
    if isinstance(p, int) or p is None:
        return None
    p = os.fsdecode(p)
    if dir_fd is not None and not os.path.isabs(p):
        try:
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        except OSError:
            return None
    return os.path.abspath(p)


def install_hook(root: str, kill_at: int | None) -> list[int]:
    """Counts filesystem-changing events under `root`; SIGKILLs this process before event `kill_at`."""
    root = os.path.abspath(root)
    count = [0]

    def under_root(p) -> bool:
        return p is not None and (p == root or p.startswith(root + os.sep))

    def hook(event: str, args) -> None:
        if event not in _EVENTS:
            return
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            paths = [_path(path)] if writing else []
        elif event == "os.rename":
            paths = [_path(args[0], args[2]), _path(args[1], args[3])]
        elif event in ("os.remove", "os.rmdir"):
            paths = [_path(args[0], args[1])]
        elif event == "os.mkdir":
            paths = [_path(args[0], args[2])]
        elif event == "shutil.rmtree":
            paths = [_path(args[0], args[1] if len(args) > 1 else None)]
        else:
            paths = [_path(args[0])]
        if any(map(under_root, paths)):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    return count


# -- the operations --------------------------------------------------------------------------------------
def _index(args: dict) -> None:
    import colbert_jax

    model = colbert_jax.load_checkpoint(args["checkpoint"])
    indexer = colbert_jax.Indexer(model, nbits=2, chunksize=args["chunksize"], show_progress=False)
    indexer.index(args["index"], args["collection"], overwrite=True)


def _cli(args: dict) -> None:
    from colbert_jax.cli import main

    rc = main(args["argv"])
    if rc:
        raise SystemExit(rc)


def _update(args: dict) -> None:
    import colbert_jax

    indexer = colbert_jax.Indexer(colbert_jax.load_checkpoint(args["checkpoint"]), show_progress=False)
    if args["op"] == "add":
        indexer.add(args["index"], args["collection"])
    elif args["op"] == "delete":
        indexer.delete(args["index"], args["pids"])
    else:
        indexer.compact(args["index"])


JOBS = {"index": _index, "cli": _cli, "update": _update}


def _preload() -> None:
    """Imports what the jobs use, without starting a JAX backend (no devices, no threads of its own)."""
    import faiss  # noqa: F401
    import grain  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import tensorstore  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    import colbert_jax  # noqa: F401
    import colbert_jax.cli  # noqa: F401
    import colbert_jax.indexing.build  # noqa: F401
    import colbert_jax.training.loop  # noqa: F401


def _run_child(job: dict) -> None:
    """In the forked child: run one job, then exit without Python's cleanup."""
    code = 0
    try:
        # C++ libraries (faiss, XLA) print to fd 1 and 2: keep them off this server's answers.
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = sys.stderr = os.fdopen(log, "w", buffering=1)
        if job.get("fsize_limit"):  # a full disk: writes past this size fail with EFBIG
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize_limit"], job["fsize_limit"]))
        count = install_hook(job["root"], job.get("kill_at_event"))
        JOBS[job["job"]](job["args"])
        with open(job["report"], "w") as f:
            json.dump({"events": count[0]}, f)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through the exit status and the log
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def _wait(pid: int, kill_after: float | None, limit: float) -> int:
    start = time.monotonic()
    deadline = start + (kill_after if kill_after is not None else limit)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.005)


def serve() -> None:
    """Reads jobs from stdin, answers `{"rc", "signal", "seconds", "events"}` per job on stdout."""
    _preload()
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _run_child(job)
        status = _wait(pid, job.get("kill_after_s"), job.get("limit_s", 300.0))
        answer = {
            "rc": os.waitstatus_to_exitcode(status),
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "seconds": time.monotonic() - t0,
            "events": None,
        }
        if answer["rc"] == 0:
            with open(job["report"]) as f:
                answer["events"] = json.load(f)["events"]
        print(json.dumps(answer), file=out, flush=True)


if __name__ == "__main__":
    serve()
