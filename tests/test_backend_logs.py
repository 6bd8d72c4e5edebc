"""The llama_cpp backend's loads keep the process's own output: real model, real stderr.

llama-cpp-python with ``verbose=False`` points file descriptors 1 and 2 at /dev/null for the
whole process while a model loads, so a log line another thread wrote meanwhile (a server
shutting down during a pre-warm load) was lost. The load runs in a child process here, so
the test reads the real file descriptor 2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import FAST_FILE


LOG_DURING_LOAD = r"""
import logging, sys, threading
from sarai_router.loading import load_config
from sarai_router.default_plugins.llama_cpp import LlamaCppBackend

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s: %(message)s")
loading, logged = threading.Event(), threading.Event()


class HoldTheLoad(logging.Handler):
    # llama.cpp's first log line is written from inside the load: the load waits there
    # until another thread has logged, so that line is written while the load runs.
    def emit(self, record):
        if not loading.is_set():
            loading.set()
            logged.wait(60)


logging.getLogger("llama_cpp").addHandler(HoldTheLoad())


def other_thread():
    loading.wait(60)
    logging.getLogger("sarai_router.server").warning("LINE FROM ANOTHER THREAD DURING THE LOAD")
    sys.stderr.write("PRINTED BY ANOTHER THREAD DURING THE LOAD\n")
    logged.set()


thread = threading.Thread(target=other_thread)
thread.start()
model = LlamaCppBackend().load(load_config(sys.argv[1]).models["fast"])
thread.join(60)
assert loading.is_set() and logged.is_set(), "the load wrote no log line"
model.close()
print("LOADED")
"""


@pytest.mark.models
def test_a_log_line_from_another_thread_during_a_load_reaches_stderr(write_config):
    result = subprocess.run([sys.executable, "-c", LOG_DURING_LOAD, str(write_config())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sarai_router.server: LINE FROM ANOTHER THREAD DURING THE LOAD" in result.stderr
    assert "PRINTED BY ANOTHER THREAD DURING THE LOAD" in result.stderr
    # llama-cpp-python's verbose notes went to the llama_cpp logger, not to stdout.
    assert "llama_cpp: Model metadata:" in result.stderr
    assert result.stdout == "LOADED\n"
    assert FAST_FILE in result.stderr  # llama.cpp's own load lines reached the log too
