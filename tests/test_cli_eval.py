"""``sarai-router eval`` through the CLI: agreement with ``route``, the report, bad input,
calibration's snippet. No model is loaded (routing reads text; the cost reads GGUF headers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sarai_router.cli import cli
from sarai_router.types import message_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EVAL = Path(__file__).resolve().parent.parent / "eval"
EVAL_CONFIG = str(EVAL / "eval.toml")


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_usage_error(result, *fragments: str) -> str:
    """Exit 2, ``Error: ...`` naming every fragment, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result.output


def small_case_file(tmp_path: Path, n: int = 24) -> Path:
    """Every kind of case from the test split, at most ``n``, in a file of its own."""
    lines = (EVAL / "routing-test.jsonl").read_text(encoding="utf-8").splitlines()
    picked, kinds = [], {}
    for line in lines:
        kind = json.loads(line).get("kind")
        if kinds.get(kind, 0) < 3:
            kinds[kind] = kinds.get(kind, 0) + 1
            picked.append(line)
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(picked[:n]) + "\n", encoding="utf-8")
    # media paths are relative to the case file's folder
    (tmp_path / "fixtures").symlink_to(EVAL / "fixtures")
    return path


@pytest.mark.models
def test_eval_json_agrees_with_route_json_case_by_case():
    """Every case of the test split: the model `eval --json` chose is the one `route --json`
    chooses for the same text and attachments (a `messages` case: its latest user turn, which
    is what the router reads)."""
    cases_file = EVAL / "routing-test.jsonl"
    result = run("--config", EVAL_CONFIG, "eval", "--json", str(cases_file))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    missed = {m["line"]: m["chosen"] for m in report["misses"]}
    lines = cases_file.read_text(encoding="utf-8").splitlines()
    assert report["cases"] == len(lines)
    checked = set()
    for number, line in enumerate(lines, start=1):
        case = json.loads(line)
        text = case.get("prompt")
        if text is None:
            text = message_text(next(m for m in reversed(case["messages"])
                                     if m["role"] == "user"))
        media = [a for p in case.get("images", []) for a in ("--image", str(EVAL / p))]
        if "audio" in case:
            media += ["--audio", str(EVAL / case["audio"])]
        routed = run("--config", EVAL_CONFIG, "route", "--json", *media, text)
        assert routed.exit_code == 0, routed.output
        chosen = json.loads(routed.stdout)["model"]
        assert missed.get(number, case["expect"]) == chosen, (number, text)
        checked.add(chosen)
    assert checked == {"fast", "quality"}  # both models were chosen somewhere


def test_eval_text_report_has_every_part(tmp_path):
    cases = tmp_path / "mine.jsonl"
    cases.write_text(
        '{"prompt": "Me siento muy triste hoy", "expect": "quality"}\n'
        '{"prompt": "Explain the CAP theorem", "expect": "quality"}\n'
        '{"prompt": "I\'m so lonely tonight", "expect": "fast"}\n', encoding="utf-8")
    result = run("--config", EVAL_CONFIG, "eval", str(cases))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "accuracy: 66.7% (2/3)" in out
    assert "precision" in out and "recall" in out
    assert "confusion (rows: expected, columns: chosen)" in out
    # the miss, with the plugin that decided and its reason
    assert ("line 1: expected quality, chose fast (heuristic: short emotional conversation"
            in out)
    # the cost against each single model
    for strategy in ("routed", "all fast", "all quality"):
        assert f"\n{strategy} " in out


@pytest.mark.models
def test_eval_json_has_the_documented_keys(tmp_path):
    result = run("--config", EVAL_CONFIG, "eval", "--json", str(small_case_file(tmp_path)))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"accuracy", "cases", "correct", "confusion", "models", "misses", "cost",
            "by_kind", "by_lang"} <= set(report)
    assert sum(sum(row.values()) for row in report["confusion"].values()) == report["cases"]
    assert report["cost"]["routed"]["requests"] == report["cases"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "hola", "expect": "fast"', "not valid JSON"),
        ('{"prompt": "hola"}', 'missing "expect"'),
        ('{"prompt": "hola", "expect": "turbo"}', "unknown model 'turbo'"),
        ('{"prompt": "mira", "images": ["nope.png"], "expect": "quality"}', "cannot read"),
    ],
)
def test_a_bad_line_exits_2_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"prompt": "Hola", "expect": "fast"}\n\n' + line + "\n", encoding="utf-8")
    out = assert_usage_error(run("--config", EVAL_CONFIG, "eval", str(path)),
                             f"Error: {path}:3: ", message)
    assert out.count("\n") == 1  # one line, nothing else


