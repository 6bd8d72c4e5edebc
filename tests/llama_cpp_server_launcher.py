"""``python -m llama_cpp.server`` with llama.cpp's weight repacking decided as sarai-router's
own GGUF backends decide it: off on CPUs with Intel AMX, whose kernels crash the process at
the first decode (see ``default_plugins.gguf_backend.repack_weights``). llama_cpp.server has
no option for it, so the default model parameters are wrapped before it starts.

Run as ``python tests/llama_cpp_server_launcher.py [llama_cpp.server arguments]``.
"""

from __future__ import annotations

import runpy
import sys

import llama_cpp

from sarai_router.default_plugins.gguf_backend import repack_weights

_defaults = llama_cpp.llama_cpp.llama_model_default_params


def _model_defaults():
    params = _defaults()
    params.use_extra_bufts = repack_weights(None)
    return params


llama_cpp.llama_cpp.llama_model_default_params = _model_defaults
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
