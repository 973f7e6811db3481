import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import json, os, sys
before = dict(os.environ)
import tfkdp, export, pipelines, pipelines.workflow
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
