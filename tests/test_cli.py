"""The command line imports only the module of the command it runs, and its table of commands is complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qanchor.cli import build_parser, main
from qanchor.cli.common import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def _subcommands(parser) -> dict:
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_listed_command_is_registered_by_its_module():
    full = _subcommands(build_parser())
    assert set(full) == set(COMMANDS)
    for name in COMMANDS:
        assert full[name].get_default("func") is not None or name in ("data", "index"), name  # groups hold sub-commands
    # a named command gets its real parser; the others are help-only stubs that never run
    only_train = _subcommands(build_parser(["pretrain", "train.max_steps=3"]))
    assert set(only_train) == set(COMMANDS)
    assert only_train["pretrain"].get_default("func") is not None and only_train["embed"].get_default("func") is None


def _modules_after(args: list[str]) -> set[str]:
    code = ("import sys; from qanchor.cli import main; code = main(sys.argv[1:]); "
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return set(done.stdout.splitlines()[-1].split())  # the last line: the top-level packages imported


def test_help_and_a_usage_error_import_no_heavy_stack():
    for args in (["--help"], ["bogus-command"]):
        loaded = _modules_after(args)
        assert not loaded & {"torch", "transformers", "sklearn"}, (args, sorted(loaded & {"torch", "transformers", "sklearn"}))
    assert "torch" in _modules_after(["pretrain", "--help"])  # the named command's stack is loaded


@pytest.mark.parametrize("code, hint", [(13, "check the permissions"), (28, "free some disk space")])
def test_a_machine_refusing_a_write_is_one_error_line_and_another_os_error_keeps_its_traceback(monkeypatch, capsys,
                                                                                             tmp_path, code, hint):
    import os

    import qanchor.cli.data as data_cli
    from qanchor.cli import main

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "part-00000.parquet"))

    monkeypatch.setattr(data_cli, "validate_dataset", refuse)
    assert main(["data", "validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'out' / 'part-00000.parquet'}: ") and hint in err[0]
    monkeypatch.setattr(data_cli, "validate_dataset", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        main(["data", "validate", str(tmp_path)])


def test_the_deepspeed_launchers_local_rank_flag_is_dropped(tiny_dataset, capsys):
    """`deepspeed --module qanchor.cli pretrain ...` starts each rank as `python -m qanchor.cli --local_rank=N pretrain
    ...`; the rank is read from LOCAL_RANK, so the flag must not stop the command (it was "unrecognized arguments")."""
    assert main(["data", "validate", str(tiny_dataset)]) == 0
    plain = capsys.readouterr().out
    for flag in (["--local_rank=3"], ["--local_rank", "3"]):
        assert main([*flag, "data", "validate", str(tiny_dataset)]) == 0
        assert capsys.readouterr().out == plain
    assert main(["data", "validate", str(tiny_dataset), "--local_rank=0"]) == 0
    capsys.readouterr()
    assert main(["data", "validate", str(tiny_dataset), "--quiet"]) == 0  # the one convention: every command takes it
    assert capsys.readouterr().out == plain.splitlines(keepends=True)[0]


def test_help_lists_every_setting_with_its_default(capsys):
    from qanchor.cli.common import settings_listing
    from qanchor.config import PretrainConfig

    assert main(["pretrain", "--help"]) == 0
    text = capsys.readouterr().out
    keys = settings_listing(PretrainConfig)
    assert len(keys) > 50 and all(f"  {key}={value}\n" in text for key, value in keys)
    assert "  train.max_steps=" in text and "  model.backbone.init_embeddings_from_minilm=true\n" in text


def test_building_into_the_working_directory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """`out=.` in an empty folder ran the whole build, then failed with a traceback (a rename onto the working directory
    would have left the shell in a deleted folder)."""
    here = tmp_path / "e2"
    here.mkdir()
    monkeypatch.chdir(here)
    for builder in ("synth", "ratings"):
        assert main(["data", builder, "out=.", "users=3"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is (or holds) the working directory" in err[0] and "out=mydata" in err[0], err
    assert main(["data", "synth", f"out={tmp_path}", "users=3"]) == 2  # a folder holding it, too
    assert sorted(p.name for p in here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["e2"]


def test_data_encode_does_the_encoding_pretraining_waits_for(tiny_dataset, tmp_path, capsys):
    """Pretraining's rank 0 encodes every event's text (the whole history feeds its statistics) while the other ranks
    wait at a barrier; `data encode`, meant to do that work before a cluster run, encoded only the kept events'."""
    from qanchor.config import DataConfig
    from qanchor.data.dataset import load_dataset
    from qanchor.data.pipeline import UserPipeline
    from tests.helpers import copy_dataset

    ds_dir = copy_dataset(tiny_dataset, tmp_path / "ds")
    assert main(["data", "encode", str(ds_dir), "default_max_events=1", "--quiet"]) == 0
    ds = load_dataset(ds_dir)
    n_events = sum(len(s) for r in ds.users() for s in r.events.values())
    assert capsys.readouterr().out.startswith(f"events: {n_events}   unique texts stored: ")
    pipe = UserPipeline.for_dataset(ds, DataConfig(default_max_events=1))
    pipe.prime(ds.users(), all_events=True)  # what pretraining does first
    assert pipe.cache.encoded_count == 0 and len(pipe.cache) == len({t for r in ds.users() for s in r.events.values()
                                                                    for t in s.text})


