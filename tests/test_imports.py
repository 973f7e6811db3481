import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import json, os, sys
before = dict(os.environ)
import tfkdp, tfkdp.export, tfkdp.pipelines, tfkdp.pipelines.workflow
import keras
print(json.dumps({
    "env_changed": sorted(k for k in set(os.environ) | set(before)
                          if os.environ.get(k) != before.get(k)),
    "tfmot_imported": any(m.startswith("tensorflow_model_optimization") for m in sys.modules),
    "policy": keras.config.dtype_policy().name,
    "version": tfkdp.__version__,
    "missing": [n for n in tfkdp.__all__ if not hasattr(tfkdp, n)],
}))
"""


def test_importing_the_packages_has_no_global_side_effects():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["env_changed"] == []
    assert probe["tfmot_imported"] is False  # it would set TF_USE_LEGACY_KERAS=1
    assert probe["policy"] == "float32"
    assert probe["missing"] == []
    from tfkdp.version import __version__

    assert probe["version"] == __version__


_INSTALLED = """
import importlib.util, json, os, sys
import tfkdp.export, tfkdp.pipelines.compress
print(json.dumps({
    "top_level": {n: importlib.util.find_spec(n) is not None for n in ("export", "pipelines")},
    "tfkdp": os.path.dirname(tfkdp.__file__),
    "export": os.path.dirname(tfkdp.export.__file__),
}))
"""


def test_export_and_pipelines_are_installed_under_the_tfkdp_namespace(tmp_path):
    # From a folder outside the repository: only the installed package is importable.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", _INSTALLED], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["top_level"] == {"export": False, "pipelines": False}
    assert probe["export"] == os.path.join(probe["tfkdp"], "export")


def test_console_scripts_and_module_entry_points_run_from_outside_the_repository(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    bindir = os.path.dirname(sys.executable)
    # The console scripts; the `python -m tfkdp...` forms run in test_pipeline/test_export_cli.
    for command in (
        [os.path.join(bindir, "tfkdp-compress"), "--helpfull"],
        [os.path.join(bindir, "tfkdp-export"), "--helpfull"],
    ):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=180)
        # absl answers --helpfull with the flags on stdout and exit code 1.
        assert result.returncode in (0, 1), (command, result.stderr[-2000:])
        assert "--output_dir" in result.stdout or "--model" in result.stdout, command
        assert "Traceback" not in result.stderr, command
