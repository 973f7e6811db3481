"""Centripetal SGD: drive each cluster of channels to one filter, in the compiled train step.

For every trainable weight slice a clustered channel owns
(`tfkdp.pruning.clustering.owned_refs`), the gradient the optimizer receives
is replaced, member by member, with

    g'ⱼ = mean_{i ∈ cluster} gᵢ + ε · (Wⱼ − mean_{i ∈ cluster} Wᵢ)

so every member follows the cluster's average task gradient (the cluster's
mean moves as one filter trained on the task would) while the differences
between members decay geometrically (by (1 − lr·ε) per plain SGD step).
Batch-norm γ and β get the same rule with `bn_factor · ε`. The rule is a
`transform_gradients` hook of `tfkdp.Distiller` (called after the tape,
before `apply_gradients`), built from `unsorted_segment_mean` and `gather`
with constant segment ids: no NumPy, XLA- and graph-friendly.

Interactions:
- Weight decay: `tfkdp.train.recipe.make_optimizer` applies *decoupled*
  weight decay, Wⱼ ← Wⱼ·(1 − lr·wd), the same factor for every member, so
  it commutes with the cluster mean and only shrinks the differences
  further. C-SGD turns weight decay off for these weights because its decay
  is an L2 term in the loss, which it replaces by the centripetal term; with
  decoupled decay there is nothing to turn off, and we keep it (the
  clusters' means stay regularised like every other weight).
- Momentum: the transformed gradient is linear in the members, so momentum
  buffers of members stay consistent with the rule.
- `tf.distribute`: the hook sees each replica's gradients before Keras sums
  them over replicas; the averaging is linear (sums commute), and the pull,
  identical on every replica, is divided by the number of replicas so the
  sum applies it once.
- Mixed precision with loss scaling (`mixed_float16`) is refused: the hook
  sees scaled gradients and the pull would be scaled with them.

Reference:
    Ding, Ding, Guo, Han, "Centripetal SGD for Pruning Very Deep
    Convolutional Networks with Complicated Structure", CVPR 2019, eq. 4.
"""

import keras
import numpy as np
import tensorflow as tf

from tfkdp import checks
from tfkdp.pruning.analysis import analyze
from tfkdp.pruning.clustering import intra_cluster_distance, owned_refs, validate_clusters

__all__ = ["Centripetal", "CentripetalMonitor"]

_BATCHNORM_ATTRS = ("gamma", "beta")


class _Entry:
    """One variable under the rule: its segment ids along `axis` and the pull strength."""

    def __init__(self, variable, axis, segment_ids, epsilon):
        self.variable = variable
        self.axis = axis
        _, self.segment_ids = np.unique(segment_ids, return_inverse=True)
        self.segment_ids = self.segment_ids.astype(np.int32)
        self.num_segments = int(self.segment_ids.max()) + 1
        self.epsilon = float(epsilon)


