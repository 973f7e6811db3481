"""PDC: teacher-guided clustering of filters, then exact channel merging (no fine-tune).

`pdc` (class `PDC`) runs, as a short sequence of phases:

1. **budget**: `make_plan` turns the MAC (or parameter) budget into a number
   of channels to keep per group (global, MAC-aware allocation, `round_to`);
2. **clusters**: each group's channels are split into that many clusters by
   k-means (scikit-learn, seeded) on everything a channel owns across the
   group's coupled producers (`tfkdp.pruning.clustering`);
3. **centripetal KD** (`admm_epochs`): the student is distilled from the
   teacher while C-SGD's gradient rule (`tfkdp.pruning.sparsity.centripetal`)
   drives each cluster's members together; the largest intra-cluster
   distance is logged per epoch (`pdc_distance`);
4. **hard average** (`finetune`): each cluster's members are replaced by
   their mean, batch-norm statistics are re-estimated (no weight is
   trained), and the accuracy is recorded before and after the merge;
5. **merge** (`finalize`): one channel per cluster, the consumers' input
   slices summed (`tfkdp.merge_channels`): exactly the hard-averaged model.

There is no fine-tune phase: `finetune_epochs` must be 0.

Which part comes from where: PDC (the paper) gives the idea: the teacher
guides a clustering of the filters, clusters are removed by channel
addition, no fine-tuning. Its loss, ε schedule and cluster-count allocation
are not public. C-SGD gives the k-means clustering, the update rule (cluster
gradient mean + ε pull, 0.1·ε for batch norm) and the merge. Ours: counts per
group from our MAC-aware allocation, clustering on all coupled producers'
slices, KD loss = the house soft-target KD, decoupled weight decay kept,
batch-norm re-estimation after the hard average, and a constant ε sized to
the phase (`epsilon="auto"`, the default; `auto_epsilon`), with batch-norm
γ/β pulled as hard as the kernels (`bn_factor=1.0` under `auto`, where
C-SGD weakens it to 0.1): C-SGD's 3e-3 was
meant for schedules of hundreds of epochs, and on our 4-epoch protocol it
left the clusters at half their starting spread, so the hard average cost
the resnet32 student 80 points (BENCHMARKS.md, "PDC").

Reference:
    Niu, Teng, Jin, Zou, Liu, "Pruning-and-distillation: One-stage joint
    compression framework for CNNs via clustering", Image and Vision
    Computing 2023, 104743; Ding et al., "Centripetal SGD for Pruning Very
    Deep Convolutional Networks with Complicated Structure", CVPR 2019.
"""

import dataclasses
import os

import numpy as np
from absl import logging

from tfkdp import checks
from tfkdp.methods.base import Pruned, Recipe, register
from tfkdp.train import phases

__all__ = ["PDC"]

_STATE_FILE = "pdc_state.json"
#: `epsilon="auto"`: the share of each member's starting distance to its cluster mean left at the end.
AUTO_RESIDUAL = 1e-3
#: Batches on which `PDC.finetune` measures the accuracies around the merge.
DIAGNOSTIC_BATCHES = 50


