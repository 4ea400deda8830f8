"""math-verify grading in worker processes with hard deadlines.

math-verify's own timeouts use SIGALRM: they only work on a process's main thread, must be ints
(a float silently grades "wrong"), and cannot interrupt some C-level work; printing a parsed
SymPy object can hang. So each item is graded in a worker process (whose main thread owns the
alarm) with int timeouts, under an outer per-item deadline enforced by the parent: a worker that
misses it is killed and replaced, and the item counts as wrong (and as a timeout). Parsed
objects never leave the worker; only booleans and raw strings do.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass

MAX_CHARS = 20_000  # the tail of a completion that is parsed; answers sit at the end
STARTUP_TIMEOUT_S = 120.0  # a fresh worker imports math-verify (sympy) before its first item


def _verify(completion: str, gold: str, timeout_s: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    last_box = completion.rfind("\\boxed")
    if last_box >= 0:  # the final answer is the last box (math-verify would take the first)
        completion = completion[last_box:]
    gold_parsed = parse(f"${gold}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                        parsing_timeout=timeout_s)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=timeout_s)
    pred = parse(
        completion,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout_s,
    )
    if not gold_parsed or not pred:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=timeout_s))


def _worker_main(timeout_s: int) -> None:
    """Worker process: JSON lines [idx, completion, gold] on stdin -> [idx, ok] on stdout."""
    import math_verify  # noqa: F401  (import once, before the first item)

    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        idx, completion, gold = json.loads(line)
        try:
            ok = _verify(completion, gold, timeout_s)
        except Exception:  # noqa: BLE001 - any parser failure grades as wrong
            ok = False
        out.write(json.dumps([idx, bool(ok)]) + "\n")
        out.flush()


@dataclass
class GradeStats:
    items: int = 0
    timeouts: int = 0
    seconds: float = 0.0


class Grader:
    """A small pool of grading processes. Use as a context manager or call close()."""

    def __init__(self, workers: int = 1, item_timeout_s: float = 10.0, verify_timeout_s: int = 3):
        self.workers = max(1, int(workers))
        self.item_timeout_s = float(item_timeout_s)
        self.verify_timeout_s = int(verify_timeout_s)  # math-verify needs an int
        self.stats = GradeStats()
        self._pool: list[subprocess.Popen] = []

    def _spawn(self) -> subprocess.Popen:
        # a fresh interpreter (not fork/spawn of the caller): no inherited torch threads, and
        # no re-import of the caller's __main__
        proc = subprocess.Popen(
            [sys.executable, "-m", "trb.grading", str(self.verify_timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        ready, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT_S)
        if not ready or proc.stdout.readline().strip() != '"ready"':
            proc.kill()
            raise RuntimeError("a math-verify grading worker did not start; is math-verify installed?")
        return proc

    def grade(self, completions: list[str], golds: list[str]) -> list[bool]:
        """Correctness of each completion against its gold answer string (timeouts are wrong)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        t0 = time.monotonic()
        while len(self._pool) < self.workers:
            self._pool.append(self._spawn())
        results = [False] * len(completions)
        queue = list(range(len(completions)))[::-1]
        idle = list(range(len(self._pool)))
        busy: dict[int, float] = {}  # slot -> deadline
        while queue or busy:
            while queue and idle:
                slot, idx = idle.pop(), queue.pop()
                text = str(completions[idx])[-MAX_CHARS:]
                self._pool[slot].stdin.write(json.dumps([idx, text, str(golds[idx])]) + "\n")
                self._pool[slot].stdin.flush()
                busy[slot] = time.monotonic() + self.item_timeout_s
            by_fd = {self._pool[s].stdout: s for s in busy}
            ready, _, _ = select.select(list(by_fd), [], [], 0.05)
            for stream in ready:
                slot = by_fd[stream]
                busy.pop(slot)
                line = stream.readline()
                if line:
                    idx, ok = json.loads(line)
                    results[idx] = bool(ok)
                else:  # the worker died on this item: wrong; replace it
                    self._replace(slot)
                idle.append(slot)
            now = time.monotonic()
            for slot, deadline in list(busy.items()):
                if now > deadline:  # stuck (C-level work, a hang): kill, replace, count
                    busy.pop(slot)
                    self.stats.timeouts += 1
                    self._replace(slot)
                    idle.append(slot)
        self.stats.items += len(completions)
        self.stats.seconds += time.monotonic() - t0
        return results

    def _replace(self, slot: int) -> None:
        proc = self._pool[slot]
        proc.kill()
        proc.wait(timeout=5)
        self._pool[slot] = self._spawn()

    def close(self) -> None:
        for proc in self._pool:
            try:
                proc.stdin.close()
                proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
        self._pool = []

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT: Grader | None = None


def grade_batch(completions: list[str], golds: list[str]) -> list[bool]:
    """Grade with a process-wide default grader (started on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Grader()
    return _DEFAULT.grade(completions, golds)


def is_correct(completion: str, gold: str) -> bool:
    """True when math-verify judges the completion's final answer equal to `gold`."""
    return grade_batch([completion], [gold])[0]


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
