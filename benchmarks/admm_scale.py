"""How large KDP's ADMM penalty is against the task loss, with and without scale-aware ρ.

A `keras.applications.MobileNetV2` (α = 0.35, 32×32×3, 3 classes) whose conv
and depthwise kernels are multiplied by 10, as a teacher trained without weight
decay has them (batch norm makes the function the same at any kernel scale),
is compressed by `kdp` at 50 % MACs for 2 ADMM epochs of 6 steps on 96
generated images. The table gives the first epoch's mean `sparsity_loss` over
its mean `student_loss`:

- `mean`: KDP's defaults (`normalize="mean"`: the penalty is ρ/2 times the mean,
  over every regularised weight, of its squared distance to the sparse set in
  units of its group's mean square; ρ 0.5 → 25);
- `group`: the defaults before issue 18 (`normalize=True`, each group's term
  divided by its mean square but summed over the weights; ρ 0.001 → 0.05);
- `raw`: the defaults before that (`normalize=False`, ρ 0.1 → 5).

    .venv/bin/python -m benchmarks.admm_scale

Writes benchmarks/results/admm_scale.json.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import data, methods, onednn  # noqa: E402
from tfkdp.train import copy_model  # noqa: E402

RESULTS = os.path.join(common.RESULTS_DIR, "admm_scale.json")
SETTINGS = {
    "mean": {},
    "group": {"normalize": True, "rho_initial": 1e-3, "rho_final": 0.05},
    "raw": {"normalize": False, "rho_initial": 0.1, "rho_final": 5.0},
}


def first_epoch_ratio(options, images=96, update_every=2):
    """`(sparsity_loss, student_loss)` of the first ADMM epoch (means) of `kdp` with `options`.

    The setup of the module docstring on `images` generated images (batch 16);
    `update_every`: optimizer steps between ADMM updates. `tests/test_kdp.py`
    calls it with 48 images and `update_every=1` (a 10× bar on the ratio).
    """
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(images, 32, 32, 3)).astype("float32")
    y = (np.arange(images) % 3).astype("int32")
    x[y == 1, :16] += 1.0
    x[y == 2, 16:] += 1.0
    keras.utils.set_random_seed(0)
    teacher = keras.applications.MobileNetV2(
        alpha=0.35, weights=None, input_shape=(32, 32, 3), classes=3, classifier_activation=None
    )
    student = copy_model(teacher)
    for layer in student.layers:  # as a teacher trained without weight decay has them
        if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
            layer.kernel.assign(layer.kernel * 10.0)
    method = methods.get(
        "kdp", admm_epochs=2, finetune_epochs=0, update_every=update_every,
        training={"learning_rate": 0.01, "recalibrate_bn": 0}, **options,
    )  # fmt: skip
    train = data.make_dataset(x, y, batch_size=16, training=False)
    pruned = method.prune(teacher, student, train, None, methods.Budget.macs(0.5))
    history = pruned.history["admm"]
    return history["sparsity_loss"][0], history["student_loss"][0]


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    rows = {}  # rewritten whole: the settings' names changed with issue 18
    print(f"{'setting':<22} {'sparsity_loss':>14} {'student_loss':>13} {'ratio':>9}")
    for name, options in SETTINGS.items():
        penalty, task = first_epoch_ratio(options)
        rows[name] = {
            "options": options,
            "sparsity_loss": penalty,
            "student_loss": task,
            "ratio": penalty / task,
        }
        print(f"{name:<22} {penalty:>14.4g} {task:>13.4g} {penalty / task:>9.3g}")
        common.write_json(RESULTS, rows)


if __name__ == "__main__":
    main()
