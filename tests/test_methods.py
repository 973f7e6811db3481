"""The method layer: registry, budgets, results, and one code path for recipes."""

import json

import keras
import numpy as np
import pytest

from tfkdp import data, methods, models
from tfkdp.methods import Budget, Method, Pruned
from tfkdp.pruning import PruningPlan, apply_plan, plan_of


def _dataset(n=32, size=12):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, size, size, 1)).astype("float32")
    y = (np.arange(n) % 3).astype("int64")
    return data.make_dataset(x, y, batch_size=16, training=False)


def _model(width=8):
    return models.resnet_cifar(8, width=width, input_shape=(12, 12, 1), num_classes=3)


def test_registry_lists_the_three_kdp_recipes():
    assert methods.names()[:3] == ["kdp", "prune_only", "kd_only"]
    assert isinstance(methods.get("kdp"), methods.kdp.KDP)


def test_unknown_method_lists_valid_names_and_suggests_one():
    with pytest.raises(ValueError, match=r"method='kdpp'.*kdp.*prune_only.*kd_only.*Did you mean 'kdp'"):
        methods.get("kdpp")


def test_bad_method_option_names_the_value():
    with pytest.raises(ValueError, match="update_every=0"):
        methods.get("kdp", update_every=0)
    with pytest.raises(ValueError, match="criterion"):
        methods.get("prune_only", criterion="l7")
    with pytest.raises(TypeError):
        methods.get("kd_only", no_such_option=1)


