"""Backend ``llama_server``: each model in a ``llama-server`` child process the router manages.

One process per model, the way llama-swap runs them: started on the model's first use (or
when the router starts, for a pinned model) on a free port of 127.0.0.1, used once
``/health`` says the model is loaded, stopped when the pool unloads the model (TTL,
eviction, shutdown). Its ``parallel`` slots decode together (continuous batching), so the
pool lets ``parallel`` requests use one instance at once.

The binary: ``[models.NAME] binary``, else ``$SARAI_ROUTER_LLAMA_SERVER``, else
``llama-server`` on ``PATH``, else the build that ``python -m
sarai_router.llama_server_install`` made from the llama-cpp-python sdist.

Requests go to the child's OpenAI-compatible ``/v1/chat/completions`` through the ``openai``
backend's client. The process side lives in ``llama_server_process``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import attrs

from ..backend import (SAMPLING_KEYS, Backend, BackendError, Capabilities, Delta,
                       GenerationParams, Presence)
from ..config import PATH_SETTING, Config, ModelSpec
from ..errors import ContextLengthError, InstanceDead, UpstreamError
from ..hookspecs import hookimpl
from ..types import AudioInput, ImageInput
from .grammar_limits import check_params
from .llama_cpp import default_threads, file_presence, gguf_path_problems, repack_weights
from .openai import OpenAIModel, OpenAISettings

if TYPE_CHECKING:
    from .llama_server_process import ServerProcess

log = logging.getLogger(__name__)

#: Flags the backend sets itself; in ``server_args`` they are refused, naming the key to use.
MANAGED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("-m", "--model"), "set by the model's `path`"),
    **dict.fromkeys(("--host",), "the router runs the server on 127.0.0.1"),
    **dict.fromkeys(("--port",), "the router picks a free port"),
    **dict.fromkeys(("-c", "--ctx-size"), "use `n_ctx` (per slot; the server gets "
                                          "n_ctx x parallel)"),
    **dict.fromkeys(("-np", "--parallel"), "use `parallel`"),
    **dict.fromkeys(("-t", "--threads"), "use `n_threads`"),
    **dict.fromkeys(("-mm", "--mmproj"), "use `mmproj`"),
    **dict.fromkeys(("--repack", "-nr", "--no-repack"), "use `repack`"),
    **dict.fromkeys(("--api-key", "--api-key-file"),
                    "the router talks to the server on 127.0.0.1 without a key"),
}

INSTALL_HINT = "python -m sarai_router.llama_server_install"
#: Bind failures (another process took the free port first) are retried on a new port.
START_ATTEMPTS = 3
#: llama-server's micro-batch (``-ub``) default, which sizes its compute buffers.
SERVER_UBATCH = 512
#: The longest wait for a first token from the child: the pool never gives it more requests
#: than it has slots, so this only trips on a hung server.
REQUEST_TIMEOUT_SECONDS = 600.0


@attrs.frozen
class LlamaServerSettings:
    """The ``llama_server`` backend's own keys in ``[models.NAME]``."""

    #: slots decoded together (continuous batching); each gets ``n_ctx`` tokens of context
    parallel: int = 4
    #: 0: every core for one model alone; `serve` gives each model its share
    n_threads: int = 0
    #: the multimodal projector GGUF that lets the model take images (or audio)
    mmproj: str = attrs.field(default="", metadata=PATH_SETTING)
    #: the llama-server program; empty: $SARAI_ROUTER_LLAMA_SERVER, PATH, the cached build
    binary: str = attrs.field(default="", metadata=PATH_SETTING)
    #: more llama-server flags, e.g. ["--cache-ram", "256"]
    server_args: tuple[str, ...] = ()
    #: how long the model may take to load before the start is given up
    startup_timeout_seconds: float = 120.0
    #: repack weights for llama.cpp's faster CPU kernels; unset: on, except on CPUs with
    #: AMX, whose kernels crash in llama.cpp's current version (``--no-repack`` then)
    repack: bool | None = None


