"""Small statistics and what the study records of the machine and the models it ran on."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..config import Config

# -- small statistics ---------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in 0..100 (numpy's default), without numpy."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- machine ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def peak_rss_mb() -> float:
    """The process's peak RSS so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def machine_info() -> dict[str, Any]:
    import psutil

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_total_mb": round(psutil.virtual_memory().total / 2**20),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": _version("llama_cpp_python") or _version("llama-cpp-python"),
        "sarai_router": _version("sarai-router"),
        "load_average_start": None if load is None else [round(x, 2) for x in load],
    }


def model_info(config: Config, name: str) -> dict[str, Any]:
    spec = config.models[name]
    path = Path(spec.path)
    return {
        "name": name,
        "backend": spec.backend,
        "file": path.name,
        "path": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 1) if path.is_file() else None,
        "sha256": spec.sha256 or None,
        "n_ctx": spec.n_ctx,
        **{key: value for key, value in _backend_facts(config, spec).items()
           if key in ("n_batch", "n_threads", "chat_format")},
    }


def _backend_facts(config: Config, spec) -> Mapping[str, Any]:
    from ..plugins import Hooks, build_plugins

    hooks = Hooks(config.plugin_set or build_plugins(config), config)
    return hooks.backend(spec.backend).describe(spec)
