"""Ollama's API on the router's own server and port: ``/api/chat``, ``/api/generate``,
``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/version``, ``/api/embed`` and
``/api/embeddings``.

The shapes are in ``ollama_dialect``; a generation runs exactly as an OpenAI chat
completion does (``Engine.prepare``, then a ``Generation`` task on the loop), answered as
NDJSON lines or one JSON object. Errors are
Ollama's ``{"error": "..."}`` (the server's outermost middleware picks the shape by path).
``keep_alive`` reaches the pool through :meth:`ModelPool.keep_alive`, within the server's
policy: see docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import Cancelled
from ..streaming import Done, Failed, Generation, Piece
from ..types import RouteDecision
from . import ollama_dialect as dialect
from .embeddings import check_inputs, embed, embedding_model, read_json, sarai_field
from .openai import (AUTO_MODEL, REQUEST_ID, ApiError, _check_keys, _short, _shutting_down,
                     error_for)

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


def _line(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False) + "\n"


# -- chat and generate ----------------------------------------------------------------------


async def chat(request: Request) -> Response:
    return await _answer(request, "chat")


async def generate(request: Request) -> Response:
    return await _answer(request, "generate")


async def _answer(request: Request, kind: str) -> Response:
    state = request.app.state.sarai
    try:
        body = await read_json(state, request)
        parse = dialect.parse_chat if kind == "chat" else dialect.parse_generate
        asked = parse(body, state.config, state.limits)
        if asked.parsed is not None and asked.model != AUTO_MODEL \
                and state.config.models[asked.model].embedding:
            raise ApiError(400, f"model {asked.model!r} is loaded for embeddings (embedding = "
                           "true) and does not chat: send its requests to /api/embed",
                           code="unsupported_value", param="model")
        if asked.parsed is None:
            return await _load_or_unload(state, asked, kind)
        explicit = None if asked.model == AUTO_MODEL else asked.model
        decision = await state.prepare(request, asked.parsed.request, explicit)
        dialect.check_num_ctx(asked.options, state.config, decision.model)
    except Cancelled:
        return state.client_left("its transcription")
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
        return state._fail(error_for(exc), exc)
    return await _generate(state, request, asked, decision, kind)


async def _load_or_unload(state: Any, asked: dialect.OllamaRequest, kind: str) -> Response:
    """Ollama's idiom: no prompt (no messages) loads the model, or with ``keep_alive`` 0
    unloads it. ``auto`` means ``[routing] default_model``."""
    config = state.config
    name = config.routing.default_model if asked.model == AUTO_MODEL else asked.model
    pool = state.engine.pool
    if asked.keep_alive.unload:
        outcome = await anyio.to_thread.run_sync(pool.keep_alive, name, 0.0)
        reason = "unload"
    else:
        def load() -> str:
            state.engine.ensure_present(name)
            pool.ensure_loaded(name)
            return pool.keep_alive(name, asked.keep_alive.seconds)

        outcome = await anyio.to_thread.run_sync(load)
        reason = "load"
    text_key = {"chat": "message", "generate": "response"}[kind]
    return JSONResponse({
        "model": name, "created_at": dialect.timestamp(),
        text_key: {"role": "assistant", "content": ""} if kind == "chat" else "",
        "done": True, "done_reason": reason,
        "sarai": {"keep_alive": outcome},
    })


async def _generate(state: Any, request: Request, asked: dialect.OllamaRequest,
                    decision: RouteDecision, kind: str) -> Response:
    parsed = asked.parsed
    begun = await state.begin_answer(request, parsed.request, decision, parsed.params)
    if isinstance(begun, Response):
        return begun
    generation, events, first, decision = begun
    answer = _Answer(state, asked, decision, kind)
    headers = {"x-sarai-model": decision.model}
    if parsed.stream:
        return StreamingResponse(answer.lines(first, events, generation), media_type=NDJSON,
                                 headers={**headers, "cache-control": "no-cache",
                                          "x-accel-buffering": "no"})
    collected = await state.collect(first, events, request, generation, decision)
    if isinstance(collected, Response):
        return collected
    text, tokens, completion = collected
    final = await answer.final(completion, text, tokens)
    return JSONResponse(final, headers=headers)


class _Answer:
    """One answer's Ollama objects: the streamed lines and the last one."""

    def __init__(self, state: Any, asked: dialect.OllamaRequest, decision: RouteDecision,
                 kind: str):
        self.state = state
        self.asked = asked
        self.model = decision.model
        self.kind = kind

    def _piece(self, text: str) -> dict[str, Any]:
        if self.kind == "chat":
            return {"role": "assistant", "content": text}
        return text

    def _key(self) -> str:
        return "message" if self.kind == "chat" else "response"

    def chunk(self, text: str, tokens=()) -> dict[str, Any]:
        data = {"model": self.model, "created_at": dialect.timestamp(),
                self._key(): self._piece(text), "done": False}
        if self.asked.logprobs:
            data["logprobs"] = dialect.logprobs(tokens)
        return data

    async def final(self, completion, text: str | None, tokens=()) -> dict[str, Any]:
        """The last object: the whole text when not streamed (``text``), the counts,
        durations and our routing; ``keep_alive`` applied now that the answer is done (the
        tokens are counted by the engine's ``generation_finished`` event)."""
        outcome = await anyio.to_thread.run_sync(
            self.state.engine.pool.keep_alive, completion.decision.model,
            self.asked.keep_alive.seconds)
        piece = self._piece(text or "")
        if self.kind == "chat" and completion.tool_calls:
            piece["tool_calls"] = dialect.tool_calls(completion.tool_calls)
        data: dict[str, Any] = {"model": self.model, "created_at": dialect.timestamp(),
                                self._key(): piece, "done": True,
                                "done_reason": dialect.done_reason(completion),
                                **dialect.durations(completion)}
        if self.asked.logprobs and text is not None:
            data["logprobs"] = dialect.logprobs(tokens)
        data["sarai"] = {"route": completion.decision.to_dict(),
                         "timings": completion.to_dict()["timings"],
                         "stopped_by": completion.stopped_by, "keep_alive": outcome}
        return data

    async def lines(self, first, events: asyncio.Queue,
                    generation: Generation) -> AsyncIterator[str]:
        try:
            event = first
            while True:
                if isinstance(event, Piece):
                    yield _line(self.chunk(event.text, event.logprobs))
                elif isinstance(event, Done) and not event.cancelled:
                    yield _line(await self.final(event.completion, None))
                    break
                else:  # stopped by shutdown, or failed mid-answer: say it in the stream
                    error = _shutting_down() if isinstance(event, Done) else \
                        error_for(event.error)
                    self.state.refused(error.status, error.code, error.message)
                    if isinstance(event, Failed):
                        log.warning("generation failed mid-stream (request id %s): %s",
                                    REQUEST_ID.get(), event.error)
                    yield _line({"error": error.message})
                    break
                event = await events.get()
        finally:
            generation.cancel()  # a client that went away stops the generation