class LlamaServerBackend(Backend):
    settings_class = LlamaServerSettings

    # -- config -----------------------------------------------------------------------

    def check(self, spec: ModelSpec, *, config: Config,
              check_files: bool) -> Iterable[tuple[str, str]]:
        settings: LlamaServerSettings = spec.settings
        yield from gguf_path_problems(spec, "the GGUF file to serve", check_files=check_files)
        if settings.parallel < 1:
            yield "parallel", "must be >= 1 (the number of requests the server decodes together)"
        if settings.n_threads < 0:
            yield "n_threads", "must be >= 0 (0 = all cores)"
        if not settings.startup_timeout_seconds > 0:
            yield "startup_timeout_seconds", "must be > 0"
        for flag in settings.server_args:
            name = flag.split("=", 1)[0]
            if name in MANAGED_FLAGS:
                yield "server_args", f"{name!r} is managed by the router: {MANAGED_FLAGS[name]}"
        if not check_files:
            return
        # What would fail at the first request, caught by `config check`.
        for modality in ("image", "audio"):
            if modality in spec.modalities and not settings.mmproj:
                yield "mmproj", (f"a model that takes {modality} input needs its multimodal "
                                 "projector (mmproj)")
        if settings.mmproj and not os.path.isfile(settings.mmproj):
            yield "mmproj", f"file not found: {settings.mmproj}"
        problem = _binary_problem(settings.binary)
        if problem:
            yield "binary", problem

    def concurrency(self, spec: ModelSpec) -> int:
        return max(1, spec.settings.parallel)

    def uses_threads(self, spec: ModelSpec) -> bool:
        return True

    def with_threads(self, spec: ModelSpec, threads: int) -> ModelSpec:
        if spec.settings.n_threads:
            return spec
        return attrs.evolve(spec, settings=attrs.evolve(spec.settings, n_threads=threads))

    def estimate_ram_mb(self, spec: ModelSpec) -> float:
        estimate = _ram_estimate(spec)
        return 0.0 if estimate is None else estimate.total_mb + _mmproj_mb(spec)

    def describe(self, spec: ModelSpec) -> Mapping[str, Any]:
        settings: LlamaServerSettings = spec.settings
        estimate = _ram_estimate(spec)
        try:
            binary = _find_binary(settings.binary)
        except BackendError:
            binary = None
        return {"estimated_ram": None if estimate is None else {
            "weights_mb": round(estimate.weights_mb, 1),
            "kv_cache_mb": round(estimate.kv_cache_mb, 1),
            "compute_mb": round(estimate.compute_mb, 1),
            "mmproj_mb": round(_mmproj_mb(spec), 1),
        }, "parallel": settings.parallel, "n_threads": settings.n_threads or default_threads(),
            "binary": None if binary is None else str(binary)}

    def presence(self, spec: ModelSpec) -> Presence:
        return file_presence(spec)

    def capabilities(self, spec: ModelSpec) -> Capabilities:
        # llama-server takes tools (its jinja templates), response_format json_schema
        # (grammar-constrained) and logprobs.
        return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx,
                            tools=True, json_schema=True, logprobs=True)

    def async_chat(self, spec: ModelSpec) -> bool:
        return True

    # -- running ----------------------------------------------------------------------

    def load(self, spec: ModelSpec) -> "LlamaServerModel":
        settings: LlamaServerSettings = spec.settings
        if not os.path.isfile(spec.path):
            raise BackendError(f"model {spec.name!r}: its file is missing ({Path(spec.path).name})")
        if settings.mmproj and not os.path.isfile(settings.mmproj):
            raise BackendError(f"model {spec.name!r}: its mmproj file is missing "
                               f"({Path(settings.mmproj).name})")
        binary = _find_binary(settings.binary)
        if binary is None:
            raise BackendError(_no_binary_message(spec.name))
        for attempt in range(1, START_ATTEMPTS + 1):
            # The process side (http.client, ctypes) loads with the first child, not for
            # every command that reads the config.
            from . import llama_server_process as child

            port = child.free_port()
            server = child.ServerProcess(spec.name, server_argv(spec, str(binary), port), port,
                                   private_paths=(spec.path, settings.mmproj, str(binary)))
            try:
                server.start(timeout=settings.startup_timeout_seconds)
            except BackendError:
                if attempt < START_ATTEMPTS and server.bind_failed():
                    log.info("port %d was taken before llama-server bound it; trying another",
                             port)
                    continue
                raise
            return LlamaServerModel(spec, server)
        raise AssertionError("unreachable")  # pragma: no cover


def server_argv(spec: ModelSpec, binary: str, port: int) -> list[str]:
    """The llama-server command line for ``spec`` on ``port``."""
    settings: LlamaServerSettings = spec.settings
    argv = [
        binary,
        "--model", spec.path,
        "--alias", spec.name,
        "--host", "127.0.0.1",
        "--port", str(port),
        # llama-server splits its context across the slots: n_ctx is per request here.
        "--ctx-size", str(spec.n_ctx * settings.parallel),
        "--parallel", str(settings.parallel),
        "--threads", str(settings.n_threads or default_threads()),
        "--no-webui",
        "--metrics",
        "--log-colors", "off",
    ]
    if settings.mmproj:
        argv += ["--mmproj", settings.mmproj]
    argv.append("--repack" if repack_weights(settings.repack) else "--no-repack")
    return argv + list(settings.server_args)


def _find_binary(explicit: str) -> Path | None:
    """The llama-server to run (None: none found); a configured one that leads nowhere
    raises BackendError naming it."""
    from ..llama_server_install import LlamaServerError, find_llama_server

    try:
        return find_llama_server(explicit or None)
    except LlamaServerError as exc:
        raise BackendError(str(exc)) from None


