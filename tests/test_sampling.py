"""Sampling per model and the runaway guard, on the real models.

Where a setting comes from: the request, else ``[models.NAME]``, else the GGUF's
``general.sampling.*`` keys, else the built-in defaults. The GGUF case uses a copy of the
fast model with those keys written into its header (the default models carry none).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sarai_router.backend import BUILTIN_SAMPLING, GenerationParams
from sarai_router.config import ConfigError
from sarai_router.loading import load_config
from sarai_router.engine import Engine
from sarai_router.default_plugins.gguf_info import read_info
from sarai_router.runaway import RunawayGuard
from sarai_router.serving.metrics import Metrics
from sarai_router.types import ChatRequest

from conftest import FAST_FILE


_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_FLOAT32, GGUF_UINT32 = 6, 4


def with_metadata(source: Path, target: Path, extra: dict[str, float | int]) -> Path:
    """Copy GGUF ``source`` to ``target`` with ``extra`` key/values added to its header
    (floats as float32, ints as uint32); tensor data is moved, not changed."""
    data = source.read_bytes()
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)

    def skip_string(at: int) -> int:
        (length,) = struct.unpack_from("<Q", data, at)
        return at + 8 + length

    def skip_value(kind: int, at: int) -> int:
        if kind == 8:
            return skip_string(at)
        if kind == 9:
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item in _SIZES:
                return at + count * _SIZES[item]
            for _ in range(count):
                at = skip_value(item, at)
            return at
        return at + _SIZES[kind]

    pos, alignment = 24, 32
    for _ in range(n_kv):
        key_end = skip_string(pos)
        key = data[pos + 8:key_end].decode()
        (kind,) = struct.unpack_from("<I", data, key_end)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", data, key_end + 4)
        pos = skip_value(kind, key_end + 4)
    kv_end = pos
    for _ in range(n_tensors):
        pos = skip_string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    infos_end = pos
    data_start = -(-infos_end // alignment) * alignment
    added = b""
    for key, value in extra.items():
        raw = key.encode()
        added += struct.pack("<Q", len(raw)) + raw
        added += (struct.pack("<If", GGUF_FLOAT32, value) if isinstance(value, float)
                  else struct.pack("<II", GGUF_UINT32, value))
    head = (data[:16] + struct.pack("<Q", n_kv + len(extra)) + data[24:kv_end] + added
            + data[kv_end:infos_end])
    head += b"\0" * (-len(head) % alignment)
    target.write_bytes(head + data[data_start:])
    return target


@pytest.fixture(scope="module")
def greedy_gguf(tmp_path_factory, models_dir) -> Path:
    """The fast model recommending top_k 1 (always the likeliest token) and temperature 1.3."""
    return with_metadata(models_dir / FAST_FILE,
                         tmp_path_factory.mktemp("gguf") / "greedy.gguf",
                         {"general.sampling.top_k": 1, "general.sampling.temp": 1.3,
                          "general.sampling.penalty_repeat": 1.05})


def one_model(path: Path, keys: str = "", extra: str = "", max_tokens: int = 12) -> str:
    return f"""
[routing]
default_model = "m"

[plugins.heuristic]
conversation_model = "m"
multimodal_model = "m"

