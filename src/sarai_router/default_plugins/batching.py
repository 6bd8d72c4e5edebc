"""What ``serve`` runs a GGUF model under: in process, or a managed llama-server that batches.

In process (``llama_cpp``), one model instance decodes one request at a time: 16 clients
share one generation slot and most wait, or are refused once the queue is full. A managed
``llama_server`` child decodes its ``parallel`` slots together (continuous batching). So
when a llama-server binary is installed, ``serve`` moves every model whose table does not
write ``backend`` (the default, ``llama_cpp``) to ``llama_server``, with the same file,
context, threads, projector and chat template. A table that writes ``backend`` keeps it,
and ``[server] batching = "off"`` (or ``serve --batching off``) keeps every model in process.

``query`` and ``chat`` stay in process: one user sends one request at a time, which
batching does not speed up, and an in-process model loads in a fraction of the time a child
takes to start (0.2-2.5 s against 6-24 s measured; docs/serving.md).
"""

from __future__ import annotations

from typing import Any

import attrs

from ..config import Config, ModelSpec
from ..loading import rebind

#: The command that installs llama-server, named wherever batching is missing.
INSTALL_COMMAND = "sarai-router engines install"

#: Slots per model. Measured with the default fast model, 16 streamed clients, 1 thread
#: on 2 busy cores (docs/scaling.md): 16 slots gave 32.6 tok/s and a 0.9 s TTFT p50,
#: 8 slots 0.87x of that and 16 s, 4 slots 0.75x and 32 s (the clients beyond the slots
#: wait for a whole answer). A slot costs its KV cache (n_ctx tokens).
DEFAULT_PARALLEL = 16

#: llama-cpp-python ``chat_format`` -> llama-server's built-in ``--chat-template`` of the
#: same format (the names that llama-server lists in ``--help``).
CHAT_TEMPLATES = {
    "chatml": "chatml", "gemma": "gemma", "llama-2": "llama2", "llama-3": "llama3",
    "zephyr": "zephyr", "vicuna": "vicuna", "openchat": "openchat", "chatglm3": "chatglm3",
    "mistral-instruct": "mistral-v1", "phi3": "phi3",
}


@attrs.frozen
class Plan:
    """The config ``serve`` runs, and what to tell the operator about it."""

    config: Config
    #: model names moved to a managed llama-server
    batched: tuple[str, ...] = ()
    #: model name -> why it stays in process
    in_process: dict[str, str] = attrs.field(factory=dict)
    #: one line for the operator, or "" when there is nothing to say
    message: str = ""


def plan(config: Config, mode: str | None = None) -> Plan:
    """``config`` with its default-backend GGUF models under ``llama_server`` where possible.

    ``mode``: ``"auto"`` or ``"off"``; None: ``[server] batching``.
    """
    mode = mode or config.server.batching
    candidates = {name: spec for name, spec in config.models.items()
                  if not spec.backend_explicit and spec.backend == "llama_cpp"}
    if mode == "off" or not candidates:
        return Plan(config)
    from .llama_server_install import LlamaServerError, find_llama_server
    from ..plugins import Hooks, build_plugins

    plugin_set = config.plugin_set or build_plugins(config)
    if "llama_server" not in Hooks(plugin_set, config).backends():
        return Plan(config, in_process=dict.fromkeys(candidates, "no llama_server backend"),
                    message="batching is off: the llama_server plugin is disabled")
    try:
        binary = find_llama_server()
    except LlamaServerError as exc:
        binary, why = None, str(exc)
    else:
        why = "no llama-server is installed"
    if binary is None:
        return Plan(config, in_process=dict.fromkeys(candidates, why),
                    message=(f"models {', '.join(candidates)} run in process, one request "
                             f"at a time ({why}); run `{INSTALL_COMMAND}` to serve them "
                             "with continuous batching"))
    models = dict(config.models)
    in_process: dict[str, str] = {}
    for name, spec in candidates.items():
        keys, reason = server_keys(spec)
        if keys is None:
            in_process[name] = reason
            continue
        models[name] = attrs.evolve(spec, backend="llama_server", backend_keys=keys,
                                    settings=None)
    batched = tuple(name for name in candidates if name not in in_process)
    if not batched:
        return Plan(config, in_process=in_process, message=_stays(in_process))
    bound = rebind(attrs.evolve(config, models=models), plugin_set)
    message = (f"models {', '.join(batched)} run under llama-server with continuous "
               f"batching ({binary}); [server] batching = \"off\" runs them in process")
    if in_process:
        message += "; " + _stays(in_process)
    return Plan(bound, batched=batched, in_process=in_process, message=message)


def server_keys(spec: ModelSpec) -> tuple[dict[str, Any] | None, str]:
    """The ``llama_server`` keys that run ``spec`` (a ``llama_cpp`` model) the same way,
    or None and why it can't be."""
    settings = spec.settings
    if settings is None:
        return None, "its backend keys did not bind"
    if settings.options:
        return None, (f"its llama_cpp options ({', '.join(sorted(settings.options))}) have "
                      "no llama-server equivalent here")
    if spec.embedding:
        return None, "an embedding model (the llama_server backend serves chat only)"
    if "audio" in spec.modalities:
        return None, "it takes audio input"
    # Written paths, not resolved ones: binding resolves them again.
    written = spec.backend_keys
    keys: dict[str, Any] = {"parallel": DEFAULT_PARALLEL, "n_threads": settings.n_threads,
                            "server_args": ["--batch-size", str(settings.n_batch)]}
    if settings.mmproj:
        keys["mmproj"] = written.get("mmproj", settings.mmproj)
    if settings.repack is not None:
        keys["repack"] = settings.repack
    if settings.chat_format:
        template = CHAT_TEMPLATES.get(settings.chat_format)
        if template is None:
            return None, (f"llama-server has no built-in template for chat_format "
                          f"{settings.chat_format!r}")
        keys["server_args"] += ["--chat-template", template]
    return keys, ""


def _stays(in_process: dict[str, str]) -> str:
    return "; ".join(f"model {name} stays in process: {why}" for name, why in in_process.items())
