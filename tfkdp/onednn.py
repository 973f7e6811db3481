"""The oneDNN hazard: strided 1×1 convolutions with few input channels on AVX-512.

TensorFlow 2.21 bundles oneDNN v3.7. Its `jit_1x1:avx512_core` backward-weights
kernel of a 1×1 convolution with a stride > 1 whose input has fewer than 16
channels (16 = its AVX-512 channel block) writes past its scratch buffer when a
thread's share of the batch starts mid-image (odd batch sizes on 2 threads):
training dies with `Segmentation fault`, `Aborted` or `double free or
corruption`. Pruning makes exactly that shape (a ResNet's strided projection
left with 8 input channels), so tfkdp

- keeps at least `ONEDNN_SAFE_CHANNELS` channels on the groups that
  `hazardous_groups` returns when `onednn_active()` (in `make_plan`), and
- runs its command-line entry points with oneDNN's custom operations off
  (`disable_for_entry_point`), unless `TFKDP_ONEDNN=1`.

This module imports neither TensorFlow nor Keras at module level: the entry
points call it before TensorFlow is loaded. Importing it changes nothing.

Reference: uxlfoundation/oneDNN#6035 (heap overflow in the avx512_core 1x1
convolution backward-weights kernel).
"""

import os
import platform
import sys

__all__ = [
    "ONEDNN_SAFE_CHANNELS",
    "ONEDNN_ENV",
    "TFKDP_ONEDNN_ENV",
    "onednn_active",
    "hazardous_groups",
    "disable_for_entry_point",
]

# oneDNN's AVX-512 channel block: a 1x1 strided conv reading >= 16 channels is safe.
ONEDNN_SAFE_CHANNELS = 16
# TensorFlow's switch, read once when TensorFlow is imported (measured: setting it
# after `import tensorflow` changes nothing).
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
# tfkdp's switch for its entry points: "1" keeps TensorFlow's own setting.
TFKDP_ONEDNN_ENV = "TFKDP_ONEDNN"

_CPUINFO = "/proc/cpuinfo"
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# The CPU features for which TensorFlow turns oneDNN on by default on Linux
# (`DefaultOneDnnPolicy` in tensorflow/core/util/port.cc), as /proc/cpuinfo names them.
_DEFAULT_ON_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
_CONV_RANKS = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3}


