"""Progress output: a tqdm bar on a terminal, a plain line per interval in a log (issue 32 item 8:
tqdm's redraws filled 91% of a non-TTY log)."""

import io

import pytest

from sftrl_jax import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdm_a_log_gets_lines():
    from tqdm import tqdm

    tty = progress.bar(total=3, desc="sft", unit="step", file=_Tty())
    assert isinstance(tty, tqdm)
    tty.close()
    assert isinstance(progress.bar(total=3, desc="sft", unit="step", file=io.StringIO()), progress.LineProgress)
    assert progress.bar(total=3, desc="sft", unit="step", enabled=False) is None


def test_a_line_per_interval_and_one_at_the_end(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress.bar(total=100, initial=10, desc="sft", unit="step", file=out, interval=30)
    for _ in range(90):  # one step a second
        clock[0] += 1.0
        bar.update(1)
        bar.set_postfix(loss="1.2500")
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [
        "sft: 40/100 (40%), 0:00:30 elapsed, 1 step/s, loss=1.2500",
        "sft: 70/100 (70%), 0:01:00 elapsed, 1 step/s, loss=1.2500",
        "sft: 100/100 (100%), 0:01:30 elapsed, 1 step/s, loss=1.2500",
    ]


def test_the_interval_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("SFTRL_PROGRESS_INTERVAL", "0")
    items = list(progress.iterate(range(3), desc="gp-l train", unit="ex"))
    assert items == [0, 1, 2]
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert [line.split(",")[0] for line in err.splitlines()] == [
        "gp-l train: 1/3 (33%)",
        "gp-l train: 2/3 (67%)",
        "gp-l train: 3/3 (100%)",
    ]


@pytest.mark.parametrize("value", ["soon", "-5"])
def test_a_bad_interval_falls_back(monkeypatch, value):
    monkeypatch.setenv("SFTRL_PROGRESS_INTERVAL", value)
    assert progress.LineProgress(total=1).interval == (0.0 if value == "-5" else progress.DEFAULT_INTERVAL)
