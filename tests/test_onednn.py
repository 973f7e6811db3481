"""The oneDNN hazard: detection (any CPU) and the upstream crash (AVX-512 CPUs only).

Upstream bug: uxlfoundation/oneDNN#6035. oneDNN v3.7 (bundled with TF 2.21)
overflows a heap buffer in the `jit_1x1:avx512_core` backward-weights kernel
of a 1×1 convolution with stride > 1 whose input has < 16 channels, when a
thread's share of an odd batch starts mid-image. tfkdp's guard keeps
`ONEDNN_SAFE_CHANNELS` (16) channels on the groups `hazardous_groups` finds.
"""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

import tfkdp
from tfkdp import onednn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The pure-Keras reproduction; `channels` is the input width of the conv.
_REPRO = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    import keras
    from tensorflow.python.util import _pywrap_util_port

    if not _pywrap_util_port.IsMklEnabled():
        sys.exit(3)  # oneDNN is off: this run would prove nothing
    # The overflow depends on how the batch is split between threads; 2 is
    # the measured case (odd batch 77 on a 2-core Xeon).
    tf.config.threading.set_intra_op_parallelism_threads(2)
    channels = int(sys.argv[1])
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, channels)),
        keras.layers.Conv2D(24, 1, strides=2, use_bias=False),
    ])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(77 * 25, 16, 16, channels)).astype("float32")
    y = np.zeros((77 * 25, 8, 8, 24), "float32")
    model.fit(x, y, batch_size=77, epochs=16, verbose=0)  # 400 steps
    print("clean")
