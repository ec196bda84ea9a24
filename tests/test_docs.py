"""The docs stay true: tables agree with their records, links resolve, commands parse, examples run.

The checks read Markdown and configs only (no training), so they run in the default suite.
"""

from __future__ import annotations

import json

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import report_tables  # noqa: E402

SKIP_DIRS = {".venv", ".git", "outputs", "multirun", "wandb", "node_modules", "build", ".pytest_cache", "data"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.md")
                  if not SKIP_DIRS & set(p.relative_to(REPO).parts) and "egg-info" not in str(p))


def command_pages() -> list[Path]:
    """The pages whose commands a user copies: the README, docs/ and the recipes."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
            *sorted((REPO / "experiments" / "recipes").glob("*.md"))]


def test_every_result_table_agrees_with_its_committed_records():
    differing, tables = [], 0
    for page in report_tables.default_pages():
        _, found = report_tables.render(page)
        differing += found
        tables += page.read_text().count("<!-- table: ")
    assert tables > 0  # the recipes' tables are generated, so there is something to check
    assert not differing, "\n".join(differing) + "\n(python experiments/report_tables.py rewrites them)"


def test_every_interval_the_text_quotes_is_in_a_table_or_the_records_it_reads():
    unsourced = [line for page in report_tables.default_pages() for line in report_tables.unsourced_intervals(page)]
    assert not unsourced, "\n".join(unsourced)


def test_a_figure_the_text_quotes_wrong_or_stale_is_caught(tmp_path, capsys):
    page = tmp_path / "recipes" / "99-test.md"
    page.parent.mkdir()
    results = os.path.relpath(REPO / "experiments" / "results" / "cifar10_routers" / "pareto.json", page.parent)
    table = f"<!-- table: {results} --reference dense -->\n<!-- /table -->\n"
    # from the table (any sign), and a Welch comparison of its records (Tokens Choice k=2 over Soft MoE, recipe 1)
    page.write_text(f"# t\n\n{table}\nDense scores 52.19 +- 2.60; k=2 beats Soft MoE by +3.66 +- 1.98.\n")
    assert report_tables.main([str(page)]) == 0
    assert report_tables.unsourced_intervals(page) == []
    page.write_text(page.read_text().replace("scores 52.19", "scores 52.91"))  # a typo, or a stale copy
    assert report_tables.unsourced_intervals(page) == [f'{page}:{page.read_text().count(chr(10))}: '
                                                       '"52.91 +- 2.60" is in no table of the page, of its records '
                                                       'or of a page it links']
    assert report_tables.main(["--check", str(page)]) == 1 and report_tables.main([str(page)]) == 1
    assert "1 figures of the text in no table" in capsys.readouterr().out
    quoting = tmp_path / "quoting.md"  # a page without tables quotes the page it links
    quoting.write_text(f"[recipe 99](recipes/99-test.md): dense at 52.19 +- 2.60, not 52.19 +- 2.06.\n")
    assert [line.split(": ", 1)[1] for line in report_tables.unsourced_intervals(quoting)] == [
        '"52.19 +- 2.06" is in no table of the page, of its records or of a page it links']


def test_a_table_edited_by_hand_is_caught(tmp_path):
    page = tmp_path / "recipes" / "99-test.md"
    page.parent.mkdir()
    results = os.path.relpath(REPO / "experiments" / "results" / "cifar10_routers" / "pareto.json", page.parent)
    page.write_text(f"# t\n\n<!-- table: {results} --reference dense -->\n<!-- /table -->\n")
    assert report_tables.main([str(page)]) == 0  # written from the records
    assert report_tables.main(["--check", str(page)]) == 0
    text = page.read_text()
    assert "| dense | 3 | 52.19 +- 2.60 |" in text
    page.write_text(text.replace("52.19 +- 2.60", "52.91 +- 2.60"))  # a typo, or a stale copy
    assert report_tables.main(["--check", str(page)]) == 1
    page.write_text(text.replace("<!-- /table -->\n", ""))
    with pytest.raises(report_tables.TableError, match="without its"):
        report_tables.render(page)


def test_a_table_says_how_far_apart_two_arms_intervals_are_and_their_training_flops(tmp_path):
    """--bar: the issue's bar (the two arms' own 95% intervals do not overlap) as a column, so a
    reading points at it instead of typing the intervals' ends; --train-flops: the total
    training FLOPs (n/a for records made before that axis)."""
    import json

    import compare_arms

    def runs(label: str, values: list[float], flops: float | None) -> list[dict]:
        return [{"label": label, "seed": seed, "top1": value, "gflops_per_image": 0.03,
                 **({"train_gflops_total": flops} if flops else {})} for seed, value in enumerate(values)]

    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps({"runs": runs("wide", [0.50, 0.51, 0.52], 12_000) + runs("far", [0.60, 0.61, 0.60], 12_500)}))
    old.write_text(json.dumps({"runs": runs("dense", [0.50, 0.505, 0.51], None)}))
    args = compare_arms.arg_parser().parse_args([str(new), str(old), "--reference", "dense", "--bar", "--train-flops"])
    lines = compare_arms.render(args, args.files).splitlines()
    assert lines[0] == ("| arm | seeds | top1 % (mean +- 95%) | per seed | GFLOPs/img | training TFLOPs | vs dense (Welch) "
                        "| vs dense (paired) | vs dense (arm intervals) |")
    far, wide, dense = lines[2:]
    # far 60.33 +- 1.43 (58.90-61.77), wide 51.00 +- 2.48 (48.52-53.48), dense 50.50 +- 1.24 (49.26-51.74)
    assert far == ("| far | 3 | 60.33 +- 1.43 | 60.00, 61.00, 60.00 | 0.0300 | 12.5 | **+9.83 +- 1.40** | "
                   "**+9.83 +- 1.90** (3) | apart by 7.16 |")
    assert wide.endswith("| 12.0 | +0.50 +- 2.78 | +0.50 +- 1.24 (3) | overlap by 2.48 |")  # dense's lies inside
    assert dense.endswith("| n/a |  |  |  |")


def test_the_recipes_result_tables_are_generated_not_typed():
    # Recipes 2-5 and recipe 11's paired RandAugment table were typed by hand from these records once.
    recipes = REPO / "experiments" / "recipes"
    for page in ("02-soft-experts.md", "03-soft-slots.md", "04-soft-ablations.md", "05-bpr.md"):
        assert "<!-- table: " in (recipes / page).read_text(), page
    assert (recipes / "11-two-datasets-randaugment.md").read_text().count("--effect-of RandAugment -->") == 2
    typed = []  # a table in compare_arms' own shape outside a generated block is a copy someone typed
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(recipes.glob("*.md"))]:
        generated = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            generated = line.startswith("<!-- table: ") or (generated and not line.startswith("<!-- /table"))
            if not generated and line.startswith("|") and "% (mean +- 95%)" in line:
                typed.append(f"{page.relative_to(REPO)}:{number}")
    assert not typed, typed


def test_an_effect_table_pairs_the_tagged_runs_with_the_untagged_by_seed(tmp_path):
    results = REPO / "experiments" / "results"
    args = f"{results}/cifar10_routers/pareto.json {results}/cifar10_randaugment/pareto.json@RA --effect-of RA"
    table = report_tables.generate(args, tmp_path / "page.md").splitlines()
    assert table[0] == "| arm | RA minus without: top1 % (paired, 95%) | per seed |"
    # dense, seed by seed: its run with RandAugment minus its run without
    assert "| dense | **-4.94 +- 2.42** (3) | -4.11, -4.69, -6.01 |" in table
    with pytest.raises(report_tables.TableError, match="no arm has both"):
        report_tables.generate(f"{results}/cifar10_routers/pareto.json --effect-of RA", tmp_path / "page.md")


def test_recipe_7s_diagnostics_and_recipe_9s_trials_are_generated_and_checked(tmp_path):
    recipes = REPO / "experiments" / "recipes"
    assert "<!-- table: soft-init-diagnostics " in (recipes / "07-scale-init-grid.md").read_text()
    assert "<!-- table: search-pareto " in (recipes / "09-optuna-search.md").read_text()
    results = REPO / "experiments" / "results"
    page = tmp_path / "page.md"
    grid = report_tables.generate(f"soft-init-diagnostics {results}/cifar10_scale_grid/routing_diagnostics.json", page)
    # the scale-8 cell is named by its variant only; its scale and init come from conf/variant
    assert "| 8 | one draw | 53.95, 56.16, 54.04 | 0.131-0.168 |" in grid
    search = f"{results}/cifar10_search"
    trials = report_tables.generate(f"search-pareto {search}/pareto.json {search}/optimization_results.yaml", page)
    assert "| 17, 20 | soft E8 p1, lr 0.00184 | 0.0228 | 52.56 | 51.70 |" in trials
    # a study whose pareto.json and Optuna's solutions disagree is refused, not tabled
    optuna = tmp_path / "optimization_results.yaml"
    optuna.write_text((results / "cifar10_search" / "optimization_results.yaml").read_text().replace("0.5418", "0.5481"))
    with pytest.raises(report_tables.TableError, match="is not .*solutions"):
        report_tables.generate(f"search-pareto {search}/pareto.json {optuna}", page)
    with pytest.raises(report_tables.TableError, match="No such file"):
        report_tables.generate(f"soft-init-diagnostics {tmp_path}/missing.json", page)


def test_a_router_diagnostics_table_gives_each_arms_range_over_seeds(tmp_path):
    def run(label, seed, top1, adam_m=None, **routing):
        means = {name: value / 2 for name, value in routing.items() if name in ("dropped", "load_max_over_mean")}
        return {"run": f"s{seed}/x", "label": label, "seed": seed, "top1": top1, "routing_last_step": routing,
                "routing_training_mean": means, "weights": {} if adam_m is None else {"router_adam_m": adam_m}}
    records = tmp_path / "routing_diagnostics.json"
    records.write_text(json.dumps([
        run("tc bias", 1, 0.52, 2e-4, dropped=0.30, load_max_over_mean=1.8, load_cv=0.2, bias_spread=0.4),
        run("tc bias", 0, 0.50, 1e-4, dropped=0.34, load_max_over_mean=1.8, load_cv=0.3, bias_spread=0.5),
        run("remoe", 0, 0.55, load_max_over_mean=1.2, load_cv=0.1, experts_per_token=1.1, tokens_0_experts=0.05)]))
    table = report_tables.generate(f"router-diagnostics {records}", tmp_path / "page.md").splitlines()
    assert table[0].endswith("| dropped (training mean) | load_max_over_mean (training mean) | router_adam_m |")
    assert table[2:] == [  # best mean first; seeds in order; a figure the router does not log is -
        "| remoe | 0 | 55.00 | - | 1.2 | 0.1 | - | 1.1 | 0.05 | - | 0.6 | - |",
        "| tc bias | 0, 1 | 50.00, 52.00 | 0.3-0.34 | 1.8 | 0.2-0.3 | 0.4-0.5 | - | - | 0.15-0.17 | 0.9 | 0.0001-0.0002 |"]
    for older in ("label", "routing_training_mean"):  # records of an older routing_diagnostics.py
        records.write_text(json.dumps([{k: v for k, v in run("a", 0, 0.5).items() if k != older}]))
        with pytest.raises(report_tables.TableError, match="re-run it"):
            report_tables.generate(f"router-diagnostics {records}", tmp_path / "page.md")


def test_routing_diagnostics_gives_the_last_step_and_each_metrics_mean_over_the_steps_that_logged_it(tmp_path):
    import routing_diagnostics

    lines = [{"step": 1, "train/loss": 2.0},  # a line without routing metrics is not a step of them
             {"step": 50, "routing/blocks.2.mlp/dropped": 0.5, "routing/blocks.3.mlp/dropped": 0.3},
             {"step": 100, "routing/blocks.2.mlp/dropped": 0.1, "routing/blocks.3.mlp/dropped": 0.1,
              "routing/blocks.3.mlp/bias_spread": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    logged = routing_diagnostics.logged_routing_steps(tmp_path)
    assert [step for step, _ in logged] == [50, 100]
    steps = [metrics for _, metrics in logged]
    assert routing_diagnostics.per_key_mean(steps[-1]) == {"bias_spread": 0.4, "dropped": 0.1}
    means = routing_diagnostics.per_key_mean(routing_diagnostics.mean_over_steps(steps))
    assert means == pytest.approx({"bias_spread": 0.4, "dropped": 0.25})  # blocks' means 0.3 and 0.2


def test_routing_diagnostics_keeps_the_recorded_rows_of_runs_trained_on_another_machine(tmp_path):
    import routing_diagnostics

    here = tmp_path / "s2" / "run_c"
    here.mkdir(parents=True)
    (tmp_path / "s1" / "run_b").mkdir(parents=True)
    earlier = [{"run": str(tmp_path / "s0" / "run_a"), "top1": 0.1},  # its dir is gone: kept as recorded
               {"run": str(tmp_path / "s1" / "run_b"), "top1": 0.2},  # on disk but not finished: not kept
               {"run": str(here), "top1": 0.3}]  # diagnosed again: the new row replaces it
    rows = routing_diagnostics.carried_rows(earlier, [{"run": str(here), "top1": 0.4}])
    assert [(Path(row["run"]).name, row["top1"]) for row in rows] == [("run_a", 0.1), ("run_c", 0.4)]


def test_routing_diagnostics_names_arms_as_the_pooled_records_do(tmp_path):
    """Arms sharing a router label are told apart by keys only in a report of them: the diagnostics take
    the report's labels (by run name), not the bare router label that would merge them into one row."""
    import routing_diagnostics

    runs = [tmp_path / "losses" / "cifar10" / "s0" / name for name in ("0_load", "0_importance", "0_unrecorded")]
    base = "tokens_choice E32 k1 C1.0 sigmoid m4 shared1"
    pareto = tmp_path / "pareto.json"
    pareto.write_text(json.dumps({"runs": [
        {"run": "cifar10/s0/0_load", "label": f"{base} router.importance_weight=0.0 router.load_weight=0.005"},
        {"run": "cifar10/s0/0_importance", "label": f"{base} router.importance_weight=0.005 router.load_weight=0.0"},
        {"run": "cifar10/s0/0_bias", "label": base}]}))
    labels = routing_diagnostics.pooled_labels(pareto, runs)
    assert labels == {runs[0]: f"{base} router.importance_weight=0.0 router.load_weight=0.005",
                      runs[1]: f"{base} router.importance_weight=0.005 router.load_weight=0.0"}  # no record: own label


