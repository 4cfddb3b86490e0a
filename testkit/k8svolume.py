"""Kubernetes volumes as kubelet writes them, for tests of code that reads mounted Secrets.

kubelet's AtomicWriter is why a Secret volume can rotate under a reader without a torn read:
files live in a timestamped directory and one `..data` symlink swap publishes them. Tests that
rotate credentials must do exactly that, or they test an easier case than production.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def kubelet_update(directory: Path, data: dict[str, str], stamp: str) -> None:
    """Update a Secret volume the way kubelet's AtomicWriter does.

    Write the new files into `..<stamp>/`, point a temporary `..data_tmp` symlink at it and
    rename that over `..data` (the atomic switch), make sure each key has a `KEY -> ..data/KEY`
    symlink, then remove the previous timestamped directory and keys no longer present.
    """
    directory.mkdir(exist_ok=True)
    data_link = directory / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    new = directory / f"..{stamp}"
    new.mkdir()
    for key, value in data.items():
        (new / key).write_text(value)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(new.name)
    tmp.rename(data_link)
    for key in data:
        link = directory / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")
    for entry in directory.iterdir():
        if not entry.name.startswith("..") and entry.name not in data:
            entry.unlink()
    if old is not None:
        shutil.rmtree(directory / old)
