"""`python -m promptshift.report RESULTS_DIR [OUT_HTML]`: the report without the CLI's other
dependencies (typer), for CPU-only analysis nodes."""

import sys

from promptshift.errors import PromptShiftError
from promptshift.report import build_report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        print("usage: python -m promptshift.report RESULTS_DIR [OUT_HTML]", file=sys.stderr)
        return 2
    try:
        path = build_report(args[0], args[1] if len(args) > 1 else None)
    except PromptShiftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