def test_pooling_a_pooled_file_again_keeps_its_run_names_and_a_later_file_replaces_its_runs(tmp_path):
    import pool_frontier

    def run(label: str, seed: int, top1: float, name: str) -> dict:
        return {"run": name, "label": label, "seed": seed, "model": "tiny", "data": "x", "setup": "", "top1": top1}

    sweep = tmp_path / "sweep" / "pareto.json"
    sweep.parent.mkdir()
    sweep.write_text(json.dumps({"runs": [run("a", 0, 0.5, "s0/run_a0"), run("b", 1, 0.6, "s1/run_b1")]}))
    pooled = tmp_path / "pooled" / "pareto.json"
    pooled.parent.mkdir()
    pooled.write_text(json.dumps({"pooled_from": ["earlier"], "runs": [run("a", 0, 0.5, "old/s0/run_a0"),
                                                                      run("c", 0, 0.7, "old/s0/run_c0")]}))
    rows = pool_frontier.pooled_rows([str(pooled), str(sweep)], "top1")
    assert sorted(row["run"] for row in rows) == ["old/s0/run_c0", "sweep/s0/run_a0", "sweep/s1/run_b1"]
    sweep.write_text(json.dumps({"runs": [run("a", 0, 0.55, "s0/run_a0")]}))  # not the run the records hold
    with pytest.raises(SystemExit, match="not the same run"):
        pool_frontier.pooled_rows([str(pooled), str(sweep)], "top1")


