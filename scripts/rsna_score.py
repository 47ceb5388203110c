"""Score an RSNA 2024 lumbar spine submission against train.csv-format ground truth.

Usage:
    python scripts/rsna_score.py --solution train.csv --submission submission.csv

Prints the per-term log losses and the score as JSON; exit 0. Bad input: a message naming the file
and row on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.errors import BundleInputError  # noqa: E402
from bundle.rsna_metric import read_rsna_solution, read_rsna_submission, rsna_score  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solution", required=True, help="train.csv-format ground truth")
    parser.add_argument("--submission", required=True, help="row_id,normal_mild,moderate,severe CSV")
    args = parser.parse_args(argv)
    try:
        solution = read_rsna_solution(args.solution)
        submission = read_rsna_submission(args.submission)
        result = rsna_score(solution, submission, solution_name=args.solution, submission_name=args.submission)
    except BundleInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