def auto_epsilon(total_steps, learning_rate, optimizer="sgd", warmup_fraction=0.05,
                 residual=AUTO_RESIDUAL):  # fmt: skip
    """The constant ε that brings a phase's clusters to `residual` of their starting spread.

    Under C-SGD's rule a member's deviation `d` from its cluster mean gets the
    gradient `ε·d` (the task gradient is the cluster's mean, the same for all
    members). This runs that scalar through the house optimizer exactly
    (Keras SGD, Nesterov momentum 0.9, the phase's own schedule from
    `tfkdp.train.recipe.make_schedule`: warm-up, then cosine decay) for a
    grid of ε, refined five times, and returns the smallest ε whose `d`
    ends at or below `residual` of its start (in a phase too short for
    that, the ε that closes `d` most). (Roughly
    `ε ≈ ln(1/residual)·(1 − β)/Σ_t η_t`; Nesterov's look-ahead closes
    faster than that.) Decoupled weight decay scales mean and deviation
    alike and does not enter.

    Args:
        total_steps: optimizer steps of the centripetal phase (>= 1).
        learning_rate: its peak learning rate.
        optimizer: `"sgd"` (the house optimizer); AdamW normalises the pull
            away, so it needs an explicit ε.
        warmup_fraction: the schedule's warm-up share.
        residual: the share of the starting spread left at the end, in (0, 1).

    Returns:
        ε (a float, the rule's `epsilon`).

    Raises:
        ValueError: for `optimizer="adamw"` or a residual outside (0, 1).

    Example:
        >>> round(auto_epsilon(1876, 0.05), 4)  # 4 epochs of 469 steps at peak LR 0.05
        0.014

    Reference:
        Ding et al., "Centripetal SGD for Pruning Very Deep Convolutional
        Networks with Complicated Structure", CVPR 2019 (the rule).
    """
    from tfkdp.train.recipe import make_schedule

    if optimizer != "sgd":
        raise ValueError(
            f"epsilon='auto' assumes SGD with momentum; with optimizer={optimizer!r} pass a number"
        )
    checks.check_fraction("residual", residual)
    steps = checks.check_int("total_steps", total_steps, 1)
    rates = _rates(make_schedule(steps, learning_rate, warmup_fraction), steps)
    # ε·η_peak from 1e-9 to 3 (Nesterov SGD on ε·d/2·d² is stable below ~2(1 + β)/(1 + 2β) ≈ 1.36).
    low, high = 1e-9 / learning_rate, 3.0 / learning_rate
    with np.errstate(all="ignore"):  # the largest ε of a grid may diverge: inf/NaN, never chosen
        for _ in range(5):
            grid = np.geomspace(low, high, 33)
            left = _remaining(grid, rates)
            left = np.where(np.isfinite(left), left, np.inf)
            closed = np.nonzero(left <= residual)[0]
            # The smallest ε that closes; in a phase too short for any, the ε that closes most.
            i = int(closed[0]) if len(closed) else int(np.argmin(left))
            best = grid[i]
            low = grid[max(i - 1, 0)] if i else grid[0] / 2
            high = grid[i] if len(closed) else grid[min(i + 1, len(grid) - 1)]
    return float(best)


def _remaining(epsilons, rates, momentum=0.9):
    """|d_T| / |d_0| under Keras' Nesterov SGD with gradient ε·d, for each ε in `epsilons`."""
    d = np.ones_like(epsilons)
    m = np.zeros_like(epsilons)
    for lr in rates:
        g = epsilons * d
        m = momentum * m - lr * g
        d = d + momentum * m - lr * g
    return np.abs(d)


def _rates(schedule, steps):
    """The schedule's learning rate at steps 0 … steps−1 (one traced map, not `steps` eager calls)."""
    import tensorflow as tf

    mapped = tf.function(lambda t: tf.map_fn(schedule, t, fn_output_signature=tf.float32))
    return np.asarray(mapped(tf.range(steps, dtype=tf.float32)), dtype="float64")