def test_a_study_on_a_new_machine_does_not_train_again_the_runs_its_committed_records_hold(tmp_path, monkeypatch,
                                                                                           capsys):
    import io

    import unrecorded

    records = tmp_path / "pareto.json"  # recipe 15's label of the DeepSeek-style preset, as `moebench pareto` wrote it
    records.write_text(json.dumps({"runs": [{"label": "tokens_choice E32 k1 C1.0 sigmoid bias0.001 m4 shared1",
                                             "seed": 0}]}))
    queue = ["tiny 0 deepseek variant=tc_deepseek_e32 experiment=smoke\n",  # recorded
             "tiny 1 deepseek variant=tc_deepseek_e32 experiment=smoke\n",  # another seed
             "tiny 0 sigmoid variant=tc_deepseek_e32 router.gate=softmax experiment=smoke\n",  # another arm
             "other 0 deepseek variant=tc_deepseek_e32 experiment=smoke\n"]  # no records for this name
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(queue)))
    assert unrecorded.main([f"tiny={records}", f"missing={tmp_path / 'none.json'}"]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(queue[1:])
    assert "tiny seed 0 deepseek is in the committed records: skipped" in err

    # Arms that differ only in keys their label leaves out (the "-bias" arm without its importance loss, and
    # without its load loss) are told apart by those keys, as their own report labels them: a record of the
    # "-bias" arm (the bare label) is neither of them, and theirs are skipped.
    base = "tokens_choice E32 k1 C1.0 sigmoid m4 shared1"
    records.write_text(json.dumps({"runs": [
        {"label": base, "seed": 0},
        {"label": f"{base} router.importance_weight=0.0 router.load_weight=0.005", "seed": 0}]}))
    no_bias = "variant=tc_deepseek_e32 router.bias_rate=null router.noise_std=1.0 experiment=smoke"
    queue = [f"tiny 0 -bias-importance {no_bias} router.load_weight=0.005\n",  # recorded
             f"tiny 0 -bias-load {no_bias} router.importance_weight=0.005\n"]  # shares only the bare label
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(queue)))
    assert unrecorded.main([f"tiny={records}"]) == 0
    out, err = capsys.readouterr()
    assert out == queue[1] and "tiny seed 0 -bias-importance is in the committed records: skipped" in err