def _cpu_flags(path=None):
    """The `flags` of the first CPU in /proc/cpuinfo; empty where the file does not exist."""
    try:
        with open(path or _CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _env_bool(value):
    """TensorFlow's `ReadBoolFromEnvVar`: True/False for 1/true/0/false, None otherwise."""
    value = (value or "").strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    return None


def _tf_onednn_enabled():
    """What the loaded TensorFlow decided, or None when TensorFlow is not imported yet."""
    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # TensorFlow moved the probe: fall back to predicting.
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def _custom_ops_on(environ, flags):
    """TensorFlow's decision (`IsMklEnabled`) predicted from the environment and CPU flags."""
    if platform.machine().lower() not in _X86 or not sys.platform.startswith("linux"):
        return False
    explicit = _env_bool(environ.get(ONEDNN_ENV))
    if explicit is not None:
        return explicit
    return any(flag in flags for flag in _DEFAULT_ON_FLAGS)


def onednn_active():
    """Whether the oneDNN kernels that overflow can run in this process.

    True when TensorFlow's oneDNN custom operations are on (the decision of the
    loaded TensorFlow if it is imported, otherwise predicted the way TensorFlow
    makes it: `TF_ENABLE_ONEDNN_OPTS` when it is `0`/`false`/`1`/`true`, else
    on for Linux x86 CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX) and
    the CPU has AVX-512 (`avx512f` among the /proc/cpuinfo flags, so False
    where that file does not exist).

    Returns:
        A bool. Reading it imports nothing and sets nothing.

    Example:
        >>> from tfkdp import onednn
        >>> floor = onednn.ONEDNN_SAFE_CHANNELS if onednn.onednn_active() else 1

    Reference: uxlfoundation/oneDNN#6035.
    """
    flags = _cpu_flags()
    if "avx512f" not in flags:
        return False
    decided = _tf_onednn_enabled()
    if decided is not None:
        return decided
    return _custom_ops_on(os.environ, flags)


def _is_hazardous_conv(layer):
    """A Conv1D/2D/3D (not depthwise, separable or transposed) with a 1×1 kernel and a stride > 1."""
    rank = next((r for name, r in _CONV_RANKS.items() if _is_keras_class(layer, name)), None)
    if rank is None:
        return False
    kernel_size = tuple(getattr(layer, "kernel_size", ()) or ())
    strides = tuple(getattr(layer, "strides", ()) or ())
    return (
        len(kernel_size) == rank
        and all(int(k) == 1 for k in kernel_size)
        and any(int(s) > 1 for s in strides)
    )


def _is_keras_class(layer, name):
    import keras

    return isinstance(layer, getattr(keras.layers, name))


def hazardous_groups(model, groups=None):
    """Channel groups read by a strided 1×1 convolution (the oneDNN hazard).

    A group is hazardous when one of its `in_params` is the `kernel` of a
    Conv1D/Conv2D/Conv3D whose kernel size is 1 on every axis and whose
    stride is > 1 on some axis: pruning the group below
    `ONEDNN_SAFE_CHANNELS` (16) channels makes oneDNN's AVX-512
    backward-weights kernel of that convolution overflow. The answer depends
    only on the model's structure; callers decide what to do with it (only
    when `onednn_active()`).

    Args:
        model: a functional (or built sequential) `keras.Model`; nested
            models are looked through.
        groups: the model's `tfkdp.channel_groups(model)` if already computed;
            computed (cached by tfkdp) when None.

    Returns:
        A dict `{group_id: [layer paths]}`, in group order, listing for each
        hazardous group the paths (`"outer/inner"` in nested models) of the
        strided 1×1 convolutions reading it. Empty when there are none.
        Unprunable groups are included; filter on `prunable` if needed.

    Raises:
        ValueError: if `model` is not a functional or built sequential model
            (from `tfkdp.channel_groups`).

    Example:
        >>> import tfkdp
        >>> model = tfkdp.models.resnet_cifar(8, width=8, input_shape=(16, 16, 1))
        >>> hazardous_groups(model)
        {'stem_conv': ['stage2_block1_proj'], 'stage2_block1_conv2': ['stage3_block1_proj']}

    Reference: uxlfoundation/oneDNN#6035.
    """
    # Imported here: this module must load without TensorFlow (entry points).
    from tfkdp.pruning import channel_groups, get_layer

    if groups is None:
        groups = channel_groups(model)
    verdict = {}  # layer path -> hazardous?; a projection usually reads one group only
    found = {}
    for group in groups:
        for ref in group.in_params:
            if ref.attr != "kernel":
                continue
            if ref.layer not in verdict:
                verdict[ref.layer] = _is_hazardous_conv(get_layer(model, ref.layer))
            if verdict[ref.layer]:
                paths = found.setdefault(group.id, [])
                if ref.layer not in paths:
                    paths.append(ref.layer)
    return found


def disable_for_entry_point(argv=None):
    """Runs this command with oneDNN's custom operations off, unless asked not to.

    Called first thing by tfkdp's command-line entry points. With
    `TFKDP_ONEDNN=1`, or `TF_ENABLE_ONEDNN_OPTS` already set by the user, it
    does nothing. Otherwise it sets `TF_ENABLE_ONEDNN_OPTS=0`, which
    TensorFlow reads once, when it is imported. If TensorFlow is already
    imported (an entry point inside the `tfkdp` package imports it with
    `tfkdp`) and has turned oneDNN on, the variable comes too late: the
    process re-executes itself (`os.execv`, same pid, same arguments) with it
    set, which costs one more interpreter start and TensorFlow import
    (5-7 s measured on a 2-core machine). Where TensorFlow left oneDNN off (e.g.
    CPUs without AVX512_VNNI, AVX_VNNI or AMX) there is nothing to undo and no
    re-execution.

    Args:
        argv: the command to re-execute, interpreter arguments included;
            defaults to `sys.orig_argv` (Python >= 3.10).

    Returns:
        `"kept"` (user's setting kept), `"set"` (variable set before or after
        a TensorFlow that had oneDNN off); never returns after re-executing.

    Reference: uxlfoundation/oneDNN#6035.
    """
    if os.environ.get(TFKDP_ONEDNN_ENV, "").strip() == "1" or os.environ.get(ONEDNN_ENV, "").strip():
        return "kept"
    os.environ[ONEDNN_ENV] = "0"  # also inherited by every subprocess we start
    if _tf_onednn_enabled():
        argv = list(sys.orig_argv if argv is None else argv)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.execv(sys.executable, [sys.executable, *argv[1:]])
    return "set"
