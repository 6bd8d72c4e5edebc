"""Embeddings: ``POST /v1/embeddings`` (OpenAI's shape) and the work both dialects share.

A model with ``embedding = true`` in its table is loaded for embeddings (the ``llama_cpp``
backend pools its hidden states; the ``openai`` backend passes the call to its upstream's
``/v1/embeddings``). It is held through the pool like any model (its RAM, TTL, queue and
metrics), and ``auto`` names the first such model. The loaded model offers
``embed(inputs, truncate=...) -> (vectors, prompt_tokens)``.
"""

from __future__ import annotations

import array
import base64
import logging
import sys
import time
from typing import Any, Mapping, Sequence

import anyio
import attrs
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..backend import Usage
from ..config import Config
from ..engine import Completion, Timings
from ..errors import BackendError, not_configured
from ..events import SOURCE
from ..router import EXPLICIT_PLUGIN
from ..types import RouteDecision
from .openai import AUTO_MODEL, ApiError, _check_keys, _short, _type_name, error_for

log = logging.getLogger(__name__)

#: OpenAI's bound on the inputs of one request.
MAX_INPUTS = 2048
#: The plugin name a request for ``auto`` is decided by.
EMBEDDING_PLUGIN = "(embedding)"
HOW_TO_CONFIGURE = ("add `embedding = true` to a [models.NAME] table (a GGUF with the "
                    "llama_cpp backend, or an openai upstream that serves /v1/embeddings)")


def embedding_model(config: Config, raw: Any, *, param: str = "model") -> RouteDecision:
    """The embedding model ``raw`` names (``auto``: the first with ``embedding = true``)."""
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, f"{param} is required: an embedding model's name or \"auto\"",
                       code="invalid_value", param=param)
    name = raw.removesuffix(":latest")
    embedders = [n for n, spec in config.models.items() if spec.embedding]
    if name == AUTO_MODEL:
        if not embedders:
            raise ApiError(400, f"no model is configured for embeddings: {HOW_TO_CONFIGURE}",
                           code="no_embedding_model", param=param)
        return RouteDecision(model=embedders[0], reason="the configured embedding model",
                             plugin=EMBEDDING_PLUGIN, signals={})
    if name not in config.models:
        raise ApiError(404, not_configured(raw[:100], [AUTO_MODEL, *embedders]),
                       code="model_not_found", param=param)
    if not config.models[name].embedding:
        hint = (f"; the embedding model{'s are' if len(embedders) > 1 else ' is'} "
                f"{', '.join(map(repr, embedders))}" if embedders else f"; {HOW_TO_CONFIGURE}")
        raise ApiError(400, f"model {name!r} is not loaded for embeddings (it has no "
                       f"`embedding = true`){hint}", code="not_an_embedding_model",
                       param=param)
    return RouteDecision(model=name, reason="model requested explicitly",
                         plugin=EXPLICIT_PLUGIN, signals={})


def check_inputs(raw: Any, max_chars: int, *, param: str = "input",
                 tokens: bool = True) -> list[str | list[int]]:
    """OpenAI's ``input``: a string, a list of strings, a list of token ids, or a list of
    such lists; Ollama's: a string or a list of strings (``tokens=False``)."""
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in raw) and tokens:
        items = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        kinds = "a string, a list of strings or token ids" if tokens else \
            "a string or a list of strings"
        raise ApiError(400, f"{param} must be {kinds}, got {_type_name(raw)}",
                       code="invalid_value", param=param)
    if not items:
        raise ApiError(400, f"{param} must not be empty", code="invalid_value", param=param)
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"{param} has {len(items)} inputs, more than {MAX_INPUTS}",
                       code="invalid_value", param=param)
    chars = 0
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"{where} is an empty string", code="invalid_value",
                               param=where)
            chars += len(item)
        elif tokens and isinstance(item, list) and item and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item):
            chars += len(item)
        else:
            what = "a non-empty string or a list of token ids (integers >= 0)" if tokens \
                else "a non-empty string"
            raise ApiError(400, f"{where} must be {what}, got {_short(item)}",
                           code="invalid_value", param=where)
    if chars > max_chars:
        raise ApiError(400, f"the inputs have {chars} characters, more than this server takes "
                       f"([server] max_prompt_chars = {max_chars})",
                       code="context_length_exceeded", param=param)
    return items


