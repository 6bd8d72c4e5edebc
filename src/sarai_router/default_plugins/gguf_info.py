"""Read a GGUF file's metadata (no weights loaded) to validate it and estimate its RAM.

RAM = weights (the tensor data, as mapped by llama.cpp) + the KV cache for the configured
``n_ctx`` (f16 keys and values for every layer) + the logits and compute buffers, which
scale with the vocabulary and ``n_batch``. The pool budgets with this before a load, then
with the larger of it and the RSS growth it measured.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from pathlib import Path
from typing import Mapping

import attrs

from ..errors import SaraiError

MB = 1024 * 1024
F16_BYTES = 2
F32_BYTES = 4


class GGUFError(SaraiError):
    """The file is missing, unreadable or not a GGUF model."""


@attrs.frozen
class GGUFInfo:
    path: str
    architecture: str
    file_bytes: int
    tensor_bytes: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    context_length: int
    n_vocab: int
    has_chat_template: bool
    #: the model author's recommended sampling (``general.sampling.*``), by SAMPLING_KEYS name
    sampling: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen
class RamEstimate:
    weights_mb: float
    kv_cache_mb: float
    compute_mb: float

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.kv_cache_mb + self.compute_mb


def read_info(path: str | os.PathLike[str]) -> GGUFInfo:
    file = Path(path)
    try:
        stat = file.stat()
    except FileNotFoundError:
        raise GGUFError(f"model file not found: {file}") from None
    return _read_info_cached(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _read_info_cached(path: str, _mtime_ns: int, file_bytes: int) -> GGUFInfo:
    try:
        fields, data_start = read_header(path)
    except (OSError, ValueError, struct.error, OverflowError, MemoryError, IndexError) as exc:
        # A junk header can ask for offsets or counts past any file (OverflowError).
        raise GGUFError(f"not a readable GGUF file: {path} ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
    try:
        return _info_from_fields(path, file_bytes, fields, data_start)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise GGUFError(f"not a usable GGUF model: {path} (a metadata value has the wrong "
                        f"type: {type(exc).__name__})") from None


def _info_from_fields(path: str, file_bytes: int, fields: dict[str, object],
                      data_start: int) -> GGUFInfo:
    arch = str(fields.get("general.architecture", "unknown"))

    def arch_field(name: str, default=None):
        return fields.get(f"{arch}.{name}", default)

    n_embd = int(arch_field("embedding_length", 0) or 0)
    n_head = int(_scalar(arch_field("attention.head_count", 1)) or 1)
    n_head_kv = int(_scalar(arch_field("attention.head_count_kv", n_head)) or n_head)
    head_dim = n_embd // n_head if n_head else 0
    vocab = arch_field("vocab_size", None) or fields.get("tokenizer.ggml.tokens", 0)
    return GGUFInfo(
        path=path,
        architecture=arch,
        file_bytes=file_bytes,
        tensor_bytes=max(0, file_bytes - data_start),
        n_layer=int(arch_field("block_count", 0) or 0),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=int(arch_field("attention.key_length", head_dim) or head_dim),
        value_length=int(arch_field("attention.value_length", head_dim) or head_dim),
        context_length=int(arch_field("context_length", 0) or 0),
        n_vocab=int(vocab),
        has_chat_template="tokenizer.chat_template" in fields,
        sampling=sampling_from_fields(fields),
    )


#: ``general.sampling.*`` GGUF keys (llama.cpp's gguf-py ``Keys.General.SAMPLING_*``) ->
#: sarai-router's sampling setting. llama.cpp defines no key for presence/frequency penalty.
GGUF_SAMPLING_KEYS: Mapping[str, str] = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
}


def sampling_from_fields(fields: Mapping[str, object]) -> dict[str, float]:
    """The recommended sampling in a GGUF header's fields; values of the wrong type are
    left out (the file's mistake must not break a request)."""
    sampling: dict[str, float] = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        value = fields.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value or value in (float("inf"), float("-inf")):
            continue
        sampling[name] = int(value) if name == "top_k" else float(value)
    return sampling


# GGUF value types -> struct format (8 = string, 9 = array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
GGUF_MAGIC = b"GGUF"


def read_header(path: str) -> tuple[dict[str, object], int]:
    """Parse the GGUF header: metadata (arrays as their length, except short numeric ones)
    and the offset where tensor data starts. Reads only the header, never the weights.

    The ``gguf`` package's reader decodes every token string of the vocabulary, which takes
    ~9 s for Gemma 3's 262k-token vocabulary on this machine; this skips over them instead.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise ValueError("no GGUF magic number at the start of the file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        if n_kv > len(buf) or n_tensors > len(buf):  # junk: every entry takes bytes
            raise ValueError(f"the header claims {n_kv} keys and {n_tensors} tensors, more "
                             "than the file could hold")
        pos = 24
        fields: dict[str, object] = {}

        def read_string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", buf, at)
            at += 8
            return buf[at:at + length].decode("utf-8", errors="replace"), at + length

        def skip_value(kind: int, at: int) -> int:
            if kind == 8:
                (length,) = struct.unpack_from("<Q", buf, at)
                return at + 8 + length
            return at + struct.calcsize(_SCALARS[kind])

        def read_value(kind: int, at: int) -> tuple[object, int]:
            if kind == 8:
                return read_string(at)
            if kind == 9:
                item_kind, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if count > len(buf):
                    raise ValueError(f"an array of {count} items, longer than the file")
                if item_kind in _SCALARS and count <= 1024:
                    fmt = _SCALARS[item_kind]
                    size = struct.calcsize(fmt)
                    items = [struct.unpack_from(fmt, buf, at + i * size)[0] for i in range(count)]
                    return items, at + count * size
                if item_kind in _SCALARS:
                    return count, at + count * struct.calcsize(_SCALARS[item_kind])
                for _ in range(count):
                    at = skip_value(item_kind, at)
                return count, at
            if kind not in _SCALARS:
                raise ValueError(f"unknown GGUF value type {kind}")
            fmt = _SCALARS[kind]
            return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)

        for _ in range(n_kv):
            key, pos = read_string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            value, pos = read_value(kind, pos + 4)
            fields[key] = value
        for _ in range(n_tensors):
            _, pos = read_string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims + 4 + 8
        alignment = int(fields.get("general.alignment", 32) or 32)
        data_start = (pos + alignment - 1) // alignment * alignment
        return fields, data_start


def _scalar(value):
    # Some architectures store per-layer head counts as arrays; the max bounds the cache.
    if isinstance(value, (list, tuple)):
        return max(value) if value else None
    return value


def estimate_ram(info: GGUFInfo, n_ctx: int, n_batch: int) -> RamEstimate:
    kv_per_token = info.n_layer * info.n_head_kv * (info.key_length + info.value_length) * F16_BYTES
    kv_bytes = kv_per_token * n_ctx
    # llama.cpp keeps logits for up to n_batch outputs plus a compute graph of a few
    # activations per batch token; both are f32.
    compute_bytes = info.n_vocab * F32_BYTES * min(n_batch, n_ctx) // 4 + (
        info.n_embd * F32_BYTES * min(n_batch, n_ctx) * 8
    )
    return RamEstimate(
        weights_mb=info.tensor_bytes / MB,
        kv_cache_mb=kv_bytes / MB,
        compute_mb=compute_bytes / MB,
    )
