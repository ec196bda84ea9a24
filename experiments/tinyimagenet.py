"""Tiny-ImageNet-200 as the ImageFolder tree `experiment=tinyimagenet` reads, made offline from a git snapshot.

    git clone https://github.com/seshuad/IMagenet data/IMagenet     # a copy of the CS231n release
    python experiments/tinyimagenet.py data/IMagenet data/tiny-imagenet-200

The tree: ``train/<wnid>/*.JPEG`` (100,000 images, 500 per class), ``test/<wnid>/*.JPEG``
(the 10,000 labelled validation images, 50 per class: the release's own test split has no
labels) and ``classes.tsv`` (index, wnid, name). Files are read with ``git archive``, so
the snapshot may be a bare repository; an OUT that is already complete is left as it is.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PREFIX = "tiny-imagenet-200/"


def members(snapshot: Path) -> tarfile.TarFile:
    git_dir = snapshot / ".git" if (snapshot / ".git").is_dir() else snapshot
    tar = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "--format=tar", "HEAD",
                          f"{PREFIX}train", f"{PREFIX}val", f"{PREFIX}wnids.txt", f"{PREFIX}words.txt"],
                         check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(tar))


def build(snapshot: Path, out: Path, expected: tuple[int, int] = (100_000, 10_000)) -> dict[str, int]:
    if (out / "classes.tsv").is_file() and (out / "train").is_dir() and (out / "test").is_dir():
        return {}
    part = out.with_name(out.name + ".part")  # renamed into place only when whole
    shutil.rmtree(part, ignore_errors=True)
    archive = members(snapshot)
    files = {m.name[len(PREFIX):]: m for m in archive.getmembers() if m.isfile()}
    read = lambda name: archive.extractfile(files[name]).read()  # noqa: E731
    wnids = [w for w in read("wnids.txt").decode().split() if w]
    val_labels = dict(line.split("\t")[:2] for line in read("val/val_annotations.txt").decode().splitlines() if line)
    counts = {"train": 0, "test": 0}
    for name in files:
        parts = name.split("/")
        if parts[0] == "train" and len(parts) == 4 and parts[2] == "images":  # train/<wnid>/images/<file>
            split, wnid = "train", parts[1]
        elif parts[:2] == ["val", "images"] and len(parts) == 3:  # val/images/<file>, label in the annotations
            split, wnid = "test", val_labels[parts[2]]
        else:
            continue
        target = part / split / wnid / parts[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read(name))
        counts[split] += 1
    words = dict(line.split("\t", 1) for line in read("words.txt").decode().splitlines() if "\t" in line)
    (part / "classes.tsv").write_text("".join(f"{i}\t{w}\t{words[w]}\n" for i, w in enumerate(wnids)))
    if (counts["train"], counts["test"]) != expected:  # a partial snapshot must not pass for the dataset
        raise SystemExit(f"tinyimagenet: expected {expected[0]} train and {expected[1]} test images, found {counts} "
                         f"(in {part})")
    part.rename(out)
    return counts


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0] + "\nusage: python experiments/tinyimagenet.py SNAPSHOT OUT", file=sys.stderr)
        return 2
    counts = build(Path(argv[0]), Path(argv[1]))
    print(f"{argv[1]}" + (f": {counts['train']} train, {counts['test']} test images" if counts else " (already there)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
