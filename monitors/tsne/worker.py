"""The background process of :mod:`monitors.tsne.monitor`: one niced, single-threaded Python process
that computes t-SNE frames (:mod:`monitors.tsne.frame`) while training goes on.

Why not ``multiprocessing``/``ProcessPoolExecutor``: fork is unsafe in a process running torch
threads, and ``spawn``/``forkserver`` re-import the user's ``__main__`` script in the child,
which re-runs a training script that lacks an ``if __name__ == "__main__":`` guard (common in
the loops ``attach()`` is made for). A fresh interpreter that runs only ``frame.py`` has
neither problem.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Mapping, Optional

from .frame import HEADER, read_message

__all__ = ["BackgroundWorker"]


def _child_prelude(nice: int) -> str:
    """First lines of the worker, run before its heavy imports (numpy, sklearn).

    Only ``nice``, not Linux ``SCHED_IDLE`` as well: under SCHED_IDLE a machine that training
    saturates would starve the frames completely."""
    return "\n".join(["import os, sys", "try:", f"    os.nice({int(nice)})", "except OSError:", "    pass"]) + "\n"


class BackgroundWorker:
    """One long-lived, niced, single-threaded Python process computing frames; results arrive as
    :class:`concurrent.futures.Future` objects.

    Messages are length-prefixed pickles over the child's stdin/stdout; one short-lived thread
    per frame writes the job and waits for the answer, so the training thread never blocks, not
    even while the child starts.
    """

    def __init__(self, nice: int = 19) -> None:
        self.nice = nice
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()  # one frame at a time on the pipes
        self._closed = False

    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is None:
            # the worker runs frame.py as a script: no torch, no monitors package to import
            worker = str(Path(__file__).resolve().with_name("frame.py"))
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                       NUMEXPR_NUM_THREADS="1", VECLIB_MAXIMUM_THREADS="1", MPLBACKEND="Agg",
                       CUDA_VISIBLE_DEVICES="")
            code = _child_prelude(self.nice) + f"import runpy\nrunpy.run_path({worker!r}, run_name='__main__')\n"
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=env, close_fds=True)
        return self._proc

    def submit(self, job: Mapping[str, Any]) -> Future:
        """Hand one frame's job to the worker; the Future holds its result or its error."""
        if self._closed:
            raise RuntimeError("tsne: the background worker was shut down")
        data = pickle.dumps(dict(job), protocol=pickle.HIGHEST_PROTOCOL)  # a pickling error raises here
        fut: Future = Future()
        threading.Thread(target=self._run, args=(data, fut), name="tsne-frame", daemon=True).start()
        return fut

    def _run(self, data: bytes, fut: Future) -> None:
        try:
            with self._lock:
                proc = self._ensure_started()
                proc.stdin.write(HEADER.pack(len(data)) + data)
                proc.stdin.flush()
                reply = read_message(proc.stdout)
            if reply is None:
                raise RuntimeError(f"tsne: the background worker exited (code {proc.poll()}) before "
                                   "answering; its stderr above says why")
            if reply[0] == "ok":
                fut.set_result(reply[1])
            else:
                fut.set_exception(RuntimeError(f"tsne: frame failed in the background worker: {reply[1]}\n{reply[2]}"))
        except BaseException as exc:  # broken pipe, dead worker, unpicklable reply
            if not fut.done():
                fut.set_exception(exc)

    @property
    def pid(self) -> Optional[int]:
        """The worker process's id, or None before the first frame."""
        return None if self._proc is None else self._proc.pid

    def shutdown(self, timeout: float = 5.0) -> None:
        """Close the child's stdin (it exits at EOF); kill it if it does not within ``timeout``."""
        self._closed = True
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