def test_a_commands_result_on_stdout_never_carries_log_or_warning_lines(infer_env, tmp_path, capsys):
    """`qanchor ask ... json=true` printed a warning line before its JSON (json.loads: "Extra data"), and `embed`'s
    progress lines went before its report whenever stdout was not a terminal (cron, `> report.json`). Log lines of the
    commands whose stdout is their result now go to stderr; warnings always do."""
    import json
    import shutil

    ckpt = tmp_path / "newer"
    shutil.copytree(infer_env.ckpt, ckpt)
    meta = json.loads((ckpt / "qanchor.json").read_text())
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "added_in_newer": 1}))  # as a newer qanchor writes it
    assert main(["ask", f"checkpoint={ckpt}", f"data.path={infer_env.ds_dir}", "user=u002", "question=Which one?",
                 "options=[coffee,fuel]", "json=true"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["user_id"] == "u002"
    assert "warning: " in err and "entries this qanchor does not know (added_in_newer)" in err
    queries = tmp_path / "queries.txt"
    queries.write_text("Will this user stop paying?\n")
    assert main(["embed", f"checkpoint={infer_env.ckpt}", f"data.path={infer_env.ds_dir}", f"queries={queries}",
                 f"out={tmp_path / 'emb'}"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["users"] > 0 and len(out.splitlines()) == 1
    assert "embed" in err  # its progress lines, on stderr


def test_index_search_takes_a_user_id_verbatim():
    """A user whose id is "None" or "null" could not be looked up: the setting read as absent."""
    from qanchor.config import IndexSearchConfig, load_config

    assert [load_config(None, [f"user={u}"], schema=IndexSearchConfig).user for u in ("None", "null", "u1")] == \
        ["None", "null", "u1"]
    assert load_config(None, [], schema=IndexSearchConfig).user == ""


def test_a_flag_before_the_command_name_is_said_to_belong_after_it(capsys):
    """`qanchor --quiet data synth ...` was told settings are key=value, not --flags: the flag was right, its place not."""
    from qanchor.cli import main

    assert main(["--quiet", "data", "synth", "users=5"]) == 2
    assert "--quiet goes after the command's name" in capsys.readouterr().err
    assert main(["--config", "c.yaml", "pretrain"]) == 2  # argparse called c.yaml an invalid command
    assert "--config goes after the command's name" in capsys.readouterr().err
    assert main(["data", "validate", "nowhere", "--config", "x.yaml"]) == 2  # after it: not this hint
    assert "goes after the command's name" not in capsys.readouterr().err


def test_a_library_warning_under_the_cli_is_a_log_line(monkeypatch, capsys, tmp_path):
    """A warning from the library printed in Python's format under the CLI, naming the console script's line
    (`.venv/bin/qanchor:6: UserWarning: ...  sys.exit(main())`). The caller's own handler is back on every way out,
    a usage error's included."""
    import re
    import warnings

    import qanchor.cli.data as data_cli

    def warns(*args, **kwargs):
        warnings.warn("3 events are at or after the cutoff", UserWarning, stacklevel=2)

    monkeypatch.setattr(data_cli, "validate_dataset", warns)
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(AttributeError):  # the stand-in returns no report: what matters is the line before
            main(["data", "validate", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d warning: 3 events are at or after the cutoff",
                                          err[0]), err
    assert warnings.showwarning is shown
    assert main(["no-such-command"]) == 2 and warnings.showwarning is shown


def test_a_closed_stdout_stops_the_command_with_one_error_line(tmp_path):
    """`qanchor data validate DIR | head` (or a log pipe that died under a long run) ended in a BrokenPipeError
    traceback; then, for a while, in exit 0 with the work abandoned. Now one error line and exit 1; a broken pipe that
    is not stdout keeps its traceback."""
    script = tmp_path / "talk.py"
    script.write_text(
        "import sys\n"
        "import qanchor.cli.data as d\n"
        "from qanchor.cli import main\n"
        "def talk(*a, **k):\n"
        "    if sys.argv[1] == 'other':\n"
        "        raise BrokenPipeError(32, 'Broken pipe')\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "d.validate_dataset = talk\n"
        "sys.exit(main(['data', 'validate', 'x']))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reader = subprocess.Popen([sys.executable, str(script), "stdout"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env)
    assert reader.stdout.readline() == b"line 0\n"
    reader.stdout.close()
    err = reader.stderr.read().decode()
    assert reader.wait() == 1
    assert err.strip() == ("error: standard output was closed before the command finished (a pipe's reader stopped "
                           "reading); the command stopped there")
    other = subprocess.run([sys.executable, str(script), "other"], capture_output=True, text=True, env=env)
    assert other.returncode == 1 and "Traceback" in other.stderr and "BrokenPipeError" in other.stderr