# -- models ---------------------------------------------------------------------------------


async def running(request: Request) -> Response:
    """``GET /`` (and ``HEAD``): Ollama's own liveness answer, which clients such as Open
    WebUI probe before they use an Ollama connection."""
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": dialect.OLLAMA_API_VERSION, "sarai_router": __version__})


async def tags(request: Request) -> Response:
    state = request.app.state.sarai
    rows = await anyio.to_thread.run_sync(lambda: _tag_rows(state))
    return JSONResponse({"models": rows})


def _tag_rows(state: Any) -> list[dict[str, Any]]:
    config = state.config
    rows = [{"name": AUTO_MODEL, "model": AUTO_MODEL,
             "modified_at": dialect.timestamp(state.created), "size": 0, "digest": "",
             "details": {"parent_model": "", "format": "router", "family": "sarai-router",
                         "families": ["sarai-router"], "parameter_size": "",
                         "quantization_level": ""},
             "sarai": {"routes_to": [n for n, s in config.models.items() if not s.embedding]}}]
    for name, spec in config.models.items():
        size, modified = _file_facts(spec, state.created)
        rows.append({"name": name, "model": name, "modified_at": dialect.timestamp(modified),
                     "size": size, "digest": spec.sha256, "details": _details(spec),
                     "sarai": {"backend": spec.backend, "pinned": spec.pinned,
                               "embedding": spec.embedding,
                               "modalities": list(spec.modalities)}})
    return rows


def _file_facts(spec, default_time: float) -> tuple[int, float]:
    """The model file's size and time (never its path); 0 and the server's start for a
    remote model or a missing file."""
    if spec.backend in ("llama_cpp", "llama_server") and spec.path:
        try:
            stat = os.stat(spec.path)
            return stat.st_size, stat.st_mtime
        except OSError:
            pass
    return 0, default_time


def _gguf(spec):
    if spec.backend not in ("llama_cpp", "llama_server") or not spec.path:
        return None
    from ..default_plugins.gguf_info import GGUFError, read_info

    try:
        return read_info(spec.path)
    except (GGUFError, OSError):
        return None


