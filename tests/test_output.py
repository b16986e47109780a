"""The CLI's quiet output (no Ray): engine logs to a file, raylane's lines on the terminal,
``--verbose`` streaming them, and the last lines of the log on a failure.

The real thing (a full quickstart under 60 lines) is tests/test_quickstart_e2e.py; the last test
here runs `raylane run --verbose` on real Ray Train (slow).
"""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

# A stand-in for Ray's log relay and vLLM's child processes: a child process and this process
# both writing to fds 1 and 2, then raylane's own lines on the terminal it was given.
SCRIPT = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from raylane.output import engine_logs
    from runtime.errors import RaylaneError
    from runtime.log import listen, note

    log = None if sys.argv[1] == "-" else Path(sys.argv[1])
    with engine_logs(log) as term:
        seen = []
        with listen(lambda source, msg, keep: seen.append((source, msg, keep))):
            subprocess.run(["sh", "-c", "echo ENGINE-OUT; echo ENGINE-ERR >&2"], check=True)
            print("DRIVER-PRINT")
            print("DRIVER-STDERR", file=sys.stderr)
            note("batch", "rows 5/10")
            note("serve", "ready: http://x/v1", keep=True)
        term.err.write(f"MINE {seen}\\n")
        term.out.write("RESULT\\n")
        if sys.argv[2] == "fail":
            subprocess.run(["sh", "-c", "echo CAUSE-OF-FAILURE >&2"], check=True)
            raise RaylaneError("the stage broke", hint="look at the log")
