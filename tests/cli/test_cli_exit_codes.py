"""The exit status and the stderr of the real entry point: usage errors are one line with exit 2,
bare groups print their help, a command's own status (``typer.Exit``) and Ctrl-C (130) come through."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from tlvr_entry import child_env, command, console_script, one_line, tlvr


def test_bare_groups_print_their_help_and_exit_2():
    for args, usage in (((), "Usage: tlvr [OPTIONS] COMMAND [ARGS]..."),
                        (("eval",), "Usage: tlvr eval [OPTIONS] COMMAND [ARGS]..."),
                        (("data",), "Usage: tlvr data [OPTIONS] COMMAND [ARGS]..."),
                        (("presets",), "Usage: tlvr presets [OPTIONS] COMMAND [ARGS]...")):
        out = tlvr(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stdout.startswith(usage) and "Commands:" in out.stdout
        assert out.stderr == ""
    helped = tlvr("eval", "--help")
    assert helped.returncode == 0 and "synthetic" in helped.stdout


@pytest.mark.parametrize("args, error, usage", [
    (("foo",), "error: No such command 'foo'.", "usage: tlvr [OPTIONS] COMMAND [ARGS]..."),
    (("eval", "foo"), "error: No such command 'foo'.", "usage: tlvr eval [OPTIONS] COMMAND [ARGS]..."),
    (("data", "check", "--rot", "x"), "error: No such option: --rot (Possible options: --report, --root)",
     "usage: tlvr data check [OPTIONS] {TARGET}"),
    (("presets", "show"), "error: Missing argument 'NAME|PATH'.", "usage: tlvr presets show [OPTIONS] {NAME|PATH}"),
    (("eval", "synthetic", "--limit", "x"), "error: Invalid value for '--limit'",
     "usage: tlvr eval synthetic [OPTIONS]"),
    (("eval", "synthetic", "--duration", "all"), "error: No such option: --duration", "usage: tlvr eval synthetic"),
])
def test_usage_errors_are_one_line_with_exit_2(args, error, usage):
    out = tlvr(*args)
    assert out.returncode == 2
    line = one_line(out.stderr)
    assert line.startswith(error) and usage in line and "Traceback" not in line
    assert out.stdout == ""


def test_a_commands_own_exit_code_comes_through(tmp_path, make_video):
    # data check exits 1 when a video is bad, and writes its report beside the data
    videos = tmp_path / "videos"
    make_video("videos/good.mp4")
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    out = tlvr("data", "check", str(videos), "--workers", "1", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    report = json.loads((videos / "check-videos.json").read_text())
    assert report["counts"]["ok"] == 1 and [b["path"] for b in report["bad"]] == [str(videos / "broken.mp4")]
    assert f"report: {videos / 'check-videos.json'}" in out.stdout
    (videos / "broken.mp4").unlink()
    assert tlvr("data", "check", str(videos), "--workers", "1", cwd=tmp_path).returncode == 0


def test_fetch_problems_exit_non_zero(tmp_path):
    none = tlvr("data", "fetch", "--root", str(tmp_path))
    assert none.returncode == 2 and one_line(none.stderr).startswith("error: name at least one target")
    unknown = tlvr("data", "fetch", "videome", "--root", str(tmp_path))
    assert unknown.returncode == 2 and "videome" in one_line(unknown.stderr)


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    # a job without a checkpoint to offer: `data synth` writing many videos, interrupted once the first is there
    proc = subprocess.Popen(command("data", "synth", "--root", str(tmp_path), "--set", "train=3000", "--set", "eval=0",
                                    "--set", "coldstart=0"), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((tmp_path / "NextQA").rglob("*.mp4")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert one_line(err) == "interrupted"


@pytest.mark.skipif(console_script() is None, reason="no tlvr console script installed")
def test_the_console_script_keeps_the_exit_codes(tmp_path):
    assert tlvr(script=True).returncode == 2
    bad = tlvr("foo", script=True)
    assert bad.returncode == 2 and one_line(bad.stderr).startswith("error: No such command 'foo'.")
    assert tlvr("--version", script=True).returncode == 0
    missing = tlvr("infer", str(tmp_path / "none.mp4"), "q", "--model", "tiny", script=True)
    assert missing.returncode == 2 and "none.mp4" in one_line(missing.stderr)
