"""Find llama.cpp's ``llama-server``, or build it from the Python package index and cache it.

There is no llama.cpp package on most distributions, and no wheel on the index carries the
server binary under a permissive licence. The ``llama-cpp-python`` sdist (MIT, llama.cpp
MIT) vendors the whole llama.cpp tree, so the build takes that sdist at the version already
installed here: the server runs the same llama.cpp commit as the in-process backend.

The build is static (``BUILD_SHARED_LIBS=OFF``): the one file copied into the cache needs
only system libraries, so the build tree can be deleted. It is tuned for this CPU
(llama.cpp's default ``GGML_NATIVE``), so the cache records the CPU it was built for and a
cache copied to a different CPU is rebuilt rather than trusted.

Cache layout: ``<cache_dir()>/<llama-cpp-python version>/llama-server`` plus ``build.json``
(what was built, how, and its ``--version`` output). A folder appears there only once
complete (built elsewhere, then renamed into place); a lock file keeps two callers from
building at once.

``sarai-router engines install`` builds if needed and prints the path (``python -m
sarai_router.default_plugins.llama_server_install`` does the same; ``--print`` only prints,
exit 1 if there is none).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

BINARY_NAME = "llama-server"
BINARY_ENV = "SARAI_ROUTER_LLAMA_SERVER"
CACHE_ENV = "SARAI_ROUTER_CACHE_DIR"
DISTRIBUTION = "llama-cpp-python"
MANIFEST = "build.json"
#: llama.cpp's ``cmake_minimum_required``; an older system cmake is passed over for PyPI's.
MIN_CMAKE = (3, 14)
INSTALL_COMMAND = "sarai-router engines install"

#: Only the server, no network at build time (the embedded web UI would be downloaded from a
#: model hub; HTTPS is only for fetching models by URL), static so the binary stands alone.
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_CCACHE=OFF",
)

Reporter = Callable[[str], None]


class LlamaServerError(Exception):
    """Base of this module's errors; the message says what to do next."""


class LlamaServerNotFound(LlamaServerError):
    """A configured llama-server path does not lead to an executable file."""


class LlamaServerBuildError(LlamaServerError):
    """Building llama-server failed (download, configure, compile or check)."""


class BuildToolMissing(LlamaServerBuildError):
    """A tool the build needs is missing; the message names it and how to install it."""


def installed_llama_cpp_version() -> str:
    """The version of the llama-cpp-python distribution installed in this environment."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        raise LlamaServerBuildError(
            f"{DISTRIBUTION} is not installed for {sys.executable}; "
            f"run `{sys.executable} -m pip install {DISTRIBUTION}` first"
        ) from None


def cache_dir() -> Path:
    """``$SARAI_ROUTER_CACHE_DIR/llama-server``, else ``~/.cache/sarai-router/llama-server``."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base).expanduser().absolute() / BINARY_NAME
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "sarai-router" / BINARY_NAME


def version_dir(version: str | None = None) -> Path:
    """Where the build for one llama-cpp-python version lives (default: the installed one)."""
    return cache_dir() / (version or installed_llama_cpp_version())


# -- finding -----------------------------------------------------------------------------------


def find_llama_server(explicit: str | None = None) -> Path | None:
    """The llama-server to run, or None if there is none yet.

    Order: ``explicit`` (a model's ``binary`` key), ``$SARAI_ROUTER_LLAMA_SERVER``,
    ``llama-server`` on ``PATH``, the cached build for the installed llama-cpp-python.
    An explicit path or the env var that leads nowhere raises :class:`LlamaServerNotFound`
    instead of falling through, so a typo is not silently replaced by another binary.
    """
    if explicit:
        return _checked(explicit, f"binary = {explicit!r}")
    env = os.environ.get(BINARY_ENV)
    if env:
        return _checked(env, f"${BINARY_ENV} = {env!r}")
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return Path(on_path)
    try:
        version = installed_llama_cpp_version()
    except LlamaServerBuildError:
        return None
    return cached_llama_server(version)