def _binary_problem(explicit: str) -> str:
    try:
        found = _find_binary(explicit)
    except BackendError as exc:
        return str(exc)
    if found is None:
        return ("no llama-server found ($SARAI_ROUTER_LLAMA_SERVER unset, none on PATH, no "
                f"cached build); run `{INSTALL_HINT}` to build one, or set `binary`")
    return ""


def _no_binary_message(name: str) -> str:
    return (f"model {name!r}: no llama-server found ([models.{name}] binary unset, "
            f"$SARAI_ROUTER_LLAMA_SERVER unset, none on PATH, no cached build); run "
            f"`{INSTALL_HINT}` to build one")


def _ram_estimate(spec: ModelSpec):
    """Weights + KV cache for every slot, from the GGUF header; None when unreadable."""
    from ..gguf_info import GGUFError, estimate_ram, read_info

    try:
        return estimate_ram(read_info(spec.path), spec.n_ctx * max(1, spec.settings.parallel),
                            SERVER_UBATCH)
    except GGUFError:
        return None


def _mmproj_mb(spec: ModelSpec) -> float:
    try:
        return os.path.getsize(spec.settings.mmproj) / (1024 * 1024) if spec.settings.mmproj else 0.0
    except OSError:
        return 0.0


class _ChildClient(OpenAIModel):
    """The ``openai`` backend's client, one new connection per request.

    llama-server sometimes closes a keep-alive connection after a streamed answer without
    saying so (no ``Connection: close``); the next request sent on it fails at once with
    "server disconnected without sending a response". Seen here under load: 3 of 224
    streamed requests on reused connections failed so, none of 160 on fresh ones. A
    connection to 127.0.0.1 costs far less than one token.
    """

    def _limits(self):
        import httpx

        return httpx.Limits(max_connections=self.settings.max_concurrency + 4,
                            max_keepalive_connections=0)


class LlamaServerModel:
    """A model served by its own llama-server child; ``parallel`` requests at once.

    Requests go through the ``openai`` backend's client to the child's
    ``/v1/chat/completions``; images and audio travel as OpenAI content parts (the child
    decodes them with its ``mmproj``). When the child has died, a failed request raises
    :class:`InstanceDead`, and the pool starts a new child for the next request.
    """

    def __init__(self, spec: ModelSpec, server: "ServerProcess"):
        self.spec = spec
        self.server = server
        client_settings = OpenAISettings(
            base_url=f"{server.base_url}/v1", remote_model=spec.name,
            timeout_seconds=REQUEST_TIMEOUT_SECONDS,
            max_concurrency=spec.settings.parallel,
            # One endpoint, watched through its process: a failure is not retried later.
            max_cooldown_seconds=1.0)
        self.client = _ChildClient(attrs.evolve(spec, settings=client_settings), api_key="")
        # llama-server takes llama.cpp's own sampling keys too.
        self.client.sampling_keys = SAMPLING_KEYS

    def chat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams, *,
             images: Sequence[ImageInput] = (),
             audio: AudioInput | None = None) -> Iterator[Delta]:
        # llama-server builds its grammars with the same llama.cpp parser: the same limits.
        check_params(params)
        deltas = self.client.chat(messages, params, images=images, audio=audio)
        try:
            yield from deltas
        except (UpstreamError, ContextLengthError):
            raise  # the request's fault, the server is fine
        except BackendError as exc:
            raise self._dead_or(exc) from None
        finally:
            deltas.close()

    async def achat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams, *,
                    images: Sequence[ImageInput] = (),
                    audio: AudioInput | None = None) -> AsyncIterator[Delta]:
        check_params(params)
        deltas = self.client.achat(messages, params, images=images, audio=audio)
        try:
            async for delta in deltas:
                yield delta
        except (UpstreamError, ContextLengthError):
            raise
        except BackendError as exc:
            raise self._dead_or(exc) from None
        finally:
            await deltas.aclose()

    def _dead_or(self, error: BackendError) -> BackendError:
        """``InstanceDead`` when the child is gone (the socket closes a moment before the
        process is reaped, so give it that moment), else ``error`` as it is."""
        proc = self.server.proc
        if proc is not None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                return error  # still running: the request failed, not the server
        return InstanceDead(f"model {self.spec.name!r}: its llama-server (pid {self.pid}) "
                            f"died ({self.server.exit_text()}); the next request starts it "
                            "again")

    @property
    def pid(self) -> int | None:
        return self.server.pid

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def alive(self) -> bool:
        """False once the child has exited without being asked to (the pool then drops it)."""
        return self.server.alive()

    def rss_mb(self) -> float:
        """The child's measured resident memory (what the pool's RAM budget counts)."""
        return self.server.rss_mb()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()


@hookimpl(trylast=True)
def register_backends(register):
    register("llama_server", LlamaServerBackend())
