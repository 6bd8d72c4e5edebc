"""The plugin manager the core's hook facade (``plugins.Hooks``) calls through:
pluggy's, with a call loop that isolates each plugin in the facade's calls."""

from __future__ import annotations

import operator
import sys
from typing import Any, Callable, Mapping, Sequence

import pluggy

from .errors import PluginError

#: The keyword through which a facade's call reaches the plugin manager (see
#: :class:`IsolatingPluginManager`); no implementation names it, so none receives it.
CALL_KWARG = "_sarai_call"


class FacadeCall:
    """How the facade wants a hook called: where failures go, which answers are unusable,
    which exceptions only pass the word on. Calls that need nothing of their own share
    their ``Hooks``'s one (``Hooks._plain``): the hot paths make none."""

    #: ``check(answer)``: why an answer is unusable (None when it is fine); an unusable
    #: answer is skipped like a failure, and the next plugin is asked
    check: Callable[[Any], str | None] | None = None
    #: exceptions that pass the word to the next plugin instead of counting as a failure;
    #: the first is kept in ``refusal``
    passes: type[Exception] | None = None
    refusal: Exception | None = None
    plugin = ""  # the plugin being called, for a collecting hook's ``register``

    def __init__(self, hooks: Any):
        #: the facade (``plugins.Hooks``): its ``plugins.trace`` and ``_failed``
        self.hooks = hooks


_GETTERS: dict[tuple[str, ...], Callable[[Mapping[str, object]], tuple[Any, ...]]] = {}


def _arguments(names: tuple[str, ...]) -> Callable[[Mapping[str, object]], tuple[Any, ...]]:
    """What takes an implementation's arguments (two or more) out of a call's keywords:
    ``operator.itemgetter``, one per argument list, made once (a comprehension per call
    costs a hook call about a fifth of a microsecond)."""
    getter = _GETTERS.get(names)
    if getter is None:
        getter = _GETTERS[names] = operator.itemgetter(*names)
    return getter


class IsolatingPluginManager(pluggy.PluginManager):
    """pluggy's plugin manager, except that a call that comes from the facade (it carries
    ``CALL_KWARG``) runs each implementation on its own: one that raises, or answers
    something the call's ``check`` refuses, is reported to the facade and skipped, and the
    next is asked, where pluggy would stop the whole call at the first exception. Such a
    call answers ``(plugin, answer)`` pairs, so the facade knows who answered: one pair (or
    None) for a ``firstresult`` hook, else a list of them.

    The rest is pluggy's: the hook specs and their argument checks, the call order
    (``tryfirst``/``trylast``, last registered first), ``firstresult``, subset callers, call
    monitoring and tracing, and every call made on ``pm.hook`` directly. The loop sits where
    pluggy keeps its own (``_inner_hookexec``, the step its monitoring wraps).
    """

    def __init__(self, project_name: str):
        super().__init__(project_name)
        self._pluggy_loop = self._inner_hookexec
        self._inner_hookexec = self._isolating_loop

    def _isolating_loop(self, hook_name: str, hook_impls: Sequence[pluggy.HookImpl],
                        caller_kwargs: Mapping[str, object], firstresult: bool) -> Any:
        kwargs = caller_kwargs
        call = kwargs.get(CALL_KWARG)
        if not isinstance(call, FacadeCall):
            return self._pluggy_loop(hook_name, hook_impls, kwargs, firstresult)
        results: list[Any] = []
        trace = call.hooks.plugins.trace
        for impl in reversed(hook_impls):  # pluggy's call order, as in its own loop
            plugin = call.plugin = impl.plugin_name
            try:
                if impl.wrapper or impl.hookwrapper:
                    # refused when discovered; this one was registered in code since
                    raise PluginError("a hook wrapper; sarai-router does not support them")
                names = impl.argnames
                if trace:
                    print(f"[trace] {hook_name} -> {plugin}({', '.join(names)})",
                          file=sys.stderr)
                if impl.kwargnames:  # arguments it gave defaults: those the call has
                    result = impl.function(*[kwargs[name] for name in names],
                                           **{name: kwargs[name] for name in impl.kwargnames
                                              if name in kwargs})
                elif len(names) == 1:  # observe(event), most often: the cheapest call
                    result = impl.function(kwargs[names[0]])
                elif names:
                    result = impl.function(*_arguments(names)(kwargs))
                else:
                    result = impl.function()
            except Exception as exc:
                if call.passes is not None and isinstance(exc, call.passes):
                    call.refusal = call.refusal or exc
                else:
                    call.hooks._failed(hook_name, plugin, exc, kwargs)
                continue
            if trace:
                print(f"[trace] {hook_name} <- {plugin}: {result!r}", file=sys.stderr)
            if result is None:
                continue
            if call.check is not None:
                problem = call.check(result)
                if problem is not None:
                    call.hooks._failed(hook_name, plugin, ValueError(problem), kwargs)
                    continue
            results.append((plugin, result))
            if firstresult:
                break
        if firstresult:
            return results[0] if results else None
        return results
