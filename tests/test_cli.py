"""Tests of ``python -m companion check``: exit statuses, the table, options,
and refusals of untrusted files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from companion import IGNORE_INDEX
from companion.__main__ import main
from companion.experiments.batch_check import write_code_running_pickle

ROOT = Path(__file__).resolve().parent.parent


def batch(*, scored_padding: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]])
    mask = (ids != 0).long()
    labels = ids.clone() if scored_padding else torch.where(mask == 1, ids, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(batch(), "good.pt")
    torch.save(batch(scored_padding=True), "bad.pt")
    return tmp_path


def test_a_clean_batch_exits_0_and_says_so(files, capsys):
    assert main(["check", "good.pt"]) == 0
    out = capsys.readouterr().out
    assert out == "good.pt: 2 x 6 batch, keys attention_mask, input_ids, labels\nno findings\n"


def test_an_error_exits_1_with_the_table(files, capsys):
    assert main(["check", "bad.pt"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["severity", "code", "where"]
    assert out[2].split()[:2] == ["error", "padding-scored"]
    assert "(0, 4) (0, 5)" in out[2]


def test_fail_on_decides_what_fails(files, capsys):
    torch.save({**batch(), "labels": torch.tensor([[-100, 5, 6, 2, -100, -100], [-100] * 6])}, "rows.pt")
    assert main(["check", "rows.pt"]) == 0  # a row without targets is a warning
    assert main(["check", "rows.pt", "--fail-on", "warning"]) == 1
    assert "row-without-targets" in capsys.readouterr().out


def test_options_reach_the_checker(files, capsys):
    assert main(["check", "good.pt", "--vocab-size", "8"]) == 1
    assert "input-id-out-of-range" in capsys.readouterr().out
    assert main(["check", "good.pt", "--placeholder-token-id", "9", "--placeholder-token-id", "7"]) == 1
    assert "ids [9, 7]" in capsys.readouterr().out
    assert main(["check", "good.pt", "--micro-batch-size", "1"]) == 0
    assert "micro-batch-imbalance" in capsys.readouterr().out
    assert main(["check", "bad.pt", "--max-positions", "1"]) == 1
    assert "(0, 4) +1 more" in capsys.readouterr().out
    torch.save({**batch(), "labels": torch.where(batch()["labels"] == IGNORE_INDEX, -1, batch()["labels"])},
               "minus.pt")
    assert main(["check", "minus.pt", "--ignore-index", "-1"]) == 0
    assert main(["check", "minus.pt"]) == 1
    assert "label-out-of-range" in capsys.readouterr().out


def test_several_files_and_the_worst_status(files, capsys):
    assert main(["check", "good.pt", "bad.pt"]) == 1
    out = capsys.readouterr().out
    assert out.count(" x 6 batch") == 2 and "\n\nbad.pt" in out
    assert main(["check", "bad.pt", "missing.pt"]) == 2
    err = capsys.readouterr().err
    assert err == "missing.pt: error: path missing.pt does not exist\n"


def test_untrusted_files_are_refused_with_status_2(files, capsys):
    write_code_running_pickle("evil.pt", "ran")
    Path("cut.pt").write_bytes(Path("good.pt").read_bytes()[:100])
    Path("bad.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n')
    torch.save({"input_ids": torch.ones(1, 2, dtype=torch.long), "labels": [1, 2]}, "list.pt")
    torch.save({"labels": torch.ones(1, 2, dtype=torch.long)}, "no_ids.pt")
    for name, problem in {
        "evil.pt": "refused without running it",
        "cut.pt": "truncated or not a torch.save file",
        "bad.jsonl": "line 2: not valid JSON",
        "list.pt": "non-tensor value under 'labels'",
        "no_ids.pt": "batch must hold 'input_ids'",
    }.items():
        assert main(["check", name]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"{name}: error: ") and problem in err, err
    assert not Path("ran").exists()


def test_json_lines(files, capsys):
    Path("rows.jsonl").write_text('{"input_ids": [1, 5, 2]}\n{"input_ids": [1, 5, 6, 7, 2]}\n')
    assert main(["check", "rows.jsonl", "--pad-token-id", "2", "--eos-token-id", "2"]) == 0
    assert "rows.jsonl: 2 x 5 batch, keys attention_mask, input_ids, labels" in capsys.readouterr().out


def test_bad_command_lines_exit_2(files):
    for argv in ([], ["check"], ["inspect", "good.pt"], ["check", "good.pt", "--fail-on", "never"],
                 ["check", "good.pt", "--vocab-size", "many"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


def test_python_dash_m_companion_runs_the_command(files):
    done = subprocess.run(
        [sys.executable, "-m", "companion", "check", "bad.pt"], capture_output=True, text=True,
        check=False, timeout=300, cwd=files, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert done.returncode == 1, done.stderr
    assert "padding-scored" in done.stdout and done.stderr == ""