def test_a_redrawn_picture_is_titled_with_its_setup_and_the_counts_of_its_records():
    import json

    import replot

    summary = json.loads((REPO / "experiments" / "results" / "tinyimagenet_all_arms" / "pareto.json").read_text())
    assert replot.title_of(summary, "Tiny-ImageNet-200") == "Tiny-ImageNet-200 (15 arms, 3-6 seeds each)"


def test_replot_rebuilds_the_arms_of_records_that_predate_them_and_counts_in_the_singular(tmp_path, capsys):
    """Recipes 2-5's pareto.json hold runs without "arms" (made before the arm summary): replot.py
    rebuilds the arms from the runs (the seeds of one label are one arm) and leaves the records alone."""
    import json

    import replot

    def run(label: str, router: str, seed: int, top1: float, gflops: float) -> dict:
        return {"run": f"{label}/seed={seed}", "label": label, "router": router, "seed": seed,
                "gflops_per_image": gflops, "params_total": int(1e6 * gflops), "top1": top1}

    records = tmp_path / "old_sweep" / "pareto.json"
    records.parent.mkdir()
    records.write_text(json.dumps({"quality": "top1", "cost_axes": ["gflops_per_image", "params_total"], "runs": [
        run("dense", "dense", 0, 0.50, 0.03), run("dense", "dense", 1, 0.52, 0.03), run("soft E8", "soft", 0, 0.55, 0.04),
    ], "skipped": []}))
    before = records.read_text()
    assert replot.main([str(records), "--title", "CIFAR-10, a test"]) == 0
    picture = records.parent / "pareto.png"
    assert capsys.readouterr().out == f"wrote {picture}: CIFAR-10, a test (2 arms, 1-2 seeds each)\n"
    assert picture.read_bytes().startswith(b"\x89PNG") and records.read_text() == before
    # the counts in the title: "1 arms" and "1 seeds each" were printed on four committed pictures
    assert replot.title_of({"arms": [{"seeds": 3}]}, "T") == "T (1 arm, 3 seeds)"
    assert replot.title_of({"arms": [{"seeds": 1}] * 17}, "T") == "T (17 arms, 1 seed each)"
    assert replot.title_of({"arms": [{"seeds": 1}, {"seeds": 2}]}, "T") == "T (2 arms, 1-2 seeds each)"


