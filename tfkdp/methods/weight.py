"""Weight (unstructured) pruning with knowledge distillation: the `weight` method.

`weight` (class `WeightPruning`) prunes individual weights by magnitude, not
channels. Two orders:

- `order="sequential"` (Malihi & Heidemann's pipeline): **KD** of the dense
  student (`kd_epochs`), then **prune with KD** (`prune_epochs`: element
  masks, sparsity ramped by a polynomial schedule to `target_sparsity` over
  the first `ramp` of the phase, then held), then **KD fine-tune**
  (`finetune_epochs`, masks fixed) and batch-norm re-estimation;
- `order="joint"`: the masks are in place from the start and the sparsity
  ramps during the first KD phase (`prune_epochs`); no KD-only phase before
  (`kd_epochs` must be 0); the same fine-tune after.

`target_sparsity` is the share of the *prunable* weights set to zero (conv
and dense kernels by default, see `tfkdp.pruning.unstructured`), reached
exactly. The model keeps its shape: `Pruned.plan` is an empty
`PruningPlan`, and `finalize` returns the student with its masks removed and
its zeros kept, so the export sees plain layers. Zeros shrink compressed
files (and `tflite_sparse`); dense kernels still multiply them, so MACs and
dense latency do not change (`prunes = False`: the pipeline's MAC budget
does not apply).

Reference:
    Malihi & Heidemann, "Matching the Ideal Pruning Method with Knowledge
    Distillation for Optimal Compression", Applied System Innovation 7(4):56,
    2024; Malihi & Heidemann, "Efficient and Controllable Model Compression
    through Sequential Knowledge Distillation and Pruning", BDCC 7(3):154,
    2023; Zhu & Gupta, arXiv:1710.01878, 2017 (the sparsity ramp).
"""

import dataclasses
import math

from absl import logging

from tfkdp import checks
from tfkdp.methods.base import Method, Pruned, register
from tfkdp.train import phases

__all__ = ["WeightPruning", "ORDERS"]

ORDERS = ("sequential", "joint")