def _details(spec) -> dict[str, Any]:
    info = _gguf(spec)
    family = info.architecture if info is not None else spec.backend
    return {"parent_model": "", "format": "gguf" if info is not None else spec.backend,
            "family": family, "families": [family], "parameter_size": "",
            "quantization_level": dialect.quantization(os.path.basename(spec.path))
            if spec.path else ""}


async def ps(request: Request) -> Response:
    state = request.app.state.sarai
    pool = state.engine.pool
    rows = []
    for resident in pool.residents():
        name = resident["name"]
        spec = state.config.models.get(name)
        if spec is None or resident["state"] not in ("loaded", "loading"):
            continue
        expires = None
        if not spec.pinned:
            left = pool.expires_in(name)
            if left is None:  # in use: its idle clock starts when it is done
                left = resident.get("keep_alive_s") or state.config.ttl_for(spec)
            expires = dialect.expiry(left)
        rows.append({"name": name, "model": name,
                     "size": int(resident["ram_mb"] * 1024 * 1024), "size_vram": 0,
                     "digest": spec.sha256, "details": _details(spec),
                     "expires_at": expires, "context_length": spec.n_ctx,
                     "sarai": {"state": resident["state"], "pinned": spec.pinned,
                               "in_flight": resident["active"],
                               "queued": resident["queued"] - resident["active"],
                               "keep_alive_seconds": resident.get("keep_alive_s"),
                               "ttl_seconds": None if spec.pinned else
                               state.config.ttl_for(spec)}})
    return JSONResponse({"models": rows})


async def show(request: Request) -> Response:
    state = request.app.state.sarai
    try:
        body = dialect.check_body(await read_json(state, request))
        _check_keys(body, ("model", "name", "verbose"), "body")
        raw = body.get("model") if body.get("model") is not None else body.get("name")
        name = dialect.model_name(state.config, raw)
        if body.get("verbose") is not None and not isinstance(body["verbose"], bool):
            raise dialect.invalid("verbose must be true or false", "verbose")
    except Exception as exc:  # noqa: BLE001
        return state._fail(error_for(exc), exc)
    data = await anyio.to_thread.run_sync(lambda: _show(state, name))
    return JSONResponse(data)


def _show(state: Any, name: str) -> dict[str, Any]:
    config = state.config
    router = state.engine.router
    if name == AUTO_MODEL:
        chat_models = [n for n, s in config.models.items() if not s.embedding]
        caps = sorted({c for n in chat_models for c in _capabilities(router, config, n)})
        return {"modelfile": "", "parameters": "", "template": "", "license": "",
                "details": _tag_rows(state)[0]["details"], "model_info": {},
                "capabilities": caps, "modified_at": dialect.timestamp(state.created),
                "sarai": {"routes_to": chat_models,
                          "default_model": config.routing.default_model}}
    spec = config.models[name]
    info = _gguf(spec)
    model_info: dict[str, Any] = {}
    if info is not None:
        arch = info.architecture
        # The context this server loads the model with, not the file's trained one:
        # clients (Continue) send it back as options.num_ctx.
        model_info = {"general.architecture": arch,
                      f"{arch}.context_length": spec.n_ctx,
                      f"{arch}.embedding_length": info.n_embd,
                      f"{arch}.block_count": info.n_layer,
                      f"{arch}.attention.head_count": info.n_head,
                      f"{arch}.attention.head_count_kv": info.n_head_kv}
    sampling = state.engine.sampling_for(name)
    parameters = "\n".join(f"{key} {value:g}" for key, value in sorted(sampling.items()))
    _, modified = _file_facts(spec, state.created)
    return {"modelfile": "", "parameters": parameters, "template": "", "license": "",
            "details": _details(spec), "model_info": model_info,
            "capabilities": _capabilities(router, config, name),
            "modified_at": dialect.timestamp(modified),
            "sarai": {"backend": spec.backend, "description": spec.description,
                      "pinned": spec.pinned, "n_ctx": spec.n_ctx,
                      "trained_context_length": info.context_length if info else None,
                      "max_tokens": spec.max_tokens,
                      "ttl_seconds": None if spec.pinned else config.ttl_for(spec),
                      "modalities": list(spec.modalities), "fallbacks": list(spec.fallbacks),
                      "embedding": spec.embedding}}


