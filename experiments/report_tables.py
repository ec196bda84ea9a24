"""The result tables of the docs, written from the committed pareto.json files and checked against them.

A result table in a Markdown page sits between two comment lines; the first holds the
arguments of ``compare_arms.py`` (pareto.json paths relative to the page, ``--reference``,
``--arm``, ``--quality``), and everything up to the second is the table that command prints:

    <!-- table: ../results/cifar10_routers/pareto.json --reference dense -->
    | arm | seeds | top1 % (mean +- 95%) | per seed | GFLOPs/img | vs dense (Welch) | ... |
    ...
    <!-- /table -->

A number typed by hand into a table is the copy that goes stale (a result stated in five
places, corrected one "docs:" commit at a time); here the page holds the command and this
script the numbers.

    python experiments/report_tables.py            # rewrite every table of the docs from its records
    python experiments/report_tables.py --check    # exit 1, naming each table that disagrees (CI)
    python experiments/report_tables.py PAGE.md ...

A new recipe's table (e.g. recipe 14) is one comment line in its page, then one run of this script.
A line whose first word is a kind of record_tables.py (``search-pareto``, ``soft-init-diagnostics``)
is drawn by that kind from the files named after it instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # compare_arms.py is a script beside this one, not a package module
import compare_arms  # noqa: E402
import record_tables  # noqa: E402

REPO = HERE.parent
START = re.compile(r"^<!-- table: (?P<args>.*) -->$")
END = "<!-- /table -->"


class TableError(Exception):
    """A table block that cannot be generated: no end line, or arguments compare_arms refuses."""


def default_pages() -> list[Path]:
    """The pages whose tables are kept: the README, docs/ and the recipe pages."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
            *sorted((HERE / "recipes").glob("*.md"))]


def generate(args: str, page: Path) -> str:
    """The table compare_arms prints for ``args`` (paths relative to ``page``'s directory)."""
    words = shlex.split(args)
    if words and words[0] in record_tables.KINDS:  # a table of other records than compare_arms' arms
        try:
            return record_tables.KINDS[words[0]](*(page.parent / word for word in words[1:]))
        except (record_tables.RecordError, TypeError) as exc:
            raise TableError(f"{page}: table {args!r}: {exc}") from None
        except OSError as exc:
            raise TableError(f"{page}: table {args!r}: {exc.filename}: {exc.strerror}") from None
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            parsed = compare_arms.arg_parser().parse_args(words)
            files = []
            for spec in parsed.files:  # FILE@TAG: the tag stays, the file is found beside the page
                path, at, tag = spec.partition("@")
                files.append(str(page.parent / path) + at + tag)
            return compare_arms.render(parsed, files)
    except SystemExit as exc:  # argparse's and compare_arms' refusals
        message = exc.code if isinstance(exc.code, str) else " ".join(err.getvalue().strip().splitlines()[-1:])
        raise TableError(f"{page}: table {args!r}: {message}") from None
    except OSError as exc:
        raise TableError(f"{page}: table {args!r}: {exc.filename}: {exc.strerror}") from None


def render(page: Path) -> tuple[str, list[str]]:
    """The page with every table regenerated, and the tables that differed from the page's (by line)."""
    lines = page.read_text().split("\n")
    out, differing, i = [], [], 0
    while i < len(lines):
        match = START.match(lines[i].strip())
        out.append(lines[i])
        i += 1
        if not match:
            continue
        try:
            end = lines.index(END, i)
        except ValueError:
            raise TableError(f"{page}:{i}: table without its {END} line") from None
        table = generate(match["args"], page).rstrip("\n").split("\n")
        if lines[i:end] != table:
            differing.append(f"{page}:{i}: table {match['args']!r} differs from its records")
        out += table + [END]
        i = end + 1
    return "\n".join(out), differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="Markdown pages (default: README, docs/, recipes)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    differing, tables = [], 0
    try:
        for page in args.pages or default_pages():
            text, found = render(page)
            tables += page.read_text().count("<!-- table: ")
            differing += found
            if found and not args.check:
                page.write_text(text)
    except TableError as err:
        print(f"report_tables: {err}", file=sys.stderr)
        return 2
    for line in differing:
        print(line if args.check else line.replace("differs from its records", "rewritten from its records"))
    print(f"{tables} tables, {len(differing)} {'differ' if args.check else 'rewritten'}")
    return 1 if differing and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
