"""Where a dataset's files must be, checked without reading them.

No torch here: `moebench train` refuses a command line whose data.root cannot hold the
data before it imports torch (seconds on a loaded machine); data.py loads the data.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")


class DataError(Exception):
    """A dataset that is missing or malformed; the message says where and what to do."""


CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # torchvision's extracted files
GENERATED = {"digits": "bundled with scikit-learn", "synthetic": "generated"}


def check_source(name: str, root: str | None, download: bool = False) -> str | None:
    """Before anything is written: DataError when the data cannot be where ``root`` says (the checks that
    need no reading); a warning (returned) when a dataset that needs no files is given a root."""
    if name not in NAMES:
        raise DataError(f"data.name={name!r} is unknown; allowed: {', '.join(NAMES)}")
    if name in GENERATED:
        return f"data.root={root} is ignored: data={name} is {GENERATED[name]}" if root else None
    if name == "imagefolder" or is_imagefolder(root):
        imagefolder_dirs(root)
    elif not download and not (Path(root or "data").expanduser() / CIFAR_DIRS[name]).is_dir():
        where = Path(root or "data").expanduser().resolve()
        raise DataError(f"{name} not found in {where} (no {CIFAR_DIRS[name]}/ there); set data.download=true when "
                        "online, or point data.root at torchvision's files or at an ImageFolder tree "
                        "(ROOT/train/<class>/, ROOT/test/<class>/)")
    return None


def is_imagefolder(root: str | None) -> bool:
    """A tree of ROOT/train/<class>/ dirs rather than torchvision's pickled batches."""
    train = Path(root).expanduser() / "train" if root else None
    return bool(train and train.is_dir() and any(p.is_dir() for p in train.iterdir()))


IMAGEFOLDER_LAYOUT = "expected ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (or val/)"


def imagefolder_dirs(root: str | None) -> tuple[Path, Path, Path]:
    """(root, train dir, test dir) of an ImageFolder tree; DataError naming what is missing."""
    layout = IMAGEFOLDER_LAYOUT
    if not root:
        raise DataError(f"data=imagefolder needs data.root=DIR; {layout}")
    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir():
        raise DataError(f"data.root={root}: no such directory ({root_path}); {layout}")
    train_dir = root_path / "train"
    test_dir = next((root_path / n for n in ("test", "val") if (root_path / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"data.root={root_path} lacks train/ and test/ (or val/); {layout}")
    return root_path, train_dir, test_dir