def _capabilities(router, config, name: str) -> list[str]:
    spec = config.models[name]
    if spec.embedding:
        return ["embedding"]
    caps = router.capabilities(name)
    found = ["completion"]
    if caps.tools:
        found.append("tools")
    if "image" in caps.modalities:
        found.append("vision")
    if "audio" in caps.modalities:
        found.append("audio")
    return found


# -- embeddings -----------------------------------------------------------------------------

EMBED_FIELDS = ("model", "input", "truncate", "options", "keep_alive", "dimensions")
EMBEDDINGS_FIELDS = ("model", "prompt", "options", "keep_alive")


def _embedding_target(state: Any, body: dict) -> tuple[RouteDecision, dialect.KeepAlive]:
    """The embedding model a body names, checked against its ``options``, and its
    ``keep_alive``: what both embedding endpoints read the same way."""
    decision = embedding_model(state.config, body.get("model"))
    options = dialect.parse_options(body.get("options"), state.limits, sampling=False)
    dialect.check_num_ctx(options, state.config, decision.model)
    keep = dialect.parse_keep_alive(body.get("keep_alive"),
                                    state.config.server.keep_alive_max_seconds)
    return decision, keep


async def embed_endpoint(request: Request) -> Response:
    """``POST /api/embed``: a string or a list of strings; an empty input loads the model."""
    state = request.app.state.sarai
    try:
        body = dialect.check_body(await read_json(state, request))
        _check_keys(body, EMBED_FIELDS, "body")
        if body.get("dimensions") is not None:
            raise dialect.refused("dimensions is not supported: the models here give vectors "
                                  "of their own size", "dimensions")
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise dialect.invalid("truncate must be true or false", "truncate")
        decision, keep = _embedding_target(state, body)
        raw = body.get("input")
        if raw in (None, "", []):
            return await _embed_load(state, decision, keep, {"embeddings": []})
        inputs = check_inputs(raw, state.config.server.max_prompt_chars, tokens=False)
        result = await embed(state, decision, inputs, truncate=truncate)
        outcome = await anyio.to_thread.run_sync(state.engine.pool.keep_alive,
                                                 decision.model, keep.seconds)
    except Exception as exc:  # noqa: BLE001
        return state._fail(error_for(exc), exc)
    durations = dialect.durations(result.completion)
    return JSONResponse({
        "model": decision.model, "embeddings": result.vectors,
        "total_duration": durations["total_duration"],
        "load_duration": durations["load_duration"],
        "prompt_eval_count": durations["prompt_eval_count"],
        "sarai": {**sarai_field(result), "keep_alive": outcome},
    })


async def embeddings_legacy(request: Request) -> Response:
    """``POST /api/embeddings`` (deprecated by Ollama): one ``prompt``, one vector."""
    state = request.app.state.sarai
    try:
        body = dialect.check_body(await read_json(state, request))
        _check_keys(body, EMBEDDINGS_FIELDS, "body")
        decision, keep = _embedding_target(state, body)
        prompt = body.get("prompt")
        if prompt in (None, ""):
            return await _embed_load(state, decision, keep, {"embedding": []})
        if not isinstance(prompt, str):
            raise dialect.invalid(f"prompt must be a string, got {_short(prompt)}", "prompt")
        inputs = check_inputs(prompt, state.config.server.max_prompt_chars, param="prompt",
                              tokens=False)
        result = await embed(state, decision, inputs)
        outcome = await anyio.to_thread.run_sync(state.engine.pool.keep_alive,
                                                 decision.model, keep.seconds)
    except Exception as exc:  # noqa: BLE001
        return state._fail(error_for(exc), exc)
    return JSONResponse({"embedding": result.vectors[0],
                         "sarai": {**sarai_field(result), "keep_alive": outcome}})


async def _embed_load(state: Any, decision: RouteDecision, keep: dialect.KeepAlive,
                      empty: dict[str, Any]) -> Response:
    pool = state.engine.pool
    name = decision.model

    def work() -> str:
        if not keep.unload:
            state.engine.ensure_present(name)
            pool.ensure_loaded(name)
        return pool.keep_alive(name, keep.seconds)

    outcome = await anyio.to_thread.run_sync(work)
    return JSONResponse({"model": name, **empty, "sarai": {"keep_alive": outcome}})


def routes() -> list[Route]:
    """Every Ollama endpoint this router serves (not the ones that manage model files:
    pull, push, create, copy, delete, blobs)."""
    return [
        Route("/", running, methods=["GET"]),  # HEAD too: Starlette adds it to a GET route
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/embed", embed_endpoint, methods=["POST"]),
        Route("/api/embeddings", embeddings_legacy, methods=["POST"]),
    ]
