"""Log lines of long work when stdout is not a terminal: start, progress, and a last line that tells done from stopped."""

from __future__ import annotations

import pytest

from qanchor.logs import Progress, progress


def _last(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_done_only_when_the_work_finished(capsys):
    with Progress(3, "work", "item") as bar:
        bar.update(3)
    assert "work: done, 3/3 item" in _last(capsys)
    with pytest.raises(KeyboardInterrupt), Progress(3, "work", "item") as bar:  # Ctrl-C, or any error, mid-way
        bar.update(1)
        raise KeyboardInterrupt
    assert "work: stopped, 1/3 item" in _last(capsys)


def test_the_iterator_says_stopped_when_cut_short(capsys):
    assert list(progress(range(4), desc="users", unit="user")) == [0, 1, 2, 3]
    assert "users: done, 4/4 user" in _last(capsys)
    items = progress(range(4), desc="users", unit="user")
    for i in items:
        if i == 1:
            break
    items.close()
    assert "users: stopped, 1/4 user" in _last(capsys)


def test_a_redirected_stdout_keeps_only_what_the_command_prints_and_a_log_on_stdout_gets_its_lines(capsys, monkeypatch):
    """From a terminal with stdout redirected: a command whose stdout is its result (`qanchor update ... > report.json`)
    shows the bar on the terminal and writes no progress lines into the file. One whose stdout is its log (`qanchor
    data userU DIR > run.log`) got no start, progress or summary line in the file either (the lines followed stderr's
    terminal, not stdout); now it logs there as pretraining does (progress_lines()), the bar staying on the terminal."""
    import sys

    from qanchor.logs import progress_lines, results_on_stdout

    monkeypatch.delenv("QANCHOR_NO_BARS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)

    @results_on_stdout
    def update() -> None:
        with Progress(2, "work", "item", every_s=0.0) as bar:
            assert bar._bar is not None  # the terminal's bar
            bar.update(2)

    update()
    captured = capsys.readouterr()
    assert captured.out == "" and "work: start" not in captured.err and "work: done" not in captured.err
    with Progress(2, "userU", "user", every_s=0.0) as bar:
        assert bar._bar is not None  # the terminal's bar, on stderr
        bar.update(1)
        bar.update(1)
    captured = capsys.readouterr()
    lines = [ln.split(" ", 2)[2] for ln in captured.out.splitlines()]
    assert lines[0] == "userU: start, 2 user" and lines[-1].startswith("userU: done, 2/2 user") and len(lines) == 4
    assert "userU: start" not in captured.err  # the lines went to the file only
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert not progress_lines()  # both on the terminal: the bar alone
    with Progress(2, "userU", "user") as bar:
        bar.update(2)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_lines()  # no terminal for a bar: lines