[models.m]
path = "{path.as_posix()}"
n_ctx = 512
max_tokens = {max_tokens}
n_threads = 1
pinned = true
{keys}
{extra}"""


@pytest.fixture
def engine_for(tmp_path):
    engines: list[Engine] = []

    def make(text: str) -> Engine:
        config_file = tmp_path / f"sarai{len(engines)}.toml"
        config_file.write_text(text, encoding="utf-8")
        engine = Engine(load_config(config_file))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def answers(engine: Engine, params: GenerationParams, seeds=(1, 2, 3)) -> set[str]:
    request = ChatRequest.from_prompt("Tell me a short story about a cat.")
    return {engine.complete(request, GenerationParams(**{**params_dict(params), "seed": s})).text
            for s in seeds}


def params_dict(params: GenerationParams) -> dict:
    return {k: getattr(params, k) for k in ("max_tokens", "temperature", "top_k", "top_p")}


# -- where each setting comes from --------------------------------------------------------


def test_gguf_recommended_sampling_is_read_from_the_header(greedy_gguf, models_dir):
    assert read_info(greedy_gguf).sampling == pytest.approx(
        {"top_k": 1, "temperature": 1.3, "repeat_penalty": 1.05})
    assert read_info(models_dir / FAST_FILE).sampling == {}, "the default models carry none"


def test_config_beats_gguf_beats_builtin(engine_for, greedy_gguf, models_dir):
    from_file = engine_for(one_model(greedy_gguf))
    assert from_file.sampling_for("m") == {"top_k": 1, "temperature": pytest.approx(1.3),
                                           "repeat_penalty": pytest.approx(1.05)}
    from_config = engine_for(one_model(greedy_gguf, "top_k = 40\nmin_p = 0.1"))
    sampling = from_config.sampling_for("m")
    assert (sampling["top_k"], sampling["min_p"]) == (40, 0.1)
    assert sampling["temperature"] == pytest.approx(1.3), "what the config leaves, the file gives"
    # Neither says anything: nothing is set, and the llama_cpp backend takes the built-in.
    plain = engine_for(one_model(models_dir / FAST_FILE))
    assert plain.sampling_for("m") == {}
    params = GenerationParams().with_defaults(plain.sampling_for("m"))
    assert params.with_defaults(BUILTIN_SAMPLING).sampling() == BUILTIN_SAMPLING


@pytest.mark.models
def test_gguf_top_k_1_reaches_the_sampler(engine_for, greedy_gguf):
    # The file says top_k 1: whatever the seed, always the likeliest token, even at the
    # temperature 1.3 the file also asks for.
    greedy = engine_for(one_model(greedy_gguf))
    assert len(answers(greedy, GenerationParams(max_tokens=12))) == 1
    # The config overrides the file: top_k 40 at temperature 1.3 gives each seed its own.
    loose = engine_for(one_model(greedy_gguf, "top_k = 40"))
    assert len(answers(loose, GenerationParams(max_tokens=12))) > 1


@pytest.mark.models
def test_the_request_overrides_the_model_defaults(engine_for, greedy_gguf):
    loose = engine_for(one_model(greedy_gguf, "top_k = 40\ntemperature = 2.0"))
    assert len(answers(loose, GenerationParams(max_tokens=12))) > 1
    assert len(answers(loose, GenerationParams(max_tokens=12, temperature=0.0))) == 1
    assert len(answers(loose, GenerationParams(max_tokens=12, top_k=1))) == 1


def test_sampling_keys_out_of_range_are_config_errors(tmp_path, models_dir):
    config_file = tmp_path / "bad.toml"
    config_file.write_text(one_model(models_dir / FAST_FILE,
                                     "top_p = 1.5\nrepeat_penalty = -1.0\ntemperature = 'hot'"),
                           encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    text = str(info.value)
    assert "models.m.top_p: must be between 0 and 1, got 1.5" in text
    assert "models.m.repeat_penalty: must be between 0 and 10, got -1.0" in text
    assert "models.m.temperature" in text


# -- the runaway guard ---------------------------------------------------------------------


def feed_all(guard: RunawayGuard, text: str, step: int = 3) -> int | None:
    """Feed ``text`` in pieces; the offset where the guard tripped, or None."""
    for at in range(0, len(text), step):
        if guard.feed(text[at:at + step]):
            return at
    return None


def test_guard_trips_on_a_passage_repeated_in_a_row():
    guard = RunawayGuard(min_chars=16, max_chars=400, repeats=4)
    at = feed_all(guard, "Eso es la raza de los perros. " * 10)
    assert at is not None and at < 30 * 4 + 3
    assert "Eso es la raza de los perros." in guard.reason


def test_guard_trips_on_a_numbered_line_repeated():
    text = "".join(f"{n}. Eso es la raza de los perros.\n" for n in range(1, 8))
    guard = RunawayGuard(min_chars=16, repeats=4)
    assert feed_all(guard, text) is not None
    assert "came 4 times" in guard.reason


def test_guard_trips_on_a_short_list_item_repeated_twice_as_often():
    text = "".join(f"{n}. Erocer\n" for n in range(1, 12))
    guard = RunawayGuard(min_chars=16, repeats=4)
    assert feed_all(guard, text) is not None
    assert "'Erocer' came 8 times" in guard.reason


def test_guard_trips_on_sentences_that_come_back_in_varied_paragraphs():
    # Seen from the fast model: the same two sentences again and again, the line around
    # them changing a little, never four identical lines in a row.
    text = "".join(f"{start} blindingo por el nazio-fuego, sí. Estás fracasajos a ceros de "
                   f"ojimito. Los niros debemos ser difiables{end}\n"
                   for start, end in [("La vida es", "."), ("El mundo esta", " y alto."),
                                      ("La vida es", " y alto."), ("El mundo", ".")])
    guard = RunawayGuard(min_chars=16, repeats=4)
    assert feed_all(guard, text) is not None
    assert "came 4 times" in guard.reason


def test_a_line_of_exactly_min_chars_counts_as_a_sentence():
    """A numbered line whose text is exactly ``min_chars`` long trips at ``repeats``; a
    shorter one is a short list item (twice as many)."""
    line = "Los perros ladran"[:16]
    assert len(line) == 16
    text = "".join(f"{n}. {line}\n" for n in range(1, 6))
    guard = RunawayGuard(min_chars=16, repeats=4)
    assert feed_all(guard, text) is not None
    assert "came 4 times" in guard.reason
    shorter = "".join(f"{n}. {line[:15]}\n" for n in range(1, 6))
    assert feed_all(RunawayGuard(min_chars=16, repeats=4), shorter) is None


def test_a_passage_of_exactly_min_chars_repeated_in_a_row_trips():
    unit = "perro gato loro "  # no sentence end: only the passage check can see it
    assert len(unit) == 16
    guard = RunawayGuard(min_chars=16, max_chars=400, repeats=4)
    assert feed_all(guard, unit * 4, step=1) is not None
    assert "came 4 times in a row" in guard.reason


@pytest.mark.parametrize("text", [
    ", ".join(str(n) for n in range(300)),                       # counting is not a loop
    "| --- " * 12 + "|\n",                                       # a table rule
    "jajaja, ¡qué gracioso! " + "ja" * 6,                        # short laughter
    "El perro corre. El gato duerme. El pájaro canta. El pez nada. " * 1,
    "def f(x):\n    return x\n\ndef g(x):\n    return x\n",     # short lines may repeat
    "Ingredientes:\n- 2 huevos\n- 1 taza de leche\n- 1 taza de harina\n- sal\n- azúcar\n"
    "Pasos:\n1. Bate los huevos.\n2. Añade la leche.\n3. Añade la harina.\n",
])
def test_guard_leaves_ordinary_text_alone(text):
    assert feed_all(RunawayGuard(), text) is None


#: At temperature 0 without a repeat penalty the fast model answers "... Dogs are a symbol of
#: family and a symbol of love." over and over, up to max_tokens.
LOOP_PROMPT = "Tell me about dogs."


@pytest.mark.models
def test_guard_stops_a_real_loop_and_says_so(engine_for, models_dir):
    # Without the guard the loop runs to max_tokens; with it, it stops and says why.
    unguarded = engine_for(one_model(models_dir / FAST_FILE, "", "[generation]\nrunaway_guard = false",
                                     max_tokens=200))
    params = GenerationParams(temperature=0.0, max_tokens=200)
    looped = unguarded.complete(ChatRequest.from_prompt(LOOP_PROMPT), params)
    assert looped.finish_reason == "length" and looped.usage.completion_tokens == 200, looped.text
    guarded = engine_for(one_model(models_dir / FAST_FILE, max_tokens=200))
    metrics = Metrics(guarded.pool, guarded.hooks)
    stopped = guarded.complete(ChatRequest.from_prompt(LOOP_PROMPT), params)
    assert stopped.stopped_by == "runaway_guard"
    assert stopped.finish_reason == "stop"
    # Same start as the loop (temperature 0), cut once the loop had come four times.
    assert 0 < stopped.usage.completion_tokens < looped.usage.completion_tokens
    assert stopped.text and looped.text.startswith(stopped.text)
    print(f"loop: {looped.usage.completion_tokens} tokens unguarded, "
          f"{stopped.usage.completion_tokens} with the guard")
    assert 'sarai_runaway_stops_total{model="m"} 1.0' in metrics.render().decode()
    # Per model: this one keeps its loops.
    off = engine_for(one_model(models_dir / FAST_FILE, "runaway_guard = false",
                               max_tokens=200))
    assert off.complete(ChatRequest.from_prompt(LOOP_PROMPT), params).stopped_by is None
