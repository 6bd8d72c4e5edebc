"""Backend ``llama_server``: each model in a ``llama-server`` child process the router manages.

One process per model, the way llama-swap runs them: started on the model's first use (or
when the router starts, for a pinned model) on a free port of 127.0.0.1, used once
``/health`` says the model is loaded, stopped when the pool unloads the model (TTL,
eviction, shutdown). Its ``parallel`` slots decode together (continuous batching), so the
pool lets ``parallel`` requests use one instance at once.

The binary: ``[models.NAME] binary``, else ``$SARAI_ROUTER_LLAMA_SERVER``, else
``llama-server`` on ``PATH``, else the build that ``sarai-router engines install`` made
from the llama-cpp-python sdist.

Requests go to the child's OpenAI-compatible ``/v1/chat/completions`` through the ``openai``
backend's client. The process side lives in ``llama_server_process``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Mapping, Sequence

import attrs

from ..backend import SAMPLING_KEYS, BackendError, Delta, GenerationParams
from ..config import PATH_SETTING, ModelSpec
from ..errors import ContextLengthError, InstanceDead, ModelLoadError, UpstreamError
from ..hookspecs import hookimpl
from ..types import AudioInput, ImageInput
from .balance import BalanceSettings, balance_fields, balance_problems
from .grammar_limits import check_params
from .gguf_backend import GGUFBackend, GGUFSettings, default_threads, repack_weights
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

INSTALL_HINT = "sarai-router engines install"
#: Bind failures (another process took the free port first) are retried on a new port.
START_ATTEMPTS = 3
#: llama-server's micro-batch (``-ub``) default, which sizes its compute buffers.
SERVER_UBATCH = 512
#: The longest wait for a first token from the child: the pool never gives it more requests
#: than it has slots, so this only trips on a hung server.
REQUEST_TIMEOUT_SECONDS = 600.0


@attrs.frozen
class LlamaServerSettings(BalanceSettings, GGUFSettings):
    """The ``llama_server`` backend's own keys in ``[models.NAME]``, besides those of every
    GGUF backend (``n_threads``, ``mmproj``, ``repack``: ``--no-repack`` where repacking
    is off) and ``balance`` & co. for ``replicas``."""

    #: slots decoded together (continuous batching); each gets ``n_ctx`` tokens of context
    parallel: int = 4
    #: llama-server processes of the model, each with ``parallel`` slots; requests are
    #: balanced across them (``balance``); they share ``n_threads``
    replicas: int = 1
    #: the llama-server program; empty: $SARAI_ROUTER_LLAMA_SERVER, PATH, the cached build
    binary: str = attrs.field(default="", metadata=PATH_SETTING)
    #: more llama-server flags, e.g. ["--cache-ram", "256"]
    server_args: tuple[str, ...] = ()
    #: how long the model may take to load before the start is given up
    startup_timeout_seconds: float = 120.0


class LlamaServerBackend(GGUFBackend):
    settings_class = LlamaServerSettings
    name = "llama_server"
    file_role = "the GGUF file to serve"
    projector_modalities = ("image", "audio")

    # -- config -----------------------------------------------------------------------

    def check_settings(self, spec: ModelSpec) -> Iterable[tuple[str, str]]:
        settings: LlamaServerSettings = spec.settings
        if settings.parallel < 1:
            yield "parallel", "must be >= 1 (the number of requests the server decodes together)"
        if settings.replicas < 1:
            yield "replicas", "must be >= 1 (the number of llama-server processes)"
        yield from balance_problems(settings)
        if not settings.startup_timeout_seconds > 0:
            yield "startup_timeout_seconds", "must be > 0"
        for flag in settings.server_args:
            name = flag.split("=", 1)[0]
            if name in MANAGED_FLAGS:
                yield "server_args", f"{name!r} is managed by the router: {MANAGED_FLAGS[name]}"

    def check_runtime(self, spec: ModelSpec) -> Iterable[tuple[str, str]]:
        problem = _binary_problem(spec.settings.binary)
        if problem:
            yield "binary", problem

    def concurrency(self, spec: ModelSpec) -> int:
        return max(1, spec.settings.parallel) * max(1, spec.settings.replicas)

    def threads(self, spec: ModelSpec) -> int:
        return child_threads(spec.settings)

    def ram_shape(self, spec: ModelSpec) -> tuple[int, int]:
        # llama-server splits its context across the slots.
        return spec.n_ctx * max(1, spec.settings.parallel), SERVER_UBATCH

    def instances(self, spec: ModelSpec) -> int:
        return max(1, spec.settings.replicas)

    def describe_settings(self, spec: ModelSpec) -> Mapping[str, Any]:
        settings: LlamaServerSettings = spec.settings
        try:
            binary = _find_binary(settings.binary)
        except BackendError:
            binary = None
        return {"parallel": settings.parallel, "replicas": settings.replicas,
                "balance": settings.balance,
                "binary": None if binary is None else str(binary)}

    def async_chat(self, spec: ModelSpec) -> bool:
        return True

    # -- running ----------------------------------------------------------------------

    def load(self, spec: ModelSpec) -> "LlamaServerModel":
        """A started, healthy child; ModelLoadError (a load failure: 503, fallbacks
        apply) when its file, its program or its start fails."""
        try:
            return self._start(spec)
        except ModelLoadError:
            raise
        except BackendError as exc:
            raise ModelLoadError(str(exc), spec.name) from None

    def _start(self, spec: ModelSpec) -> "LlamaServerModel":
        settings: LlamaServerSettings = spec.settings
        if not os.path.isfile(spec.path):
            raise BackendError(f"model {spec.name!r}: its file is missing ({Path(spec.path).name})")
        if settings.mmproj and not os.path.isfile(settings.mmproj):
            raise BackendError(f"model {spec.name!r}: its mmproj file is missing "
                               f"({Path(settings.mmproj).name})")
        binary = _find_binary(settings.binary)
        if binary is None:
            raise BackendError(_no_binary_message(spec.name))
        servers: list["ServerProcess"] = []
        try:
            for _ in range(max(1, settings.replicas)):
                servers.append(_start_child(spec, str(binary)))
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return LlamaServerModel(spec, servers)


def _start_child(spec: ModelSpec, binary: str) -> "ServerProcess":
    """One llama-server of ``spec``, healthy, on a free port."""
    settings: LlamaServerSettings = spec.settings
    for attempt in range(1, START_ATTEMPTS + 1):
        # The process side (http.client, ctypes) loads with the first child, not for
        # every command that reads the config.
        from . import llama_server_process as child

        port = child.free_port()
        server = child.ServerProcess(spec.name, server_argv(spec, binary, port), port,
                                     private_paths=(spec.path, settings.mmproj, binary))
        try:
            server.start(timeout=settings.startup_timeout_seconds)
        except BackendError:
            if attempt < START_ATTEMPTS and server.bind_failed():
                log.info("port %d was taken before llama-server bound it; trying another",
                         port)
                continue
            raise
        return server
    raise AssertionError("unreachable")  # pragma: no cover


def child_threads(settings: LlamaServerSettings) -> int:
    """Threads of each child: ``n_threads`` (default: every core) shared by the replicas."""
    return max(1, (settings.n_threads or default_threads()) // max(1, settings.replicas))


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
        "--threads", str(child_threads(settings)),
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
    from .llama_server_install import LlamaServerError, find_llama_server

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

        return httpx.Limits(max_connections=self.settings.max_concurrency * len(self.urls) + 4,
                            max_keepalive_connections=0)


class LlamaServerModel:
    """A model served by its own llama-server children (``replicas``, one by default);
    ``parallel`` requests at once on each.

    Requests go through the ``openai`` backend's client to a child's
    ``/v1/chat/completions`` (the least busy one, or by prefix: ``balance``); images and
    audio travel as OpenAI content parts (the child decodes them with its ``mmproj``). When
    a child has died, a failed request raises :class:`InstanceDead`, and the pool starts
    the model's children again for the next request.
    """

    def __init__(self, spec: ModelSpec, servers: "Sequence[ServerProcess]"):
        self.spec = spec
        self.servers = list(servers)
        #: the first child (the only one unless ``replicas`` > 1)
        self.server = self.servers[0]
        client_settings = OpenAISettings(
            endpoints=tuple(f"{server.base_url}/v1" for server in self.servers),
            remote_model=spec.name,
            timeout_seconds=REQUEST_TIMEOUT_SECONDS,
            max_concurrency=spec.settings.parallel,
            # Watched through their processes: a failure is not retried later.
            max_cooldown_seconds=1.0,
            **balance_fields(spec.settings))
        self.client = _ChildClient(attrs.evolve(spec, settings=client_settings), api_key="")
        # llama-server takes llama.cpp's own sampling keys too.
        self.client.sampling_keys = SAMPLING_KEYS

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
        """``InstanceDead`` when a child is gone (the socket closes a moment before the
        process is reaped, so give it that moment), else ``error`` as it is."""
        for server in self.servers:
            proc = server.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=1.0 if len(self.servers) == 1 else 0.2)
            except subprocess.TimeoutExpired:
                continue  # still running
            return InstanceDead(f"model {self.spec.name!r}: its llama-server (pid "
                                f"{server.pid}) died ({server.exit_text()}); the next "
                                "request starts it again")
        return error  # every child runs: the request failed, not a server

    @property
    def pid(self) -> int | None:
        return self.server.pid

    @property
    def pids(self) -> list[int | None]:
        return [server.pid for server in self.servers]

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def alive(self) -> bool:
        """False once a child has exited without being asked to (the pool then drops the
        model, and the next request starts every child again)."""
        return all(server.alive() for server in self.servers)

    def health(self) -> dict[str, Any] | None:
        """Each child as an endpoint (state, in-flight requests, failures) when there are
        several; None for one (its process is its health)."""
        return self.client.health() if len(self.servers) > 1 else None

    def rss_mb(self) -> float:
        """The children's measured resident memory (what the pool's RAM budget counts)."""
        return sum(server.rss_mb() for server in self.servers)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            for server in self.servers:
                server.stop()


@hookimpl(trylast=True)
def register_backends(register):
    register("llama_server", LlamaServerBackend())