def test_every_committed_picture_has_a_command_that_redraws_it_with_a_title_naming_its_data():
    results = REPO / "experiments" / "results"
    recipes = "\n".join(p.read_text() for p in (REPO / "experiments" / "recipes").glob("*.md"))
    command = re.compile(r"replot\.py experiments/results/([\w-]+)/pareto\.json \\\n\s+--title \"([^\"]+)\"")
    titled = {folder: title for folder, title in command.findall(recipes)}
    missing = []
    for picture in sorted(results.glob("*/pareto.png")):
        folder = picture.parent.name
        if folder.startswith(("router_study_", "modern_routers_")):  # recipes 14 and 15: pool_frontier.py --title
            continue
        if not re.match(r"(CIFAR-10|Tiny-ImageNet-200)[, ]", titled.get(folder, "")):
            missing.append(folder)
    # a picture whose title is its dir name or the clock time is the stale copy this catches
    assert not missing, missing


def test_every_relative_link_in_the_markdown_resolves():
    broken = []
    for page in markdown_files():
        in_code = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            if in_code or line.startswith("    "):
                continue
            for match in LINK.finditer(line):
                target = (match.group(1) or match.group(2)).split("#", 1)[0]
                if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor, http:, mailto:
                    continue
                if not (page.parent / target).exists():
                    broken.append(f"{page.relative_to(REPO)}:{number}: {target}")
    assert not broken, "\n".join(broken)


