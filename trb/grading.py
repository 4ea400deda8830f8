"""math-verify grading in worker processes with hard deadlines.

math-verify's own timeouts use SIGALRM: they only work on a process's main thread, must be ints
(a float silently grades "wrong"), and cannot interrupt some C-level work; printing a parsed
SymPy object can hang. So each item is graded in a worker process (whose main thread owns the
alarm) with int timeouts, under an outer per-item deadline enforced by the parent: a worker that
misses it is killed and replaced, and the item counts as wrong (and as a timeout). Parsed
objects never leave the worker; only booleans and raw strings do.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

MAX_CHARS = 20_000  # the tail of a completion that is parsed; answers sit at the end
STARTUP_TIMEOUT_S = 120.0  # a fresh worker imports math-verify (sympy) before its first item


def _verify(completion: str, gold: str, timeout_s: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if len(completion) > MAX_CHARS:
        completion = completion[-MAX_CHARS:]
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


def _worker(conn, timeout_s: int) -> None:
    import math_verify  # noqa: F401  (import once, before the first item)

    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, completion, gold = msg
        try:
            ok = _verify(completion, gold, timeout_s)
        except Exception:  # noqa: BLE001 - any parser failure grades as wrong
            ok = False
        conn.send((idx, ok))


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
        self._ctx = mp.get_context("spawn")  # no inherited torch threads or locks
        self._pool: list[tuple] = []

    def _spawn(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, self.verify_timeout_s), daemon=True)
        proc.start()
        child.close()
        if not parent.poll(STARTUP_TIMEOUT_S) or parent.recv() != "ready":
            proc.kill()
            raise RuntimeError("a math-verify grading worker did not start; is math-verify installed?")
        return proc, parent

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
        busy: dict = {}  # conn -> (deadline, slot)
        while queue or busy:
            while queue and idle:
                slot, idx = idle.pop(), queue.pop()
                conn = self._pool[slot][1]
                conn.send((idx, str(completions[idx]), str(golds[idx])))
                busy[conn] = (time.monotonic() + self.item_timeout_s, slot)
            for conn in wait(list(busy), timeout=0.05):
                _, slot = busy.pop(conn)
                try:
                    got_idx, ok = conn.recv()
                    results[got_idx] = bool(ok)
                except (EOFError, OSError):  # the worker died on this item: wrong; replace it
                    self._replace(slot)
                idle.append(slot)
            now = time.monotonic()
            for conn, (deadline, slot) in list(busy.items()):
                if now > deadline:  # stuck (C-level work, a hang): kill, replace, count
                    busy.pop(conn)
                    self.stats.timeouts += 1
                    self._replace(slot)
                    idle.append(slot)
        self.stats.items += len(completions)
        self.stats.seconds += time.monotonic() - t0
        return results

    def _replace(self, slot: int) -> None:
        proc, conn = self._pool[slot]
        proc.kill()
        proc.join(timeout=5)
        conn.close()
        self._pool[slot] = self._spawn()

    def close(self) -> None:
        for proc, conn in self._pool:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=2)
            if proc.is_alive():
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
