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
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MAX_CHARS = 20_000  # the tail of a completion that is parsed; answers sit at the end
STARTUP_TIMEOUT_S = 120.0  # a fresh worker imports math-verify (sympy) before its first item
# latex2sympy2_extended's parser generated for ANTLR 4.9.3 (the runtime hydra needs, so the one
# installed) is older than its 4.13.2 parser: it has no percent atom (`28\%` reads as 28 or as
# nothing). The grading workers are separate interpreters, so they put this runtime first on
# their path; `python -m trb.grading --install` (run by `make install`) puts it there.
GRADING_ANTLR = "4.13.2"
_NUMBER_GOLD = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*%?|[-+]?\.\d+")  # 1,234  -5  28%  .5
_COMMA_PAIR = re.compile(r"[-+]?\d+,\d+")  # 1,22 or -2,1: a decimal comma or a list of two; either reading counts
_DELIMITED = ("$", "\\(", "\\[", "\\boxed", "\\fbox")


def runtime_dir() -> Path:
    """Where the grading workers' ANTLR runtime lives (TRB_GRADING_RUNTIME, else inside the env)."""
    env = os.environ.get("TRB_GRADING_RUNTIME")
    return Path(env) if env else Path(sys.prefix) / "share" / "trb" / f"antlr-{GRADING_ANTLR}"


def install_runtime() -> Path:
    """pip-install the ANTLR runtime the grading workers use into runtime_dir() (the main
    process keeps hydra's 4.9.3)."""
    target = runtime_dir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target),
                    f"antlr4-python3-runtime=={GRADING_ANTLR}"], check=True)
    return target


def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _has_math(parsed: list) -> bool:
    """math-verify appends the raw matched string as a fallback: a reading counts only when a
    parsed object came back."""
    return any(not isinstance(x, str) for x in parsed)


def parse_gold(gold: str, timeout_s: int) -> list[list]:
    """The gold answer as given, as a list of accepted readings. Delimited LaTeX ($...$, \\(...\\),
    \\[...\\], \\boxed{}) and plain numbers (thousands separators, a percent sign) are read as they
    are; anything else is LaTeX content without delimiters (a MATH box's content, `2\\sqrt{2}`) and
    is read inside $...$. When that reading yields no math object the other one is tried; when
    neither does, the first reading's matched string stands (math-verify then compares strings). Two
    digit groups around one comma that are not a thousands group (`1,22`, `-2,1`) are ambiguous: both
    the decimal and the two-element reading are accepted."""
    from math_verify import parse

    text = gold.strip()

    def read(t: str) -> list:
        return parse(t, extraction_config=_configs(), parsing_timeout=timeout_s)

    if _COMMA_PAIR.fullmatch(text) and not _NUMBER_GOLD.fullmatch(text):
        return [r for r in (read(text), read(f"${text}$")) if _has_math(r)]
    as_given = any(d in text for d in _DELIMITED) or _NUMBER_GOLD.fullmatch(text) is not None
    first = read(text if as_given else f"${text}$")
    if not _has_math(first):
        second = read(f"${text}$" if as_given else text)
        if _has_math(second):
            return [second]
    return [first] if first else []


