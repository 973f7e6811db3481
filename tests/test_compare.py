"""`tfkdp-compress --method=a,b,c`: one teacher, every method's folder, one comparison, resume, failures."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags as absl_flags
from test_pipeline import _tiny_npz, _values  # tests/ is on sys.path (rootdir-relative, no package)

from tfkdp import methods
from tfkdp.pipelines import compare, comparison, workflow

ROW_FIELDS = {
    "method", "test_accuracy", "macs", "params", "nonzero_params", "size_bytes", "gzip_bytes",
    "litert_p50_ms", "wall_seconds", "epochs", "within_budget", "status",
}


def _compare_values(tmp_path, names):
    values = _values(tmp_path, method=",".join(names), teacher_epochs=1, formats=["tflite"],
                     latency_repeat=5, verify_samples=32)  # fmt: skip
    values.update(seeds=[], deploy_format="tflite")
    return values


def test_a_crashed_method_resumes_a_failed_one_is_reported_then_reruns(tmp_path, monkeypatch):
    names = ["kdp", "pdc"]
    values = _compare_values(tmp_path, names)
    out = values["output_dir"]
    calls = []
    real = dict(workflow._STAGE_FNS)
    crash = {"kdp": "strip"}  # (method, stage) that is killed / fails
    fail = {}

    def wrapped(name):
        def stage(ctx, work):
            method = ctx.flags["method"]
            calls.append((method, name))
            if crash.get(method) == name:
                raise KeyboardInterrupt("simulated kill of the second method")
            if fail.get(method) == name:
                raise RuntimeError("simulated failure of pdc")
            return real[name](ctx, work)

        return stage

    for name in real:
        monkeypatch.setitem(workflow._STAGE_FNS, name, wrapped(name))
    with pytest.raises(KeyboardInterrupt):
        compare.run(values)
    assert calls[-1] == ("kdp", "strip") and not any(m == "pdc" for m, _ in calls)
    assert not os.path.exists(os.path.join(out, "comparison.json"))  # nothing finished yet

    # Rerun: kdp resumes at its strip stage; pdc fails.
    calls.clear()
    crash.clear()
    fail["pdc"] = "compress"
    markdown, failed = compare.run(values)
    assert [s for m, s in calls if m == "kdp"] == ["strip", "export", "verify", "latency", "report"]
    assert failed == ["pdc"]
    with open(os.path.join(out, "comparison.json")) as f:
        result = json.load(f)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["pdc"]["status"] == "failed" and "simulated failure" in rows["pdc"]["errors"][0]
    assert "simulated failure" in markdown and "| pdc | failed |" in markdown

    # Third run: only pdc runs, from its compress stage (its teacher stage had finished);
    # kdp, finished, is not opened again.
    calls.clear()
    fail.clear()
    markdown, failed = compare.run(values)
    assert failed == [] and {m for m, _ in calls} == {"pdc"}
    assert [s for _, s in calls][0] == "compress"

    with open(os.path.join(out, "comparison.json")) as f:
        result = json.load(f)
    assert [r["method"] for r in result["rows"]] == names
    total = values["compress_epochs"] + values["finetune_epochs"]
    for row in result["rows"]:
        assert ROW_FIELDS <= set(row), row
        assert row["status"] == "ok" and 0.0 <= row["test_accuracy"] <= 1.0
        assert row["macs"] < result["teacher"]["macs"] and row["within_budget"] is True
        assert row["size_bytes"] > 0 and row["gzip_bytes"] > 0 and row["litert_p50_ms"] > 0
        assert sum(row["epochs"].values()) == total, row["epochs"]  # the same epoch budget
        folder = os.path.join(out, row["method"])
        for name in ("report.json", "report.md", "state.json", "export", "strip"):
            assert os.path.exists(os.path.join(folder, name)), (row["method"], name)
    assert rows["pdc"]["epochs"] == {"compress_epochs": total, "finetune_epochs": 0}
    assert result["teacher"]["litert_p50_ms"] > 0
    best = max(result["rows"], key=lambda r: (r["test_accuracy"], -r["litert_p50_ms"]))
    assert result["best"] == best["method"]
    with open(os.path.join(out, "best", "best.json")) as f:
        assert json.load(f)["method"] == result["best"]
    assert os.path.exists(os.path.join(out, "best", "report.json"))
    for name in ("comparison.md", "pareto_macs.png", "pareto_latency.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # One teacher for all: every method's run loaded the comparison's teacher file.
    teacher_file = os.path.join(out, "teacher", "teacher.keras")
    for name in names:
        with open(os.path.join(out, name, "flags.json")) as f:
            assert json.load(f)["teacher"] == teacher_file


def test_a_failing_method_is_reported_and_the_exit_code_says_so(tmp_path):
    """Unreachable budget for kdp (fails its preflight); kd_only removes no channels and runs."""
    npz = _tiny_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tfkdp.pipelines.compress", f"--output_dir={out}",
               f"--dataset=npz:{npz}", "--teacher=resnet8", "--method=kd_only,kdp",
               "--target_macs_reduction=0.5", "--round_to=64", "--teacher_epochs=1",
               "--compress_epochs=1", "--finetune_epochs=1", "--batch_size=16", "--formats=tflite",
               "--verify_samples=16", "--latency_repeat=5"]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("tfkdp-compress: error:")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1 and "kdp" in errors[0] and "Traceback" not in result.stderr
    with open(out / "comparison.json") as f:
        rows = {r["method"]: r for r in json.load(f)["rows"]}
    assert rows["kd_only"]["status"] == "ok" and rows["kd_only"]["within_budget"] is False
    assert rows["kdp"]["status"] == "failed" and "not reachable" in rows["kdp"]["errors"][0]
    assert not os.path.exists(out / "kdp")  # failed before any of its stages
    assert not os.path.exists(out / "best")  # no method met the budget
    assert "| kdp | failed |" in result.stdout


def test_method_lists_and_seeds_are_checked():
    assert compare.parse_methods("all") == methods.names()
    assert compare.parse_methods(" kdp , pdc ") == ["kdp", "pdc"]
    with pytest.raises(ValueError, match="valid names") as info:
        compare.parse_methods("kdp,nope")
    assert all(name in str(info.value) for name in methods.names())
    with pytest.raises(ValueError, match="more than once"):
        compare.parse_methods("kdp,kdp")
    with pytest.raises(ValueError, match="--seeds"):
        compare.parse_seeds({"seeds": ["0", "x"], "seed": 0})
    assert compare.parse_seeds({"seeds": [], "seed": 3}) == [3]
    assert compare.is_comparison({"method": "kdp", "seeds": ["0", "1"], "seed": 0})
    assert not compare.is_comparison({"method": "kdp", "seeds": [], "seed": 0})
    base = {"method": "kdp,pdc", "seeds": [], "seed": 0, "formats": ["onnx"], "strategy": "default"}
    with pytest.raises(ValueError, match="not among --formats"):
        compare.check(dict(base, deploy_format="tflite"))
    with pytest.raises(ValueError, match="multiworker"):
        compare.check(dict(base, formats=["tflite"], deploy_format="tflite", strategy="multiworker"))
    # The CLI's validator names the registry too.
    from tfkdp.pipelines import compress

    with pytest.raises(absl_flags.ValidationError, match="valid: <kdp"):
        compress._known_method("kdp,nope")
    assert compress._known_method("all") and compress._known_method("kdp,pdc")


@pytest.mark.parametrize("name", methods.names())
def test_every_method_splits_the_same_total_epochs(name):
    flags = {"cascade_stage2_epochs": 1, "weight_order": "sequential", "finetune_epochs": 1,
             "compress_epochs": 2, "target_sparsity": 0.5}  # fmt: skip
    for total in (2, 3, 5):
        run, epochs = compare.method_values(dict(flags, compress_epochs=total - 1), name, 0, "t", "o")
        assert sum(epochs.values()) == total, (name, epochs)
        cls = methods.get_class(name)
        from tfkdp.train.phases import Training

        method = cls(**cls.pipeline_options(dict(run, criterion="l1", round_to=1, lr=0.01,
                                                 pdc_epsilon=3e-3, dean_every=10, dean_lr=0.05,
                                                 dean_distill_max=2.0, dean_sparsity_max=2.0,
                                                 cascade_num_tas=1, cascade_levels=[],
                                                 mskd_criteria=["l1"], mskd_allocations=["global"],
                                                 mskd_top_k=1, mskd_select_steps=0),
                                            Training()))  # fmt: skip
        config = method.get_config()
        trained = sum(config.get(k, 0) or 0 for k in
                      ("admm_epochs", "finetune_epochs", "stage2_epochs", "kd_epochs", "prune_epochs"))  # fmt: skip
        assert trained == total, (name, total, config)


def _row(method, seed, accuracy, p50, reduction=0.5):
    return {
        "method": method, "seed": seed, "dir": f"{method}/seed{seed}", "test_accuracy": accuracy,
        "macs": 1e6 * (1 - reduction), "params": 1000, "nonzero_params": 900,
        "macs_reduction": reduction, "deploy_format": "tflite", "size_bytes": 4000,
        "gzip_bytes": 3000, "litert_p50_ms": p50, "teacher_litert_p50_ms": 2.0,
        "wall_seconds": 10.0, "epochs": {"compress_epochs": 2, "finetune_epochs": 1}, "rejected": [],
    }  # fmt: skip


def test_seeds_are_aggregated_and_the_best_follows_the_stated_rule():
    from tfkdp.pipelines import comparison

    runs = [
        _row("a", 0, 0.90, 1.0), _row("a", 1, 0.92, 1.2),  # mean 0.91, the fastest of the tie
        _row("b", 0, 0.91, 1.5), _row("b", 1, 0.91, 1.5),  # mean 0.91: a tie, slower
        _row("c", 0, 0.95, 0.8, reduction=0.40),  # most accurate, but outside the budget
    ]
    failures = [{"method": "d", "seed": 0, "error": "ValueError: unreachable", "epochs": None}]
    teacher = {"accuracy": 0.93, "macs": 1e6, "params": 2000, "seconds": 5.0}
    budget = {"target_macs_reduction": 0.5, "target_latency_ms": None}
    setup = {"teacher": "t", "seeds": [0, 1], "total_epochs": 3, "deploy_format": "tflite", "threads": "1"}
    result = comparison.build(teacher, runs, failures, ["a", "b", "c", "d", "e"], budget, setup)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["a"]["test_accuracy"] == pytest.approx(0.91)
    assert rows["a"]["test_accuracy_std"] == pytest.approx(0.0141421, rel=1e-4)  # sample std
    assert (rows["a"]["test_accuracy_min"], rows["a"]["test_accuracy_max"]) == (0.90, 0.92)
    assert rows["a"]["litert_p50_ms"] == pytest.approx(1.1) and rows["a"]["speedup"] == pytest.approx(2.0 / 1.1)
    assert rows["c"]["within_budget"] is False and rows["d"]["status"] == "failed"
    # e has neither run nor failed yet (the comparison is written after every run)
    assert rows["e"]["status"] == "pending" and rows["e"]["within_budget"] is False
    assert result["best"] == "a"  # tie on accuracy with b: the lower latency wins
    assert result["teacher"]["litert_p50_ms"] == 2.0
    # 0.49 is within make_plan's 2 %; 0.47 is not.
    assert comparison.within_budget(dict(rows["a"], macs_reduction=0.49), budget)
    assert not comparison.within_budget(dict(rows["a"], macs_reduction=0.47), budget)
    latency = {"target_macs_reduction": 0.5, "target_latency_ms": 1.0}
    assert comparison.within_budget(dict(rows["a"], litert_p50_ms=1.09), latency)
    assert not comparison.within_budget(dict(rows["a"], litert_p50_ms=1.11), latency)
    # a share of the teacher's latency (timed in the same runs): 1.1 x (1 - 0.5) x 2.0 ms = 1.1 ms
    relative = {"target_macs_reduction": 0.5, "target_latency_ms": None, "target_latency_reduction": 0.5}
    assert comparison.within_budget(dict(rows["a"], litert_p50_ms=1.09), relative, teacher_p50_ms=2.0)
    assert not comparison.within_budget(dict(rows["a"], litert_p50_ms=1.11), relative, teacher_p50_ms=2.0)
    assert comparison.within_budget(dict(rows["a"], litert_p50_ms=1.0), relative) is None  # no teacher time
    assert "50 % less latency than the teacher" in comparison.markdown(dict(result, budget=relative))
    text = comparison.markdown(result)
    assert "| a **(best)** | 91.00 ± 1.41 |" in text and "| d | failed |" in text
    assert "| e | not run yet |" in text
    assert "ValueError: unreachable" in text


@pytest.mark.parametrize("count", [3, 10, 11, 20])
def test_pareto_rows_get_distinct_colours_up_to_twenty(count):
    colours = comparison.row_colors(count)
    assert len(colours) == count
    assert len(set(colours)) == count  # matplotlib's default cycle repeats after 10
