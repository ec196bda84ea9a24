"""`moebench train --help`, written from the comments in conf/ when it is asked for.

The YAML comments are the documentation of every key (the developer guide asks
for one per key), so the help text is built from them at run time and cannot
drift from the configs. Hydra's help template (conf/train.yaml, hydra.help)
calls the ``moebench_help`` resolver (``help_resolver``, registered by resolvers.py).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

# Groups a user picks from that the root config's defaults list does not name.
EXTRA_GROUPS = {"hydra/launcher": "how -m runs its jobs (default: one after another in this process)",
                "hydra/sweeper": "which jobs -m runs (default: every combination of the swept values)"}
HIDDEN_KEYS = ("defaults", "hydra.help", "hydra.callbacks")  # machinery, not settings
COMMENT_COLUMN = 36


def split_comment(line: str) -> tuple[str, str]:
    """'key: "a # b"  # why' -> ('key: "a # b"', 'why'); a '#' inside quotes is not a comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def parse_yaml_comments(text: str) -> dict:
    """What the comments of one conf/ file say.

    Returns ``{"description": the leading comment's first sentence, "keys": {dotted key: comment},
    "defaults": [(entry, comment), ...]}``; keys keep the file's order.
    """
    description, keys, defaults = "", {}, []
    reading_description = True  # the first sentence of the leading comment block
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    block_indent = None  # inside a `key: |` block scalar: skip its lines
    for raw in text.splitlines():
        code, comment = split_comment(raw)
        if not code.strip():
            if reading_description and comment and not comment.startswith("@package"):
                if raw.lstrip().startswith("#  "):  # an indented example command ends the sentence
                    reading_description = False
                else:
                    description = f"{description} {comment}".strip()
                    reading_description = not description.endswith((".", ":"))
            elif description:
                reading_description = False
            continue
        reading_description = False
        indent = len(code) - len(code.lstrip())
        if block_indent is not None and indent > block_indent:
            continue
        block_indent = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        item = code.strip()
        if item.startswith("- "):  # a list item: only the defaults list documents something
            if stack and stack[-1][1] == "defaults":
                defaults.append((item[2:].strip(), comment))
            continue
        key, _, value = item.partition(":")
        dotted = ".".join([k for _, k in stack] + [key.strip()])
        keys[dotted] = comment
        value = value.strip()
        if value in ("|", ">", "|-", ">-"):
            block_indent = indent
        elif not value:
            stack.append((indent, key.strip()))
    return {"description": description.rstrip(":"), "keys": keys, "defaults": defaults}


def group_docs(conf: Path, root: dict) -> dict[str, dict]:
    """{group: {"comment": ..., "options": {option: its description}}} for the groups a user picks from."""
    comments = dict(EXTRA_GROUPS)
    for entry, comment in root["defaults"]:
        group = entry.removeprefix("override ").partition(":")[0].strip()
        if ":" in entry and not group.startswith("hydra/"):
            comments[group] = comment
    docs = {}
    for group, comment in comments.items():
        folder = conf / group
        if folder.is_dir():
            options = {path.stem: parse_yaml_comments(path.read_text())["description"]
                       for path in sorted(folder.glob("*.yaml"))}
            docs[group] = {"comment": comment, "options": options}
    return docs


def show_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)


def lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def key_lines(comments: dict[str, str], values: dict, prefix: str = "") -> list[str]:
    """`  key=value   comment` for each leaf key, with the value it has in this composition."""
    lines = []
    for key, comment in comments.items():
        dotted = f"{prefix}{key}"
        if dotted.startswith(HIDDEN_KEYS):
            continue
        value, found = lookup(values, dotted)
        if isinstance(value, dict) and not comment:  # a section: its leaves follow
            continue
        setting = f"  {dotted}={show_value(value) if found else '(unset)'}"
        lines.append(f"{setting:<{COMMENT_COLUMN}} {comment}".rstrip() if comment else setting)
    return lines


def help_text(conf: Path, cfg: dict, choices: dict[str, str | None]) -> str:
    """The whole help: groups with every option, then every key with its comment and current value."""
    root = parse_yaml_comments((conf / "train.yaml").read_text())
    groups = group_docs(conf, root)
    out = [
        "moebench train: train, evaluate and measure one model (a Hydra app).",
        "",
        "  moebench train [group=option ...] [key=value ...]   one run",
        "  moebench train -m key=a,b [key=c,d ...]             a sweep: one run per combination",
        "  moebench train [overrides] --help                   this text, for those overrides",
        "",
        "Groups (group=option; > marks the current choice):",
    ]
    for group, doc in groups.items():
        out.append(f"  {group}: {doc['comment']}" if doc["comment"] else f"  {group}:")
        chosen, width = choices.get(group), max(map(len, doc["options"]), default=0)
        for option, description in doc["options"].items():
            mark = ">" if option == chosen else " "
            out.append(f"  {mark} {group}={option:<{width}}  {description}".rstrip())
    out += ["", "Keys (key=value, shown with their current values; defaults in conf/train.yaml):"]
    out += key_lines(root["keys"], cfg)
    for group in ("model", "router", "data"):  # groups whose options fill a section of the same name
        option = choices.get(group)
        path = conf / group / f"{option}.yaml"
        if option and path.is_file():
            out += ["", f"Keys of {group}={option} (conf/{group}/{option}.yaml):"]
            out += key_lines(parse_yaml_comments(path.read_text())["keys"], cfg, prefix=f"{group}.")
    return "\n".join(out)


def conf_root() -> Path:
    """conf/ as the installed package ships it (moebench/conf), or the checkout's top-level conf/."""
    installed = Path(__file__).resolve().parent / "conf"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def help_resolver(*, _root_) -> str:
    values = OmegaConf.to_container(_root_, resolve=False)
    choices = OmegaConf.to_container(_root_.hydra.runtime.choices, resolve=False) if "hydra" in _root_ else {}
    # Hydra fills its template with string.Template: a literal "$" (e.g. in ${experts}) is written "$$".
    return help_text(conf_root(), values, choices).replace("$", "$$")



def train_help(args: list[str]) -> int:
    """`moebench train [overrides] --help` without the train app's imports (torch and the model code
    take seconds to import, tens of seconds on a loaded machine; the help needs conf/ alone).

    Hydra composes the config with the overrides, as the app would, and prints its help template,
    which calls ``moebench_help``. The caller registers the resolvers (``resolvers.register`` with
    a plain start stamp), so nothing imports torch.
    """
    import sys

    import hydra

    @hydra.main(config_path=str(conf_root()), config_name="train", version_base="1.3")
    def show(_cfg) -> None:  # not called: --help ends in Hydra
        pass

    saved = sys.argv
    sys.argv = ["moebench train", *args]
    try:
        show()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return 0
