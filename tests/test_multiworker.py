"""Scale-out (#20): `--strategy=multiworker` — TF_CONFIG, chief-only writing, two local workers.

The fast tests check the pieces in this process. The end-to-end test runs two
worker processes on 127.0.0.1 (one CPU device each), kills both after the
first fine-tune epoch and restarts them: 96 s on a quiet 2-core machine.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pytest

from tfkdp import runtime
from tfkdp.pipelines import workflow
from tfkdp.train import phases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_WORKERS = {"cluster": {"worker": ["127.0.0.1:2001", "127.0.0.1:2002"]},
               "task": {"type": "worker", "index": 0}}  # fmt: skip


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "is not set"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "no non-empty cluster.worker"),
        ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker"}}',
         r"cluster jobs \['ps'\]"),
        ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "not host:port"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}',
         "task.type 'evaluator'"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
         r"task.index 2, outside \[0, 1\]"),
    ],
)  # fmt: skip
def test_parse_tf_config_rejects_missing_or_malformed_values_naming_the_format(
    value, message, monkeypatch
):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match=message) as error:
        runtime.parse_tf_config(value)
    assert '"cluster": {"worker": ["host1:12345"' in str(error.value)  # the expected format
    with pytest.raises(ValueError, match=message):
        runtime.multiworker_strategy() if value is None else runtime.parse_tf_config(value)


def test_is_chief_is_the_chief_task_else_worker_zero():
    config = runtime.parse_tf_config(json.dumps(TWO_WORKERS))
    assert config == {"cluster": TWO_WORKERS["cluster"], "task": {"type": "worker", "index": 0}}
    assert runtime.is_chief(config)
    assert not runtime.is_chief(dict(config, task={"type": "worker", "index": 1}))
    with_chief = {"cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                  "task": {"type": "worker", "index": 0}}  # fmt: skip
    assert not runtime.is_chief(runtime.parse_tf_config(json.dumps(with_chief)))
    with_chief["task"] = {"type": "chief", "index": 0}
    assert runtime.is_chief(runtime.parse_tf_config(json.dumps(with_chief)))


def test_worker_dir_is_stable_per_task_and_none_on_the_chief(tmp_path, monkeypatch):
    values = {"strategy": "multiworker", "output_dir": str(tmp_path / "out")}
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    assert workflow.worker_dir(values) is None  # worker 0 of a cluster without a chief
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps(dict(TWO_WORKERS, task={"type": "worker", "index": 1}))
    )
    first = workflow.worker_dir(values)
    # a restarted worker (same TF_CONFIG, same --output_dir) finds its own state again
    assert first == workflow.worker_dir(dict(values))
    assert os.path.basename(first).startswith("tfkdp-worker1-")
    assert not first.startswith(str(tmp_path))
    assert workflow.worker_dir(dict(values, output_dir=str(tmp_path / "other"))) != first
    assert workflow.worker_dir(dict(values, strategy="mirrored")) is None


def test_multiworker_global_batch_must_split_over_the_replicas():
    two = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(ValueError, match="--batch_size=15 is the global batch.*2 replicas"):
        workflow._log_global_batch(two, {"strategy": "multiworker", "batch_size": 15})
    workflow._log_global_batch(two, {"strategy": "multiworker", "batch_size": 16})
    workflow._log_global_batch(two, {"strategy": "mirrored", "batch_size": 15})  # as before


def test_training_backup_dir_puts_one_backup_and_restore_first(tmp_path):
    other = keras.callbacks.History()
    training = phases.Training(backup_dir=str(tmp_path))
    callbacks = phases._with_backup([other], training, "kdp ADMM phase")
    assert isinstance(callbacks[0], keras.callbacks.BackupAndRestore)
    assert callbacks[0].backup_dir == os.path.join(str(tmp_path), "kdp_ADMM_phase")
    assert callbacks[1:] == [other]
    # a phase given its own (pdc, cascade) keeps it; no backup_dir: nothing added
    own = keras.callbacks.BackupAndRestore(str(tmp_path / "own"))
    assert phases._with_backup([own, other], training, "p") == [own, other]
    assert phases._with_backup([other], phases.Training(), "p") == [other]


def test_set_mixed_precision_sets_the_keras_policy_and_rejects_others():
    previous = runtime.set_mixed_precision("mixed_bfloat16")
    try:
        assert previous == "float32"
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert runtime.set_mixed_precision("none") == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "float32"
        with pytest.raises(ValueError, match=r"mixed_precision must be one of .*'float16'"):
            runtime.set_mixed_precision("float16")
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ----------------------------------------------------------------- end to end

# One worker: runs the pipeline with the test's values and dumps, for the
# comparison, the ADMM state when the ADMM phase ends and every stage's model.
_WORKER = r"""
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)  # two workers share two cores
import keras
import numpy as np
from absl import logging
from tfkdp.pipelines import workflow
from tfkdp.pruning.sparsity import admm as admm_lib

