"""`tessera train TASK --help` lists every --param the task takes, with its default and what it accepts, so
a user never learns a parameter's name from a typo's error message."""

from __future__ import annotations

import json

import pytest

from services.cli import main
from services.trainer.commands import TASK_NAMES
from services.trainer.tasks import make_task


@pytest.mark.parametrize("task", TASK_NAMES)
def test_the_help_lists_every_parameter(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["train", task, "--help"])
    assert ended.value.code == 0
    shown = capsys.readouterr().out
    assert "--param" in shown and f"{task} parameters" in shown
    for name, default in make_task(task).params({}).items():
        line = next(line for line in shown.splitlines() if line.split()[:1] == [name])
        assert json.dumps(default, default=str) in line, line


def test_tessera_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from services.cli import parser; parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
