"""The `weight` method: KD, weight pruning with KD, KD fine-tune; and its pipeline run."""

import json
import os

import keras
import numpy as np
import pytest

from tfkdp import data, methods, metrics, models
from tfkdp.methods.weight import WeightPruning
from tfkdp.pruning import unstructured


def _dataset(tiny_images):
    x, y = tiny_images
    return data.make_dataset(x, y, batch_size=16, training=False)  # 4 steps per epoch


def _model(width, name):
    return models.resnet_cifar(8, width=width, input_shape=(12, 12, 1), num_classes=3, name=name)


def _training():
    from tfkdp.train.phases import Training

    # recalibrate_bn=2: both BN passes of the tiny set; jit off for a fast trace on CPU.
    return Training(learning_rate=0.02, jit_compile=False, recalibrate_bn=2)


def test_weight_method_reaches_the_target_and_finalizes_a_plain_model_with_the_zeros(tiny_images):
    order = "sequential"  # joint runs in the next test (fewer phases, the same code after)
    train = _dataset(tiny_images)
    teacher, student = _model(8, "teacher"), _model(4, "student")
    method = methods.get("weight", order=order, target_sparsity=0.6, training=_training())
    result = method.compress(teacher, student, train, None, budget=None)

    sparsity = result.record["weight_sparsity"]
    sizes = {p: m.mask.numpy().size for p, m in unstructured.weight_masks(result.masked).items()}
    assert sparsity["pruned"] == sum(int(np.floor(0.6 * n + 0.5)) for n in sizes.values())
    assert set(sparsity["layers"]) == set(unstructured.prunable_layers(student))
    assert set(result.history) == {"kd", "prune", "finetune"}
    assert len(result.plan) == 0  # weights, not channels
    final = result.model
    assert unstructured.weight_masks(final) == {}
    assert metrics.count_params(final) == metrics.count_params(student)
    assert metrics.count_macs(final) == metrics.count_macs(student)  # dense kernels: same MACs
    # at least the pruned entries are zero (BN re-estimation changes no kernel)
    assert metrics.count_nonzero_params(final) <= metrics.count_params(final) - sparsity["pruned"]
    x = tiny_images[0][:8]
    np.testing.assert_allclose(final(x), result.masked(x), rtol=0, atol=1e-5)


def test_global_scope_and_layer_selection_are_honoured(tiny_images):
    train = _dataset(tiny_images)
    method = WeightPruning(
        order="joint", target_sparsity=0.5, scope="global", layers=["logits", "stage3_block1_conv2"],
        finetune_epochs=0, training=_training(),
    )  # fmt: skip
    result = method.compress(_model(8, "teacher"), _model(4, "student"), train)
    assert set(result.history) == {"prune"}  # joint: no KD-only phase before pruning
    sparsity = result.record["weight_sparsity"]
    assert list(sparsity["layers"]) == ["stage3_block1_conv2", "logits"]
    assert sparsity["pruned"] == int(np.floor(0.5 * sparsity["total"] + 0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_sparsity": 1.0}, r"target_sparsity.*\[0, 1\).*target_sparsity=1\.0"),
        ({"target_sparsity": -0.1}, r"target_sparsity=-0\.1"),
        ({"order": "parallel"}, r"order=.parallel."),
        ({"order": "joint", "kd_epochs": 1}, r"kd_epochs=1"),
        ({"order": "sequential", "kd_epochs": 0}, r"kd_epochs=0"),
        ({"scope": "row"}, r"scope=.row."),
        ({"ramp": 0.0}, r"ramp=0\.0"),
        ({"layers": "logits"}, r"layers='logits'"),
    ],
)
def test_bad_options_are_value_errors_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.get("weight", **kwargs)


def test_config_round_trips_and_pipeline_flags_map_onto_options():
    method = methods.get("weight", order="joint", target_sparsity=0.8, scope="global")
    again = WeightPruning.from_config(json.loads(json.dumps(method.get_config())))
    assert again.get_config() == method.get_config()
    flags = {"compress_epochs": 3, "finetune_epochs": 2, "weight_order": "sequential",
             "target_sparsity": 0.7}  # fmt: skip
    options = WeightPruning.pipeline_options(flags, None)
    assert (options["kd_epochs"], options["prune_epochs"], options["finetune_epochs"]) == (1, 2, 2)
    options = WeightPruning.pipeline_options(dict(flags, weight_order="joint"), None)
    assert (options["kd_epochs"], options["prune_epochs"]) == (0, 3)
    assert options["target_sparsity"] == 0.7
    assert WeightPruning.prunes is False  # the MAC budget's preflight does not apply


def test_schedule_ends_on_a_pruning_step_at_the_target():
    method = WeightPruning(target_sparsity=0.5, ramp=0.5)
    schedule = method.schedule(steps=100)
    end = schedule.end_step
    assert end % schedule.frequency == 0 and end >= 50
    should, sparsity = schedule(end)
    assert bool(should) and float(sparsity) == pytest.approx(0.5)


def test_pipeline_runs_method_weight_end_to_end_with_tflite_sparse(tmp_path):
    from tests.test_pipeline import _values
    from tfkdp.pipelines import workflow

    values = _values(
        tmp_path, method="weight", weight_order="sequential", target_sparsity=0.75,
        teacher_epochs=1, compress_epochs=2, finetune_epochs=1, formats=["tflite", "tflite_sparse"],
        latency_repeat=3,
    )  # fmt: skip
    markdown = workflow.run(values)
    with open(os.path.join(values["output_dir"], "report.json")) as f:
        report = json.load(f)
    student, teacher = report["student"], report["teacher"]
    assert student["record"]["method"] == "weight"
    assert student["record"]["weight_sparsity"]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert student["params"] == teacher["params"]  # same layers
    pruned = student["record"]["weight_sparsity"]["pruned"]
    assert student["nonzero_params"] <= teacher["nonzero_params"] - pruned
    efficiency = student["performance_efficiency"]
    assert efficiency["nonzero_params"] == pytest.approx(
        metrics.performance_efficiency(student["accuracy"], teacher["accuracy"],
                                       student["nonzero_params"], teacher["nonzero_params"])
    )  # fmt: skip
    assert efficiency["macs"] == pytest.approx(student["accuracy"] / teacher["accuracy"])
    by_format = {a["format"]: a for a in report["artifacts"]}
    assert set(by_format) == {"tflite", "tflite_sparse"}
    for artifact in by_format.values():
        assert artifact["top1_agreement"] == 1.0
        assert 0 < artifact["gzip_bytes"] < artifact["size_bytes"]
        assert artifact["performance_efficiency"]["latency_ms_p50"] > 0
    # 75 % zeros: the sparse encoding and gzip both shrink the file
    assert by_format["tflite_sparse"]["size_bytes"] < by_format["tflite"]["size_bytes"]
    assert teacher["reference_artifact"]["size_bytes"] > 0
    assert "non-zero params" in markdown and "| tflite_sparse |" in markdown
    assert keras.saving.load_model(
        os.path.join(values["output_dir"], "strip", "student.keras")
    ).count_params() == student["params"]
