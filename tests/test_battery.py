"""tools/battery.py: the cells' commands, the skip-if-done logic and the table, with nothing timed run (--dry-run,
or a fake peer script that writes result.json at once)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

import tools.battery as battery
from tests.conftest import make_colour_dataset


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """Two tiny sets under one root: one with a name in the epoch table, one not (its epochs are estimated)."""
    make_colour_dataset(tmp_path / "sets" / "tiny", train_per_class=4, val_per_class=2)
    make_colour_dataset(tmp_path / "sets" / "emoji-twitter", train_per_class=2, val_per_class=1)
    (tmp_path / "sets" / "not-a-set").mkdir()  # no train/ val/: not a dataset
    return tmp_path / "sets"


def _commands(stdout: str) -> dict[str, list[str]]:
    """'would run LABEL: CMD' lines -> {LABEL: argv}."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("would run "):
            label, _, cmd = line[len("would run "):].partition(": ")
            out[label] = shlex.split(cmd)
    return out


def _fake_result(cell: Path, timm: float, ours: float) -> None:
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"timm_top1": timm, "ours_top1": ours, "wall_s": 60.0}))


def test_dry_run_prints_one_peer_command_a_cell(root, tmp_path, capsys):
    """Every dataset x budget x seed gets `bash PEER DATA vit_local_tiny_patch16 64 EPOCHS OUT/d/b/seedk --seed k`,
    seed-major; the table's epochs for a known name, the estimate for another; nothing is written."""
    peer = tmp_path / "peer.sh"
    out = tmp_path / "runs"
    assert battery.main(["--root", str(root), "--out", str(out), "--seeds", "2", "--peer", str(peer),
                         "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    cmds = _commands(stdout)
    assert list(cmds) == [f"{d}/{b}/seed{s}" for s in (0, 1) for d in ("emoji-twitter", "tiny")
                          for b in ("short", "long")]
    tiny_epochs = {b: battery.estimate_epochs(12, 6, battery.TARGET_S[b]) for b in battery.BUDGETS}
    for label, argv in cmds.items():
        name, budget, seed = label.split("/")
        epochs = battery.EPOCHS["emoji-twitter"][battery.BUDGETS.index(budget)] if name == "emoji-twitter" \
            else tiny_epochs[budget]
        assert argv == ["bash", str(peer.resolve()), str((root / name).resolve()), "vit_local_tiny_patch16", "64",
                        str(epochs), str(out.resolve() / name / budget / seed), "--seed", seed[len("seed"):]]
    assert tiny_epochs["long"] > tiny_epochs["short"] >= 1
    assert "| tiny | short |" in stdout and "0/2" in stdout
    assert not out.exists()


def test_done_cells_are_skipped_and_tabled(root, tmp_path, capsys):
    """A cell with a result.json is skipped (not among the commands) and counted in the table's medians."""
    out = tmp_path / "runs"
    _fake_result(out / "tiny" / "short" / "seed0", timm=50.0, ours=60.0)
    _fake_result(out / "tiny" / "short" / "seed1", timm=40.0, ours=44.0)
    (out / "tiny" / "long" / "seed0").mkdir(parents=True)  # stopped half-way: no result.json, so not done
    assert battery.main(["--root", str(root), "--out", str(out), "--only", "tiny", "--seeds", "2", "--dry-run",
                         "--peer", str(tmp_path / "peer.sh")]) == 0
    stdout = capsys.readouterr().out
    assert set(_commands(stdout)) == {"tiny/long/seed0", "tiny/long/seed1"}
    assert "skip tiny/short/seed0" in stdout and "skip tiny/short/seed1" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("| tiny | short |"))
    assert [c.strip() for c in row.strip("|").split("|")][3:] == ["60", "2/2", "45.00", "52.00", "+7.00"]


def test_runs_cells_through_the_peer_and_resumes(root, tmp_path, capsys):
    """With a fake peer that writes result.json at once: each missing cell runs once with its arguments, a
    half-written cell is cleared first, a rerun runs nothing, and OUT/battery.md holds the table."""
    calls = tmp_path / "calls.txt"
    peer = tmp_path / "peer.sh"
    peer.write_text(f"""set -eu
echo "$@" >> {calls}
test ! -e "$5/stale" || exit 3
mkdir -p "$5"
echo '{{"timm_top1": 10.0, "ours_top1": 12.5, "wall_s": 3.0}}' > "$5/result.json"
""")
    out = tmp_path / "runs"
    (out / "emoji-twitter" / "long" / "seed0").mkdir(parents=True)
    (out / "emoji-twitter" / "long" / "seed0" / "stale").write_text("")
    args = ["--root", str(root), "--out", str(out), "--only", "emoji-twitter", "--budgets", "long", "--seeds", "2",
            "--peer", str(peer)]
    assert battery.main(args) == 0
    lines = calls.read_text().splitlines()
    assert [line.split()[-1] for line in lines] == ["0", "1"]
    assert all(line.split()[1:4] == ["vit_local_tiny_patch16", "64", "21"] for line in lines)
    assert battery.main(args) == 0
    assert len(calls.read_text().splitlines()) == 2  # all done: nothing rerun
    table = (out / "battery.md").read_text()
    assert "| emoji-twitter | long | 21 | 3 | 2/2 | 10.00 | 12.50 | +2.50 |" in table
    assert "short" not in table.split("\n\n")[0]
    capsys.readouterr()


def test_bad_arguments_fail_before_running(root, tmp_path):
    """An unknown --only name, an unknown budget and a bad --epochs override stop with an error."""
    base = ["--root", str(root), "--out", str(tmp_path / "runs"), "--dry-run"]
    with pytest.raises(SystemExit, match="no-such"):
        battery.main([*base, "--only", "no-such"])
    with pytest.raises(SystemExit):
        battery.main([*base, "--budgets", "medium"])
    with pytest.raises(SystemExit, match="NAME=SHORT,LONG"):
        battery.main([*base, "--epochs", "tiny=3"])


def test_epochs_override(root, tmp_path, capsys):
    """--epochs NAME=S,L replaces the table's (or the estimate's) epochs for that set."""
    assert battery.main(["--root", str(root), "--out", str(tmp_path / "runs"), "--only", "tiny", "--seeds", "1",
                         "--epochs", "tiny=2,7", "--dry-run"]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert cmds["tiny/short/seed0"][5] == "2" and cmds["tiny/long/seed0"][5] == "7"
