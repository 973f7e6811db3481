"""The method layer's pipeline hooks: `pipeline_options`, `state_dir` and `report`."""

import json
import os

import pytest

from tests.test_pipeline import _values
from tfkdp import methods
from tfkdp.methods.kdp import KDOnly
from tfkdp.pipelines import workflow
from tfkdp.pipelines.config import METHOD_FLAGS, RESUME_DIR, STAGE_FLAGS


def test_method_flags_belong_to_the_compress_stage():
    assert set(METHOD_FLAGS) <= set(STAGE_FLAGS["compress"])


def test_get_class_returns_the_class_and_lists_names_when_unknown():
    assert methods.get_class("kdp") is methods.kdp.KDP
    with pytest.raises(ValueError, match=r"method='kdpp'.*valid names.*Did you mean 'kdp'"):
        methods.get_class("kdpp")


def test_recipe_pipeline_options_map_the_shared_flags():
    flags = {"compress_epochs": 3, "finetune_epochs": 2, "criterion": "l2", "round_to": 4}
    options = methods.kdp.KDP.pipeline_options(flags, training=None)
    assert options == {"admm_epochs": 3, "finetune_epochs": 2, "criterion": "l2", "round_to": 4,
                       "training": None}  # fmt: skip


def test_pipeline_runs_a_method_through_its_hooks(tmp_path):
    """A registered method gets its options, a resumable state folder and its report section."""
    seen = {}

    @methods.register
    class Hooked(KDOnly):
        name = "test_hooked"

        @classmethod
        def pipeline_options(cls, flags, training):
            seen["temperature"] = flags["temperature"]
            options = super().pipeline_options(flags, training)
            options["admm_epochs"] = 1  # its own mapping of the flags
            return options

        def prune(self, teacher, student, train_data, val_data, budget):
            seen["state_dir"] = self.state_dir
            with open(os.path.join(self.state_dir, "progress.json"), "w") as f:
                f.write("{}")
            return super().prune(teacher, student, train_data, val_data, budget)

        def report(self, record, out_dir):
            path = os.path.join(out_dir, "hooked.png")
            with open(path, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n")
            return {"markdown": f"## hooked\n\nphases: {record['phases']}", "plots": {"hooked": path}}

    try:
        values = _values(tmp_path, method="test_hooked", compress_epochs=1, finetune_epochs=0,
                         formats=["tflite"], temperature=3.0)  # fmt: skip
        out = values["output_dir"]
        markdown = workflow.run(values)
        assert seen["temperature"] == 3.0
        assert seen["state_dir"] == os.path.join(os.path.abspath(out), RESUME_DIR, "compress")
        # the stage finished: its resumable state is gone
        assert not os.path.exists(seen["state_dir"])
        assert "## hooked\n\nphases: {'kd': 1}" in markdown
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        assert report["method_report"]["plots"] == {"hooked": "hooked.png"}
        assert report["plots"]["hooked"] == "hooked.png"
        assert os.path.exists(os.path.join(out, "hooked.png"))
    finally:
        methods.base._REGISTRY.pop("test_hooked", None)