""")


def _run(log: str, mode: str = "ok"):
    return subprocess.run([sys.executable, "-c", SCRIPT, log, mode], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)


def test_engine_output_goes_to_the_log_file_and_raylanes_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "run.log"
    r = _run(str(log))
    assert r.returncode == 0, r.stderr
    terminal = r.stdout + r.stderr
    for line in ("ENGINE-OUT", "ENGINE-ERR", "DRIVER-PRINT", "DRIVER-STDERR", "[batch] rows 5/10"):
        assert line not in terminal and line in log.read_text()
    assert r.stdout == "RESULT\n"
    # listeners hear every note, with keep as given
    assert "MINE [('batch', 'rows 5/10', False), ('serve', 'ready: http://x/v1', True)]" in r.stderr


def test_without_a_log_file_everything_streams_as_before(tmp_path):
    r = _run("-")
    assert r.returncode == 0, r.stderr
    assert "ENGINE-OUT" in r.stdout and "DRIVER-PRINT" in r.stdout and "RESULT" in r.stdout
    assert "ENGINE-ERR" in r.stderr and "[batch] rows 5/10" in r.stderr and "MINE" in r.stderr
    assert not list(tmp_path.iterdir())


def test_a_failure_shows_the_last_log_lines_and_the_log_path(tmp_path):
    log = tmp_path / "run.log"
    r = _run(str(log), "fail")
    assert r.returncode != 0
    # fds 1 and 2 are the terminal again: the error (here Python's own report) reaches it
    assert "the stage broke" in r.stderr
    assert f"the last 7 lines of {log}" in r.stderr and "CAUSE-OF-FAILURE" in r.stderr
    assert f"full log (Ray, Serve, HAProxy, vLLM): {log}" in r.stderr


def test_verbose_flag_on_the_engine_commands():
    from raylane.cli import build_parser

    p = build_parser()
    for cmd in (["quickstart"], ["run", "x.yaml"]):
        assert p.parse_args(cmd).verbose is False
        assert p.parse_args([*cmd, "--verbose"]).verbose is True


def test_stage_lines_off_a_terminal(tmp_path):
    from raylane.display import StageLines, console_for

    out = tmp_path / "term.txt"
    with open(out, "w") as f:
        lines = StageLines(console_for(f), live=True)  # not a terminal: plain lines, no live display
        lines.start(3, 6, "batch", "batch inference")
        lines.note("batch", "rows 5/10", False)
        lines.note("serve", "ready: http://127.0.0.1:1/v1", True)
        lines.done(3, 6, "batch", 45.61, {"rows_in": 200, "rows_out": 197, "rows_error": 3, "rows_per_s": 4.4,
                                         "tokens_per_s": 69.0, "verified": True})
        lines.failed(4, 6, "serve", 2.0, RuntimeError("replica died\nmore"))
        lines.close()
    assert out.read_text().splitlines() == [
        "… [3/6] batch: batch inference",
        "[serve] ready: http://127.0.0.1:1/v1",
        "✓ batch          45.6 s  197/200 rows (3 error rows), 4.4 rows/s, 69 tok/s, verified",
        "✗ serve           2.0 s  failed: replica died",
    ]


@pytest.mark.parametrize("stage,details,figure", [
    ("train", {"training": {"first_loss": 6.258, "last_loss": 3.806},
               "finetune": {"first_loss": 6.289, "last_loss": 5.889,
                            "registry": {"name": "quickstart-lora", "version": 1, "alias": "champion"}}},
     "loss 6.26 → 3.81; LoRA 6.29 → 5.89, quickstart-lora v1 champion"),
    ("serve", {"ttft_ms": 123.4, "model": "tiny:tuned", "ready_seconds": 60.2},
     "TTFT 123 ms (tiny:tuned), ready in 60.2 s"),
    ("agent", {"steps": 3, "tools_called": ["calculator"], "tokens": 90, "answered": True},
     "3 steps, tools calculator, 90 tokens"),
    ("kuberay", {"rendered": {"a.yaml": "RayJob", "b.yaml": "RayService", "c.yaml": "RayJob"}},
     "3 specs → 2 RayJob, 1 RayService"),
    ("batch", {"rows_in": 1}, ""),  # a stage dict missing its figures gives no figure, not an error
    ("unknown", {}, ""),
])
def test_key_figures(stage, details, figure):
    from runtime.quickstart import key_figure

    assert key_figure(stage, details) == figure


def test_result_figures_for_raylane_run():
    from raylane.display import result_figure

    assert result_figure({"loss_history": [6.0, 4.0], "final_step": 20, "steps_per_second": 1.5,
                          "registry": {"name": "m", "version": 2, "alias": "challenger"}}) == \
        "20 steps, loss 6.00 → 4.00, 1.50 steps/s; m v2 challenger"
    assert result_figure({"rows_in": 100, "rows_out": 99, "rows_error": 1, "seconds": 10.0, "tokens_per_s": 50.0,
                          "output": "/o"}) == "99/100 rows (1 error rows), 10.0 rows/s, 50 tok/s; output /o"
    assert result_figure({"url": "http://h:1", "served_seconds": 5.0, "ready_seconds": 30.0}) == \
        "served http://h:1 for 5 s (ready in 30 s)"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_raylane_run_verbose_streams_the_engine_logs(tmp_path):
    """The smallest real run (2 steps of tiny training on Ray Train) with --verbose: Ray's log
    relay (Ray Train's controller and worker) reaches stderr, and no log file is written."""
    import json

    import yaml

    from tests.conftest import EXAMPLES, run_cli

    spec = yaml.safe_load((EXAMPLES / "train.yaml").read_text())
    spec["data"]["path"] = str(EXAMPLES / "data" / "train.jsonl")
    spec.update(storage={"root": str(tmp_path)}, resources={"num_workers": 1, "cpus_per_worker": 1})
    spec["train"].update(steps=2, checkpoint_every_n_steps=2, warmup_steps=0)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = run_cli("run", str(path), "--json", "--verbose", env={"RAY_ADDRESS": ""}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["final_step"] == 2
    assert "(RayTrainWorker pid=" in r.stderr and "(TrainController pid=" in r.stderr
    assert "[train] Training tiny-llama-pretrain:" in r.stderr  # raylane's notes, as they happen
    assert "✓ Training tiny-llama-pretrain" in r.stderr and "2 steps, loss" in r.stderr
    assert "logs:" not in r.stderr and not (tmp_path / "logs").exists()


def test_a_failure_before_anything_logged_leaves_no_log(tmp_path):
    from raylane.output import engine_logs
    from runtime.errors import RaylaneError

    log = tmp_path / "logs" / "x.log"
    with pytest.raises(RaylaneError), engine_logs(log):
        raise RaylaneError("no API keys are configured")
    assert not log.exists()
