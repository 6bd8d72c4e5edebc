"""What the two GGUF backends share: ``llama_cpp`` (llama-cpp-python in this process) and
``llama_server`` (llama.cpp's server in child processes) run the same llama.cpp on the same
files, so the keys they share, their checks, thread sharing, presence, capabilities and RAM
breakdown are written once here. Each backend adds its own keys and how it runs a model.

Also here: the CPU quirk both work around (:func:`repack_weights`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Mapping

import attrs

from ..backend import Backend, Capabilities, Presence
from ..config import MODALITIES, PATH_SETTING, Config, ModelSpec


def default_threads() -> int:
    # llama-cpp-python's own default is half the cores, which leaves a 2-core box at 1.
    return max(1, os.cpu_count() or 1)


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has Intel AMX (Sapphire Rapids and later), read from its flags."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def repack_weights(setting: bool | None) -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types (AMX, the
    CPU_REPACK kernels). ``None`` (the default): everywhere but on CPUs with AMX, where
    ggml's AMX matrix kernels crash the process in the first decode of a Q4_K model and
    compute wrong results for Q4_0/Q4_1 (reported upstream against llama.cpp, unfixed in
    the version llama-cpp-python 0.3.36 vendors). Seen here: both default models
    segfaulted on an AMX machine and answered normally with repacking off."""
    return (not cpu_has_amx()) if setting is None else setting


# Not slotted, so that a backend's settings may also take another slotted base's keys
# (``llama_server``'s ``BalanceSettings``).
@attrs.frozen(slots=False)
class GGUFSettings:
    """The keys of ``[models.NAME]`` that both GGUF backends take."""

    #: 0: every core for one model alone; `serve` gives each model its share
    n_threads: int = 0
    #: the multimodal projector GGUF that lets the model take images (and audio, through
    #: ``llama_server``)
    mmproj: str = attrs.field(default="", metadata=PATH_SETTING)
    #: repack weights for llama.cpp's faster CPU kernels; unset: on, except on CPUs with
    #: AMX, whose kernels crash in llama.cpp's current version (see ``repack_weights``)
    repack: bool | None = None


