"""`moebench train --help`: the comments in conf/ are the documentation of every group and key."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from moebench.confhelp import HIDDEN_KEYS, conf_root, parse_yaml_comments

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def train_help(*overrides: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "moebench", "train", *overrides, "--help"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_comments_are_read_per_dotted_key_and_defaults_entry():
    doc = parse_yaml_comments(
        "# @package _global_\n"
        "# First sentence that goes on\n"
        "# on a second line. Not this one.\n"
        "#   moebench train example=1\n"
        "defaults:\n"
        "  - model: tiny   # the model group\n"
        "  - _self_\n"
        "a: 1   # plain\n"
        "b:\n"
        "  c: \"x # not a comment\"  # nested\n"
        "  d: |   # a block\n"
        "    e: 2  # inside the block: not a key\n"
        "f: [1, 2]  # a list\n"
    )
    assert doc["description"] == "First sentence that goes on on a second line. Not this one."
    assert doc["defaults"] == [("model: tiny", "the model group"), ("_self_", "")]
    assert doc["keys"] == {"defaults": "", "a": "plain", "b": "", "b.c": "nested", "b.d": "a block", "f": "a list"}


def test_help_shows_every_key_with_its_comment_and_value():
    text = train_help()
    assert re.search(r"^  train\.lr=0\.003 +peak learning rate \(AdamW\)$", text, re.M)
    assert re.search(r"^  router\.num_experts=\$\{experts\} +experts per MoE layer$", text, re.M)  # literal ${...}
    assert "hydra.sweep.dir=multirun/${moebench_now:%Y-%m-%d}" in text
    assert len(re.findall(r"^  [a-z_.]+=", text, re.M)) > 50
    assert "--multirun,-m" in text  # Hydra's flags stay


def test_every_key_the_help_lists_has_a_comment():
    undocumented = []
    groups = ("model", "router", "data")  # the sections whose chosen option the help lists key by key
    files = [conf_root() / "train.yaml", *(p for g in groups for p in (conf_root() / g).glob("*.yaml"))]
    for path in files:
        keys = parse_yaml_comments(path.read_text())["keys"]
        for key, comment in keys.items():
            is_section = any(other.startswith(key + ".") for other in keys)
            if not comment and not is_section and not key.startswith(HIDDEN_KEYS):
                undocumented.append(f"{path.relative_to(conf_root())}: {key}")
    assert not undocumented, undocumented


def test_help_lists_every_group_option_with_its_description_and_marks_the_choice():
    text = train_help("router=tokens_choice", "experiment=smoke")
    for group in ("model", "router", "data", "experiment", "variant", "hydra/launcher"):
        for option in sorted(p.stem for p in (conf_root() / group).glob("*.yaml")):
            assert re.search(rf"^  [ >] {re.escape(group)}={option} +\S", text, re.M), f"{group}={option}"
    assert re.search(r"^  > router=tokens_choice +Tokens Choice: each token picks", text, re.M)
    assert re.search(r"^  > experiment=smoke ", text, re.M)
    assert "Keys of router=tokens_choice (conf/router/tokens_choice.yaml):" in text
    assert re.search(r"^  router\.bpr=true +Batch Priority Routing", text, re.M)
    assert re.search(r"^  data\.num_train=64 ", text, re.M)  # the value the experiment sets, not the default


def test_every_option_of_the_other_commands_says_what_it_does():
    from moebench import arguments, cli

    assert set(arguments.COMMANDS) == set(cli.COMMANDS) - {"train"}  # every subcommand parses there
    for command, (parser, _) in arguments.COMMANDS.items():
        silent = [action.option_strings or action.dest for action in parser()._actions if not action.help]
        assert not silent, (command, silent)  # `moebench bench --help` listed --dim, --hidden, --batch... without a word
