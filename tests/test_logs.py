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


def test_a_terminal_shows_the_bar_and_a_redirected_stdout_still_gets_the_lines(capsys, monkeypatch):
    """`qanchor pretrain ... > train.log` from a terminal: stderr is a terminal (the bar), stdout a file, which must
    get the start, progress and summary lines all the same."""
    import sys

    monkeypatch.delenv("QANCHOR_NO_BARS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    with Progress(2, "work", "item", every_s=0.0) as bar:
        assert bar._bar is not None  # the terminal's bar
        bar.update(1)
        bar.update(1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "work: start, 2 item" in lines[0] and "work: 1/2 item" in lines[1] and "work: done, 2/2 item" in lines[-1]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)  # both on the terminal: the bar alone
    with Progress(2, "work", "item", every_s=0.0) as bar:
        bar.update(2)
    assert capsys.readouterr().out == ""