def _last_box(text: str) -> str | None:
    """The completion from its last \\boxed (or \\fbox) on, else None."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return text[at:] if at >= 0 else None


def _answer(parsed: list) -> tuple[str | None, str | None]:
    """(the string math-verify matched, the vote key: the parsed object's text, else that string)."""
    strs = [x for x in parsed if isinstance(x, str)]
    maths = [x for x in parsed if not isinstance(x, str)]
    matched = strs[0] if strs else (str(maths[0]) if maths else None)
    return matched, (str(maths[0]) if maths else matched)


def _verify(completion: str, gold: str, timeout_s: int) -> tuple[bool, str | None, str | None]:
    """(correct, extracted answer, vote key) of one completion.

    The answer is math-verify's reading of the completion's final part (its last MAX_CHARS
    characters; several boxes in a row join into one set answer, as math-verify reads them). A
    reading of the text from the last box on is accepted as well, so a single answer is the last
    box even when a model corrected itself on one line (`\\boxed{5}. No: \\boxed{6}`, which
    math-verify alone reads as {5, 6}). extracted is the string math-verify matched (of the accepted
    reading when correct); the vote key is the parsed object's text (answers that parse alike vote
    together)."""
    from math_verify import parse, verify

    cfg = _configs()
    readings = [parse(completion, extraction_config=cfg, parsing_timeout=timeout_s)]
    if completion.count("\\boxed") + completion.count("\\fbox") >= 2:  # one box: both readings are that box
        readings.append(parse(_last_box(completion), extraction_config=cfg, parsing_timeout=timeout_s))
    readings = [r for r in readings if r]
    if not readings:
        return False, None, None
    golds = _gold_readings(gold, timeout_s) if gold.strip() else []
    for reading in readings:
        if any(verify(g, reading, timeout_seconds=timeout_s) for g in golds):
            return (True, *_answer(reading))
    return (False, *_answer(readings[0]))


_GOLD_CACHE: dict[str, list] = {}  # per worker: the n samples of a problem share one gold parse


def _gold_readings(gold: str, timeout_s: int) -> list:
    if gold not in _GOLD_CACHE:
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = parse_gold(gold, timeout_s)
    return _GOLD_CACHE[gold]


def _worker_main(timeout_s: int) -> None:
    """Worker process: JSON lines [idx, completion, gold] on stdin -> [idx, ok, extracted, key]."""
    runtime = runtime_dir()
    if runtime.is_dir():
        sys.path.insert(0, str(runtime))  # before latex2sympy2_extended picks its parser
    import importlib.metadata as md

    import math_verify  # noqa: F401  (import once, before the first item)

    out = sys.stdout
    out.write(json.dumps({"antlr": md.version("antlr4-python3-runtime"), "math_verify": md.version("math-verify")})
              + "\n")
    out.flush()
    for line in sys.stdin:
        idx, completion, gold = json.loads(line)
        try:
            ok, extracted, key = _verify(completion, gold, timeout_s)
        except Exception:  # noqa: BLE001 - any parser failure grades as wrong
            ok, extracted, key = False, None, None
        out.write(json.dumps([idx, bool(ok), extracted, key]) + "\n")
        out.flush()


@dataclass
class Judgement:
    correct: bool
    extracted: str | None  # the answer as math-verify matched it (None: no answer found)
    key: str | None  # the parsed answer's text: the maj@k vote key


@dataclass
class GradeStats:
    items: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    antlr: str = ""  # the ANTLR runtime the workers' LaTeX parser ran on
    math_verify: str = ""


_WARNED = False


class Grader:
    """A small pool of grading processes. Use as a context manager or call close()."""

    def __init__(self, workers: int = 1, item_timeout_s: float | None = None, verify_timeout_s: int = 3):
        self.workers = max(1, int(workers))
        # an item may parse up to four readings and verify up to three pairs, each under verify_timeout_s
        self.item_timeout_s = float(item_timeout_s) if item_timeout_s is not None else 7.0 * verify_timeout_s + 2
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
        try:
            header = json.loads(proc.stdout.readline()) if ready else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict):
            proc.kill()
            raise RuntimeError("a math-verify grading worker did not start; is math-verify installed?")
        self.stats.antlr, self.stats.math_verify = header["antlr"], header["math_verify"]
        global _WARNED
        if header["antlr"] != GRADING_ANTLR and not _WARNED:
            _WARNED = True
            print(f"warning: grading workers run math-verify's LaTeX parser on ANTLR {header['antlr']}, which does "
                  f"not read percents (28\\% reads as 28); run `python -m trb.grading --install` once (puts "
                  f"antlr4-python3-runtime {GRADING_ANTLR} in {runtime_dir()} for the workers only)", file=sys.stderr)
        return proc

    def grade(self, completions: list[str], golds: list[str]) -> list[bool]:
        """Correctness of each completion against its gold answer string (timeouts are wrong)."""
        return [j.correct for j in self.judge(completions, golds)]

    def judge(self, completions: list[str], golds: list[str]) -> list[Judgement]:
        """Correctness, extracted answer and vote key of each completion (timeouts: wrong, no
        answer)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        t0 = time.monotonic()
        while len(self._pool) < self.workers:
            self._pool.append(self._spawn())
        results = [Judgement(False, None, None) for _ in completions]
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
                    idx, ok, extracted, key = json.loads(line)
                    results[idx] = Judgement(bool(ok), extracted, key)
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
    if sys.argv[1:] == ["--install"]:
        print(f"installed antlr4-python3-runtime {GRADING_ANTLR} for the grading workers in {install_runtime()}")
    else:
        _worker_main(int(sys.argv[1]))
