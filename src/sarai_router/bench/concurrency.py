"""Concurrent streams through the router against the engine called directly.

``run_concurrency(...)`` starts ``sarai-router serve`` as a child process on 127.0.0.1 (so
its CPU time is its own), sends N concurrent streamed requests through it with httpx, and,
when the model is a remote endpoint, the same requests straight to that endpoint with the
same client. It reports aggregate tok/s, TTFT percentiles, errors, the ratio, the router's
CPU time per proxied request and per relayed token, and the proxy overhead: paired
one-at-a-time requests, router and direct alternately, the median of their latency
differences.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Mapping

import attrs


@attrs.define
class StreamRun:
    """N concurrent streams against one target."""

    target: str
    concurrency: int
    requests: int
    errors: int = 0
    error_samples: list[str] = attrs.field(factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    ttfts: list[float] = attrs.field(factory=list)
    latencies: list[float] = attrs.field(factory=list)
    cpu_s: float | None = None  # the router's CPU time over the run

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        done = self.requests - self.errors
        return {
            "target": self.target, "concurrency": self.concurrency, "requests": self.requests,
            "errors": self.errors, "error_samples": self.error_samples[:3],
            "tokens": self.tokens, "wall_s": round(self.wall_s, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "ttft_s": percentiles(self.ttfts), "latency_s": percentiles(self.latencies),
            "router_cpu_s": None if self.cpu_s is None else round(self.cpu_s, 3),
            "router_cpu_ms_per_request": None if self.cpu_s is None or not done
            else round(1000 * self.cpu_s / done, 3),
            # what the relay costs for each token it passes on (the figure regressions move)
            "router_cpu_ms_per_token": None if self.cpu_s is None or not self.tokens
            else round(1000 * self.cpu_s / self.tokens, 4),
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": round(statistics.median(ordered), 4), "p95": at(0.95), "p99": at(0.99)}


@attrs.frozen
class Target:
    """Where a chat-completions request goes, and how."""

    name: str
    url: str
    headers: Mapping[str, str]
    model: str


async def _one(client, target: Target, body: dict[str, Any], run: StreamRun) -> float | None:
    """Stream one answer; record its TTFT and tokens. Returns its latency (None on error)."""
    import json

    started = time.perf_counter()
    first = None
    pieces = 0
    usage = None
    try:
        async with client.stream("POST", target.url, json={**body, "model": target.model},
                                 headers=dict(target.headers)) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                raise RuntimeError(f"HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:200])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        pieces += 1
                        if first is None:
                            first = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - counted, and a sample kept
        run.errors += 1
        run.error_samples.append(f"{type(exc).__name__}: {exc}")
        return None
    latency = time.perf_counter() - started
    run.tokens += int(usage["completion_tokens"]) if usage else pieces
    if first is not None:
        run.ttfts.append(first)
    run.latencies.append(latency)
    return latency


async def _streams(target: Target, body: dict[str, Any], concurrency: int, requests: int,
                   cpu_of: int | None = None) -> StreamRun:
    import httpx

    run = StreamRun(target=target.name, concurrency=concurrency, requests=requests)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    remaining = iter(range(requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits,
                                 trust_env=False) as client:
        async def worker() -> None:
            for _ in remaining:
                await _one(client, target, body, run)

        cpu_before = _cpu(cpu_of)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - started
        if cpu_of is not None:
            run.cpu_s = _cpu(cpu_of) - cpu_before
    return run


async def _paired(router: Target, direct: Target, body: dict[str, Any],
                  pairs: int) -> dict[str, Any]:
    """One request at a time, router and direct alternately: the router's added latency."""
    import httpx

    scratch = StreamRun(target="paired", concurrency=1, requests=2 * pairs)
    differences, ttft_differences = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), trust_env=False) as client:
        for i in range(pairs):
            order = (router, direct) if i % 2 == 0 else (direct, router)
            measured = {}
            for target in order:
                before = len(scratch.ttfts)
                latency = await _one(client, target, body, scratch)
                ttft = scratch.ttfts[-1] if len(scratch.ttfts) > before else None
                measured[target.name] = (latency, ttft)
            (r_lat, r_ttft), (d_lat, d_ttft) = measured[router.name], measured[direct.name]
            if r_lat is not None and d_lat is not None:
                differences.append(r_lat - d_lat)
            if r_ttft is not None and d_ttft is not None:
                ttft_differences.append(r_ttft - d_ttft)
    return {
        "pairs": pairs, "errors": scratch.errors,
        "median_added_latency_ms": round(1000 * statistics.median(differences), 3)
        if differences else None,
        "median_added_ttft_ms": round(1000 * statistics.median(ttft_differences), 3)
        if ttft_differences else None,
    }


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouterProcess:
    """``sarai-router serve`` as a child on a free 127.0.0.1 port."""

    def __init__(self, config_path: str | None, *, startup_seconds: float = 180.0):
        self.port = _free_port()
        args = [sys.executable, "-m", "sarai_router"]
        if config_path:
            args += ["--config", config_path]
        args += ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env={**os.environ})
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait(startup_seconds)

    def _wait(self, seconds: float) -> None:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"sarai-router serve exited with {self.process.returncode}:"
                                   f"\n{err}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"sarai-router serve did not answer within {seconds:.0f} s")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def direct_target(config, model: str) -> tuple[Target | None, Any]:
    """The engine behind ``model`` called directly, when its loaded model can say where
    (``direct_target()``: a remote endpoint); also the loaded model, to close."""
    from ..plugins import Hooks, build_plugins

    spec = config.models[model]
    hooks = Hooks(config.plugin_set or build_plugins(config), config)
    backend = hooks.backend(spec.backend)
    if not backend.async_chat(spec):
        return None, None
    loaded = backend.load(spec)
    where = getattr(loaded, "direct_target", None)
    if where is None:
        loaded.close()
        return None, None
    url, headers, name = where()
    return Target(name="direct", url=url, headers=headers, model=name), loaded