""")


def _requires_avx512():
    if "avx512f" not in onednn._cpu_flags():
        pytest.skip(
            "oneDNN's jit_1x1:avx512_core kernel (uxlfoundation/oneDNN#6035) only runs on "
            "CPUs with AVX-512; this CPU has no avx512f flag"
        )


def _train_repro(channels):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _REPRO, str(channels)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if result.returncode == 3:
        pytest.skip("TF_ENABLE_ONEDNN_OPTS=1 did not turn oneDNN on in this TensorFlow build")
    return result


def test_strided_1x1_conv_with_16_input_channels_trains_with_onednn_on():
    _requires_avx512()
    result = _train_repro(onednn.ONEDNN_SAFE_CHANNELS)
    # returncode < 0 is a signal (SIGSEGV, SIGABRT from glibc's heap checks).
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip().endswith("clean")


@pytest.mark.xfail(
    strict=False,
    reason="documents uxlfoundation/oneDNN#6035: heap corruption crashes most runs but not "
    "always; an XPASS on every run may mean the bug is fixed upstream",
)
def test_strided_1x1_conv_with_8_input_channels_crashes_with_onednn_on():
    _requires_avx512()
    result = _train_repro(8)
    assert result.returncode != 0, "oneDNN did not overflow on 8 input channels"


def test_hazardous_groups_finds_the_reproduction_shape():
    inputs = keras.Input((16, 16, 4))
    hidden = keras.layers.Conv2D(8, 3, padding="same", name="producer")(inputs)
    outputs = keras.layers.Conv2D(24, 1, strides=2, use_bias=False, name="proj")(hidden)
    model = keras.Model(inputs, outputs)
    assert onednn.hazardous_groups(model) == {"producer": ["proj"]}


def test_hazardous_groups_of_tiny_resnet_are_the_inputs_of_strided_projections():
    model = tfkdp.models.resnet_cifar(8, width=8, input_shape=(16, 16, 1))
    found = onednn.hazardous_groups(model)
    # stage2/3 open with a strided 1x1 projection of the previous stage's output,
    # whose group is named after the first conv producing it.
    assert found == {
        "stem_conv": ["stage2_block1_proj"],
        "stage2_block1_conv2": ["stage3_block1_proj"],
    }
    # Passing precomputed groups gives the same answer (make_plan reuses its own).
    assert onednn.hazardous_groups(model, tfkdp.channel_groups(model)) == found


def test_hazardous_groups_ignores_stride_1_wide_kernels_and_depthwise():
    inputs = keras.Input((16, 16, 4))
    x = keras.layers.Conv2D(8, 1, name="pointwise_stride1")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv3x3_stride2")(x)
    x = keras.layers.DepthwiseConv2D(1, strides=2, name="depthwise_stride2")(x)
    x = keras.layers.Conv2D(8, (1, 3), strides=2, padding="same", name="conv1x3_stride2")(x)
    model = keras.Model(inputs, x)
    assert onednn.hazardous_groups(model) == {}


def test_hazardous_groups_finds_conv1d_and_conv3d_and_nested_models():
    inner_in = keras.Input((8, 8, 6))
    inner = keras.Model(
        inner_in, keras.layers.Conv2D(4, 1, strides=(1, 2), name="proj")(inner_in), name="inner"
    )
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="c2")(inputs)
    outputs = inner(x)
    model = keras.Model(inputs, outputs)
    assert onednn.hazardous_groups(model) == {"c2": ["inner/proj"]}

    seq_in = keras.Input((16, 3))
    y = keras.layers.Conv1D(5, 3, padding="same", name="c1")(seq_in)
    y = keras.layers.Conv1D(7, 1, strides=2, name="p1")(y)
    assert onednn.hazardous_groups(keras.Model(seq_in, y)) == {"c1": ["p1"]}

    vol_in = keras.Input((4, 4, 4, 2))
    z = keras.layers.Conv3D(5, 3, padding="same", name="c3")(vol_in)
    z = keras.layers.Conv3D(7, 1, strides=2, name="p3")(z)
    assert onednn.hazardous_groups(keras.Model(vol_in, z)) == {"c3": ["p3"]}


def _fake_cpu(monkeypatch, tmp_path, flags, tf_decision=None):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\n")
    monkeypatch.setattr(onednn, "_CPUINFO", str(cpuinfo))
    monkeypatch.setattr(onednn, "_tf_onednn_enabled", lambda: tf_decision)
    monkeypatch.setattr(onednn.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(onednn.sys, "platform", "linux")


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ("avx2 avx512f avx512_vnni", None, True),  # TF's default: on with VNNI
        ("avx2 avx512f", None, False),  # AVX-512 without VNNI/BF16/AMX: TF leaves it off
        ("avx2 avx512f", "1", True),
        ("avx2 avx512f", "TRUE", True),
        ("avx2 avx512f avx512_vnni", "0", False),
        ("avx2 avx512f avx512_vnni", "false", False),
        ("avx2 avx512f avx512_vnni", "maybe", True),  # TF ignores an invalid value
        ("avx2 avx_vnni", "1", False),  # oneDNN on, but no AVX-512 kernel to overflow
    ],
)
def test_onednn_active_follows_tensorflow_policy(monkeypatch, tmp_path, flags, env, expected):
    _fake_cpu(monkeypatch, tmp_path, flags)
    if env is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", env)
    assert onednn.onednn_active() is expected


def test_onednn_active_prefers_the_loaded_tensorflow_decision(monkeypatch, tmp_path):
    # TensorFlow reads the variable once at import: a later change does not count.
    _fake_cpu(monkeypatch, tmp_path, "avx512f avx512_vnni", tf_decision=False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    assert onednn.onednn_active() is False


def test_onednn_active_is_false_without_cpuinfo_or_off_x86(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_CPUINFO", str(tmp_path / "absent"))
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    assert onednn.onednn_active() is False
    _fake_cpu(monkeypatch, tmp_path, "avx512f avx512_vnni")
    monkeypatch.setattr(onednn.platform, "machine", lambda: "aarch64")
    assert onednn.onednn_active() is False


def test_entry_point_guard_sets_variable_or_keeps_user_choice(monkeypatch):
    monkeypatch.setattr(onednn, "_tf_onednn_enabled", lambda: None)  # TF not imported yet
    monkeypatch.setattr(onednn.os, "execv", pytest.fail)
    monkeypatch.delenv("TFKDP_ONEDNN", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert onednn.disable_for_entry_point() == "set"
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    assert onednn.disable_for_entry_point() == "kept"
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    monkeypatch.setenv("TFKDP_ONEDNN", "1")
    assert onednn.disable_for_entry_point() == "kept"
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ


def test_entry_point_guard_reexecutes_when_loaded_tensorflow_has_onednn_on(monkeypatch):
    monkeypatch.setattr(onednn, "_tf_onednn_enabled", lambda: True)
    monkeypatch.delenv("TFKDP_ONEDNN", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    calls = []

    def fake_execv(path, args):
        calls.append((path, args, os.environ.get("TF_ENABLE_ONEDNN_OPTS")))
        raise SystemExit(0)  # execv never returns

    monkeypatch.setattr(onednn.os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        onednn.disable_for_entry_point(["python", "-m", "tfkdp.pipelines.compress", "--x=1"])
    assert calls == [
        (sys.executable, [sys.executable, "-m", "tfkdp.pipelines.compress", "--x=1"], "0")
    ]


_IMPORT_PROBE = textwrap.dedent("""
    import os, sys
    before = dict(os.environ)
    from tfkdp import onednn
    onednn.onednn_active()
    print(sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)))
""")


def test_importing_and_querying_sets_no_environment_variable():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    result = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# benchmarks.onednn sets TF_ENABLE_ONEDNN_OPTS itself, per run it compares; common is a library.
_NOT_ENTRY_POINTS = {"__init__", "common", "onednn"}


def _first_calls_of_main(path):
    """Names called by `main()`'s top-level statements, in order (lazy imports skipped)."""
    import ast

    tree = ast.parse(path.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    names = []
    for statement in main.body:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Call):
                names.append(ast.unparse(node.func))
    return names


def test_every_benchmark_turns_onednn_off_before_building_models():
    import pathlib

    scripts = sorted(pathlib.Path(REPO, "benchmarks").glob("*.py"))
    checked = [p for p in scripts if p.stem not in _NOT_ENTRY_POINTS]
    assert len(checked) >= 15, [p.stem for p in scripts]
    for path in checked:
        calls = _first_calls_of_main(path)
        assert "onednn.disable_for_entry_point" in calls, path.stem
        before = calls[: calls.index("onednn.disable_for_entry_point")]
        # only argument parsing may come first (benchmarks.recipes: not for --table-only)
        assert all(name in {"_parse", "_parse_args", "print", "write_outputs", "_load"}
                   for name in before), (path.stem, before)
    source = "\n".join(p.read_text() for p in checked)
    assert 'os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"' not in source  # one place: tfkdp.onednn
