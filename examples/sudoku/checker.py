"""The exact checker for a model's Sudoku answer (the text format of puzzles.py).

**Puzzle accuracy** accepts ANY valid completion consistent with the givens: the answer must be
six rows of six digits 1-6 joined by '/', every row, column and 2x3 box a permutation of 1-6,
and every given of the prompt unchanged. It never looks at the generator's solution (the
generator's puzzles have exactly one solution, but the checker does not rely on it).

**Cell accuracy** is secondary and compares against the generator's solution: the fraction of
the puzzle's *blank* cells whose answer digit equals the solution's (givens are excluded: copying
them is not solving). A malformed answer still gets credit for the cells it has where they belong
(cell (r, c) is character 7r + c); a missing or non-digit character counts as wrong. So a valid
alternative solution (of a puzzle with several) would be 100% by puzzle accuracy but not by cell
accuracy.

Written here rather than taken from py-sudoku: its ``validate()`` accepts boards with blanks and
has no notion of givens or of text; the rules are a few lines.
"""

# (no `from __future__ import annotations`: a dataclass with string annotations fails in a module
# loaded by file path without a sys.modules entry, as a --checker file is)
from dataclasses import dataclass

SIZE, BOX_ROWS, BOX_COLS = 6, 2, 3
DIGITS = set("123456")
SEP = "/"


@dataclass
class Verdict:
    solved: bool          # a valid completion consistent with the givens
    cell_accuracy: float  # blank cells equal to the generator's solution
    reason: str           # "" when solved, else the first violation found


def parse_grid(text: str) -> list[list[int]] | None:
    """Six rows of six digits 1-6 joined by '/', else None."""
    rows = text.split(SEP)
    if len(rows) != SIZE or any(len(r) != SIZE or not set(r) <= DIGITS for r in rows):
        return None
    return [[int(c) for c in r] for r in rows]


def parse_givens(prompt: str) -> list[list[int]]:
    """The prompt's grid (0 = blank); it ends with a '/'."""
    rows = prompt.rstrip(SEP).split(SEP)
    return [[int(c) for c in r] for r in rows]


def violation(grid: list[list[int]], givens: list[list[int]]) -> str:
    """The first rule the grid breaks, or ""."""
    full = set(range(1, SIZE + 1))
    for r in range(SIZE):
        for c in range(SIZE):
            if givens[r][c] and grid[r][c] != givens[r][c]:
                return f"given at row {r + 1} column {c + 1} changed"
    for r in range(SIZE):
        if set(grid[r]) != full:
            return f"row {r + 1} repeats a digit"
    for c in range(SIZE):
        if {grid[r][c] for r in range(SIZE)} != full:
            return f"column {c + 1} repeats a digit"
    for br in range(0, SIZE, BOX_ROWS):
        for bc in range(0, SIZE, BOX_COLS):
            box = {grid[br + i][bc + j] for i in range(BOX_ROWS) for j in range(BOX_COLS)}
            if box != full:
                return f"box at row {br + 1} column {bc + 1} repeats a digit"
    return ""


def cell_accuracy(answer: str, prompt: str, solution: str) -> float:
    givens = parse_givens(prompt)
    blanks = [(r, c) for r in range(SIZE) for c in range(SIZE) if not givens[r][c]]
    if not blanks:
        return 1.0
    right = 0
    for r, c in blanks:
        i = r * (SIZE + 1) + c
        right += i < len(answer) and answer[i] == solution[i]
    return right / len(blanks)


def judge(answer: str, prompt: str, solution: str) -> Verdict:
    """Judge one answer (the response text, EOS excluded) to the puzzle ``prompt`` whose
    generator solution is ``solution``."""
    acc = cell_accuracy(answer, prompt, solution)
    grid = parse_grid(answer)
    if grid is None:
        return Verdict(False, acc, "malformed: not six rows of six digits 1-6 joined by '/'")
    reason = violation(grid, parse_givens(prompt))
    return Verdict(not reason, acc, reason)


def check(response: str, record: dict) -> bool:
    """The checker interface of ``benchmarks/sampling_throughput.py --checker`` (and of any tool
    that loads ``check(response, record)``): True when ``response`` solves the puzzle of a
    puzzles.py record ({"prompt": ..., "response": the generator's solution})."""
    return judge(response, record["prompt"], record["response"]).solved
