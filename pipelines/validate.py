"""Pre-flight checks of the pipeline's inputs, run before any training.

Each check raises `ValueError` (or `FileNotFoundError` for a path that does
not exist) with one line naming the flag, the received value and what is
allowed, so `tfkdp-compress` stops with exit code 2 in seconds instead of
after a teacher has been trained on bad input. `folder_format` and
`resolve_round_to_flag` also settle what the flags leave open: the input
format of a `dir:` dataset, and `--round_to=auto`.
"""

import os
import zipfile

import numpy as np
from absl import logging

__all__ = [
    "check_finite",
    "check_model_spec",
    "check_keras_file",
    "check_model_io",
    "check_budget_reachable",
    "check_budget_with_alignment",
    "folder_format",
    "resolve_round_to_flag",
]

_KERAS_SUFFIXES = (".keras", ".h5")


def check_finite(x, name):
    """Raises if the array `x` holds NaN or infinite values.

    Args:
        x: an array (any dtype; integer arrays pass at once).
        name: what `x` is, for the message (e.g. `"x_train of npz:data.npz"`).

    Returns:
        `x`, unchanged.

    Raises:
        ValueError: naming `name` and the count of bad values.

    Example:
        >>> check_finite(np.zeros((2, 4, 4, 1), "float32"), "x_train").shape
        (2, 4, 4, 1)
    """
    from tfkdp.data import count_nonfinite

    bad = count_nonfinite(x)
    if bad:
        size = np.asarray(x).size
        raise ValueError(
            f"{name} has {bad} NaN/inf values (of {size}); images must be finite numbers"
        )
    return x


def _zoo_names():
    from tfkdp import models

    return models.names()


def check_model_spec(value, flag="teacher", allow_savedmodel=True, keywords=()):
    """Checks a model flag: a zoo model name, a keyword, or a loadable model path.

    Args:
        value: the flag's value.
        flag: the flag's name, for the message (`"teacher"`, `"student"`).
        allow_savedmodel: whether a SavedModel folder is accepted (a teacher
            may be one; a student, which is trained, may not).
        keywords: other accepted words (`("teacher",)` for `--student`).

    Returns:
        `"keyword"`, `"zoo"` or `"path"`: what `value` is.

    Raises:
        ValueError: for a name that is not in the zoo (listing the zoo), a
            path of another kind, or a Keras file that cannot be loaded.
        FileNotFoundError: for a path-like value that does not exist.
    """
    zoo = _zoo_names()
    if value in keywords:
        return "keyword"
    if value in zoo:
        return "zoo"
    kinds = "a .keras/.h5 file" + (" or a SavedModel folder" if allow_savedmodel else "")
    allowed = f"a zoo model name ({', '.join(zoo)}){''.join(f', {k!r}' for k in keywords)} or {kinds}"
    if not isinstance(value, str) or not value:
        raise ValueError(f"--{flag}={value!r} is not {allowed}")
    if not os.path.exists(value):
        looks_like_path = os.sep in value or value.endswith(_KERAS_SUFFIXES)
        if looks_like_path:
            raise FileNotFoundError(f"--{flag}={value!r} does not exist; expected {allowed}")
        raise ValueError(f"--{flag}={value!r} is neither a zoo model nor an existing path; "
                         f"expected {allowed}")
    if os.path.isdir(value):
        if allow_savedmodel and os.path.isfile(os.path.join(value, "saved_model.pb")):
            return "path"
        raise ValueError(f"--{flag}={value!r} is a folder without saved_model.pb; expected {kinds}")
    if not value.endswith(_KERAS_SUFFIXES):
        raise ValueError(f"--{flag}={value!r} is not a .keras/.h5 file; expected {allowed}")
    check_keras_file(value, flag)
    return "path"


