"""The Sudoku example's checker and puzzle generator (examples/sudoku): the checker accepts any
valid completion consistent with the givens, rejects each kind of violation and malformed
output; the generator is seeded, blanks what it says, gives unique-solution puzzles and keeps
test solution grids out of training. Validity is cross-checked with py-sudoku's own validate()
and a brute-force solution counter written here (both independent of the checker)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "sudoku"))
import checker  # noqa: E402
import puzzles  # noqa: E402
from sudoku import Sudoku  # noqa: E402

ALL_BLANK = "000000/" * 6


def to_text(grid):
    return "/".join("".join(map(str, row)) for row in grid)


def grid_of(text):
    return [[int(c) for c in row] for row in text.split("/")]


def pysudoku_valid(grid):
    """py-sudoku's check of a full board (independent of checker.py)."""
    return all(all(v) for v in grid) and Sudoku(3, 2, board=grid).validate()


def count_solutions(puzzle, limit=2):
    """Brute force: completions of a 6x6 puzzle (0 = blank), counted up to ``limit``."""
    cells = [(r, c) for r in range(6) for c in range(6) if not puzzle[r][c]]
    g = [row[:] for row in puzzle]

    def ok(r, c, v):
        if v in g[r] or any(g[i][c] == v for i in range(6)):
            return False
        br, bc = r - r % 2, c - c % 3
        return all(g[br + i][bc + j] != v for i in range(2) for j in range(3))

    def go(k):
        if k == len(cells):
            return 1
        r, c = cells[k]
        n = 0
        for v in range(1, 7):
            if ok(r, c, v):
                g[r][c] = v
                n += go(k + 1)
                g[r][c] = 0
                if n >= limit:
                    break
        return n

    return go(0)


@pytest.fixture(scope="module")
def puzzle():
    return puzzles.make_puzzle(seed=7, blanks=20)


def test_generator_is_seeded_blanks_and_unique(puzzle):
    assert puzzles.make_puzzle(seed=7, blanks=20) == puzzle
    assert puzzles.make_puzzle(seed=8, blanks=20) != puzzle
    assert len(puzzle["prompt"]) == puzzles.PROMPT_CHARS and len(puzzle["response"]) == puzzles.RESPONSE_CHARS
    assert set(puzzle["prompt"] + puzzle["response"]) <= set(puzzles.VOCAB)
    givens = checker.parse_givens(puzzle["prompt"])
    solution = grid_of(puzzle["response"])
    assert sum(v == 0 for row in givens for v in row) == 20
    assert all(g in (0, s) for gr, sr in zip(givens, solution) for g, s in zip(gr, sr))
    assert pysudoku_valid(solution)
    assert count_solutions(givens) == 1
    for seed in range(5):  # the symmetry step reaches grids beyond py-sudoku's 720
        p = puzzles.make_puzzle(seed, 24)
        assert pysudoku_valid(grid_of(p["response"])) and count_solutions(checker.parse_givens(p["prompt"])) == 1
        assert p["response"] != to_text(puzzles.base_grid(seed))


def test_split_keeps_test_grids_out_of_training():
    train, test = puzzles.make_split(num_train=60, num_test=20, blanks=16)
    assert len(train) == 60 and len(test) == 20
    assert not {p["response"] for p in train} & {p["response"] for p in test}
    # the exclusion really filters: a training stream told to exclude a grid never yields it
    banned = frozenset({train[0]["response"]})
    gen = puzzles.puzzles(0, 16, banned)
    assert all(next(gen)["response"] not in banned for _ in range(5))


def test_generator_solution_accepted(puzzle):
    v = checker.judge(puzzle["response"], puzzle["prompt"], puzzle["response"])
    assert v.solved and v.cell_accuracy == 1.0 and v.reason == ""
    # the check(response, record) interface of benchmarks/sampling_throughput.py --checker
    assert checker.check(puzzle["response"], puzzle) is True
    assert checker.check(puzzle["response"][:-1], puzzle) is False


def deadly_rectangle(grid):
    """A valid grid with two rows and two columns swapped at a rectangle (a second solution of
    the puzzle that blanks those four cells), and the four cells."""
    for r1 in range(6):
        for r2 in range(r1 + 1, 6):
            for c1 in range(6):
                for c2 in range(c1 + 1, 6):
                    if grid[r1][c1] == grid[r2][c2] and grid[r1][c2] == grid[r2][c1]:
                        alt = [row[:] for row in grid]
                        alt[r1][c1], alt[r1][c2] = grid[r1][c2], grid[r1][c1]
                        alt[r2][c1], alt[r2][c2] = grid[r2][c2], grid[r2][c1]
                        if pysudoku_valid(alt):
                            return alt, [(r1, c1), (r1, c2), (r2, c1), (r2, c2)]
    return None, None


