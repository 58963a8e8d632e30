"""Seeded 6x6 Sudoku puzzles (boxes of 2 rows x 3 columns) as prompt -> response text.

**Why 6x6.**  A 4x4 Sudoku has only 288 solution grids, so a train/test split by solution grid
leaves a few dozen test grids and a model can memorise the rest; 9x9 is far beyond what a tiny
model learns in minutes of CPU training. 6x6 has 28,200,960 grids, with the same three kinds of
constraint (rows, columns, boxes).

**Where a puzzle comes from** (puzzle ``seed``, all steps seeded, so the data set is a pure
function of its seeds):

1. py-sudoku (PyPI ``py-sudoku``) draws a seed grid and solves it: ``Sudoku(3, 2, seed=s)``
   places one given per row (a permutation drawn from ``s``) and its deterministic backtracking
   solver completes it. That alone reaches at most 6! = 720 distinct grids (its seed only picks
   the permutation), too few to hold test grids out, so
2. a random *validity-preserving symmetry* is applied (written here, as no library exposes it):
   relabel the digits, permute the 3 bands of 2 rows and the rows inside each band, the 2 stacks
   of 3 columns and the columns inside each stack. Every such map sends a valid grid to a valid
   grid and a unique-solution puzzle to a unique-solution puzzle.
3. ``blanks`` cells, drawn at random, are blanked; py-sudoku's ``has_multiple_solutions`` (it
   solves with ascending and with descending digit order and compares) rejects a pattern whose
   puzzle has more than one solution, and a new pattern is drawn. Every puzzle therefore has
   exactly one solution, the generator's.

**Split.**  Test puzzles come from one seed range, training puzzles from another; a training
puzzle whose *solution grid* is a test grid is skipped (so no test grid is ever seen in
training, with any blank pattern).

**Text** (one character per token, the project's ``char`` tokenizer): a grid is its 6 rows of
digits joined by ``/``; the prompt is the puzzle with ``0`` for a blank, followed by ``/``; the
response is the solution grid::

    prompt   "306241/142053/025136/630005/510062/260510/"     (42 characters)
    response "356241/142653/425136/631425/514362/263514"      (41 characters, then EOS)

The separators give the model explicit row boundaries (its rotary positions are relative), and
cell (r, c) of the response sits exactly 42 positions after the same cell of the prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from typing import Iterator

from sudoku import Sudoku

SIZE, BOX_ROWS, BOX_COLS = 6, 2, 3
CELLS = SIZE * SIZE
DIGITS = "123456"
BLANK = "0"
SEP = "/"
VOCAB = BLANK + DIGITS + SEP          # the char tokenizer's characters (then EOS, pad, mask)
PROMPT_CHARS = SIZE * (SIZE + 1)      # 42: six rows, each followed by '/'
RESPONSE_CHARS = PROMPT_CHARS - 1     # 41: six rows joined by '/'
TEST_SEED_OFFSET = 1_000_000_000      # test puzzles use seeds offset + i, training puzzles i


Grid = list[list[int]]  # 0 = blank


def grid_to_text(grid: Grid) -> str:
    return SEP.join("".join(str(v) for v in row) for row in grid)


def prompt_text(puzzle: Grid) -> str:
    return grid_to_text(puzzle) + SEP


def base_grid(seed: int) -> Grid:
    """py-sudoku's grid for ``seed``: one given per row drawn from the seed, then its solver."""
    solved = Sudoku(BOX_COLS, BOX_ROWS, seed=seed).solve(assert_solvable=True)
    return [list(row) for row in solved.board]


def random_symmetry(grid: Grid, rng: random.Random) -> Grid:
    """The grid under a random validity-preserving map: digits relabelled, bands and the rows in
    each band permuted, stacks and the columns in each stack permuted."""
    relabel = dict(zip(range(1, SIZE + 1), rng.sample(range(1, SIZE + 1), SIZE)))
    bands = rng.sample(range(SIZE // BOX_ROWS), SIZE // BOX_ROWS)
    rows = [b * BOX_ROWS + r for b in bands for r in rng.sample(range(BOX_ROWS), BOX_ROWS)]
    stacks = rng.sample(range(SIZE // BOX_COLS), SIZE // BOX_COLS)
    cols = [s * BOX_COLS + c for s in stacks for c in rng.sample(range(BOX_COLS), BOX_COLS)]
    return [[relabel[grid[r][c]] for c in cols] for r in rows]


def has_unique_solution(puzzle: Grid) -> bool:
    board = [[v if v else None for v in row] for row in puzzle]
    return not Sudoku(BOX_COLS, BOX_ROWS, board=board).has_multiple_solutions()


def make_puzzle(seed: int, blanks: int, max_tries: int = 1000) -> dict:
    """One puzzle with exactly ``blanks`` blank cells and a unique solution (module docstring)."""
    if not 0 < blanks < CELLS:
        raise ValueError(f"blanks must be in [1, {CELLS - 1}], got {blanks}")
    rng = random.Random(seed)
    solution = random_symmetry(base_grid(seed), rng)
    for _ in range(max_tries):
        holes = set(rng.sample(range(CELLS), blanks))
        puzzle = [[0 if r * SIZE + c in holes else solution[r][c] for c in range(SIZE)] for r in range(SIZE)]
        if has_unique_solution(puzzle):
            return {"prompt": prompt_text(puzzle), "response": grid_to_text(solution), "seed": seed,
                    "blanks": blanks}
    raise RuntimeError(f"no unique-solution pattern of {blanks} blanks in {max_tries} tries (seed {seed}): "
                       f"use fewer blanks")


def puzzles(first_seed: int, blanks: int, exclude_solutions: frozenset = frozenset()) -> Iterator[dict]:
    """Puzzles of seeds first_seed, first_seed + 1, ..., skipping those whose solution grid is in
    ``exclude_solutions`` (response texts)."""
    seed = first_seed
    while True:
        p = make_puzzle(seed, blanks)
        if p["response"] not in exclude_solutions:
            yield p
        seed += 1


def make_split(num_train: int, num_test: int, blanks: int) -> tuple[list[dict], list[dict]]:
    """(train, test): test puzzles from seeds TEST_SEED_OFFSET + i, training puzzles from seeds i
    whose solution grid is no test puzzle's."""
    test_gen = puzzles(TEST_SEED_OFFSET, blanks)
    test = [next(test_gen) for _ in range(num_test)]
    held_out = frozenset(p["response"] for p in test)
    train_gen = puzzles(0, blanks, held_out)
    train = [next(train_gen) for _ in range(num_train)]
    return train, test


def write_jsonl(records: list[dict], path: str) -> str:
    """Write the records; returns the SHA-256 of the file (printed, so a rerun can be compared)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    with open(path, "w") as f:
        f.write(text)
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--blanks", type=int, default=20)
    p.add_argument("--out-dir", required=True, help="writes train.jsonl and test.jsonl there")
    args = p.parse_args()
    import os

    os.makedirs(args.out_dir, exist_ok=True)
    train, test = make_split(args.num_train, args.num_test, args.blanks)
    for name, records in (("train", train), ("test", test)):
        digest = write_jsonl(records, os.path.join(args.out_dir, f"{name}.jsonl"))
        print(f"[sudoku] {len(records)} {name} puzzles ({args.blanks} blanks) -> "
              f"{args.out_dir}/{name}.jsonl sha256 {digest[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
