"""Resumable stages: each writes into a temp folder, then is renamed and recorded in state.json.

A stage is finished exactly when its folder exists and `state.json` records
it; both happen after all its outputs are written, so a crash (even
`kill -9`) mid-stage loses only that stage's work, and the next run redoes it.
"""

import json
import os
import shutil
import tempfile
import time

from absl import logging

from tfkdp.export._atomic import write_json_atomic

STATE_FILE = "state.json"


def read_state(path, **defaults):
    """The JSON state at `path` with `defaults` set where missing (just `defaults` if absent).

    Raises:
        ValueError: naming the file when it exists but cannot be read or parsed.
    """
    state = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is unreadable ({error}); rerun with --restart to start over") from error
    for key, value in defaults.items():
        state.setdefault(key, value)
    return state


class FlagMismatchError(ValueError):
    """Stored flags differ from the new ones in a way that invalidates finished stages."""


class StageRunner:
    """Runs named stages in order, skipping those a previous run finished.

    Args:
        output_dir: where stage folders, `state.json` and `flags.json` live.
        flags: the resolved flag values (a JSON-able dict) of this run.
        stage_flags: `{stage: [flag names it depends on]}` in stage order; a
            stage also depends on every earlier stage's flags.
        restart: wipe previous results and start over.
    """

    def __init__(self, output_dir, flags, stage_flags, restart=False):
        self.output_dir = os.path.abspath(output_dir)
        self.flags = dict(flags)
        self.stages = list(stage_flags)
        self.stage_flags = {k: tuple(v) for k, v in stage_flags.items()}
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create output_dir {self.output_dir!r}: {error}") from error
        if not os.access(self.output_dir, os.W_OK):
            raise ValueError(f"output_dir {self.output_dir!r} is not writable")
        if restart:
            self._wipe()
        self._drop_debris()
        self.state = self._load()
        self._check_flags()
        self.state["flags"] = self.flags
        self._save()

    @property
    def state_path(self):
        return os.path.join(self.output_dir, STATE_FILE)

    def stage_dir(self, stage):
        return os.path.join(self.output_dir, stage)

    def done(self, stage):
        return stage in self.state["completed"] and os.path.isdir(self.stage_dir(stage))

    def record(self, stage):
        """The record a finished stage left (its `seconds` and `summary`)."""
        return self.state["completed"][stage]

    def _wipe(self):
        for stage in self.stages:
            shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        shutil.rmtree(os.path.join(self.output_dir, ".resume"), ignore_errors=True)
        for name in (STATE_FILE, "flags.json"):
            path = os.path.join(self.output_dir, name)
            if os.path.exists(path):
                os.remove(path)

    def _drop_debris(self):
        # Temp folders of stages a killed run never finished.
        for name in os.listdir(self.output_dir):
            if name.startswith(".") and name.split("-")[0][1:] in self.stage_flags:
                shutil.rmtree(os.path.join(self.output_dir, name), ignore_errors=True)

    def _load(self):
        return read_state(self.state_path, completed={}, flags={})

    def _check_flags(self):
        old = self.state["flags"]
        finished = [s for s in self.stages if s in self.state["completed"]]
        seen = []
        for stage in self.stages:
            seen.extend(self.stage_flags[stage])
            if stage not in finished:
                continue
            changed = sorted(f for f in set(seen) if f in old and old[f] != self.flags.get(f))
            if changed:
                details = ", ".join(f"--{f}: {old[f]!r} -> {self.flags.get(f)!r}" for f in changed)
                raise FlagMismatchError(
                    f"{self.output_dir} holds results made with other flags ({details}), which "
                    f"invalidates the finished stage {stage!r}. Rerun with the original flags "
                    "to resume, pass --restart to start over, or choose another --output_dir."
                )

    def _save(self):
        write_json_atomic(self.state_path, self.state)

    def run(self, stage, fn):
        """Runs `fn(work_dir) -> summary dict` unless `stage` already finished.

        `fn` writes its outputs into `work_dir`, a temp folder that becomes
        `output_dir/stage` only after `fn` returns. Returns the summary.
        """
        if stage not in self.stage_flags:
            raise ValueError(f"unknown stage {stage!r}; stages are {self.stages}")
        if self.done(stage):
            logging.info("[%s] already finished in a previous run; skipped", stage)
            return self.record(stage)["summary"]
        # A stage folder without a state record is debris of a crash after the
        # rename; drop it so the stage reruns from scratch.
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        work = tempfile.mkdtemp(prefix=f".{stage}-", dir=self.output_dir)
        start = time.time()
        logging.info("[%s] started", stage)
        try:
            summary = fn(work) or {}
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        os.replace(work, self.stage_dir(stage))
        seconds = round(time.time() - start, 2)
        self.state["completed"][stage] = {"seconds": seconds, "summary": summary}
        self._save()
        logging.info("[%s] finished in %.1f s", stage, seconds)
        return summary