@attrs.frozen
class Embedded:
    decision: RouteDecision
    vectors: list[list[float]]
    completion: Completion  # usage (prompt tokens) and timings, as a chat's


async def embed(state: Any, decision: RouteDecision, inputs: Sequence[str | Sequence[int]], *,
                truncate: bool = True) -> Embedded:
    """Embed ``inputs`` with ``decision.model``, held through the pool like any request
    (loaded if needed, its queue, its idle clock), and counted in the metrics (the
    ``routed``... ``generation_finished`` events a chat's answer has)."""
    engine = state.engine
    name = decision.model
    engine.hooks.emit("routed", name, plugin=decision.plugin, reason=decision.reason,
                      signals={}, fallback=False, source=SOURCE.get())

    def work() -> Embedded:
        started = time.perf_counter()
        engine.ensure_present(name)
        was_loaded = engine.pool.is_loaded(name)
        with engine.pool.use(name, queue_limit=state.config.server.queue_size) as resident:
            load_s = 0.0 if was_loaded else resident.load_seconds
            # The same events as a chat's: metrics count the tokens, observers see it.
            engine.hooks.emit("generation_started", name, load_s=load_s)
            embed_fn = getattr(resident.model, "embed", None)
            if embed_fn is None:
                raise ApiError(400, f"model {name!r}: its backend "
                               f"{resident.spec.backend!r} cannot make embeddings",
                               code="unsupported_value", param="model")
            began = time.perf_counter()
            vectors, tokens = embed_fn(list(inputs), truncate=truncate)
            spent = time.perf_counter() - began
        completion = Completion(decision=decision, usage=Usage(int(tokens), 0),
                                timings=Timings(load_s=load_s, generation_s=spent,
                                                total_s=time.perf_counter() - started))
        engine.hooks.emit("generation_finished", name, prompt_tokens=int(tokens),
                          completion_tokens=0, ttft_s=None, generation_s=spent,
                          total_s=completion.timings.total_s, tokens_per_second=0.0,
                          finish_reason="embedding", stopped_by=None)
        return Embedded(decision, [list(map(float, v)) for v in vectors], completion)

    result = await anyio.to_thread.run_sync(work)
    state.metrics.request_started(decision)
    return result


def vector_base64(vector: Sequence[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32s, base64-encoded."""
    values = array.array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def sarai_field(result: Embedded) -> dict[str, Any]:
    timings = result.completion.to_dict()["timings"]
    return {"route": result.decision.to_dict(),
            "timings": {key: timings[key] for key in ("load_s", "generation_s", "total_s")}}


# -- POST /v1/embeddings --------------------------------------------------------------------

OPENAI_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")


def parse_openai(body: Any, config: Config) -> tuple[RouteDecision, list, str]:
    if not isinstance(body, Mapping):
        raise ApiError(400, f"the body must be a JSON object, got {_type_name(body)}",
                       code="invalid_body")
    _check_keys(body, OPENAI_FIELDS, "body")
    if body.get("dimensions") is not None:
        raise ApiError(400, "dimensions is not supported: the models here give vectors of "
                       "their own size", code="unsupported_parameter", param="dimensions")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be float or base64, got {_short(fmt)}",
                       code="invalid_value", param="encoding_format")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "user must be a string", code="invalid_value", param="user")
    if "input" not in body:
        raise ApiError(400, "input is required", code="invalid_value", param="input")
    decision = embedding_model(config, body.get("model"))
    inputs = check_inputs(body["input"], config.server.max_prompt_chars)
    return decision, inputs, fmt


async def openai_embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``."""
    state = request.app.state.sarai
    try:
        body = await read_json(state, request)
        decision, inputs, fmt = parse_openai(body, state.config)
        result = await embed(state, decision, inputs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
        return state._fail(error_for(exc), exc)
    tokens = result.completion.usage.prompt_tokens
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": index,
                  "embedding": vector_base64(vector) if fmt == "base64" else vector}
                 for index, vector in enumerate(result.vectors)],
        "model": decision.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "sarai": sarai_field(result),
    }, headers={"x-sarai-model": decision.model})


async def read_json(state: Any, request: Request) -> Any:
    """The body as JSON, within the server's limits (its own reader)."""
    return await state._read_json(request)


def routes() -> list[Route]:
    return [Route("/v1/embeddings", openai_embeddings, methods=["POST"])]


__all__ = ["BackendError", "Embedded", "check_inputs", "embed", "embedding_model", "routes"]