@register
class WeightPruning(Method):
    """KD, magnitude weight pruning with KD, KD fine-tune (see the module docstring).

    Args:
        order: `"sequential"` (KD → prune with KD → KD fine-tune) or
            `"joint"` (prune during KD → KD fine-tune).
        target_sparsity: share of the prunable weights set to zero, in [0, 1).
        kd_epochs: epochs of KD before pruning (`"sequential"`: >= 1, default
            1; `"joint"`: 0, the default).
        prune_epochs: epochs of the phase in which the sparsity ramps (>= 1).
        finetune_epochs: epochs of masked KD fine-tuning after it (>= 0).
        scope: `"layer"` (every prunable kernel at the target sparsity) or
            `"global"` (one magnitude threshold over all of them).
        layers: paths of the layers whose kernels are pruned, or `None` for
            the default (conv and dense kernels, not depthwise, not the first
            conv).
        ramp: share of the pruning phase over which the sparsity rises
            (polynomial, cubic) from 0 to the target, in (0, 1]; it is held
            for the rest of the phase.
        frequency: optimizer steps between mask updates during the ramp
            (`None`: about 20 updates over the ramp).
        prune_with_kd: distil during the pruning phase (`False`: supervised
            training with `WeightPruningCallback`; the teacher is then used
            only in the other phases).
        training: a `tfkdp.train.phases.Training`, or a dict of its fields.

    Raises:
        ValueError: for an unknown order or scope, a sparsity outside [0, 1),
            bad epoch counts, or a bad ramp/frequency (naming the value).

    Example:
        >>> from tfkdp import methods
        >>> method = methods.get("weight", target_sparsity=0.7, order="joint")
        >>> method.get_config()["kd_epochs"]
        0

    Reference:
        Malihi & Heidemann, Applied System Innovation 7(4):56, 2024.
    """

    name = "weight"
    # The budget is a weight sparsity: the pipeline's MAC budget does not apply.
    prunes = False

    def __init__(self, order="sequential", target_sparsity=0.5, kd_epochs=None, prune_epochs=1,
                 finetune_epochs=1, scope="layer", layers=None, ramp=0.75, frequency=None,
                 prune_with_kd=True, training=None):  # fmt: skip
        from tfkdp.pruning import unstructured
        from tfkdp.train.phases import Training

        self.order = checks.check_choice("order", order, ORDERS)
        self.target_sparsity = checks.check_fraction(
            "target_sparsity", target_sparsity, low_inclusive=True
        )
        if kd_epochs is None:
            kd_epochs = 1 if order == "sequential" else 0
        if order == "sequential":
            self.kd_epochs = checks.check_int("kd_epochs", kd_epochs, 1)
        else:
            self.kd_epochs = checks.check_int("kd_epochs", kd_epochs, 0, 0)
        self.prune_epochs = checks.check_int("prune_epochs", prune_epochs, 1)
        self.finetune_epochs = checks.check_int("finetune_epochs", finetune_epochs, 0)
        self.scope = checks.check_choice("scope", scope, unstructured.SCOPES)
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
                raise ValueError(
                    f"layers must be None or a list of layer paths; received layers={layers!r}"
                )
            layers = list(layers)
        self.layers = layers
        self.ramp = checks.check_fraction("ramp", ramp, high_inclusive=True)
        if frequency is not None:
            frequency = checks.check_int("frequency", frequency, 1)
        self.frequency = frequency
        if not isinstance(prune_with_kd, bool):
            raise ValueError(f"prune_with_kd must be a bool; received prune_with_kd={prune_with_kd!r}")
        self.prune_with_kd = prune_with_kd
        self.training = Training.of(training)

    @classmethod
    def split_epochs(cls, total, finetune_epochs, flags):
        """The KD fine-tune keeps `finetune_epochs` where it can; `--compress_epochs` the rest
        (at least 2 in sequential order: one of KD, one of pruning)."""
        minimum = 2 if flags.get("weight_order", "sequential") == "sequential" else 1
        finetune = max(0, min(finetune_epochs, total - minimum))
        return {"compress_epochs": max(1, total - finetune), "finetune_epochs": finetune}

    @classmethod
    def pipeline_options(cls, flags, training):
        """`--weight_order`, `--target_sparsity`; `--compress_epochs` split over KD and pruning.

        Sequential: `kd_epochs = max(1, compress_epochs // 2)`, `prune_epochs =
        max(1, compress_epochs - compress_epochs // 2)`; joint: `prune_epochs =
        compress_epochs`. `--finetune_epochs` is the KD fine-tune.
        """
        epochs = flags["compress_epochs"]
        order = flags["weight_order"]
        if order == "sequential":
            kd, prune = max(1, epochs // 2), max(1, epochs - epochs // 2)
        else:
            kd, prune = 0, epochs
        return {
            "order": order, "target_sparsity": flags["target_sparsity"], "kd_epochs": kd,
            "prune_epochs": prune, "finetune_epochs": flags["finetune_epochs"], "training": training,
        }  # fmt: skip

    def get_config(self):
        return {
            "order": self.order,
            "target_sparsity": self.target_sparsity,
            "kd_epochs": self.kd_epochs,
            "prune_epochs": self.prune_epochs,
            "finetune_epochs": self.finetune_epochs,
            "scope": self.scope,
            "layers": self.layers,
            "ramp": self.ramp,
            "frequency": self.frequency,
            "prune_with_kd": self.prune_with_kd,
            "training": self.training.to_dict(),
        }

    def schedule(self, steps):
        """The sparsity ramp of a pruning phase of `steps` optimizer steps.

        A `tfkdp.schedules.PolynomialDecay` from 0 to `target_sparsity`
        ending at `ceil(ramp · steps)` rounded up to a multiple of the
        frequency (so the last update lands on the target).
        """
        from tfkdp.pruning.sparsity import schedules

        ramp_steps = max(1, int(math.ceil(self.ramp * steps)))
        frequency = self.frequency or max(1, ramp_steps // 20)
        end = max(frequency, int(math.ceil(ramp_steps / frequency)) * frequency)
        return schedules.PolynomialDecay(
            0.0, self.target_sparsity, begin_step=0, end_step=end, frequency=frequency
        )

    def prune(self, teacher, student, train_data, val_data, budget):
        from tfkdp.pruning import unstructured
        from tfkdp.pruning.plan import PruningPlan
        from tfkdp.train import recipe

        if teacher is None:
            raise ValueError("method='weight' needs a teacher (KD); received teacher=None")
        if budget is not None:
            logging.info(
                "weight: the budget %s is not used; weights are pruned to target_sparsity=%s",
                budget, self.target_sparsity,
            )  # fmt: skip
        history = {}
        if self.order == "sequential":
            history["kd"] = phases.distill(
                teacher, student, train_data, val_data, self.kd_epochs, self.training, "weight KD"
            )
        masked = unstructured.apply_weight_masks(student, self.layers)
        steps = recipe.steps_in(train_data) * self.prune_epochs
        pruner = unstructured.WeightPruner(masked, self.schedule(steps), scope=self.scope)
        if self.prune_with_kd:
            history["prune"] = phases.distill(
                teacher, masked, train_data, val_data, self.prune_epochs, self.training,
                "weight pruning", sparsity=pruner,
            )  # fmt: skip
        else:
            training = dataclasses.replace(
                self.training,
                callbacks=(unstructured.WeightPruningCallback(pruner), *self.training.callbacks),
                steps_per_execution=1,
            )
            history["prune"] = phases.finetune(
                masked, train_data, val_data, self.prune_epochs, training, "weight pruning"
            )
        # The ramp ends on the target; this makes it exact whatever the step count.
        sparsity = pruner.prune_to(self.target_sparsity)
        record = self.base_record(budget)
        record["phases"] = {
            "kd": self.kd_epochs, "prune": self.prune_epochs, "finetune": self.finetune_epochs
        }
        record["channels"] = {}
        record["weight_sparsity"] = sparsity
        return Pruned(masked, PruningPlan({}), history, record)

    def finetune(self, teacher, pruned, train_data, val_data):
        from tfkdp.pruning import unstructured

        if self.finetune_epochs:
            pruned.history["finetune"] = phases.distill(
                teacher, pruned.model, train_data, val_data, self.finetune_epochs, self.training,
                "weight fine-tune", learning_rate=self.training.finetune_lr,
            )  # fmt: skip
        phases.recalibrate(pruned.model, train_data, self.training)
        pruned.record["weight_sparsity"] = unstructured.weight_sparsity(pruned.model)
        return pruned

    def finalize(self, pruned):
        """The student without its masks; the pruned weights stay exactly zero."""
        from tfkdp.pruning import unstructured

        if not unstructured.weight_masks(pruned.model):
            return pruned.model
        return unstructured.remove_weight_masks(pruned.model)

    def report(self, record, out_dir):
        """A table of the sparsity reached per pruned layer."""
        sparsity = record.get("weight_sparsity")
        if not sparsity:
            return {"markdown": "", "plots": {}}
        lines = [
            f"Weight pruning ({record.get('options', {}).get('order')}, "
            f"{record.get('options', {}).get('scope')} threshold): {sparsity['pruned']} of "
            f"{sparsity['total']} prunable weights are zero ({sparsity['sparsity']:.1%}).",
            "",
            "| layer | sparsity |",
            "|---|---|",
        ]
        lines += [f"| {path} | {value:.1%} |" for path, value in sparsity["layers"].items()]
        return {"markdown": "\n".join(lines) + "\n", "plots": {}}
