"""MS-KD: candidates from several criteria, two-rung model selection, KD of the winner."""

import json
import logging
import os

import keras
import numpy as np
import pytest

from tfkdp import data, methods, metrics, models
from tfkdp.methods.mskd import MSKD, STATE_FILE, _plan_key
from tfkdp.pruning import criteria
from tfkdp.train.phases import Training

_TARGET = 0.5


class _L1Copy(criteria.L1):
    """L1 under another name: its plans are identical to l1's."""

    name = "l1_copy"


class _Counting(MSKD):
    """MSKD that counts the candidates it scores (zero-shot) and short-trains."""

    def __init__(self, **options):
        super().__init__(**options)
        self.zero_shot_calls, self.short_kd_calls = [], []

    def _zero_shot(self, student, plan, *args):
        self.zero_shot_calls.append(plan)
        return super()._zero_shot(student, plan, *args)

    def _short_kd(self, *args):
        self.short_kd_calls.append(args[-1])
        return super()._short_kd(*args)


def _images(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.2, size=(n, 12, 12, 1)).astype("float32")
    y = np.arange(n) % 3
    for i, label in enumerate(y):
        x[i, :, label * 4 : label * 4 + 4, 0] += 0.8
    return x, y.astype("int32")


def _train():
    x, y = _images(64, 0)
    return data.make_dataset(x, y, batch_size=16, training=False)  # 4 batches, fixed order


_OPTIONS = dict(
    criteria=["l1", "l1_copy", "hessian"], allocations=["global", "uniform"], top_k=2,
    select_steps=1, bn_batches=2, admm_epochs=1, finetune_epochs=0, round_to=1,
    training=Training(learning_rate=0.02, recalibrate_bn=2),
)  # fmt: skip


