"""The dispatcher: compute signals, ask the routing plugins, check the answer.

No model is loaded here, and ``llama_cpp`` is never imported: ``sarai-router route`` runs
only this.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import attrs

from .backend import Capabilities
from .config import Config
from .loading import rebind
from .errors import BackendError, CapabilityError, PluginError, RoutingError, not_configured
from .events import SOURCE
from .plugins import Hooks, PluginSet, build_plugins
from .types import (COLD_LOAD_MB_PER_S, ChatRequest, ModelState, Residency, Route,
                    RouteDecision)

log = logging.getLogger(__name__)

FALLBACK_PLUGIN = "(fallback)"
EXPLICIT_PLUGIN = "(explicit)"


class Router:
    def __init__(self, config: Config, plugins: PluginSet | None = None, *,
                 residency: Callable[[], Residency] | None = None):
        if plugins is not None and plugins is not config.plugin_set:
            # Plugins registered in code may declare backends and tables of their own.
            config = rebind(config, plugins)
        self.config = config
        # The plugins discovered when the config was loaded, unless the caller brings its own.
        self.plugins = plugins or config.plugin_set or build_plugins(config)
        self.hooks = Hooks(self.plugins, config)
        #: What is loaded right now, for ``select_route``: the Engine installs its pool's
        #: :meth:`~sarai_router.pool.ModelPool.residency`; without one (``route``, ``eval``)
        #: every model is "unloaded".
        self.residency_provider = residency
        self._cold_estimates: dict[str, float | None] = {}

    def residency(self) -> Residency:
        """Each configured model's state and expected cold-load time, as routing sees it."""
        if self.residency_provider is not None:
            return self.residency_provider()
        return Residency(dict.fromkeys(self.config.models, "unloaded"), self.estimated_cold_load)

    def estimated_cold_load(self, name: str) -> tuple[float | None, bool]:
        """``(seconds, measured=False)``: the backend's RAM estimate for ``name`` at
        :data:`~sarai_router.types.COLD_LOAD_MB_PER_S`; None if it cannot say."""
        if name not in self._cold_estimates:
            spec = self.config.models[name]
            try:
                mb = self.hooks.backend(spec.backend).estimate_ram_mb(spec)
                self._cold_estimates[name] = max(0.0, float(mb)) / COLD_LOAD_MB_PER_S
            except Exception as exc:  # a missing file, no backend: unknown, not an error here
                log.debug("no RAM estimate for %s: %s", name, exc)
                self._cold_estimates[name] = None
        return self._cold_estimates[name], False

    def signals(self, request: ChatRequest) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, (plugin, function) in self.hooks.signal_functions().items():
            try:
                values[name] = function(request)
            except Exception as exc:
                message = f"signal {name!r} from plugin {plugin!r} raised {type(exc).__name__}: {exc}"
                log.warning("%s; left it out", message)
                self.hooks.errors.append(message)
        return values

    def route(self, request: ChatRequest, model: str | None = None, *,
              residency: Mapping[str, ModelState] | None = None) -> RouteDecision:
        """Decide which model answers ``request``; ``model`` set means the caller chose.

        ``residency``: what is loaded, for ``select_route`` (default: :meth:`residency`;
        ``eval`` passes the state of its simulated pool). Emits a ``routed`` event.
        """
        decision = self._route(request, model, residency)
        self.hooks.emit("routed", decision.model, plugin=decision.plugin,
                        reason=decision.reason, signals=dict(decision.signals),
                        fallback=decision.fallback, source=SOURCE.get())
        return decision

    def _route(self, request: ChatRequest, model: str | None,
               residency: Mapping[str, ModelState] | None) -> RouteDecision:
        signals = self.signals(request)
        if model is not None:
            if model not in self.config.models:
                raise RoutingError(self._unknown(model, "requested"))
            decision = RouteDecision(model=model, reason="model requested explicitly",
                                     plugin=EXPLICIT_PLUGIN, signals=signals)
            return self._check_modality(decision, request)
        answer = self.hooks.select_route(
            request=request, signals=signals, models=self.config.models,
            residency=self.residency() if residency is None else residency)
        if answer is None:
            default = self.config.routing.default_model
            decision = RouteDecision(
                model=default,
                reason=f"no routing plugin chose a model; fell back to [routing] default_model {default!r}",
                plugin=FALLBACK_PLUGIN, signals=signals, fallback=True,
            )
        else:
            decision = self._decision(answer.value, answer.plugin, signals)
        return self._check_modality(decision, request)

    def _decision(self, value: Any, plugin: str, signals: Mapping[str, Any]) -> RouteDecision:
        if isinstance(value, str):
            name, reason = value, f"chosen by plugin {plugin!r}"
        elif isinstance(value, Route) or (hasattr(value, "model") and hasattr(value, "reason")):
            name, reason = value.model, value.reason or f"chosen by plugin {plugin!r}"
        else:
            raise RoutingError(
                f"plugin {plugin!r} returned {type(value).__name__} from select_route; "
                "expected a model name, a sarai_router.Route or None"
            )
        if name not in self.config.models:
            raise RoutingError(self._unknown(name, f"plugin {plugin!r} routed to"))
        return RouteDecision(model=name, reason=reason, plugin=plugin, signals=signals)

    def _unknown(self, name: str, who: str) -> str:
        return not_configured(name, self.config.models, who)

    def _check_modality(self, decision: RouteDecision, request: ChatRequest) -> RouteDecision:
        missing = missing_modalities(self.config, decision.model, request)
        if not missing:
            return decision
        warnings = tuple(
            f"model {decision.model!r} does not take {m} input (its modalities: "
            f"{', '.join(self.config.models[decision.model].modalities)}); add {m!r} to "
            f"[models.{decision.model}] modalities if it does"
            for m in missing
        )
        return attrs.evolve(decision, warnings=decision.warnings + warnings)


    # -- capabilities and fallbacks

    def capabilities(self, model: str) -> Capabilities:
        spec = self.config.models[model]
        try:
            return self.hooks.backend(spec.backend).capabilities(spec)
        except BackendError:  # no plugin for its backend: loading it will say so
            return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx)

    def unmet_needs(self, model: str, request: ChatRequest) -> list[str]:
        """What ``request`` needs that ``model`` cannot give, in words (empty: it can)."""
        caps = self.capabilities(model)
        missing = []
        if self.config.models[model].embedding:
            missing.append("chat (it is loaded for embeddings: embedding = true)")
        if request.images and "image" not in caps.modalities:
            missing.append("image input")
        if request.audio is not None and "audio" not in caps.modalities:
            missing.append("audio input")
        missing.extend(need for need in sorted(request.needs) if not getattr(caps, need, False))
        return missing

    def fits_context(self, model: str, request: ChatRequest) -> bool:
        """Whether the prompt fits ``model``'s context by the estimate (characters / 3)."""
        limit = self.capabilities(model).context_length
        return not limit or request.estimated_prompt_tokens <= limit

    def ensure_capable(self, decision: RouteDecision, request: ChatRequest) -> RouteDecision:
        """``decision`` if its model can take ``request``; else (a routed decision) the first
        model that can, tried in the order of its fallbacks, the default model, the rest;
        else CapabilityError naming what is missing.

        The context length is a preference only: a prompt estimated too long for the routed
        model goes to one with room if there is one; if none has room, the routed model's
        own check answers (a context-length error naming its ``n_ctx``), since the estimate
        is rough.
        """
        missing = self.unmet_needs(decision.model, request)
        fits = self.fits_context(decision.model, request)
        if not missing and fits:
            return decision
        if decision.plugin != EXPLICIT_PLUGIN:
            for other in self._reroute_order(decision.model):
                if not self.unmet_needs(other, request) and self.fits_context(other, request):
                    why = (f"cannot take {' or '.join(missing)}" if missing else
                           f"has n_ctx {self.capabilities(decision.model).context_length}, "
                           f"less than the ~{request.estimated_prompt_tokens} prompt tokens")
                    return attrs.evolve(
                        decision, model=other, routed_model=decision.model,
                        reason=f"{decision.reason}; {decision.model!r} {why}, so {other!r}")
        if not missing:
            return decision
        spec = self.config.models[decision.model]
        others = [f"{name}: {', '.join(lacks)}" for name in self._reroute_order(decision.model)
                  if (lacks := self.unmet_needs(name, request))]
        detail = (f"[models.{decision.model}] modalities = {list(spec.modalities)}"
                  if all(m.endswith(" input") for m in missing)
                  else "send its requests to an embeddings endpoint" if spec.embedding
                  else f"its backend {spec.backend!r} does not offer it")
        message = (f"model {decision.model!r} cannot take {' or '.join(missing)}: {detail} "
                   f"(routed by {decision.plugin}: {decision.reason})")
        if decision.plugin != EXPLICIT_PLUGIN and others:
            message += f"; no other configured model can either ({'; '.join(others)})"
        raise CapabilityError(message, missing=tuple(missing))

    def _reroute_order(self, model: str) -> list[str]:
        order = [*self.fallback_chain(model), self.config.routing.default_model,
                 *self.config.models]
        return [name for name in dict.fromkeys(order) if name != model]

    def fallback_chain(self, model: str) -> list[str]:
        """The models tried, in order, when ``model`` fails before its first token: its
        ``fallbacks``, then theirs (depth first), each at most once."""
        return fallback_order(self.config.models, model)


def fallback_order(models: Mapping[str, Any], model: str) -> list[str]:
    """``model``'s fallbacks depth first, each once. Walked with an explicit stack, not by
    recursion: a chain as long as the config has models must not exhaust Python's stack."""
    chain: list[str] = []
    seen = {model}
    stack = [iter(models[model].fallbacks)]
    while stack:
        other = next(stack[-1], None)
        if other is None:
            stack.pop()
        elif other not in seen and other in models:
            seen.add(other)
            chain.append(other)
            stack.append(iter(models[other].fallbacks))
    return chain


def missing_modalities(config: Config, model: str, request: ChatRequest) -> list[str]:
    spec = config.models[model]
    needed = []
    if request.images:
        needed.append("image")
    if request.audio is not None:
        needed.append("audio")
    return [m for m in needed if not spec.supports(m)]


__all__ = ["Router", "RoutingError", "PluginError", "missing_modalities"]