def check_keras_file(path, flag="model"):
    """Loads a `.keras`/`.h5` file, turning every failure into one clear line.

    Keras reports a `.keras` file that is not a zip archive as "File not
    found"; this says what is wrong with the file instead.

    Args:
        path: an existing `.keras` or `.h5` file.
        flag: the flag's name, for the message.

    Returns:
        The loaded `keras.Model` (compile=False), so callers need not load twice.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: `"--flag='path' is not a valid Keras file: <reason>"`.
    """
    import keras

    import tfkdp  # noqa: F401  (registers tfkdp's serializable layers and losses)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{flag}={path!r} does not exist")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        reason = "not a zip archive (truncated or not written by model.save)"
        raise ValueError(f"--{flag}={path!r} is not a valid Keras file: {reason}")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # any failure to load is the same user error
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise ValueError(f"--{flag}={path!r} is not a valid Keras file: {reason}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"--{flag}={path!r} is not a valid Keras file: it holds a {type(model).__name__}, "
            "not a Model"
        )
    return model


def check_budget_reachable(model, budget, round_to, min_channels=1):
    """Raises if `make_plan` cannot reach the budget on `model`'s architecture.

    Reachability depends only on structure (which groups are prunable, their
    widths, `round_to`, `min_channels`), so an untrained copy of the model is
    enough: this runs before the teacher is trained. A latency budget builds
    (or loads from its cache) the `LatencyModel` of the architecture on the
    budget's runtime: it depends on structure only, so the compress stage
    reuses it.

    Args:
        model: the student architecture (weights may be random).
        budget: a `tfkdp.methods.Budget`, or a number: the
            `--target_macs_reduction` flag, in (0, 1).
        round_to: the `--round_to` flag.
        min_channels: fewest channels a pruned group keeps.

    Returns:
        The `PruningPlan` made (an L1 plan on the given weights).

    Raises:
        ValueError: naming the flags and values, with `make_plan`'s reason (for
            a latency budget, the fastest reachable latency).
    """
    import tfkdp
    from tfkdp.methods import Budget

    budget = Budget.of(budget)
    latency = budget.latency_model(model) if budget.is_latency else None
    try:
        return tfkdp.make_plan(
            model, criterion="l1", round_to=round_to, min_channels=min_channels,
            latency_model=latency, **budget.plan_kwargs(),
        )  # fmt: skip
    except ValueError as error:
        reason = " ".join(str(error).split())
        (flag,) = budget.plan_kwargs()
        where = f" ({budget.runtime}, {budget.threads} thread(s))" if budget.is_latency else ""
        hint = "" if budget.is_latency else f". Lower --{flag} or --round_to"
        raise ValueError(
            f"--{flag}={budget.reduction} is not reachable on "
            f"{getattr(model, 'name', 'the student')!r}{where} with --round_to={round_to} "
            f"(min_channels={min_channels}): {reason}{hint}"
        ) from None


def check_model_io(model, ctx, what):
    """Raises if `model`'s classes or input shape are not those of the pipeline's dataset.

    Args:
        model: the teacher or student (a model without `output_shape` or
            `input_shape`, e.g. a SavedModel layer, is not checked there).
        ctx: the pipeline's context (`flags["dataset"]`, `num_classes`, `input_shape`).
        what: `"teacher"` or `"student"`, for the message.

    Raises:
        ValueError: naming the model's and the dataset's classes or shapes.
    """
    out = model.output_shape[-1] if hasattr(model, "output_shape") else None
    if out is not None and out != ctx.num_classes:
        raise ValueError(
            f"the {what} outputs {out} classes but dataset {ctx.flags['dataset']!r} has "
            f"{ctx.num_classes}; pass a {what} trained for this dataset"
        )
    shape = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if shape is not None and shape != ctx.input_shape:
        raise ValueError(
            f"the {what} expects inputs of shape {shape} but dataset {ctx.flags['dataset']!r} "
            f"has images of shape {ctx.input_shape}"
        )