def test_valid_alternative_solution_accepted():
    # find a grid with a deadly rectangle; its puzzle (those four cells and a few more blank)
    # has two solutions: both must be accepted
    for seed in range(200):
        solution = grid_of(puzzles.make_puzzle(seed, 10)["response"])
        alt, cells = deadly_rectangle(solution)
        if alt:
            break
    assert alt is not None
    prompt_grid = [row[:] for row in solution]
    for r, c in cells + [(0, 0), (5, 5)]:
        prompt_grid[r][c] = 0
    prompt = to_text(prompt_grid) + "/"
    assert count_solutions(prompt_grid) == 2
    v = checker.judge(to_text(alt), prompt, to_text(solution))
    assert v.solved, v.reason
    blanks = len(set(cells + [(0, 0), (5, 5)]))
    assert v.cell_accuracy == pytest.approx((blanks - 4) / blanks)  # vs the generator's solution
    # the same alternative is rejected when those cells are givens
    v = checker.judge(to_text(alt), to_text(solution) + "/", to_text(solution))
    assert not v.solved and v.reason.startswith("given")


def test_each_violation_rejected(puzzle):
    good = grid_of(puzzle["response"])
    # a cell swap inside a row within one box: rows and boxes stay permutations, columns break
    col_bad = [row[:] for row in good]
    col_bad[0][0], col_bad[0][1] = col_bad[0][1], col_bad[0][0]
    # a cell swap inside a column within one box: columns and boxes intact, rows break
    row_bad = [row[:] for row in good]
    row_bad[0][0], row_bad[1][0] = row_bad[1][0], row_bad[0][0]
    # a Latin square that is no Sudoku: rows and columns fine, boxes repeat
    box_bad = [[(r + c) % 6 + 1 for c in range(6)] for r in range(6)]
    for grid, kind in ((col_bad, "column"), (row_bad, "row"), (box_bad, "box")):
        assert not pysudoku_valid(grid)
        v = checker.judge(to_text(grid), ALL_BLANK, puzzle["response"])
        assert not v.solved and v.reason.startswith(kind), (kind, v.reason)
    # a valid grid that changes a given
    other = grid_of(puzzles.make_puzzle(seed=99, blanks=20)["response"])
    v = checker.judge(to_text(other), puzzle["prompt"], puzzle["response"])
    assert not v.solved and v.reason.startswith("given")


@pytest.mark.parametrize("mutate", [
    lambda s: s[:-1],                # wrong length
    lambda s: s + "1",
    lambda s: s + "/123456",         # a seventh row
    lambda s: "",
    lambda s: s.replace("/", ""),    # separators missing
    lambda s: s.replace("/", "|"),
    lambda s: "0" + s[1:],           # a blank left in the answer
    lambda s: "7" + s[1:],           # out-of-range digit
    lambda s: "x" + s[1:],           # not a digit
    lambda s: s + "<|endoftext|>",   # special text after the answer
])
def test_malformed_rejected(puzzle, mutate):
    answer = mutate(puzzle["response"])
    v = checker.judge(answer, puzzle["prompt"], puzzle["response"])
    assert not v.solved and v.reason.startswith("malformed")


def test_cell_accuracy_counts_blank_cells_only(puzzle):
    givens = checker.parse_givens(puzzle["prompt"])
    blanks = [(r, c) for r in range(6) for c in range(6) if not givens[r][c]]
    # wrong digits at every given, right at every blank: cell accuracy 1 (givens do not count)
    chars = list(puzzle["response"])
    for r in range(6):
        for c in range(6):
            if givens[r][c]:
                chars[r * 7 + c] = "9"
    assert checker.cell_accuracy("".join(chars), puzzle["prompt"], puzzle["response"]) == 1.0
    # a truncated answer keeps the cells it has, in place
    cut = puzzle["response"][:20]
    expected = sum(r * 7 + c < 20 for r, c in blanks) / len(blanks)
    v = checker.judge(cut, puzzle["prompt"], puzzle["response"])
    assert not v.solved and v.cell_accuracy == pytest.approx(expected)
