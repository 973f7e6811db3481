import json
import os

import pytest

from tfkdp.pipelines.state import FlagMismatchError, StageRunner

STAGE_FLAGS = {"a": ("x",), "b": ("y",), "c": ()}


def _runner(tmp_path, **flags):
    values = {"x": 1, "y": 2}
    values.update(flags)
    return StageRunner(str(tmp_path), values, STAGE_FLAGS)


def test_finished_stages_are_skipped_on_rerun(tmp_path):
    calls = []

    def stage(name):
        def fn(work):
            calls.append(name)
            with open(os.path.join(work, "out.txt"), "w") as f:
                f.write(name)
            return {"value": name}
        return fn

    runner = _runner(tmp_path)
    for name in STAGE_FLAGS:
        runner.run(name, stage(name))
    assert calls == ["a", "b", "c"]
    again = _runner(tmp_path)
    for name in STAGE_FLAGS:
        assert again.run(name, stage(name)) == {"value": name}
    assert calls == ["a", "b", "c"]
    assert open(tmp_path / "b" / "out.txt").read() == "b"


def test_crash_mid_stage_leaves_nothing_and_reruns_only_that_stage(tmp_path):
    runner = _runner(tmp_path)
    runner.run("a", lambda work: {"ok": 1})

    def crash(work):
        with open(os.path.join(work, "partial.bin"), "w") as f:
            f.write("half")
        raise KeyboardInterrupt  # stands for a kill mid-stage

    with pytest.raises(KeyboardInterrupt):
        runner.run("b", crash)
    assert not (tmp_path / "b").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".b-")] == []
    state = json.loads((tmp_path / "state.json").read_text())
    assert list(state["completed"]) == ["a"]
    calls = []
    again = _runner(tmp_path)
    again.run("a", lambda work: calls.append("a"))
    again.run("b", lambda work: calls.append("b"))
    assert calls == ["b"]


def test_debris_of_a_killed_stage_is_removed(tmp_path):
    _runner(tmp_path)
    (tmp_path / ".b-abc123").mkdir()
    (tmp_path / ".b-abc123" / "partial").write_text("x")
    _runner(tmp_path)
    assert not (tmp_path / ".b-abc123").exists()


def test_changed_flag_of_a_finished_stage_is_an_error_naming_it(tmp_path):
    runner = _runner(tmp_path)
    runner.run("a", lambda work: {})
    runner.run("b", lambda work: {})
    with pytest.raises(FlagMismatchError, match=r"--y: 2 -> 5.*'b'"):
        _runner(tmp_path, y=5)
    # a flag of an unfinished later stage may change freely
    runner = StageRunner(str(tmp_path), {"x": 1, "y": 2, "z": 9}, STAGE_FLAGS)
    assert runner.done("a") and runner.done("b")


def test_restart_discards_finished_stages(tmp_path):
    runner = _runner(tmp_path)
    runner.run("a", lambda work: {})
    fresh = StageRunner(str(tmp_path), {"x": 7, "y": 2}, STAGE_FLAGS, restart=True)
    assert not fresh.done("a") and not (tmp_path / "a").exists()


def test_unwritable_output_dir_is_a_value_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot create output_dir"):
        StageRunner(str(blocker / "sub"), {}, STAGE_FLAGS)
