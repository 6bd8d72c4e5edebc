"""Entry points of installed distributions, read without ``importlib.metadata``.

Importing ``importlib.metadata`` and scanning with it cost ``route`` about 50 ms, for the
few lines of ``entry_points.txt`` that name plugins; this reads those files directly, once
per process.
"""

from __future__ import annotations

import importlib
import os
import sys

from .hookspecs import PROJECT_NAME

#: the entry points found, by the ``sys.path`` they were looked for on: scanned once
_ENTRY_POINTS: dict[tuple[str, ...], list[tuple[str, str]]] = {}


def entry_points(group: str = PROJECT_NAME) -> list[tuple[str, str]]:
    """``[(name, value), ...]`` of ``group`` in the distributions installed on ``sys.path``.

    Reads each ``*.dist-info`` / ``*.egg-info`` folder's ``entry_points.txt`` once per
    process (per ``sys.path``); the first distribution of a name on the path wins, as
    with ``importlib.metadata``, whose import and scan alone cost ``route`` about 50 ms.
    """
    key = (group, *sys.path)
    if key not in _ENTRY_POINTS:
        found: list[tuple[str, str]] = []
        seen: set[str] = set()
        for folder in sys.path:
            try:
                names = sorted(os.listdir(folder or "."))
            except OSError:  # a zip, a missing folder
                continue
            for name in names:
                if not name.endswith((".dist-info", ".egg-info")):
                    continue
                dist = name.rsplit(".", 1)[0].split("-")[0].replace(".", "_").lower()
                if dist in seen:
                    continue
                seen.add(dist)
                try:
                    with open(os.path.join(folder or ".", name, "entry_points.txt"),
                              encoding="utf-8") as file:
                        text = file.read()
                except OSError:
                    continue
                if group in text:  # most files have no section of ours: no need to parse them
                    found.extend(_entry_point_section(text, group))
        _ENTRY_POINTS[key] = found
    return _ENTRY_POINTS[key]


def _entry_point_section(text: str, group: str) -> list[tuple[str, str]]:
    """The ``name = value`` lines of ``[group]`` in an entry_points.txt (an INI file)."""
    section, found = None, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line:
            name, _, value = line.partition("=")
            found.append((name.strip(), value.strip()))
    return found


def load_entry_point(value: str) -> object:
    """What ``module.sub:attr.attr [extra]`` names."""
    module, _, attribute = value.split("[", 1)[0].strip().partition(":")
    target: object = importlib.import_module(module.strip())
    for part in filter(None, attribute.strip().split(".")):
        target = getattr(target, part)
    return target