BASH = shutil.which("bash") or "/bin/bash"
STUB = r"""
s=0  # recipe 13's lanes take the seed s from the reader (s = 0, 1, 2)
moebench() { printf '%s\0' "$MOEBENCH_PLUGINS" "$@" >> "$CALLS"; printf '\n' >> "$CALLS"; }
torchrun() { while [ $# -gt 0 ] && [ "$1" != "-m" ]; do shift; done; shift 2; moebench "$@"; }
"""


def train_commands(page: Path) -> tuple[list[list[str]], list[str]]:
    """Every `moebench train` call of the page's shell blocks, as bash expands it (variables, loops,
    quotes), with no program run: the block runs with `moebench` and `torchrun` as recording shell
    functions and an empty PATH. Returns the calls' arguments and the blocks that named `moebench
    train` but recorded no call (a block bash could not run)."""
    blocks, current, fenced = [], [], None
    for line in page.read_text().splitlines() + [""]:
        if fenced is not None:
            if line.startswith("```"):
                if fenced in ("", "bash", "sh", "shell", "console"):
                    blocks.append("\n".join(current))
                current, fenced = [], None
            else:
                current.append(line)
        elif line.startswith("```"):
            fenced = line[3:].strip()
        elif line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
        else:
            if current:
                blocks.append("\n".join(current))
            current = []
    calls, silent = [], []
    for block in blocks:
        if not re.search(r"^(?!moebench:).*\bmoebench train", block, re.M):  # "moebench: ..." lines are output
            continue
        script = STUB + block.replace(".venv/bin/moebench", "moebench")
        with tempfile.TemporaryDirectory() as tmp:
            record = Path(tmp) / "calls"
            record.write_text("")
            subprocess.run([BASH, "-c", script], cwd=tmp, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/nonexistent", "CALLS": str(record), "HOME": tmp})
            found = [c.split("\0")[:-1] for c in record.read_text().split("\n") if c]
        train = [c[2:] for c in found if c[0] == "" and c[1:2] == ["train"]]  # c[0]: MOEBENCH_PLUGINS
        if not train and not any(c[1:2] == ["train"] for c in found):
            silent.append(block)
        calls += train
    return calls, silent


def checkable(args: list[str]) -> bool:
    """Placeholders a reader fills in (DIR, ...) and run dirs of earlier runs are not this test's."""
    return not any(a in ("...", "--help", "-h") or a.startswith(("resume=", "hydra.run.dir=")) and "DIR" in a
                   or a == "[overrides]" for a in args)


def first_job(args: list[str]) -> tuple[list[str], list[str]]:
    """The command with each swept key at its first value, and every group option it names.

    Composing a config takes a Hydra compose (a quarter of a second here); composing every job of
    every documented sweep took minutes. One job per command checks the syntax, the keys and the
    types; the other swept values are checked where a typo is likely: group options exist.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moebench.preflight import GROUPS

    flags, overrides, words = [], [], iter(args)
    for word in words:
        if word.startswith("-"):
            flags.append(word)
            if word in ("--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-name", "-cn"):
                flags.append(next(words))  # the flag's value (--cfg job)
        else:
            overrides.append(word)
    parsed = OverridesParser.create().parse_overrides(overrides)
    job, options = [], []
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else None
        job.append(f"{key}={values[0]}" if values else o.input_line)
        if key.lstrip("+~") in GROUPS:
            options += [f"{key.lstrip('+~')}/{v}" for v in (values or [str(o.value())])]
    return flags + job, options


def test_every_train_command_in_the_readme_docs_and_recipes_parses(monkeypatch, tmp_path):
    from moebench import preflight, search
    from moebench.build import conf_dir

    # What the commands need that a clone lacks: the data, and the runs an init_from or resume names.
    monkeypatch.setattr(preflight, "check_data", lambda cfg, warnings: None)
    monkeypatch.setattr(preflight, "check_init_from", lambda jobs: None)
    # Commands share their group choices (experiment=cifar10 variant=...), whose defaults preflight
    # composes for each: compose each override list once (a Hydra compose is the cost here).
    composed, compose = {}, preflight.compose_job

    def compose_once(overrides):
        if tuple(overrides) not in composed:
            composed[tuple(overrides)] = compose(list(overrides))
        return composed[tuple(overrides)]

    monkeypatch.setattr(preflight, "compose_job", compose_once)
    monkeypatch.chdir(tmp_path)
    checked, failures, silent, seen = 0, [], [], set()
    for page in command_pages():
        calls, quiet = train_commands(page)
        silent += [f"{page.relative_to(REPO)}: {block[:80]!r}" for block in quiet]
        for args in calls:
            if not checkable(args) or any(a.startswith("resume=") for a in args):
                continue
            try:
                job, options = first_job(args)
                missing = [o for o in options if not (Path(conf_dir()) / f"{o}.yaml").is_file()]
                if missing:
                    raise AssertionError(f"no such group option: {', '.join(missing)}")
                # the same command for another seed or sweep dir composes the same: once is enough
                key = tuple(a for a in job if not a.startswith(("seed=", "data.root=", "hydra.sweep.dir=", "hydra.run.dir=")))
                if key not in seen:
                    seen.add(key)
                    search.prepare_preset(list(job))
                    preflight.prepare(list(job), conf_dir())
                checked += 1
            except Exception as err:  # noqa: BLE001 (the test reports every command that fails)
                failures.append(f"{page.relative_to(REPO)}: moebench train {shlex.join(args)}\n    {err}")
    assert not silent, "blocks naming moebench train that bash could not run:\n" + "\n".join(silent)
    assert not failures, "\n".join(failures)
    assert checked >= 30, (checked, len(seen))  # the recipes alone hold more: the extraction still finds them


def test_the_library_examples_run():
    text = (REPO / "docs" / "library.md").read_text()
    blocks = re.findall(r"<!-- example -->\n```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4  # one per router
    for block in blocks:
        exec(compile(block, "docs/library.md", "exec"), {})


def test_make_install_can_put_cpu_only_torch_first_and_says_where_the_command_is():
    run = lambda *a: subprocess.run(["make", "-n", "-B", ".venv/bin/moebench", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=60).stdout
    assert "--index-url https://download.pytorch.org/whl/cpu" in run("TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    plain = run()
    assert "--index-url" not in plain and ".venv/bin/moebench" in plain and "activate" in plain


def test_ci_runs_the_readmes_test_command():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    assert "make test " in readme or "make test\n" in readme
    assert re.search(r"^make test$", ci, re.M)


def test_the_tiny_imagenet_step_makes_the_tree_the_preset_reads(tmp_path):
    # A snapshot of the release's layout with 2 classes: train/<wnid>/images/*, val/images/* + annotations.
    sys.path.insert(0, str(REPO / "experiments"))
    import tinyimagenet

    src = tmp_path / "IMagenet" / "tiny-imagenet-200"
    for wnid in ("n01", "n02"):
        (src / "train" / wnid / "images").mkdir(parents=True)
        (src / "train" / wnid / "images" / f"{wnid}_0.JPEG").write_bytes(b"jpeg " + wnid.encode())
    (src / "val" / "images").mkdir(parents=True)
    (src / "val" / "images" / "val_0.JPEG").write_bytes(b"val")
    (src / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
    (src / "wnids.txt").write_text("n01\nn02\n")
    (src / "words.txt").write_text("n01\tgoldfish\nn02\ttabby cat\nn03\tunused\n")
    git = lambda *a: subprocess.run([shutil.which("git") or "git", *a], cwd=src.parent, check=True,  # noqa: E731
                                    capture_output=True, env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                                              "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "snapshot")
    out = tmp_path / "tree"
    assert tinyimagenet.build(src.parent, out, expected=(2, 1)) == {"train": 2, "test": 1}
    assert (out / "train" / "n02" / "n02_0.JPEG").read_bytes() == b"jpeg n02"
    assert (out / "test" / "n02" / "val_0.JPEG").read_bytes() == b"val"  # labelled by the annotations
    assert (out / "classes.tsv").read_text() == "0\tn01\tgoldfish\n1\tn02\ttabby cat\n"
    with pytest.raises(SystemExit, match="expected 100000 train"):
        tinyimagenet.build(src.parent, tmp_path / "other")  # a partial snapshot is refused, nothing renamed
    assert not (tmp_path / "other").exists()


def test_routing_diagnostics_finds_the_router_the_loss_gives_no_gradient():
    """router_adam_m is recipe 15's evidence that the "-fine" ablation's router never learned: a sigmoid gate
    over one routed choice is 1 for every token, so its AdamW moments stay at rounding's size (a few in-process
    steps of the smoke model)."""
    import routing_diagnostics
    import torch

    from conftest import compose_cfg
    from moebench.build import build_model, make_optimizer
    from moebench.moe import collect_aux_loss

    def adam_m(*overrides: str) -> dict[str, float]:
        torch.manual_seed(0)
        cfg = compose_cfg("experiment=smoke", "variant=tc_deepseek_e32", "experts=4", "router.group_size=2", *overrides)
        model = build_model(cfg, in_chans=1, num_classes=10)
        optimizer = make_optimizer(model, cfg)
        for _ in range(2):
            images = torch.randn(4, 1, cfg.data.image_size, cfg.data.image_size)
            loss = torch.nn.functional.cross_entropy(model(images), torch.randint(10, (4,))) + collect_aux_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return routing_diagnostics.router_adam_moments(model, cfg, optimizer.state_dict()["state"])

    one_choice = adam_m("router.granularity=1", "router.shared_experts=0")
    assert list(one_choice) == ["blocks.1.mlp/router_adam_m"]  # the smoke model's one MoE block
    assert all(value < 1e-10 for value in one_choice.values())  # s / s = 1: no gradient but rounding
    assert all(value > 1e-6 for value in adam_m().values())  # 3 routed choices: the gate has a gradient
    assert all(value > 1e-6 for value in adam_m("router.granularity=1", "router.shared_experts=0",
                                                "router.gate=softmax").values())