def _merge(runs: list[StreamRun]) -> StreamRun:
    """Several runs of one target as one: tokens and wall time added up."""
    merged = StreamRun(target=runs[0].target, concurrency=runs[0].concurrency,
                       requests=sum(r.requests for r in runs))
    for run in runs:
        merged.errors += run.errors
        merged.error_samples += run.error_samples
        merged.tokens += run.tokens
        merged.wall_s += run.wall_s
        merged.ttfts += run.ttfts
        merged.latencies += run.latencies
        if run.cpu_s is not None:
            merged.cpu_s = (merged.cpu_s or 0.0) + run.cpu_s
    return merged


def run_concurrency(config, config_path: str | None, model: str, *, concurrency: int,
                    requests: int, max_tokens: int, prompt: str, pairs: int, rounds: int = 2,
                    report=lambda message: None) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    direct, loaded = direct_target(config, model)
    report(f"starting sarai-router serve for {model} ...")
    router_process = RouterProcess(config_path)
    router = Target(name="router", url=router_process.url + "/v1/chat/completions",
                    headers={}, model=model)
    result: dict[str, Any] = {"model": model, "concurrency": concurrency,
                              "requests": requests, "max_tokens": max_tokens}
    try:
        # A burst first, not counted, through each: a lazy load, new pooled connections
        # and first-time code paths are not the steady state being measured.
        targets = [router] + ([direct] if direct is not None else [])
        for target in targets:
            asyncio.run(_streams(target, body, concurrency, concurrency))
        # Rounds alternate which target goes first, so that a machine whose load drifts
        # (other work, thermal) favours neither; the figures add the rounds up.
        runs: dict[str, list[StreamRun]] = {t.name: [] for t in targets}
        per_round = max(1, requests // rounds)
        for index in range(rounds):
            for target in targets if index % 2 == 0 else targets[::-1]:
                report(f"round {index + 1}/{rounds}: {concurrency} concurrent streams "
                       f"to the {'router' if target is router else 'endpoint directly'} ...")
                runs[target.name].append(asyncio.run(_streams(
                    target, body, concurrency, per_round,
                    cpu_of=router_process.process.pid if target is router else None)))
        result["requests"] = per_round * rounds
        result["rounds"] = rounds
        result["router"] = _merge(runs["router"]).to_dict()
        if direct is not None:
            result["direct"] = _merge(runs["direct"]).to_dict()
            r, d = result["router"], result["direct"]
            result["ratio"] = {
                "tokens_per_second": round(r["tokens_per_second"] / d["tokens_per_second"], 3)
                if d["tokens_per_second"] else None,
                "ttft_p50": round(r["ttft_s"]["p50"] / d["ttft_s"]["p50"], 3)
                if r["ttft_s"]["p50"] and d["ttft_s"]["p50"] else None,
            }
            if pairs:
                report(f"{pairs} paired one-at-a-time requests (proxy overhead) ...")
                result["overhead"] = asyncio.run(_paired(router, direct, body, pairs))
        else:
            result["direct"] = None
    finally:
        router_process.close()
        if loaded is not None:
            loaded.close()
    return result


def format_concurrency(result: Mapping[str, Any]) -> str:
    lines = [f"model {result['model']}: {result['requests']} streamed requests of "
             f"{result['max_tokens']} tokens, {result['concurrency']} at a time, in "
             f"{result.get('rounds', 1)} alternating rounds"]
    header = f"{'':8} {'tok/s':>8} {'TTFT p50':>9} {'p95':>8} {'p99':>8} {'errors':>7}"
    lines.append(header)
    for key in ("router", "direct"):
        row = result.get(key)
        if not row:
            continue
        t = row["ttft_s"]

        def fmt(v):
            return "-" if v is None else f"{v:.3f}s"

        lines.append(f"{key:8} {row['tokens_per_second']:>8.1f} {fmt(t['p50']):>9} "
                     f"{fmt(t['p95']):>8} {fmt(t['p99']):>8} {row['errors']:>7}")
    ratio = result.get("ratio")
    if ratio:
        lines.append(f"router/direct: tok/s x{ratio['tokens_per_second']}, "
                     f"TTFT p50 x{ratio['ttft_p50']}")
    router = result["router"]
    if router.get("router_cpu_ms_per_request") is not None:
        per_token = router.get("router_cpu_ms_per_token")
        lines.append(f"router CPU: {router['router_cpu_ms_per_request']:.2f} ms per request, "
                     + ("" if per_token is None else f"{per_token:.3f} ms per token ")
                     + f"({router['router_cpu_s']:.2f} s over the run)")
    overhead = result.get("overhead")
    if overhead:
        lines.append(f"proxy overhead (median of {overhead['pairs']} paired requests): "
                     f"{overhead['median_added_latency_ms']} ms latency, "
                     f"{overhead['median_added_ttft_ms']} ms TTFT")
    for sample in router.get("error_samples", []):
        lines.append(f"error: {sample}")
    return "\n".join(lines)
