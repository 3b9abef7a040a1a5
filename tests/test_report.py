"""The run report: the HTML and PNG files written for a synthetic run (every optional file
present), for a run that logs little, for a pipeline of stage runs, the CLI, and a render in
headless Chromium (skipped, with the reason, where no browser is installed)."""

import argparse
import base64
import json
import math
import re
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest

from posttrain.cli import report as report_cli
from posttrain.errors import PosttrainError
from posttrain.eval.rm_audit import PairScores, build_report
from posttrain.monitor.rules import Alert
from posttrain.report import write_report
from posttrain.report.runs import last_step_samples

STEPS = 60
ALERT_STEP = 30
SHA = "ab12cd34ef56" + "0" * 52
ALERT_RGB = (0xBF, 0x87, 0x00)  # ACTION_COLOURS["warn"]


def make_run(path, *, algorithm="grpo", created="2026-01-01T00:00:00+00:00", parents=()):
    """An online run: training lines every step, eval lines every 10, one alert, samples of two steps."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for step in range(1, STEPS + 1):
        t = step / STEPS
        lines.append(
            {"step": step, "time": 1000.0 + step, "loss": 1.0 - 0.5 * t + 0.05 * rng.standard_normal(),
             "reward/mean": 0.2 + 0.6 * t, "reward/correct/mean": 0.6 * t, "reward/format/mean": 0.2,
             "reward/std": 0.3, "kl": 0.01 * step, "entropy": 1.5 - t, "completion_length/mean": 20 + 10 * t,
             "completion_length/max": 64.0, "completion_length/truncated_share": 0.1 * t, "pass_rate": 0.6 * t,
             "lr": 1e-4, "grad_norm": 1.0 + rng.random(), "tokens_per_s": 900 + 50 * rng.random(),
             "generation/tokens_per_s": 1500.0, "step_s": 0.5, "tokens": 100 * step, "custom/score": t * t}
        )  # fmt: skip
        if step % 10 == 0:
            lines.append(
                {"step": step, "time": 1000.5 + step, "eval/pass@1": 0.5 * t, "eval/loss": 1.2 - 0.3 * t}
            )
    lines[5]["grad_norm"] = float("nan")  # logged as NaN: drawn as a red x, not dropped silently
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    alert = Alert(ALERT_STEP, "kl_spike", "kl 0.3 is 5.0x its rolling median", "warn", {"kl": math.inf})
    (path / "alerts.jsonl").write_text(alert.to_json() + "\n")
    manifest = {
        "created": created, "command": ["posttrain", "train", "grpo.yaml"], "algorithm": algorithm, "seed": 7,
        "versions": {"python": "3.11.7", "torch": "2.13.0", "trl": None}, "git_commit": "deadbeef",
        "host": {"name": "box", "platform": "Linux", "cpus": 2}, "models": ["runs/sft/final"],
        "inputs": {"data/prompts.jsonl": SHA}, "parents": [str(p) for p in parents],
    }  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "config.yaml").write_text(f"algorithm: {algorithm}\nmodel:\n  path: runs/sft/final\n")
    samples = [
        {"step": s, "group": i // 4, "prompt": f"<q>{i}</q>", "completion": f"step{s}-answer{i}",
         "reward": float(i), "components": {"correct": float(i)}, "finish_reason": "stop", "tokens": 3}
        for s in (STEPS - 2, STEPS - 1) for i in range(8)
    ]  # fmt: skip
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return path


def images(html: str) -> dict[str, dict[str, str]]:
    """Every <img> of the page by id, as {attribute: value}."""
    out = {}
    for tag in re.findall(r"<img [^>]*>", html):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        out[attrs["id"]] = attrs
    return out


def read_rgb(png) -> np.ndarray:
    """The image as [H, W, 3] int16 in 0..255."""
    return (matplotlib.image.imread(png)[..., :3] * 255).round().astype(np.int16)


def colour_pixels(rgb: np.ndarray, colour, tol=40) -> int:
    """Pixels within tol (per channel) of colour."""
    return int((np.abs(rgb - np.array(colour, dtype=np.int16)).max(axis=-1) <= tol).sum())


def test_report_of_a_run(tmp_path):
    run = make_run(tmp_path / "grpo")
    out = write_report(run)
    assert out == run / "report.html"
    html = out.read_text()
    imgs = images(html)

    expected = {
        "loss",
        "reward",
        "kl",
        "entropy",
        "length",
        "eval",
        "optim",
        "throughput",
        "time",
        "more-custom",
    }
    assert set(imgs) == {f"plot-{k}" for k in expected}  # only what was logged: no policy / PPO panels
    assert {p.stem for p in (run / "report").glob("*.png")} == expected
    for key in expected:  # the embedded image is the PNG file, and the file is a real, non-blank plot
        png = run / "report" / f"{key}.png"
        src = imgs[f"plot-{key}"]["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
        assert matplotlib.image.imread(png).std() > 0.05
        # The alert is marked on every plot of the run, in the warn colour.
        assert colour_pixels(read_rgb(png), ALERT_RGB) > 100, key
    assert imgs["plot-reward"]["data-metrics"].split() == [
        "reward/mean", "reward/correct/mean", "reward/format/mean", "reward/std"
    ]  # fmt: skip
    assert imgs["plot-eval"]["data-metrics"].split() == ["pass_rate", "eval/pass@1"]
    assert imgs["plot-loss"]["data-metrics"].split() == ["loss", "eval/loss"]
    assert "eval/pass@1" in imgs["plot-eval"]["alt"]

    # Tables: manifest, alert, samples of the last step only (best and worst), every metric.
    for text in (
        "grpo",
        "runs/sft/final",
        "data/prompts.jsonl",
        SHA[:12],
        "torch 2.13.0",
        "deadbeef",
        "seed",
    ):
        assert text in html, text
    assert "trl" not in html.split("versions")[1].split("</tr>")[0]  # absent packages are left out
    assert "kl_spike" in html and "kl 0.3 is 5.0x its rolling median" in html
    assert f"Samples at step {STEPS - 1}" in html
    assert f"step{STEPS - 1}-answer7" in html and f"step{STEPS - 1}-answer0" in html
    assert f"step{STEPS - 2}-" not in html
    assert "&lt;q&gt;7&lt;/q&gt;" in html and "<q>" not in html  # user text is escaped
    assert "completion_length/truncated_share" in html and "config.yaml" in html
    assert "+1 NaN/Inf" in html  # the NaN grad_norm is counted, not dropped silently

    # Self-contained: nothing fetched, no script.
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "default-src 'none'" in html


def test_only_logged_metrics_are_plotted(tmp_path):
    """An offline run (SFT) with a half-written last line: its own panels, no alerts or samples."""
    run = tmp_path / "sft"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 1.0 / s, "token_accuracy": 1 - 1 / s})
             for s in range(1, 21)]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')
    html = write_report(run).read_text()
    assert set(images(html)) == {"plot-loss", "plot-optim", "plot-more-token"}
    assert "Alerts" not in html and "Samples at" not in html and "Reward-model audit" not in html


def test_pipeline_report_has_a_section_per_stage(tmp_path):
    root = tmp_path / "quickstart"
    # Created out of alphabetical order: stages are ordered by when they ran.
    base = make_run(root / "zbase", algorithm="sft", created="2026-01-01T00:00:00+00:00")
    make_run(root / "grpo", created="2026-01-02T00:00:00+00:00", parents=[base.resolve()])
    (root / "data").mkdir()  # not a run
    (root / "summary.json").write_text(json.dumps({"held_out_exact_match": {"base": 0.25, "sft": 0.75}}))

    html = write_report(root).read_text()
    assert html.index('id="run-zbase"') < html.index('id="run-grpo"')
    assert 'id="run-data"' not in html
    imgs = images(html)
    assert {"plot-zbase-loss", "plot-grpo-loss", "plot-grpo-reward"} <= set(imgs)
    assert (root / "report" / "grpo-reward.png").is_file()
    assert '<a href="#run-zbase">zbase</a>' in html  # the parent run links to its section
    assert "held_out_exact_match.sft" in html and "0.75" in html


def test_rm_audit_is_reported(tmp_path):
    """rm_audit.json without its PNG: the chart is drawn from the JSON, the verdicts tabled."""
    run = tmp_path / "rm"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.6, "accuracy": 0.7}) + "\n")
    rng = np.random.default_rng(0)
    good = PairScores(rng.normal(1, 1, 50), rng.normal(0, 1, 50), np.full(50, 5.0), np.full(50, 9.0))
    bad = PairScores(rng.normal(0, 1, 50), rng.normal(1, 1, 50), np.full(50, 3.0), np.full(50, 12.0))
    (run / "rm_audit.json").write_text(json.dumps(build_report({"pairs": good, "short_better": bad})))

    html = write_report(run).read_text()
    assert "plot-rm_audit" in images(html)
    assert (run / "report" / "rm_audit.png").is_file()
    assert "short_better" in html and "detected" in html and "ECE" in html


def test_samples_are_read_from_the_end(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"step": s, "completion": "x" * 100, "reward": 0.0} for s in range(200) for _ in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ~400 kB: several blocks back
    last = last_step_samples(path)
    assert len(last) == 16 and {r["step"] for r in last} == {199}


def test_cli_and_errors(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    parser = argparse.ArgumentParser(prog="posttrain")
    report_cli.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "out" / "r.html")])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "r.html")
    assert (tmp_path / "out" / "r.html").is_file() and (run / "report" / "loss.png").is_file()

    (tmp_path / "empty").mkdir()
    with pytest.raises(PosttrainError, match="not a run directory"):
        write_report(tmp_path / "empty")


# --------------------------------------------------------------------------------------- browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def run_browser(exe, tmp_path, *args) -> subprocess.CompletedProcess:
    """Headless, sandbox off (CI runs as root), a throwaway profile, and a time limit."""
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", *args]  # fmt: skip
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{exe} did not finish within 120 s: {' '.join(cmd)}")


@pytest.mark.skipif(
    browser() is None,
    reason=f"no headless browser found (looked for {', '.join(BROWSERS)}); install Debian's 'chromium'",
)
def test_report_renders_in_headless_chromium(tmp_path):
    page = write_report(make_run(tmp_path / "grpo"))
    url = page.resolve().as_uri()
    exe = browser()

    dom = run_browser(exe, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = images(dom.stdout)
    assert {"plot-loss", "plot-reward", "plot-kl", "plot-eval"} <= set(rendered)
    assert all(a["src"].startswith("data:image/png;base64,") for a in rendered.values())

    shot = tmp_path / "screenshot.png"
    result = run_browser(exe, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", url)
    assert shot.is_file(), f"no screenshot: {result.stderr[-2000:]}"
    rgb = read_rgb(shot)
    packed = rgb.astype(np.int32)
    colours = np.unique(packed[..., 0] << 16 | packed[..., 1] << 8 | packed[..., 2])
    assert len(colours) > 200  # not blank: text, tables and plots
    # The plots decoded and painted: matplotlib's first line colour (tab:blue) and the alert's.
    assert colour_pixels(rgb, (0x1F, 0x77, 0xB4)) > 500
    assert colour_pixels(rgb, ALERT_RGB) > 100