def _checked(value: str, where: str) -> Path:
    fix = (f"fix it, or remove it and run `{INSTALL_COMMAND}` to build llama-server "
           f"into {cache_dir()}")
    if os.sep not in value:
        # A bare name, like a command line would take it: look it up on PATH.
        found = shutil.which(value)
        if found is None:
            raise LlamaServerNotFound(f"{where}: no program of that name on PATH; {fix}")
        return Path(found)
    path = Path(value).expanduser()
    if not path.exists():
        raise LlamaServerNotFound(f"{where}: no such file; {fix}")
    if not path.is_file():
        raise LlamaServerNotFound(f"{where}: not a file; {fix}")
    if not os.access(path, os.X_OK):
        raise LlamaServerNotFound(
            f"{where}: the file is not executable; run `chmod +x {path}`, or {fix}")
    return path.absolute()


def cached_llama_server(version: str) -> Path | None:
    """The cached build for ``version`` if it is complete and was built for this CPU."""
    folder = cache_dir() / version
    binary = folder / BINARY_NAME
    manifest = read_manifest(folder)
    if manifest is None or not binary.is_file() or not os.access(binary, os.X_OK):
        return None
    if manifest.get("cpu") != cpu_fingerprint():
        return None
    return binary


def read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cpu_fingerprint() -> str:
    """Architecture and instruction-set flags: what a ``-march=native`` build depends on."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        flags = platform.processor()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return f"{platform.machine()}-{digest}"


# -- building ----------------------------------------------------------------------------------


def build_llama_server(
    *,
    report: Reporter = lambda message: None,
    jobs: int | None = None,
    force: bool = False,
    version: str | None = None,
) -> Path:
    """Return the cached llama-server for ``version`` (default: the installed one), building it
    first if needed (or if ``force``). Takes minutes on first use; returns at once after."""
    version = version or installed_llama_cpp_version()
    if not force:
        cached = cached_llama_server(version)
        if cached is not None:
            report(f"llama-server for {DISTRIBUTION} {version} is cached: {cached}")
            return cached
    compilers = _find_compilers()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, report):
        # Whoever held the lock before us may just have built it.
        cached = cached_llama_server(version)
        if cached is not None and not force:
            report(f"llama-server for {DISTRIBUTION} {version} was built meanwhile: {cached}")
            return cached
        _remove_leftovers(root)
        cmake, ninja = _find_build_tools(root, report)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            return _build(version, work, root, cmake=cmake, ninja=ninja, compilers=compilers,
                          jobs=jobs or _cpu_count(), report=report)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _build(version: str, work: Path, root: Path, *, cmake: str, ninja: str,
           compilers: dict[str, str], jobs: int, report: Reporter) -> Path:
    started = time.monotonic()
    sdist = _download_sdist(version, work / "download", report, tools=(cmake, ninja))
    report(f"unpacking {sdist.name}")
    source = _unpack_llama_cpp(sdist, work / "src")
    sdist.unlink()
    build = work / "build"
    log = work / "build.log"
    cmake_args = [*CMAKE_ARGS, f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    report(f"configuring llama.cpp with {cmake}")
    _run_logged([cmake, "-S", str(source), "-B", str(build), "-G", "Ninja", *cmake_args],
                log, root, "cmake configure", env={**os.environ, **compilers})
    report(f"compiling {BINARY_NAME} with {jobs} job(s); this takes a few minutes")
    _run_logged([cmake, "--build", str(build), "--target", BINARY_NAME, "-j", str(jobs)],
                log, root, "cmake --build", env={**os.environ, **compilers}, report=report)
    built = build / "bin" / BINARY_NAME
    if not built.is_file():
        raise LlamaServerBuildError(f"the build finished but made no {built}")
    stage = work / "stage"
    stage.mkdir()
    staged = stage / BINARY_NAME
    shutil.copy2(built, staged)
    # Check the copy with the build tree gone: it must not lean on anything left in there.
    shutil.rmtree(build)
    shutil.rmtree(work / "src")
    version_output = _check_binary(staged)
    manifest = {
        "llama_cpp_python": version,
        "version_output": version_output,
        "cpu": cpu_fingerprint(),
        "cmake_args": cmake_args,
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    final = root / version
    if final.exists():
        os.rename(final, work / "replaced")
    os.replace(stage, final)
    report(f"built {final / BINARY_NAME} in {manifest['build_seconds']:.0f} s "
           f"({version_output.splitlines()[0] if version_output else 'no version line'})")
    return final / BINARY_NAME


def _find_compilers() -> dict[str, str]:
    """The C and C++ compilers cmake will use, checked now rather than minutes into a build."""
    found = {}
    for var, candidates, package in (("CC", ("cc", "gcc", "clang"), "gcc"),
                                     ("CXX", ("c++", "g++", "clang++"), "g++")):
        chosen = os.environ.get(var)
        if chosen:
            if shutil.which(chosen.split()[0]) is None:
                raise BuildToolMissing(
                    f"${var} = {chosen!r} is not an installed program; point {var} at a "
                    f"compiler or unset it (on Debian/Ubuntu: `sudo apt-get install {package}`)")
            found[var] = chosen
            continue
        program = next((shutil.which(name) for name in candidates if shutil.which(name)), None)
        if program is None:
            raise BuildToolMissing(
                f"no {'C++' if var == 'CXX' else 'C'} compiler found (tried "
                f"{', '.join(candidates)}); building llama-server needs one: on Debian/Ubuntu "
                f"`sudo apt-get install {package}`, on Fedora `sudo dnf install "
                f"{'gcc-c++' if var == 'CXX' else 'gcc'}`")
        found[var] = program
    return found


def _find_build_tools(root: Path, report: Reporter) -> tuple[str, str]:
    """cmake and ninja: this system's if recent enough, else the PyPI wheels, installed on
    first need into the cache (not into the user's environment)."""
    cmake = _system_cmake()
    ninja = shutil.which("ninja") or _script_in_env("ninja")
    if cmake and ninja:
        return cmake, ninja
    tools = root / "tools"
    cmake_in_tools = tools / "cmake" / "data" / "bin" / "cmake"
    ninja_in_tools = tools / "bin" / "ninja"
    if not (cmake_in_tools.is_file() and ninja_in_tools.is_file()):
        missing = [name for name, have in (("cmake", cmake), ("ninja", ninja)) if not have]
        report(f"no usable {' or '.join(missing)} on this system; installing the cmake and "
               f"ninja wheels from the Python package index into {tools}")
        staging = Path(tempfile.mkdtemp(prefix=".tools-", dir=root))
        command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-deps", "--only-binary=:all:", "--target", str(staging), "cmake", "ninja"]
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise BuildToolMissing(
                f"{' and '.join(missing)} not found, and installing them from the Python "
                f"package index failed:\n{_tail(result.stderr, 5)}\nInstall them yourself: "
                f"`sudo apt-get install cmake ninja-build` (Debian/Ubuntu) or "
                f"`{sys.executable} -m pip install cmake ninja`")
        if tools.exists():
            shutil.rmtree(tools)
        os.replace(staging, tools)
    return cmake or str(cmake_in_tools), ninja or str(ninja_in_tools)


def _system_cmake() -> str | None:
    for candidate in (shutil.which("cmake"), _script_in_env("cmake")):
        if candidate and _cmake_version(candidate) >= MIN_CMAKE:
            return candidate
    return None


def _script_in_env(name: str) -> str | None:
    """A tool pip installed next to this Python (an unactivated venv is not on PATH)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _cmake_version(cmake: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def _download_sdist(version: str, dest: Path, report: Reporter, *,
                    tools: tuple[str, ...] = ()) -> Path:
    requirement = f"{DISTRIBUTION}=={version}"
    report(f"downloading the {requirement} source distribution from the Python package index")
    dest.mkdir()
    # pip prepares the sdist's metadata in an isolated build environment: its build backend
    # asks for cmake and ninja unless it finds them on PATH, so put ours first. Only
    # llama-cpp-python itself must be a source distribution: with `--no-binary :all:` the
    # backend's own cmake request would be compiled from source too (many minutes).
    tool_dirs = dict.fromkeys(str(Path(tool).parent) for tool in tools)
    path = os.pathsep.join([*tool_dirs, os.environ.get("PATH", "")])
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--no-deps", "--no-binary", DISTRIBUTION, "-d", str(dest), requirement]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PATH": path})
    if result.returncode != 0:
        hint = ""
        if "No module named pip" in result.stderr:
            # Environments made by some tools (uv, venv --without-pip) have no pip.
            hint = f"\nInstall pip into this environment: `{sys.executable} -m ensurepip`"
        raise LlamaServerBuildError(
            f"`pip download {requirement}` failed:\n{_tail(result.stderr, 8)}{hint}")
    found = sorted(dest.glob("*.tar.gz"))
    if not found:
        raise LlamaServerBuildError(f"`pip download {requirement}` gave no .tar.gz sdist")
    return found[0]


def _unpack_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Extract only ``<top>/vendor/llama.cpp`` from the sdist; return that folder."""
    dest.mkdir()
    with tarfile.open(sdist) as archive:
        members = []
        top = None
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1:3] != ("vendor", "llama.cpp"):
                continue
            if member.name.startswith("/") or ".." in parts:
                raise LlamaServerBuildError(f"{sdist.name}: unsafe path {member.name!r}")
            top = parts[0]
            members.append(member)
        if not members:
            raise LlamaServerBuildError(f"{sdist.name} holds no vendor/llama.cpp tree")
        if hasattr(tarfile, "data_filter"):
            archive.extractall(dest, members=members, filter="data")
        else:  # Python without extraction filters; member paths were checked above
            archive.extractall(dest, members=members)
    return dest / top / "vendor" / "llama.cpp"