class GGUFBackend(Backend):
    """A backend that runs a GGUF file with llama.cpp on this machine's cores.

    A subclass names itself (``name``) and says what differs: the file's role in messages,
    the input its projector takes, its own keys' checks (``check_settings``) and what else
    ``config check`` looks at (``check_runtime``), the context and batch one instance
    allocates (``ram_shape``), how many instances a model runs (``instances``), the threads
    of each (``threads``) and its own facts for ``models list`` (``describe_settings``).
    """

    settings_class: type = GGUFSettings
    name = "gguf"
    #: what the model file is for, in ``config check``'s messages
    file_role = "the GGUF file to load"
    #: the input besides text that the model's ``mmproj`` lets it take; others are refused
    projector_modalities: tuple[str, ...] = ("image",)

    # -- config -----------------------------------------------------------------------

    def check(self, spec: ModelSpec, *, config: Config,
              check_files: bool) -> Iterable[tuple[str, str]]:
        settings: GGUFSettings = spec.settings
        yield from gguf_path_problems(spec, self.file_role, check_files=check_files)
        if settings.n_threads < 0:
            yield "n_threads", "must be >= 0 (0 = all cores)"
        yield from self.check_settings(spec)
        if not check_files:
            return
        # What would fail at the first request, caught by `config check`.
        # (An unknown modality is the config's own check.)
        for modality in (m for m in MODALITIES if m != "text" and m in spec.modalities):
            if modality not in self.projector_modalities:
                yield "modalities", f"the {self.name} backend cannot take {modality} input"
            elif not settings.mmproj:
                yield "mmproj", (f"a model that takes {modality} input needs its multimodal "
                                 "projector (mmproj)")
        if settings.mmproj and not os.path.isfile(settings.mmproj):
            yield "mmproj", f"file not found: {settings.mmproj}"
        yield from self.check_runtime(spec)

    def check_settings(self, spec: ModelSpec) -> Iterable[tuple[str, str]]:
        """Problems with the backend's own keys, as ``(key, message)``."""
        return ()

    def check_runtime(self, spec: ModelSpec) -> Iterable[tuple[str, str]]:
        """What else would fail at the first request (``config check`` only)."""
        return ()

    # -- resources --------------------------------------------------------------------

    def uses_threads(self, spec: ModelSpec) -> bool:
        return True

    def with_threads(self, spec: ModelSpec, threads: int) -> ModelSpec:
        if spec.settings.n_threads:
            return spec
        return attrs.evolve(spec, settings=attrs.evolve(spec.settings, n_threads=threads))

    def threads(self, spec: ModelSpec) -> int:
        """The threads one instance of the model computes on."""
        return spec.settings.n_threads or default_threads()

    def ram_shape(self, spec: ModelSpec) -> tuple[int, int]:
        """The context (tokens, all slots together) and the batch one instance allocates."""
        raise NotImplementedError

    def instances(self, spec: ModelSpec) -> int:
        """How many copies of the model one load runs."""
        return 1

    def ram_estimate(self, spec: ModelSpec):
        """One instance's weights, KV cache and compute buffers from the GGUF header (a
        ``gguf_info.RamEstimate``); None when the file can't be read."""
        from .gguf_info import GGUFError, estimate_ram, read_info

        try:
            return estimate_ram(read_info(spec.path), *self.ram_shape(spec))
        except GGUFError:
            return None

    def estimate_ram_mb(self, spec: ModelSpec) -> float:
        estimate = self.ram_estimate(spec)
        if estimate is None:
            return 0.0
        return (estimate.total_mb + projector_mb(spec)) * self.instances(spec)

    # -- what models list and the pool read --------------------------------------------

    def describe(self, spec: ModelSpec) -> Mapping[str, Any]:
        estimate = self.ram_estimate(spec)
        return {"estimated_ram": None if estimate is None else {
            "weights_mb": round(estimate.weights_mb, 1),
            "kv_cache_mb": round(estimate.kv_cache_mb, 1),
            "compute_mb": round(estimate.compute_mb, 1),
            "mmproj_mb": round(projector_mb(spec), 1),
        }, "n_threads": self.threads(spec), **self.describe_settings(spec)}

    def describe_settings(self, spec: ModelSpec) -> Mapping[str, Any]:
        """The backend's own facts for ``models list --json``."""
        return {}

    def presence(self, spec: ModelSpec) -> Presence:
        return file_presence(spec)

    def capabilities(self, spec: ModelSpec) -> Capabilities:
        # Tools and JSON through llama.cpp's grammars, logprobs from the logits: any GGUF
        # model, in process or in llama-server.
        return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx,
                            tools=True, json_schema=True, logprobs=True)


def projector_mb(spec: ModelSpec) -> float:
    """The size of the model's ``mmproj`` file, which loads beside its weights."""
    if not spec.settings.mmproj:
        return 0.0
    try:
        return os.path.getsize(spec.settings.mmproj) / (1024 * 1024)
    except OSError:
        return 0.0


def gguf_problems(path: str) -> list[str]:
    """Why ``path`` is not a readable GGUF file (empty when it is)."""
    from .gguf_info import GGUFError, read_info

    try:
        read_info(path)
    except GGUFError as exc:
        return [str(exc)]
    return []


def gguf_path_problems(spec: ModelSpec, role: str, *,
                       check_files: bool) -> Iterator[tuple[str, str]]:
    """``path`` problems of a model read from a GGUF file (``role`` says what it is for);
    the file itself is looked at only by ``config check``."""
    if not spec.path:
        yield "path", f"must not be empty ({role})"
    elif check_files and not os.path.isfile(spec.path):
        hint = " (run `sarai-router models pull`)" if file_presence(spec).fetchable else ""
        yield "path", f"model file not found: {spec.path}{hint}"
    elif check_files:
        for problem in gguf_problems(spec.path):
            yield "path", problem


def file_presence(spec: ModelSpec) -> Presence:
    """A model read from ``spec.path``: present when the file is, fetchable when the
    catalog of ``models pull`` knows it."""
    from ..fetch import catalog_entry_for

    if os.path.isfile(spec.path):
        return Presence(present=True)
    fetchable = catalog_entry_for(spec) is not None
    return Presence(present=False, fetchable=fetchable,
                    detail=f"file not found: {spec.path}")
