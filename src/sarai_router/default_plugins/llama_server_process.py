"""One managed ``llama-server`` child process: start, health-wait, log, measure, stop.

The way llama-swap runs llama-server: one process per model on a free port of 127.0.0.1,
ready once ``GET /health`` answers 200 (503 while the model loads), stopped with SIGTERM
and, after a grace period, SIGKILL.

What keeps a child from outliving the router, even a router killed with SIGKILL:

* ``PR_SET_PDEATHSIG`` (Linux): the kernel sends the child SIGTERM when its parent dies.
  The kernel ties it to the *thread* that forked the child, not to the process, and the
  router loads models on short-lived threads (a request's worker, a pre-warm, the server's
  start-up in a thread pool). So every child is forked by one spawner thread that lives as
  long as the process.
* the child runs in a session (and process group) of its own, so a Ctrl-C in the router's
  terminal reaches the router, which stops the child in order, not both at once;
* an ``atexit`` hook stops what is still running at a normal exit (and is the only guard
  where ``prctl`` does not exist).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import http.client
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Sequence

from ..errors import BackendError

log = logging.getLogger("sarai_router.llama_server")

#: What a SIGTERM'd llama-server gets to finish its slots and exit before SIGKILL.
STOP_GRACE_SECONDS = 10.0
#: Lines of the child's output kept, and shown to explain a failed start or a crash.
TAIL_LINES = 25
SHOWN_LINES = 10
#: Between two ``/health`` probes while the model loads.
HEALTH_POLL_SECONDS = 0.05

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved once here: between fork and exec the child should do as little as possible.
_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl: nothing would signal us then.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class _Spawner:
    """One long-lived thread that forks every child (see the module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen], Future]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sarai-llama-spawner",
                                                daemon=True)
                self._thread.start()
        future: Future = Future()
        self._jobs.put((lambda: subprocess.Popen(list(argv), **kwargs), future))
        return future.result()

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller, which raises it
                future.set_exception(exc)


_spawner = _Spawner()
_live: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for server in list(_live):
        server.stop(grace=2.0)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it). Another process may take it before
    the child binds it: the caller retries on a bind failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])(/[^\s'\"/]+)+/([^\s'\"/]+)")


def redact_paths(text: str, known: Sequence[str] = ()) -> str:
    """Absolute paths become their last component, so an error shows the model's file name
    but not where the user keeps their files. ``known`` paths (which may hold spaces) are
    replaced whole first."""
    for path in sorted((p for p in known if p), key=len, reverse=True):
        text = text.replace(path, Path(path).name)
    return _ABSOLUTE_PATH.sub(lambda m: m.group(2), text)


class ServerProcess:
    """A running llama-server child. ``start()`` returns once it is healthy or raises."""

    def __init__(self, label: str, argv: Sequence[str], port: int, *, host: str = "127.0.0.1",
                 private_paths: Sequence[str] = ()):
        self.label = label  # the model's name, in logs and errors
        self.argv = list(argv)
        #: the user's file paths, shown by their last component only
        self.private_paths = tuple(private_paths)
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self._ps = None  # psutil.Process, to tell our child from a process that reused its pid
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._reader: threading.Thread | None = None
        self._stopping = False
        self.ready = False  # /health said 200: an exit from now on is a crash
        self.exited = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- starting ---------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        import psutil

        try:
            self.proc = _spawner.popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()), close_fds=True)
        except OSError as exc:
            raise BackendError(f"model {self.label!r}: could not start llama-server "
                               f"({Path(self.argv[0]).name}): {exc.strerror or exc}") from None
        self.pid = self.proc.pid
        try:
            self._ps = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            self._ps = None
        _live.add(self)
        self._reader = threading.Thread(target=self._read_output,
                                        name=f"sarai-llama-log-{self.label}", daemon=True)
        self._reader.start()
        log.info("started llama-server for model %s (pid %d, port %d)", self.label, self.pid,
                 self.port)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = None
        while True:
            if self.exited.is_set() or self.proc.poll() is not None:
                self._reader.join(timeout=5)  # the last lines explain why
                raise BackendError(
                    f"model {self.label!r}: llama-server exited during start-up "
                    f"({self.exit_text()}); its last output:\n{self.last_output()}")
            status = self._health_status()
            if status == 200:
                self.ready = True
                return
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"model {self.label!r}: llama-server did not become ready within "
                    f"{timeout:.0f} s (GET /health: {status or 'no answer'}); its last "
                    f"output:\n{self.last_output()}")
            self.exited.wait(HEALTH_POLL_SECONDS)

    def _health_status(self) -> int | None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status
        except (OSError, http.client.HTTPException):
            return None  # not listening yet
        finally:
            connection.close()

    def bind_failed(self) -> bool:
        """Whether a failed start was the port being taken (worth a retry on another)."""
        return any("couldn't bind" in line or "address already in use" in line.lower()
                   for line in self.tail)

    # -- while running ----------------------------------------------------------------

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            log.debug("[%s] %s", self.label, line)
        code = self.proc.wait()
        self.exited.set()
        _live.discard(self)
        if self.ready and not self._stopping:
            log.warning("llama-server for model %s (pid %d) exited unexpectedly (%s); the next "
                        "request starts it again. Its last output:\n%s", self.label, self.pid,
                        self.exit_text(code), self.last_output())

    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set() and self.proc.poll() is None

    def rss_mb(self) -> float:
        """The child's resident memory now; 0 once it is gone."""
        import psutil

        if self._ps is None or not self.alive():
            return 0.0
        try:
            return self._ps.memory_info().rss / (1024 * 1024)
        except psutil.Error:
            return 0.0

    def last_output(self) -> str:
        lines = list(self.tail)[-SHOWN_LINES:] or ["(no output)"]
        return "\n".join("  " + redact_paths(line, self.private_paths) for line in lines)

    def exit_text(self, code: int | None = None) -> str:
        code = self.proc.poll() if code is None else code
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    # -- stopping ---------------------------------------------------------------------

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM, then SIGKILL after ``grace``; returns once the process is gone.

        Raises BackendError if the process is still there afterwards (it never should be).
        """
        proc = self.proc
        if proc is None:
            return
        self._stopping = True
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("llama-server for model %s (pid %d) ignored SIGTERM for %.0f s; "
                            "killing it", self.label, proc.pid, grace)
                self._signal(signal.SIGKILL)
                proc.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        _live.discard(self)
        if self._still_there():
            raise BackendError(f"model {self.label!r}: llama-server (pid {proc.pid}) is still "
                               "running after SIGKILL")
        log.info("stopped llama-server for model %s (pid %d, %s)", self.label, proc.pid,
                 self.exit_text())

    def _signal(self, signum: int) -> None:
        # The child leads its own process group: signal the group, in case it forked.
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.proc.send_signal(signum)

    def _still_there(self) -> bool:
        import psutil

        if self._ps is None:
            return False
        try:
            # is_running() compares the start time too: a reused pid is not our child.
            return self._ps.is_running() and self._ps.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