def _run_logged(command: list[str], log: Path, root: Path, what: str, *,
                env: dict[str, str], report: Reporter | None = None) -> None:
    """Run a build step with its output in ``log``; on failure keep the log and raise."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", env=env)
        assert process.stdout is not None
        shown = -1
        for line in process.stdout:
            out.write(line)
            if report is not None:
                # ninja prints "[done/total] ..."; pass on every tenth of the way.
                match = re.match(r"\[(\d+)/(\d+)\]", line)
                if match and int(match.group(2)):
                    tenth = 10 * int(match.group(1)) // int(match.group(2))
                    if tenth > shown:
                        shown = tenth
                        report(f"  {match.group(1)}/{match.group(2)} build steps")
        code = process.wait()
    if code != 0:
        kept = root / "last-build.log"
        shutil.copyfile(log, kept)
        raise LlamaServerBuildError(
            f"{what} failed (exit {code}); full log in {kept}. Last lines:\n"
            f"{_tail(log.read_text(encoding='utf-8', errors='replace'), 15)}")


def _check_binary(binary: Path) -> str:
    """Run ``--version``; return its output (llama.cpp prints it on stderr)."""
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise LlamaServerBuildError(f"the built {binary.name} does not run: {error}") from None
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or "version" not in output:
        raise LlamaServerBuildError(
            f"the built {binary.name} failed `--version` (exit {result.returncode}):\n"
            f"{_tail(output, 10)}")
    return output


@contextmanager
def _build_lock(root: Path, report: Reporter) -> Iterator[None]:
    """One build at a time per cache, across processes (released if the holder dies)."""
    import fcntl

    with open(root / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"another process is building llama-server in {root}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    """Work folders of builds that were killed; safe to remove while holding the lock."""
    for leftover in (*root.glob(".build-*"), *root.glob(".tools-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sarai_router.default_plugins.llama_server_install",
        description="Print the llama-server binary sarai-router would run, building it from "
                    f"the {DISTRIBUTION} sdist on the Python package index (cached in "
                    f"{cache_dir()}) if there is none.")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="only print the binary found; exit 1 if there is none")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if a cached build exists")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="parallel compile jobs (default: the CPUs this process may use)")
    args = parser.parse_args(argv)

    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.print_only:
            found = find_llama_server()
            if found is None:
                report(f"no llama-server: none in ${BINARY_ENV}, on PATH or in {cache_dir()}; "
                       f"run `{INSTALL_COMMAND}` to build it")
                return 1
        elif args.force:
            found = build_llama_server(report=report, jobs=args.jobs, force=True)
        else:
            found = find_llama_server() or build_llama_server(report=report, jobs=args.jobs)
    except LlamaServerError as error:
        report(f"error: {error}")
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
