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


def test_admm_rho_flags_reach_kdp_and_ddsl_and_bad_values_are_refused():
    flags = {"compress_epochs": 3, "finetune_epochs": 2, "criterion": "l2", "round_to": 4,
             "admm_rho_initial": 0.3, "admm_rho_final": None}  # fmt: skip
    options = methods.kdp.KDP.pipeline_options(flags, training=None)
    assert options["rho_initial"] == 0.3 and "rho_final" not in options
    kdp = methods.get("kdp", **{k: v for k, v in options.items() if k != "training"})
    assert (kdp.rho_initial, kdp.rho_final, kdp.normalize) == (0.3, 25.0, "mean")
    # ddsl keeps the penalty its dean was tuned with unless told otherwise.
    ddsl = methods.get("ddsl")
    assert (ddsl.rho_initial, ddsl.rho_final, ddsl.normalize) == (1e-3, 0.05, True)
    with pytest.raises(ValueError, match="rho_initial"):
        methods.get("kdp", rho_initial=-1.0)


def test_pipeline_gives_the_method_its_options_state_dir_and_report_section(tmp_path):
    """`workflow._method` builds the method from its hook and sets `state_dir`; the report
    merges the method's section and plots (the recipes' pipeline tests run it end to end)."""
    from types import SimpleNamespace

    from tfkdp.pipelines import report as report_lib

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

    try:
        values = _values(tmp_path, method="test_hooked", temperature=3.0)
        runner = SimpleNamespace(output_dir=str(tmp_path / "out"))
        method = workflow._method(SimpleNamespace(flags=values, runner=runner), "compress")
        assert isinstance(method, Hooked) and method.admm_epochs == 1
        assert seen["temperature"] == 3.0
        assert method.state_dir == os.path.join(runner.output_dir, RESUME_DIR, "compress")
        assert os.path.isdir(method.state_dir)
    finally:
        methods.base._REGISTRY.pop("test_hooked", None)

    out_dir = tmp_path / "report"
    out_dir.mkdir()
    plot = out_dir / "hooked.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    report = {
        "teacher": {"accuracy": 0.9, "macs": 100, "params": 10},
        "student": {"accuracy": 0.8, "macs": 50, "params": 5},
        "artifacts": [], "stages": {}, "flags": {"method": "test_hooked"},
        "method_report": {"markdown": "## hooked\n\nsection", "plots": {"hooked": str(plot)}},
    }  # fmt: skip
    markdown = report_lib.write(report, str(out_dir))
    assert "## hooked\n\nsection" in markdown
    with open(out_dir / "report.json") as f:
        written = json.load(f)
    assert written["method_report"]["plots"] == {"hooked": "hooked.png"}
    assert written["plots"]["hooked"] == "hooked.png"