def test_a_third_party_method_registers_and_runs_through_compress():
    @methods.register
    class HalveFirstGroup(Method):
        name = "test_halve_first_group"

        def get_config(self):
            return {}

        def prune(self, teacher, student, train_data, val_data, budget):
            group = next(g for g in __import__("tfkdp").channel_groups(student) if g.prunable)
            plan = PruningPlan({group.id: range(group.size // 2)})
            return Pruned(apply_plan(student, plan), plan, {}, self.base_record(budget))

    try:
        assert "test_halve_first_group" in methods.names()
        result = methods.get("test_halve_first_group").compress(None, _model(), _dataset(), budget=0.1)
        model, plan, history = result  # a result unpacks like the old tuple
        assert history == {}
        group_id = next(iter(plan))
        assert len(plan[group_id]) == 4
        assert plan_of(result.masked) == plan
        x = np.zeros((2, 12, 12, 1), "float32")
        np.testing.assert_allclose(model(x), result.masked(x), atol=1e-5)
        assert result.record["budget"] == {"kind": "macs", "reduction": 0.1}
    finally:
        methods.base._REGISTRY.pop("test_halve_first_group", None)


def test_register_rejects_what_is_not_a_named_method():
    with pytest.raises(ValueError, match="Method subclass"):
        methods.register(object)

    class Nameless(Method):
        pass

    with pytest.raises(ValueError, match="name must be a non-empty string"):
        methods.register(Nameless)


def test_budget_round_trips_and_validates():
    assert Budget.of(0.5) == Budget.macs(0.5)
    assert Budget.from_dict(json.loads(json.dumps(Budget.params(0.3).to_dict()))) == Budget.params(0.3)
    assert Budget.params(0.3).plan_kwargs() == {"target_params_reduction": 0.3}
    with pytest.raises(ValueError, match="target_macs_reduction=1.5"):
        Budget.macs(1.5)
    with pytest.raises(ValueError, match="budget kind"):
        Budget("flops", 0.5)
    with pytest.raises(ValueError, match="a budget is required"):
        Budget.of(None)


def test_method_config_round_trips_through_json():
    from tfkdp.pruning.sparsity.schedules import ExponentialRho

    method = methods.get("kdp", admm_epochs=2, finetune_epochs=3, criterion="l2", round_to=4,
                         update_every=2, sparsity_ramp=0.5,
                         rho=ExponentialRho(0.1, 1.5, 2, 2.0))  # fmt: skip
    config = json.loads(json.dumps(method.get_config()))
    again = type(method).from_config(config)
    assert again.get_config() == method.get_config()
    assert float(again.rho(4)) == float(method.rho(4))


def test_kdp_record_is_json_and_names_what_the_recipe_decided():
    teacher = _model()
    result = methods.get(
        "kdp", admm_epochs=1, finetune_epochs=1, update_every=2, training={"recalibrate_bn": 0}
    ).compress(teacher, None, _dataset(), None, Budget.macs(0.3))
    record = json.loads(json.dumps(result.record))
    assert record["method"] == "kdp"
    assert record["budget"] == {"kind": "macs", "reduction": 0.3}
    assert record["phases"] == {"admm": 1, "finetune": 1}
    kept = {gid: entry["kept"] for gid, entry in record["channels"].items() if entry["kept"] < entry["size"]}
    assert kept == {gid: len(keep) for gid, keep in result.plan.items()}
    assert record["admm_final_penalty"] >= 0.0
    assert set(result.history) == {"admm", "finetune"}
    keras.backend.clear_session()


def test_recipes_benchmark_builds_every_registered_method_and_row_under_its_protocol():
    """`benchmarks.recipes` gives every registered method (and every row variant) options it
    accepts, with the protocol's epochs in total; `weight` prunes to the target as a sparsity."""
    from benchmarks import recipes

    for row in [*methods.names(), *recipes.VARIANTS]:
        options = recipes.method_options(row, 4, 0.05, 0.6)
        method = methods.get(recipes.method_of(row)[0], **options)
        config = method.get_config()
        epochs = {k: config[k] for k in config if k.endswith("epochs") and config[k] is not None}
        assert sum(epochs.values()) == 4, (row, epochs)
        assert config["training"]["learning_rate"] == 0.05
    weight = methods.get("weight", **recipes.method_options("weight", 4, 0.05, 0.6))
    assert weight.target_sparsity == 0.6 and not weight.prunes
    assert (weight.kd_epochs, weight.prune_epochs, weight.finetune_epochs) == (1, 1, 2)


def test_recipes_kd_only_student_is_the_resnet32_width_closest_to_the_budget():
    from benchmarks import recipes
    from tfkdp import metrics

    teacher_macs = metrics.count_macs(models.resnet_cifar(32, width=16))
    student = recipes.kd_only_student(teacher_macs, 0.51)
    budget = 0.49 * teacher_macs
    width = student.get_layer(index=1).filters  # the stem conv: the network's width
    gaps = {w: abs(metrics.count_macs(models.resnet_cifar(32, width=w)) - budget) for w in (10, 11, 12)}
    assert abs(metrics.count_macs(student) - budget) == min(gaps.values())
    assert width == min(gaps, key=gaps.get)


def test_recipes_benchmark_turns_onednn_off_before_training(monkeypatch):
    """Rows must not depend on the CPU: the script turns oneDNN's custom ops off (as tfkdp's
    entry points do) before it loads a teacher, but not for --table-only."""
    import sys

    from benchmarks import recipes

    class Stop(Exception):
        pass

    def disable():
        raise Stop

    def no_teacher(**kwargs):
        raise AssertionError("the teacher was loaded before oneDNN was turned off")

    monkeypatch.setattr(recipes.onednn, "disable_for_entry_point", disable)
    monkeypatch.setattr(recipes.common, "get_teacher", no_teacher)
    monkeypatch.setattr(sys, "argv", ["recipes", "--methods", "kdp", "--seeds", "0"])
    with pytest.raises(Stop):
        recipes.main()
    written = []
    monkeypatch.setattr(recipes, "write_outputs", lambda results: written.append(results) or "")
    monkeypatch.setattr(sys, "argv", ["recipes", "--table-only"])
    recipes.main()
    assert len(written) == 1


def test_recipes_summary_averages_accuracy_and_size_over_seeds():
    """A row's summary is the mean over its seeds, its size included: cascade's masks move
    during training, so two seeds can end at different MAC counts."""
    from benchmarks import recipes

    def run(acc, macs, params):
        return {"test_accuracy": acc, "macs": macs, "params": params, "nonzero_params": params,
                "train_seconds": 10.0, "teacher_test_accuracy": 0.93,
                "macs_reduction": 1.0 - macs / 100.0}  # fmt: skip

    summary = recipes.summarise({"runs": {"cascade_ta1@0.7": {"1": run(0.93, 30.0, 7), "0": run(0.92, 31.0, 9)}}})
    row = summary["cascade_ta1@0.7"]
    assert row["seeds"] == [0, 1] and row["test_accuracy_per_seed"] == [0.92, 0.93]
    assert row["test_accuracy_mean"] == pytest.approx(0.925)
    assert row["macs"] == pytest.approx(30.5) and row["params"] == pytest.approx(8.0)
    assert row["nonzero_params"] == pytest.approx(8.0)
    assert row["macs_reduction"] == pytest.approx(0.695)


def test_recipes_cascade_table_gives_each_run_and_the_gain_of_the_tas_per_target():
    """The cascade section of `recipes.md`: one line per cascade run at any target, and per
    target the seed-mean accuracy of 0/1/2 TAs and kdp with the TAs' gain over none."""
    from benchmarks import recipes

    def run(acc, swaps=0):
        models = [{"name": "student", "level": 0.5, "macs": 1, "params": 1, "val_accuracy": 0.9,
                   "val_accuracy_recalibrated": 0.91},
                  {"name": "full", "level": 0.0, "macs": 2, "params": 2, "val_accuracy": 0.95}]  # fmt: skip
        record = {"models": models, "mask_overlap": [[0.5], [0.875]], "swaps": [{}] * swaps,
                  "stage1_seconds_per_step": 1.5, "step_time_ratio": 2.0}  # fmt: skip
        return {"test_accuracy": acc, "macs": 25e6, "params": 1, "nonzero_params": 1,
                "train_seconds": 10.0, "teacher_test_accuracy": 0.93, "macs_reduction": 0.5,
                "record": record}  # fmt: skip

    results = {"runs": {
        "cascade_ta0": {"0": run(0.930), "1": run(0.932)},
        "cascade_ta1": {"0": run(0.933, swaps=1)},
        "cascade_ta0@0.7": {"0": run(0.900)},
        "cascade_ta2@0.7": {"0": run(0.910), "1": run(0.914)},
        "kdp@0.7": {"0": {**run(0.905), "record": {}}},
        "pdc": {"0": {**run(0.95), "record": {}}},
    }}  # fmt: skip
    text = recipes.cascade_table(results)
    runs, gains = text.split("Mean test accuracy")
    assert runs.count("| cascade_ta") == 6 and "pdc" not in runs and "| kdp" not in runs
    assert "| cascade_ta1 | 0 | 93.30 | 25.00 | 1.50 | 2.00 | 91.00 / 95.00 | 0.875 | 1 |" in runs
    assert "| 0.51 | 93.10 (2) | 93.30 (1) | - | - | +0.20 | - |" in gains
    assert "| 0.7 | 90.00 (1) | - | 91.20 (2) | 90.50 (1) | - | +1.20 |" in gains
    assert recipes.cascade_table({"runs": {"pdc": results["runs"]["pdc"]}}) == ""