def _run(state_dir, step="compress"):
    keras.utils.set_random_seed(0)
    teacher = models.resnet_cifar(8, width=8, input_shape=(12, 12, 1), num_classes=3)
    method = _Counting(**_OPTIONS)
    method.state_dir = str(state_dir)
    # val_data=None: the held-out split is carved from one pass of the training data.
    student = method.prepare_student(teacher, None)
    result = getattr(method, step)(teacher, student, _train(), None, methods.Budget.macs(_TARGET))
    return teacher, method, result


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One selection over 8 candidates (2 of them copies of l1's plans), with state."""
    state_dir = tmp_path_factory.mktemp("mskd_state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(criteria._REGISTRY, "l1_copy", _L1Copy)
        keras.utils.set_random_seed(0)
        teacher = models.resnet_cifar(8, width=8, input_shape=(12, 12, 1), num_classes=3)
        method = _Counting(**_OPTIONS)
        method.state_dir = str(state_dir)
        # val_data=None: the held-out split is carved from one pass of the training data.
        result = method.compress(teacher, None, _train(), None, methods.Budget.macs(_TARGET))
    with open(os.path.join(state_dir, STATE_FILE)) as f:
        state = json.load(f)
    report = method.report(result.record, str(tmp_path_factory.mktemp("report")))
    return {
        "teacher_macs": metrics.count_macs(teacher), "method": method, "result": result,
        "state_dir": state_dir, "state": state, "report": report,
        "stripped_macs": metrics.count_macs(result.model),
    }  # fmt: skip


def _winner_by_scores(rows):
    scored = [r for r in rows if r["short_kd"]]
    best = min(scored, key=lambda r: (-r["short_kd"]["val_accuracy"], r["short_kd"]["val_kd_loss"]))
    return best["id"]


def test_every_candidate_meets_the_mac_budget_within_2_percent(first):
    rows = first["result"].record["mskd"]["candidates"]
    assert [r["id"] for r in rows] == [
        f"{c}/{a}" for c in _OPTIONS["criteria"] for a in _OPTIONS["allocations"]
    ]
    target = (1 - _TARGET) * first["teacher_macs"]
    for r in rows:
        assert abs(r["macs"] - target) <= 0.02 * target, r
    # the stripped winner costs exactly what its plan says
    winner = next(r for r in rows if r["chosen"])
    assert first["stripped_macs"] == winner["macs"]


def test_winner_is_the_argmax_of_the_recorded_short_kd_scores(first):
    record = first["result"].record["mskd"]
    rows = record["candidates"]
    assert [r["id"] for r in rows if r["chosen"]] == [record["winner"]]
    assert record["winner"] == _winner_by_scores(rows)
    # the short-KD rung ran on the zero-shot rung's top 2 distinct candidates
    distinct = [r for r in rows if r["duplicate_of"] is None]
    top = sorted(distinct, key=lambda r: (-r["zero_shot"]["val_accuracy"], r["zero_shot"]["val_kd_loss"]))
    assert {r["id"] for r in distinct if r["short_kd"]} == {r["id"] for r in top[:2]}
    for r in rows:
        assert 0.0 <= r["zero_shot"]["val_accuracy"] <= 1.0 and r["zero_shot"]["val_kd_loss"] >= 0.0


def test_identical_plans_are_scored_once(first):
    method, rows = first["method"], first["result"].record["mskd"]["candidates"]
    by_id = {r["id"]: r for r in rows}
    for allocation in _OPTIONS["allocations"]:
        copy = by_id[f"l1_copy/{allocation}"]
        assert copy["duplicate_of"] == f"l1/{allocation}"
        assert copy["zero_shot"] == by_id[f"l1/{allocation}"]["zero_shot"]
    keys = {r["key"] for r in rows}
    assert len(keys) <= len(rows) - 2
    # zero-shot once per distinct plan, plus once more for each of the top 2 before its short KD
    assert len(method.zero_shot_calls) == len(keys) + 2
    assert {_plan_key(p) for p in method.zero_shot_calls[: len(keys)]} == keys
    assert len(method.short_kd_calls) == 2


def test_selection_steps_come_out_of_the_same_total_and_cost_is_recorded(first):
    mskd = first["result"].record["mskd"]
    steps = mskd["steps"]
    assert steps == {"selection": 2, "winner_kd": 2, "finetune": 0, "budget": 4, "steps_per_epoch": 4}
    assert steps["selection"] + steps["winner_kd"] + steps["finetune"] == steps["budget"]
    assert mskd["val_source"].startswith("carved: training batches 2..2 of one pass (16 images")
    assert 0.0 < mskd["selection_seconds"] < mskd["total_seconds"]
    assert mskd["selection_share"] == pytest.approx(mskd["selection_seconds"] / mskd["total_seconds"])
    history = first["result"].history
    assert list(history) == ["kd"] and len(history["kd"]["loss"]) == 1


def test_report_has_the_candidates_table_and_the_plot(first):
    report = first["report"]
    rows = first["result"].record["mskd"]["candidates"]
    winner = first["result"].record["mskd"]["winner"]
    assert "| candidate | criterion | allocation | MACs | params | zero-shot val acc %" in report["markdown"]
    assert f"| {winner} |" in report["markdown"] and "**yes**" in report["markdown"]
    assert report["markdown"].count("\n| ") == len(rows) + 1  # header + one row per candidate
    png = report["plots"]["mskd_candidates"]
    assert os.path.getsize(png) > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_candidates_and_the_same_seed_gives_the_same_choice(first, tmp_path):
    state = dict(first["state"])
    done = list(state["zero_shot"])
    # a run killed during the short-KD rung, with 2 zero-shot scores lost too: 2 distinct
    # candidates to score again, and one of the top 2 to short-train again
    state["zero_shot"] = {k: state["zero_shot"][k] for k in done[:-2]}
    kept, lost = list(state["short_kd"])
    state["short_kd"] = {kept: state["short_kd"][kept]}
    os.link(os.path.join(first["state_dir"], f"short_kd_{kept}.weights.h5"),
            tmp_path / f"short_kd_{kept}.weights.h5")  # fmt: skip
    with open(tmp_path / STATE_FILE, "w") as f:
        json.dump(state, f)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(criteria._REGISTRY, "l1_copy", _L1Copy)
        _, method, selection = _run(tmp_path, step="select")
    # the 2 unscored candidates rescored in the zero-shot rung, then the lost one of the top 2
    # before its short KD; the finished ones skipped
    assert [_plan_key(p) for p in method.zero_shot_calls[2:]] == [lost]
    assert {_plan_key(p) for p in method.zero_shot_calls[:2]} == set(done[-2:])
    assert len(method.short_kd_calls) == 1
    old = {r["id"]: r for r in first["result"].record["mskd"]["candidates"]}
    new = selection["record"]["candidates"]
    assert selection["record"]["winner"] == first["result"].record["mskd"]["winner"]
    assert _plan_key(selection["plan"]) == next(r["key"] for r in new if r["chosen"])
    for r in new:
        # the same seed and batches: the rescored candidates score what they scored before
        assert r["zero_shot"]["val_accuracy"] == old[r["id"]]["zero_shot"]["val_accuracy"]
        np.testing.assert_allclose(
            r["zero_shot"]["val_kd_loss"], old[r["id"]]["zero_shot"]["val_kd_loss"], rtol=1e-4
        )  # float32 reductions may sum in another order across runs
        if r["short_kd"]:
            assert r["short_kd"]["val_accuracy"] == old[r["id"]]["short_kd"]["val_accuracy"]
    with open(tmp_path / STATE_FILE) as f:
        assert len(json.load(f)["zero_shot"]) == len(done)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"criteria": ["l1", "l3"]}, r"'l3'.*\['bn_gamma', 'fpgm', 'hessian', 'l1', 'l2', 'random', 'taylor'\]"),
        ({"criteria": "l1"}, r"criteria must be a non-empty list of names; received criteria='l1'"),
        ({"criteria": ["l1", "l1"]}, r"criteria names \['l1'\] more than once"),
        ({"allocations": ["global", "greedy"]}, r"\('global', 'uniform'\); received allocation='greedy'"),
        ({"top_k": 0}, r"top_k must be an integer >= 1; received top_k=0"),
        ({"select_steps": -5}, r"received select_steps=-5"),
        ({"bn_batches": 1.5}, r"received bn_batches=1.5"),
        ({"holdout_batches": 0}, r"received holdout_batches=0"),
        ({"admm_epochs": 0}, r"received admm_epochs=0"),
        ({"criterion": "l2"}, r"mskd takes criteria= \(a list\), not criterion=; received criterion='l2'"),
    ],
)
def test_bad_options_are_value_errors_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        methods.get("mskd", **options)


