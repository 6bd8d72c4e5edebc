"""Fails a test that loads a real model without the ``models`` marker.

While a test not marked ``models`` runs, ``$SARAI_ROUTER_TEST_FORBID_LOADS`` names a file.
Every llama_cpp model load in this process, or in a process it starts (this folder's
``sitecustomize.py`` installs the same guard there), then writes one line to that file and
fails instead of loading; the conftest reads the file when the test ends and fails the test.
So ``pytest -m "not models"`` loads no model at all.
"""

from __future__ import annotations

import os

ENV = "SARAI_ROUTER_TEST_FORBID_LOADS"
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from sarai_router.backend import BackendError
    from sarai_router.default_plugins.llama_cpp import LlamaCppBackend

    real_load = LlamaCppBackend.load

    def guarded_load(self, spec):
        record = os.environ.get(ENV)
        if record:
            with open(record, "a", encoding="utf-8") as out:
                out.write(f"pid {os.getpid()} loaded model {spec.name!r} ({spec.path})\n")
            raise BackendError(f"model {spec.name!r}: this test loads a model but is not "
                               "marked `models` (tests/model_load_guard)")
        return real_load(self, spec)

    LlamaCppBackend.load = guarded_load
    _installed = True
