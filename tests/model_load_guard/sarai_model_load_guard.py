"""Fails a test that loads a real model without the ``models`` marker.

While a test not marked ``models`` runs, ``$SARAI_ROUTER_TEST_FORBID_LOADS`` names a file.
Every model load in this process, or in a process it starts (this folder's
``sitecustomize.py`` installs the same guard there), then writes one line to that file and
fails instead of loading; the conftest reads the file when the test ends and fails the test.
So ``pytest -m "not models"`` loads no model at all.

A model load is any of:

* a GGUF through the ``llama_cpp`` backend, or any ``llama_cpp.Llama`` at all (``python -m
  llama_cpp.server`` among them);
* a ``llama-server`` child started for a model;
* the speech model: ``faster_whisper.WhisperModel``, and the ``whisper`` plugin handing out
  a model (a model another test loaded stays cached in the process: using it counts too).

``llama_cpp`` and ``faster_whisper`` are patched when they are imported, not here: importing
them in every child process would slow each one down.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Callable

ENV = "SARAI_ROUTER_TEST_FORBID_LOADS"
_installed = False


def forbidden(what: str) -> str | None:
    """Record ``what`` and return the error message while loads are forbidden; else None."""
    record = os.environ.get(ENV)
    if not record:
        return None
    with open(record, "a", encoding="utf-8") as out:
        out.write(f"pid {os.getpid()} {what}\n")
    return f"{what}: this test loads a model but is not marked `models` (tests/model_load_guard)"


def _guard_method(cls, name: str, describe: Callable[..., str], error: type[Exception]) -> None:
    real = getattr(cls, name)
    if getattr(real, "_sarai_guarded", False):
        return

    def guarded(self, *args, **kwargs):
        message = forbidden(describe(self, *args, **kwargs))
        if message is not None:
            raise error(message)
        return real(self, *args, **kwargs)

    guarded._sarai_guarded = True
    setattr(cls, name, guarded)


def _guard_class(cls, describe: Callable[..., str], error: type[Exception]) -> None:
    """Refuse to make an instance at all (``__new__``): a half-made one would fail again in
    its ``__del__``."""
    if cls.__dict__.get("_sarai_guarded"):
        return
    real_new = cls.__new__

    def guarded_new(klass, *args, **kwargs):
        message = forbidden(describe(*args, **kwargs))
        if message is not None:
            raise error(message)
        if real_new is object.__new__:
            return real_new(klass)
        return real_new(klass, *args, **kwargs)

    cls.__new__ = staticmethod(guarded_new)
    cls._sarai_guarded = True


def _first(name: str, args, kwargs) -> str:
    return str(kwargs.get(name, args[0] if args else "?"))


def _guard_llama(module) -> None:
    _guard_class(module.Llama, lambda *args, **kwargs: "loaded llama_cpp.Llama("
                 f"{_first('model_path', args, kwargs)})", ValueError)


def _guard_faster_whisper(module) -> None:
    _guard_class(module.WhisperModel, lambda *args, **kwargs: "loaded "
                 f"faster_whisper.WhisperModel({_first('model_size_or_path', args, kwargs)})",
                 RuntimeError)


def _guard_whisper_plugin(module) -> None:
    real = module.load_model
    if getattr(real, "_sarai_guarded", False):
        return

    def guarded(settings, config):
        message = forbidden(f"used the speech model ({settings.model})")
        if message is not None:
            raise module.TranscriptionUnavailable(message)
        return real(settings, config)

    guarded._sarai_guarded = True
    module.load_model = guarded


def _guard_llama_server(module) -> None:
    from sarai_router.backend import BackendError

    _guard_method(module.ServerProcess, "start",
                  lambda self, *args, **kwargs: f"started llama-server for {self.label!r}",
                  BackendError)


def _guard_llama_cpp_backend(module) -> None:
    from sarai_router.backend import BackendError

    _guard_method(module.LlamaCppBackend, "load",
                  lambda self, spec: f"loaded model {spec.name!r} ({spec.path})", BackendError)


#: module -> what guards it, applied as soon as the module is imported
GUARDS: dict[str, Callable] = {
    "llama_cpp.llama": _guard_llama,
    "faster_whisper.transcribe": _guard_faster_whisper,
    "sarai_router.default_plugins.whisper": _guard_whisper_plugin,
    "sarai_router.default_plugins.llama_server_process": _guard_llama_server,
    "sarai_router.default_plugins.llama_cpp": _guard_llama_cpp_backend,
}


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Applies a module's guard right after the module runs, whoever imports it."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in GUARDS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            GUARDS[fullname](module)

        # One loader object may serve several modules: wrap this spec's own copy.
        spec.loader = _Loader(loader, exec_module)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, real, exec_module):
        self._real = real
        self.exec_module = exec_module

    def create_module(self, spec):
        return self._real.create_module(spec)

    def __getattr__(self, name):
        return getattr(self._real, name)


def install() -> None:
    global _installed
    if _installed:
        return
    for name, guard in GUARDS.items():
        module = sys.modules.get(name)
        if module is not None:
            guard(module)
    sys.meta_path.insert(0, _GuardOnImport())
    _installed = True