def test_selection_steps_that_leave_no_winner_training_are_refused_before_scoring():
    teacher = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    method = _Counting(criteria=["l1"], allocations=["global"], top_k=1, select_steps=4,
                       admm_epochs=1, finetune_epochs=0, round_to=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"select_steps=4\) leave no step of the 1 × 4 steps"):
        method.compress(teacher, None, _train(), _train(), methods.Budget.macs(_TARGET))
    assert method.zero_shot_calls == []


def test_config_round_trip_and_pipeline_options():
    method = methods.get("mskd", criteria=["l1", "hessian"], allocations=["uniform"], top_k=4,
                         select_steps=7, admm_epochs=2, finetune_epochs=1)  # fmt: skip
    config = method.get_config()
    assert "criterion" not in config and config["criteria"] == ["l1", "hessian"]
    assert MSKD.from_config(json.loads(json.dumps(config))).get_config() == config
    flags = {"compress_epochs": 3, "finetune_epochs": 2, "round_to": 4, "criterion": "l2",
             "mskd_criteria": ["fpgm"], "mskd_allocations": ["global"], "mskd_top_k": 2,
             "mskd_select_steps": 0}  # fmt: skip
    options = MSKD.pipeline_options(flags, Training())
    assert options["select_steps"] is None and options["admm_epochs"] == 3
    built = MSKD(**options)
    assert (built.criteria, built.top_k, built.finetune_epochs, built.round_to) == (["fpgm"], 2, 2, 4)