class Centripetal:
    """The C-SGD gradient rule for a clustering of a model's channel groups.

    Pass it as `sparsity=` to `tfkdp.Distiller` (or `phases.distill`): it adds
    no loss term (`__call__` returns 0) and rewrites the gradients of the
    clustered channels (`transform_gradients`).

    Args:
        model: the student (a functional `keras.Model`).
        clusters: `{group_id: [[channel, ...], ...]}`
            (`tfkdp.pruning.clustering.cluster_channels`).
        epsilon: strength ε of the centripetal pull, > 0 (per optimizer
            step, in units of the gradient: the member differences shrink by
            about lr·ε per plain SGD step).
        bn_factor: multiplier of ε for batch-norm γ and β, in [0, 1]
            (C-SGD: 0.1).

    Raises:
        ValueError: for bad clusters (naming the group), a non-positive
            epsilon, or a `mixed_float16` student.

    Example:
        >>> from tfkdp import models
        >>> from tfkdp.pruning.clustering import cluster_channels
        >>> model = models.resnet_cifar(8, width=4)
        >>> rule = Centripetal(model, cluster_channels(model, {"stem_conv": 2}))
        >>> float(rule())
        0.0
    """

    def __init__(self, model, clusters, epsilon=3e-3, bn_factor=0.1):
        self.epsilon = checks.check_number("epsilon", epsilon, 0, strict=True)
        self.bn_factor = checks.check_number("bn_factor", bn_factor, 0)
        if self.bn_factor > 1:
            raise ValueError(f"bn_factor must lie in [0, 1]; received bn_factor={bn_factor!r}")
        policy = getattr(getattr(model, "dtype_policy", None), "name", "")
        if policy == "mixed_float16":
            raise ValueError(
                "Centripetal does not support the 'mixed_float16' policy (loss scaling would scale "
                "the pull); use 'mixed_bfloat16' or 'float32'"
            )
        self.model = model
        self.clusters = validate_clusters(model, clusters)
        self.weights = []  # no state of its own: the clusters are fixed
        self.variables = []
        self._entries = self._build_entries(analyze(model))

    def _build_entries(self, analysis):
        ids = {}  # id(variable) -> [variable, axis, segment ids, epsilon]
        for group_id, members in self.clusters.items():
            if all(len(m) == 1 for m in members):
                continue
            group = analysis.group_by_id[group_id]
            for ref in owned_refs(analysis, group):
                layer = analysis.layer_at(ref.layer)
                variable = getattr(layer, ref.attr)
                if not variable.trainable:
                    continue
                entry = ids.get(id(variable))
                if entry is None:
                    epsilon = self.epsilon
                    if isinstance(layer, keras.layers.BatchNormalization) and ref.attr in _BATCHNORM_ATTRS:
                        epsilon *= self.bn_factor
                    length = int(variable.shape[ref.axis])
                    entry = ids[id(variable)] = [variable, ref.axis, np.arange(length), epsilon]
                if entry[1] != ref.axis:
                    raise ValueError(
                        f"weight '{ref.layer}/{ref.attr}' is owned by channels on axes {entry[1]} "
                        f"and {ref.axis}; the centripetal rule handles one channel axis per weight"
                    )
                table = ref.indices(group.size)
                for cluster in members:
                    # Position j of every member joins position j of the representative.
                    entry[2][table[cluster]] = table[cluster[0]][None, :]
        return [_Entry(*e) for e in ids.values()]

    @property
    def clustered_variables(self):
        """The variables whose gradients the rule rewrites."""
        return [e.variable for e in self._entries]

    def __call__(self):
        return 0.0

    def transform_gradients(self, gradients, variables):
        """The C-SGD gradients of `variables` (other variables' gradients unchanged).

        Args:
            gradients: list of gradient tensors (or None), one per variable.
            variables: the trainable variables, in the same order.

        Returns:
            The list of gradients.
        """
        position = {id(v): i for i, v in enumerate(variables)}
        by_path = {getattr(v, "path", None): i for i, v in enumerate(variables)}
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        gradients = list(gradients)
        for entry in self._entries:
            i = position.get(id(entry.variable), by_path.get(getattr(entry.variable, "path", None)))
            if i is None or gradients[i] is None:
                continue
            gradients[i] = _centripetal(
                gradients[i], variables[i], entry, entry.epsilon / float(replicas)
            )
        return gradients


def _centripetal(gradient, variable, entry, epsilon):
    gradient = tf.convert_to_tensor(gradient)
    weight = tf.cast(tf.convert_to_tensor(variable), gradient.dtype)
    rank = len(gradient.shape)
    perm = [entry.axis] + [a for a in range(rank) if a != entry.axis]
    inverse = list(np.argsort(perm))
    ids = tf.constant(entry.segment_ids)

    def cluster_mean(t):
        return tf.gather(tf.math.unsorted_segment_mean(t, ids, entry.num_segments), ids)

    g = tf.transpose(gradient, perm)
    w = tf.transpose(weight, perm)
    new = cluster_mean(g) + epsilon * (w - cluster_mean(w))
    return tf.transpose(new, inverse)


class CentripetalMonitor(keras.callbacks.Callback):
    """Logs the largest intra-cluster distance (`intra_cluster_distance`) each epoch.

    The value goes into the epoch logs as `pdc_distance` (so into `History`
    and TensorBoard) and into `curve`, which starts with the value before
    training.

    Args:
        model: the student.
        clusters: its clustering.
        curve: values of earlier epochs (a resumed run), or None.
    """

    def __init__(self, student, clusters, curve=None):
        super().__init__()
        self.student = student
        self.clusters = clusters
        self.curve = list(curve) if curve else [intra_cluster_distance(student, clusters)]

    def on_epoch_end(self, epoch, logs=None):
        value = intra_cluster_distance(self.student, self.clusters)
        self.curve.append(value)
        if logs is not None:
            logs["pdc_distance"] = value