@register
class PDC(Recipe):
    """Teacher-guided centripetal clustering, then exact merging (see the module docstring).

    Args:
        epsilon: strength ε of the centripetal pull, > 0, or `"auto"`
            (default): sized to the phase's steps and learning rates so the
            clusters close to 1e-3 of their starting spread (`auto_epsilon`;
            C-SGD used 3e-3 over far longer schedules). The value used is
            `record["epsilon"]`.
        bn_factor: ε multiplier for batch-norm γ/β, or None (default): 1.0
            with `epsilon="auto"` (γ/β must close within the phase too: at
            C-SGD's 0.1 a trained model's distinct γ/β keep ~16× more spread,
            which the hard average then removes), 0.1 (C-SGD's) with a
            number.
        seed: k-means seed.
        **kwargs: the shared options (`admm_epochs` = centripetal KD epochs,
            >= 1; `finetune_epochs` must be 0; `criterion` is unused beyond
            the plan it makes; `allocation`, `min_channels`, `round_to`,
            `training`).

    Raises:
        ValueError: for `finetune_epochs` other than 0 or bad options.

    Example:
        >>> from tfkdp import methods
        >>> pdc = methods.get("pdc", admm_epochs=2)
        >>> pdc.get_config()["epsilon"]
        'auto'

    Reference:
        Niu et al., "Pruning-and-distillation: One-stage joint compression
        framework for CNNs via clustering", Image and Vision Computing 2023.
    """

    name = "pdc"
    first_phase_minimum = 1
    no_finetune = "has no fine-tune phase (the merge is exact): put the epochs into admm_epochs"

    def __init__(self, epsilon="auto", bn_factor=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(epsilon, str) and epsilon.strip().lower() == "auto":
            if self.training.optimizer != "sgd":
                auto_epsilon(1, 1.0, self.training.optimizer)  # the ValueError, now
            self.epsilon = "auto"
        else:
            if isinstance(epsilon, str):
                try:
                    epsilon = float(epsilon)
                except ValueError:
                    raise ValueError(f"epsilon must be 'auto' or a number > 0; received {epsilon!r}") from None
            self.epsilon = checks.check_number("epsilon", epsilon, 0, strict=True)
        if bn_factor is None:
            bn_factor = 1.0 if self.epsilon == "auto" else 0.1
        self.bn_factor = checks.check_number("bn_factor", bn_factor, 0)
        self.seed = checks.check_int("seed", seed, 0)

    @classmethod
    def pipeline_options(cls, flags, training):
        """The shared options, `finetune_epochs=0` and `epsilon` from `--pdc_epsilon`."""
        options = super().pipeline_options(flags, training)
        options["epsilon"] = flags["pdc_epsilon"]
        return options

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon, bn_factor=self.bn_factor, seed=self.seed)
        return config

    def _callbacks(self, student, clusters, state):
        """The distance monitor, and (with a `state_dir`) a checkpoint per epoch."""
        import keras

        from tfkdp.pruning.sparsity.centripetal import CentripetalMonitor

        monitor = CentripetalMonitor(student, clusters, state.get("curve"))
        callbacks = [monitor]
        if self.state_dir is not None:
            method = self

            class _SaveCurve(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    method.save_state(_STATE_FILE, dict(state, curve=monitor.curve))

            backup = keras.callbacks.BackupAndRestore(os.path.join(self.state_dir, "backup"))
            callbacks = [backup, monitor, _SaveCurve()]
        return monitor, callbacks

    # -- the method's steps ------------------------------------------------------
    def prune(self, teacher, student, train_data, val_data, budget):
        """Clusters the channels and runs the centripetal KD phase; returns a `Pruned`.

        `Pruned.model` is the trained student (not yet averaged); `plan` keeps
        each cluster's representative; `record["clusters"]` holds the
        clustering and `record["pdc_distance"]` the distance curve (before
        training, then per epoch).

        With a `state_dir` (the pipeline's), the clustering and the curve are
        saved there and the phase checkpoints each epoch
        (`keras.callbacks.BackupAndRestore`): a killed run resumes at the
        last finished epoch with the same clusters.
        """
        from tfkdp.pruning.analysis import channel_groups
        from tfkdp.pruning.clustering import cluster_channels, cluster_plan, validate_clusters
        from tfkdp.pruning.sparsity.centripetal import Centripetal

        if teacher is None:
            raise ValueError("method='pdc' needs a teacher; received teacher=None")
        groups = channel_groups(student)
        state = self.load_state(_STATE_FILE)
        if state is not None:
            clusters = validate_clusters(student, state["clusters"])
            logging.info("pdc: resuming with the saved clusters of %d groups", len(clusters))
        else:
            plan = self.make_plan(student, groups, budget, train_data)
            counts = {gid: len(keep) for gid, keep in plan.items()}
            clusters = cluster_channels(student, counts, seed=self.seed)
            state = {"clusters": clusters}
            self.save_state(_STATE_FILE, state)
        plan = cluster_plan(clusters)
        epsilon = self.epsilon
        if epsilon == "auto":
            from tfkdp.train.recipe import steps_in

            epsilon = auto_epsilon(steps_in(train_data) * self.admm_epochs,
                                   self.training.learning_rate, self.training.optimizer)  # fmt: skip
            logging.info("pdc: epsilon='auto' -> %.4g for %d epochs", epsilon, self.admm_epochs)
        rule = Centripetal(student, clusters, epsilon=epsilon, bn_factor=self.bn_factor)
        monitor, callbacks = self._callbacks(student, clusters, state)
        training = dataclasses.replace(
            self.training, callbacks=(*callbacks, *self.training.callbacks)
        )
        history = phases.distill(
            teacher, student, train_data, val_data, self.admm_epochs, training,
            "pdc centripetal phase", sparsity=rule,
        )  # fmt: skip
        record = self.record(student, budget, groups, plan, {"centripetal": self.admm_epochs})
        record["clusters"] = clusters
        record["epsilon"] = epsilon
        record["pdc_distance"] = [float(v) for v in monitor.curve]
        return Pruned(student, plan, {"centripetal": history}, record)

    def finetune(self, teacher, pruned, train_data, val_data):
        """Hard-averages each cluster and re-estimates batch norms (no training).

        Records the accuracy (on the first `DIAGNOSTIC_BATCHES` batches of
        `val_data`, else of `train_data`) after the centripetal phase, after
        the hard average, and just before and after the merge
        (`record["accuracy"]`), and the merged model's largest difference
        from the hard-averaged one.
        """
        from tfkdp.pruning.surgery import hard_average, merge_channels

        clusters = pruned.record["clusters"]
        data = val_data if val_data is not None else train_data
        accuracy = {}
        accuracy["after_centripetal"], batches = _accuracy(pruned.model, data)
        averaged = hard_average(pruned.model, clusters)
        accuracy["after_hard_average"], _ = _accuracy(averaged, data)
        phases.recalibrate(averaged, train_data, self.training)
        merged = merge_channels(averaged, clusters)
        accuracy["before_merge"], _ = _accuracy(averaged, data)
        accuracy["after_merge"], _ = _accuracy(merged, data)
        accuracy["data"] = "val" if val_data is not None else "train"
        accuracy["batches"] = batches
        pruned.record["accuracy"] = accuracy
        pruned.record["merge_max_abs_diff"] = _max_diff(averaged, merged, data)
        return Pruned(averaged, pruned.plan, pruned.history, pruned.record)

    def finalize(self, pruned):
        """The merged model (`merge_channels` of the clusters in `pruned.record`)."""
        from tfkdp.pruning.surgery import merge_channels

        return merge_channels(pruned.model, pruned.record["clusters"])

    def report(self, record, out_dir):
        """The intra-cluster distance curve (PNG) and the accuracies around the merge."""
        curve = record.get("pdc_distance") or []
        plots = {}
        if curve:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib import pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot(range(len(curve)), curve, marker="o")
            ax.set_xlabel("epoch of centripetal KD (0 = clustering)")
            ax.set_ylabel("max ‖Wⱼ − W̄‖ / ‖W‖ in a cluster")
            ax.set_yscale("log" if min(curve) > 0 else "linear")
            ax.set_title("PDC: intra-cluster distance")
            fig.tight_layout()
            path = os.path.join(out_dir, "pdc_distance.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            plots["pdc_distance"] = path
        lines = ["### PDC", ""]
        if curve:
            lines.append(
                f"Largest intra-cluster distance (relative): {curve[0]:.3g} at clustering → "
                f"{curve[-1]:.3g} after {len(curve) - 1} epochs of centripetal KD."
            )
        accuracy = record.get("accuracy") or {}
        if accuracy:
            lines += [
                "", f"| accuracy ({accuracy.get('data', '')}, first {accuracy.get('batches')} batches) "
                "| value |", "|---|---|",
                *(f"| {k.replace('_', ' ')} | {v:.4f} |" for k, v in accuracy.items()
                  if k not in ("data", "batches")),
            ]  # fmt: skip
        if "merge_max_abs_diff" in record:
            lines.append(f"\nMerged vs hard-averaged model: max |Δ logit| = "
                         f"{record['merge_max_abs_diff']:.3g}.")  # fmt: skip
        return {"markdown": "\n".join(lines) + "\n", "plots": plots}


def _batches(data, limit=None):
    for i, batch in enumerate(data):
        if limit is not None and i >= limit:
            return
        yield batch[0], batch[1]


def _accuracy(model, data):
    """`(top-1 accuracy, batches read)` of a logits model over the first `DIAGNOSTIC_BATCHES` batches.

    Only the first batches: these accuracies are a diagnosis of the merge,
    and four passes over a 60 k training set would cost as much as an epoch
    of training.
    """
    correct = total = batches = 0
    for x, y in _batches(data, DIAGNOSTIC_BATCHES):
        batches += 1
        logits = np.asarray(model(x, training=False))
        correct += int(np.sum(np.argmax(logits, axis=-1) == np.asarray(y).reshape(-1)))
        total += int(np.asarray(y).size)
    return correct / max(1, total), batches


def _max_diff(a, b, data, batches=4):
    worst = 0.0
    for x, _ in _batches(data, batches):
        worst = max(worst, float(np.max(np.abs(np.asarray(a(x, training=False))
                                               - np.asarray(b(x, training=False))))))  # fmt: skip
    return worst