def test_pipeline_runs_mskd_end_to_end_and_reports_the_candidates(tmp_path, tiny_teacher, caplog):
    from test_pipeline import _values  # tests/ is on sys.path (rootdir-relative, no package)

    from tfkdp.pipelines import workflow

    values = _values(
        tmp_path, method="mskd", teacher=tiny_teacher, formats=["tflite"], teacher_epochs=1, finetune_epochs=0,
        mskd_criteria=["l1"], mskd_allocations=["global", "uniform"], mskd_top_k=5,
        mskd_select_steps=1,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        markdown = workflow.run(values)
    assert "top_k=5 is larger than the" in caplog.text
    out = values["output_dir"]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    mskd = report["student"]["record"]["mskd"]
    distinct = len({r["key"] for r in mskd["candidates"]})
    assert mskd["top_k"] == distinct <= 2
    assert mskd["notes"] == [f"top_k=5 is larger than the {distinct} distinct candidates; clamped to {distinct}"]
    assert mskd["val_source"].startswith("val_data (")
    assert 0.0 < mskd["selection_share"] < 1.0
    assert "### MS-KD model selection" in markdown and f"| {mskd['winner']} |" in markdown
    assert os.path.exists(os.path.join(out, "mskd_candidates.png"))
    assert report["student"]["macs"] <= 0.52 * report["teacher"]["macs"]
    assert not os.path.exists(os.path.join(out, ".resume", "compress"))  # spent with the stage


def _recipes_run(criterion, allocation, zero_shot, short_kd, test_accuracy):
    """A `benchmarks.recipes` row of a one-candidate mskd run (only the fields the analysis reads)."""
    candidate = {
        "id": f"{criterion}/{allocation}", "macs": 100, "params": 10,
        "zero_shot": {"val_accuracy": zero_shot, "val_kd_loss": 1 - zero_shot},
        "short_kd": {"val_accuracy": short_kd, "val_kd_loss": 1 - short_kd},
    }  # fmt: skip
    options = {"criteria": [criterion], "allocations": [allocation], "top_k": 1}
    return {"method": "mskd", "options": options, "test_accuracy": test_accuracy,
            "train_seconds": 1.0, "record": {"mskd": {"candidates": [candidate]}}}  # fmt: skip


def test_benchmark_tau_from_recipes_rows_matches_scipy():
    """`benchmarks.mskd --from-recipes`: only one-candidate mskd rows of the seed at the default
    target count; τ per rung is scipy's on those rows; the rule's pick is the top-k by zero-shot
    and then the best short KD."""
    from scipy import stats

    from benchmarks.mskd import recipes_candidates, summarise

    runs = {
        "mskd_l1": {"0": _recipes_run("l1", "global", 0.2, 0.80, 0.930)},
        "mskd_l2_uniform": {"0": _recipes_run("l2", "uniform", 0.4, 0.85, 0.932)},
        "mskd_taylor": {"0": _recipes_run("taylor", "global", 0.6, 0.90, 0.931),
                        "1": _recipes_run("taylor", "global", 0.6, 0.90, 0.5)},
        "mskd_hessian_uniform": {"0": _recipes_run("hessian", "uniform", 0.5, 0.91, 0.934)},
        "mskd_l1@0.7": {"0": _recipes_run("l1", "global", 0.1, 0.7, 0.9)},  # another target
        "kdp": {"0": {"method": "kdp", "test_accuracy": 0.93}},
    }  # fmt: skip
    rows, full = recipes_candidates({"runs": runs}, seed=0)
    assert full is None
    assert [r["id"] for r in rows] == ["taylor/global", "hessian/uniform", "l2/uniform", "l1/global"]
    taus, summary = summarise(rows, top_k=3)
    final = [0.931, 0.934, 0.932, 0.930]
    expected = stats.kendalltau([0.6, 0.5, 0.4, 0.2], final)[0]
    assert taus["zero_shot_val_accuracy"]["tau"] == pytest.approx(expected)
    assert taus["short_kd_val_accuracy"]["tau"] == pytest.approx(
        stats.kendalltau([0.90, 0.91, 0.85, 0.80], final)[0]
    )
    assert taus["zero_shot_val_accuracy"]["n"] == 4
    assert summary["mskd_rule_pick"] == "hessian/uniform"  # best short KD of the top 3 zero-shot
    assert summary["regret"] == pytest.approx(0.0)
    assert summary["l1_global_test_accuracy"] == 0.930
