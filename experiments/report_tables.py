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

A figure the prose quotes from a table goes stale the same way, so every ``x +- y`` in a page's
text must be in one of its generated tables, in the Welch comparisons (``comparisons``) of the
pareto.json files they read, or in the tables of a page it links (docs/ quoting a recipe);
the script names each one that is not and exits 1, with or without ``--check``: only an edit of
the text mends it. (Its sign is not checked: "A - B" is quoted either way round; nor a figure
quoted alone.)

A new recipe's table (e.g. recipe 14) is one comment line in its page, then one run of this script.
A line whose first word is a kind of record_tables.py (``search-pareto``, ``soft-init-diagnostics``)
is drawn by that kind from the files named after it instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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


INTERVAL = re.compile(r"(?<![\d.])[+-]?\d+\.\d+ \+- \d+\.\d+")  # "52.19 +- 2.60", "-1.07 +- 0.72"
LINKED_PAGE = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def _split(page: Path) -> tuple[str, list[tuple[int, str]], list[str]]:
    """The page's generated tables (one text), its other lines (numbered from 1), and its table lines' arguments."""
    tables, prose, args, inside = [], [], [], False
    for number, line in enumerate(page.read_text().split("\n"), 1):
        match = START.match(line.strip())
        if match:
            args.append(match["args"])
        inside = (inside or bool(match)) and line != END
        if inside and not match:
            tables.append(line)
        else:
            prose.append((number, line))
    return "\n".join(tables).replace("**", ""), prose, args


def _welch_comparisons(args: str, page: Path) -> set[str]:
    """Every Welch comparison (``x +- y`` in points, unsigned) of the pareto.json files a table line reads."""
    found = set()
    for word in shlex.split(args):
        path = page.parent / word.partition("@")[0]
        if not path.name.endswith(".json") or not path.is_file():
            continue
        records = json.loads(path.read_text())
        for pair in records.get("comparisons", []) if isinstance(records, dict) else []:
            difference, ci = pair.get("top1_difference"), pair.get("top1_difference_ci95")
            if difference is not None and ci is not None:
                found.add(f"{100 * abs(difference):.2f} +- {100 * ci:.2f}")
    return found


def unsourced_intervals(page: Path) -> list[str]:
    """Each ``x +- y`` of the page's text that none of its sources holds (the module's docstring says which)."""
    tables, prose, args = _split(page)
    sources = [tables, *(pair for line in args for pair in _welch_comparisons(line, page))]
    for link in {link for _, line in prose for link in LINKED_PAGE.findall(line)}:
        linked = (page.parent / link).resolve()
        if linked.is_file() and linked != page.resolve():
            sources.append(_split(linked)[0])
    known = "\n".join(sources)
    return [f"{page}:{number}: \"{figure}\" is in no table of the page, of its records or of a page it links"
            for number, line in prose for figure in INTERVAL.findall(line) if figure.lstrip("+-") not in known]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="Markdown pages (default: README, docs/, recipes)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs (or, as always, if the text quotes a figure "
                             "no table holds)")
    args = parser.parse_args(argv)
    differing, tables, unsourced = [], 0, []
    try:
        for page in args.pages or default_pages():
            text, found = render(page)
            tables += page.read_text().count("<!-- table: ")
            differing += found
            if found and not args.check:
                page.write_text(text)
            unsourced += unsourced_intervals(page)  # after the rewrite: the prose against the new tables
    except TableError as err:
        print(f"report_tables: {err}", file=sys.stderr)
        return 2
    for line in differing:
        print(line if args.check else line.replace("differs from its records", "rewritten from its records"))
    for line in unsourced:
        print(line)
    print(f"{tables} tables, {len(differing)} {'differ' if args.check else 'rewritten'}"
          + (f"; {len(unsourced)} figures of the text in no table (edit the text)" if unsourced else ""))
    return 1 if (differing and args.check) or unsourced else 0


if __name__ == "__main__":
    sys.exit(main())