logging.set_verbosity(logging.INFO)
keras.utils.set_random_seed(1234)  # the global seed of the test process (conftest.py)
values_path, dump = sys.argv[1], sys.argv[2]
with open(values_path) as f:
    values = json.load(f)
os.makedirs(dump, exist_ok=True)
plan = admm_lib.ADMM.sparsity_plan

def sparsity_plan(self):
    np.savez(os.path.join(dump, "admm.npz"), **{w.path: w.numpy() for w in self.weights})
    return plan(self)

admm_lib.ADMM.sparsity_plan = sparsity_plan

def dumping(stage, fn):
    def wrapped(ctx, work):
        summary = fn(ctx, work)
        model = keras.saving.load_model(os.path.join(work, "masked.keras"))
        np.savez(os.path.join(dump, stage + ".npz"),
                 **{f"{i}:{w.path}": w.numpy() for i, w in enumerate(model.weights)})
        return summary
    return wrapped

for stage in ("compress", "finetune"):
    workflow._STAGE_FNS[stage] = dumping(stage, workflow._STAGE_FNS[stage])
print("RESULT", workflow.run(values).splitlines()[0], flush=True)
"""

# Seconds a launch of the two workers may take before the test kills them and fails.
_LAUNCH_TIMEOUT = 900



def _launch(tmp_path, values_by_worker, ports, attempt):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index, values in enumerate(values_by_worker):
        path = tmp_path / f"values{index}.json"
        path.write_text(json.dumps(values))
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))  # fmt: skip
        log = open(tmp_path / f"worker{index}.{attempt}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(path), str(tmp_path / f"dump{index}")],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
    return procs


def _kill(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _wait(procs, tmp_path, attempt, deadline):
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        _kill(procs)
        logs = [(tmp_path / f"worker{i}.{attempt}.log").read_text()[-3000:] for i in range(2)]
        pytest.fail(f"the workers did not finish in {_LAUNCH_TIMEOUT} s; logs:\n" + "\n".join(logs))
    for index, proc in enumerate(procs):
        log = (tmp_path / f"worker{index}.{attempt}.log").read_text()
        assert proc.returncode == 0, f"worker {index} exited {proc.returncode}:\n{log[-4000:]}"


def _load(path):
    with np.load(path) as arrays:
        return {k: arrays[k] for k in arrays.files}


def test_two_workers_run_kdp_resume_after_a_kill_and_match_one_process(
    tmp_path, tiny_teacher, monkeypatch
):
    from test_pipeline import _values

    ports = runtime.free_ports(2)
    common = dict(teacher=tiny_teacher, strategy="multiworker", compress_epochs=1,
                  finetune_epochs=2, formats=["tflite"], verify_samples=16, latency_repeat=2)  # fmt: skip
    chief = _values(tmp_path, **common)
    # The second "host" gets its own output_dir: it must stay empty (nothing written there).
    other = dict(chief, output_dir=str(tmp_path / "worker1_out"))
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
         "task": {"type": "worker", "index": 1}}))  # fmt: skip
    own_dir = workflow.worker_dir(other)
    monkeypatch.delenv("TF_CONFIG")

    # 1. Both workers start; once the chief has checkpointed the first fine-tune epoch,
    # worker 1 is killed, then worker 0 (MWMS: a lost peer fails the others' collectives,
    # and the cluster manager restarts every worker).
    deadline = time.time() + _LAUNCH_TIMEOUT
    procs = _launch(tmp_path, [chief, other], ports, attempt=1)
    patterns = [os.path.join(folder, ".resume", "finetune", "backup", "*", "training_metadata.json")
                for folder in (chief["output_dir"], own_dir)]  # fmt: skip
    pattern = patterns[0]
    try:
        # Both workers have checkpointed the first fine-tune epoch (written atomically, so
        # a kill during a later write leaves this one readable).
        while not all(glob.glob(p) for p in patterns):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                _kill(procs)
                log = (tmp_path / "worker0.1.log").read_text()[-4000:]
                pytest.fail(f"no fine-tune checkpoint appeared before the workers stopped:\n{log}")
            time.sleep(0.2)
        with open(glob.glob(pattern)[0]) as f:
            assert json.load(f)["epoch"] == 1
    finally:
        _kill(procs[1:])
        _kill(procs[:1])
    assert not os.path.exists(os.path.join(chief["output_dir"], "report.json"))

    # 2. Restarted with the same TF_CONFIG, both resume: the fine-tune at its epoch 2.
    deadline = time.time() + _LAUNCH_TIMEOUT
    procs = _launch(tmp_path, [chief, other], ports, attempt=2)
    _wait(procs, tmp_path, 2, deadline)
    for index in range(2):
        log = (tmp_path / f"worker{index}.2.log").read_text()
        assert "global batch 16 = 8 per replica x 2 replicas" in log
        assert "[compress] started" not in log  # finished before the kill: not run again
        assert "Epoch 2/2" in log and "Epoch 1/2" not in log, "fine-tune did not resume"
    with open(os.path.join(chief["output_dir"], "report.json")) as f:
        report = json.load(f)
    assert report["flags"]["strategy"] == "multiworker"
    assert [a["format"] for a in report["artifacts"]] == ["tflite"]
    assert not os.path.exists(other["output_dir"])  # the non-chief wrote nothing there
    assert not os.path.exists(own_dir)  # and removed its own folder when done
    assert not glob.glob(os.path.join(chief["output_dir"], ".resume", "*"))

    # Same all-reduced gradients, same kernels: the workers end bit-identical.
    dumps = [{n: _load(tmp_path / f"dump{i}" / f"{n}.npz") for n in ("admm", "finetune")}
             for i in range(2)]  # fmt: skip
    for name in ("admm", "finetune"):
        assert dumps[0][name].keys() == dumps[1][name].keys()
        for key, value in dumps[0][name].items():
            np.testing.assert_array_equal(value, dumps[1][name][key], err_msg=f"{name} {key}")
    with np.load(chief["dataset"][len("npz:") :]) as arrays:
        n_train = len(arrays["x_train"]) - round(0.1 * len(arrays["x_train"]))  # validation_split
    steps = -(-n_train // 16)
    assert int(dumps[0]["admm"]["admm/step"]) == steps  # the ADMM phase: one epoch

    # 3. One process, MirroredStrategy over two CPU devices, the same global batch of 16
    # (8 per replica): the compress stage (uninterrupted above) gives the same ADMM state.
    import tensorflow as tf

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the 2 logical CPU devices configured in conftest.py")
    from tfkdp.pruning.sparsity import admm as admm_lib

    seen = {}
    plan = admm_lib.ADMM.sparsity_plan

    def record(self):
        seen.update({w.path: w.numpy() for w in self.weights})
        return plan(self)

    def stop(ctx, work):
        raise KeyboardInterrupt("reference: compress only")

    monkeypatch.setattr(admm_lib.ADMM, "sparsity_plan", record)
    monkeypatch.setitem(workflow._STAGE_FNS, "finetune", stop)
    reference = dict(chief, strategy="mirrored", output_dir=str(tmp_path / "single"))
    with pytest.raises(KeyboardInterrupt):
        workflow.run(reference)
    assert seen.keys() == dumps[0]["admm"].keys()
    for key, value in dumps[0]["admm"].items():
        # 1e-4: the same float32 math; only the all-reduce (gRPC ring vs one device) and
        # oneDNN kernel choices differ, over 6 steps of a resnet8.
        np.testing.assert_allclose(seen[key], value, rtol=1e-4, atol=1e-4, err_msg=key)