def test_missing_file_and_bad_options_are_usage_errors(tmp_path):
    assert_usage_error(run("eval", str(tmp_path / "none.jsonl")), "none.jsonl: file not found")
    cases = small_case_file(tmp_path)
    assert_usage_error(run("eval", str(cases), "--target", "latency"),
                       "--target applies to --calibrate")
    assert_usage_error(run("eval", str(cases), "--plot", str(tmp_path / "x.png")),
                       "--plot applies to --calibrate")
    assert_usage_error(run("eval", str(cases), "--calibrate", "--min-accuracy", "0.9"),
                       "--min-accuracy applies to --target latency")
    bad = tmp_path / "bench.json"
    bad.write_text("not json", encoding="utf-8")
    assert_usage_error(run("eval", str(cases), "--bench-report", str(bad)),
                       "--bench-report", "is not JSON")
    assert_usage_error(run("eval", str(cases), "--bench-report", str(tmp_path / "no.json")),
                       "no.json: file not found")


@pytest.mark.models
def test_bench_report_figures_replace_the_estimate(tmp_path):
    report = {"models": {"fast": {"mean_tokens_per_second": 12.5,
                                  "memory": {"load_s": 0.2, "load_delta_mb": 150.0}}}}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(report), encoding="utf-8")
    result = run("--config", EVAL_CONFIG, "eval", "--json", "--bench-report", str(bench),
                 str(small_case_file(tmp_path)))
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["cost"]["models"]
    assert models["fast"]["tokens_per_second"] == 12.5
    assert models["fast"]["source"] == "measured (bench report)"
    assert models["quality"]["source"] == "estimate (model file)"


@pytest.mark.models
def test_calibrate_prints_a_snippet_that_config_check_accepts(tmp_path, write_config):
    cases = small_case_file(tmp_path)
    result = run("--config", EVAL_CONFIG, "eval", "--calibrate", str(cases))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "threshold  max_chars  accuracy" in out  # the curve
    snippet = out[out.index("[plugins.heuristic]"):]
    table = tomllib.loads(snippet)["plugins"]["heuristic"]
    assert set(table) == {"empathy_threshold", "max_chars"}
    assert f"empathy_threshold {table['empathy_threshold']}, max_chars {table['max_chars']}" in out
    config = write_config(snippet)
    checked = run("config", "check", str(config))
    assert checked.exit_code == 0, checked.output
    # and the JSON form carries the same snippet and the whole curve
    as_json = json.loads(run("--config", EVAL_CONFIG, "eval", "--calibrate", "--json",
                             str(cases)).stdout)
    assert as_json["toml"] == snippet.rstrip("\n") + "\n"
    assert len(as_json["curve"]) > 100 and as_json["target"] == "accuracy"


@pytest.mark.models
def test_calibrate_for_latency_with_a_plot(tmp_path):
    cases = small_case_file(tmp_path)
    png = tmp_path / "curve.png"
    result = run("--config", EVAL_CONFIG, "eval", "--calibrate", "--target", "latency",
                 "--min-accuracy", "0.8", "--plot", str(png), str(cases))
    assert result.exit_code == 0, result.output
    assert "target: latency (accuracy >= 80%)" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_bench_extra(tmp_path, monkeypatch):
    # A forced fault: matplotlib is installed here, so hide it to see the message.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert_usage_error(run("eval", str(small_case_file(tmp_path)), "--calibrate", "--plot",
                           str(tmp_path / "c.png")),
                       "--plot needs matplotlib", "sarai-router[bench]")
    assert not (tmp_path / "c.png").exists()


def test_help_lists_the_options():
    result = run("eval", "--help")
    assert result.exit_code == 0
    for option in ("--json", "--calibrate", "--target", "--min-accuracy", "--plot",
                   "--bench-report", "--reply-tokens", "FILE.jsonl"):
        assert option in result.output
    assert "eval" in run("--help").output