def folder_format(values):
    """`(image_size, color_mode)` of a `dir:` dataset: the teacher file's, else the flags'.

    A teacher file fixes the input: its height, width and channels (1:
    grayscale, 3: rgb) are used, a dynamic height/width taking `--image_size`.
    A zoo teacher trained here takes `--image_size` and `--color_mode`.

    Raises:
        ValueError: for a teacher file whose input is not one image, or has
            channels other than 1 or 3.
    """
    size = tuple(int(d) for d in values.get("image_size", (28, 28)))
    color_mode = values.get("color_mode", "grayscale")
    teacher = values["teacher"]
    if not (os.path.isfile(teacher) and teacher.endswith(_KERAS_SUFFIXES)):
        return size, color_mode  # a zoo name (or a SavedModel, whose input is not recorded)
    shape = check_keras_file(teacher, "teacher").input_shape
    if not isinstance(shape, tuple) or len(shape) != 4:
        raise ValueError(
            f"--teacher={teacher!r} has input shape {shape}; a dir: dataset needs one image "
            "input of shape (batch, height, width, channels)"
        )
    channels = {1: "grayscale", 3: "rgb"}
    if shape[3] not in channels:
        raise ValueError(
            f"--teacher={teacher!r} expects {shape[3]} input channels; dir: datasets give 1 "
            "(grayscale) or 3 (rgb)"
        )
    size = (shape[1] or size[0], shape[2] or size[1])
    logging.info("dir: images resized to %s, %s (the teacher's input)", size, channels[shape[3]])
    return size, channels[shape[3]]


def resolve_round_to_flag(ctx):
    """Turns `--round_to` into an int in `ctx.flags`; `auto` is measured on `--latency_runtime`.

    The measurement (`tfkdp.pruning.alignment.measure_alignment`) is cached per
    machine; its result is kept in `ctx.alignment` for the report. A method
    that removes no channels takes 1. Under `--strategy=multiworker` each host
    would measure its own CPU, and hosts that chose differently would train
    different plans: `auto` is refused there.

    Raises:
        ValueError: for a `--round_to` that is neither a positive integer nor
            `auto`, and for `auto` under `--strategy=multiworker`.
    """
    from tfkdp import methods
    from tfkdp.pruning import alignment

    flags = ctx.flags
    ctx.alignment = None
    value = flags["round_to"]
    if str(value).strip().lower() != "auto":
        flags["round_to"] = alignment.resolve_round_to(value)
        return
    if not getattr(methods.get_class(flags["method"]), "prunes", True):
        flags["round_to"] = 1
        return
    if flags["strategy"] == "multiworker":
        raise ValueError(
            "--round_to=auto is measured on each host, and hosts that disagree would train "
            "different plans: pass an integer under --strategy=multiworker, e.g. --round_to=8"
        )
    runtime, threads = flags["latency_runtime"], int(flags["latency_threads"])
    print(f"--round_to=auto: measuring the channel alignment {runtime} ({threads} thread(s)) "
          "rewards (once per machine, cached) ...", flush=True)  # fmt: skip
    result = alignment.measure_alignment(runtime, threads)
    flags["round_to"] = int(result["round_to"])
    ctx.alignment = result
    per_mac = ", ".join(f"{a}: {v:.4g}" for a, v in result["per_mac_ns"].items())
    print(f"--round_to=auto: multiples of {flags['round_to']} (ns per MAC by alignment: {per_mac}"
          f"{'; cached' if result.get('cached') else ''})", flush=True)  # fmt: skip


def check_budget_with_alignment(ctx, model, budget):
    """`check_budget_reachable`, letting `--round_to=auto` fall back to a finer alignment.

    The alignment `auto` measured can make a small model's budget unreachable
    (resnet8's 16/32/64-channel groups cannot lose half their MACs in steps
    of 16). Then the largest finer alignment (halving down to 1) that reaches
    the budget is used, said on stdout, and recorded in
    `ctx.alignment["fallback"]`. An integer `--round_to` is never changed.

    Raises:
        ValueError: the budget is unreachable with an integer `--round_to`,
            or with `auto` even at alignment 1 (the message of that check).
    """
    flags = ctx.flags
    try:
        return check_budget_reachable(model, budget, flags["round_to"])
    except ValueError as error:
        if getattr(ctx, "alignment", None) is None:
            raise
        measured, last_error = int(flags["round_to"]), error
    round_to = measured // 2
    while round_to >= 1:
        try:
            plan = check_budget_reachable(model, budget, round_to)
        except ValueError as error:
            last_error, round_to = error, round_to // 2
            continue
        flags["round_to"] = round_to
        ctx.alignment = dict(ctx.alignment, fallback={"measured": measured, "used": round_to})
        print(f"--round_to=auto: the budget is not reachable in multiples of {measured} on this "
              f"model; using multiples of {round_to}", flush=True)  # fmt: skip
        return plan
    raise last_error
