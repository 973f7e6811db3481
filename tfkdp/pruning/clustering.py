"""Clusters of a channel group's channels: what channel merging keeps and sums.

A *clustering* is a dict `{group_id: [[channel, ...], ...]}`: for each listed
channel group (`tfkdp.channel_groups`), a partition of its channels into
clusters; the first (smallest) channel of a cluster is its representative,
the one `tfkdp.merge_channels` keeps. Groups not listed keep every channel.

A channel *owns* every weight slice that produces or scales it across the
group's coupled producers (`ChannelGroup.out_params`: producer kernels and
biases, batch-norm parameters and statistics, the depthwise kernels it passes
through) plus the input slices its handler says belong to it
(`LayerHandler.merge_owned`: a separable convolution's depthwise kernel).
`cluster_channels` runs k-means on the concatenation of the trainable slices
a channel owns; `intra_cluster_distance` measures how far the members of the
clusters are from agreeing.

Reference:
    Ding, Ding, Guo, Han, "Centripetal SGD for Pruning Very Deep
    Convolutional Networks with Complicated Structure", CVPR 2019 (k-means
    on filters, clusters shared across a residual add).
"""

import warnings

import numpy as np

from tfkdp.pruning.analysis import analyze
from tfkdp.pruning.handlers import get_handler
from tfkdp.pruning.plan import PruningPlan

__all__ = [
    "owned_refs",
    "validate_clusters",
    "cluster_channels",
    "cluster_plan",
    "channel_features",
    "intra_cluster_distance",
]


def owned_refs(analysis, group):
    """The `ParamRef`s of every weight slice a channel of `group` owns (see module docstring)."""
    refs = list(group.out_params)
    for ref in group.in_params:
        layer = analysis.layer_at(ref.layer)
        handler = get_handler(layer)
        if handler is not None and handler.merge_owned(layer, ref.attr):
            refs.append(ref)
    return refs


def validate_clusters(model, clusters):
    """Checks a clustering against `model`'s channel groups; returns it normalised.

    Args:
        model: a functional `keras.Model`.
        clusters: `{group_id: [[channel, ...], ...]}`.

    Returns:
        `{group_id: [[int, ...], ...]}`: each cluster sorted, clusters ordered
        by their representative (first, smallest channel).

    Raises:
        ValueError: naming the group, for an unknown or unprunable group, an
            empty cluster, a channel outside the group (a cluster cannot span
            groups), a channel in two clusters or one in none.

    Example:
        >>> from tfkdp import models
        >>> model = models.resnet_cifar(8, width=4)
        >>> validate_clusters(model, {"stem_conv": [[3, 1], [0], [2]]})
        {'stem_conv': [[0], [1, 3], [2]]}
    """
    if not isinstance(clusters, dict):
        raise ValueError(
            f"clusters must be a dict {{group_id: [[channel, ...], ...]}}; received {clusters!r}"
        )
    analysis = analyze(model)
    result = {}
    for group_id, members in clusters.items():
        group = analysis.group_by_id.get(group_id)
        if group is None:
            raise ValueError(
                f"unknown group id {group_id!r}; prunable groups are "
                f"{[g.id for g in analysis.groups if g.prunable]}"
            )
        if not group.prunable:
            raise ValueError(f"group {group_id!r} is not prunable: {group.reason}")
        owner = {}
        lists = []
        for number, cluster in enumerate(members):
            indices = sorted(int(i) for i in cluster)
            if not indices:
                raise ValueError(f"group {group_id!r}: cluster {number} is empty")
            for index in indices:
                if not 0 <= index < group.size:
                    raise ValueError(
                        f"group {group_id!r}: cluster {number} holds channel {index}, outside the "
                        f"group's {group.size} channels (a cluster cannot span groups)"
                    )
                if index in owner:
                    raise ValueError(
                        f"group {group_id!r}: channel {index} is in clusters {owner[index]} and "
                        f"{number} (each channel belongs to exactly one cluster)"
                    )
                owner[index] = number
            lists.append(indices)
        missing = sorted(set(range(group.size)) - set(owner))
        if missing:
            raise ValueError(
                f"group {group_id!r}: channels {missing} are in no cluster (the clusters must "
                f"partition the group's {group.size} channels)"
            )
        result[group_id] = sorted(lists)
    return result


def channel_features(model, group, trainable_only=True):
    """Everything each channel of `group` owns, one row per channel.

    Args:
        model: the model the group belongs to.
        group: a `ChannelGroup` of `model` (or its id).
        trainable_only: leave out non-trainable slices (batch-norm moving
            statistics), which follow the trainable ones.

    Returns:
        A float64 array of shape `(group.size, n)`.
    """
    analysis = analyze(model)
    if isinstance(group, str):
        group = analysis.group_by_id[group]
    columns = []
    for ref in owned_refs(analysis, group):
        variable = getattr(analysis.layer_at(ref.layer), ref.attr)
        if trainable_only and not variable.trainable:
            continue
        value = np.moveaxis(np.asarray(variable.numpy(), dtype=np.float64), ref.axis, 0)
        columns.append(value[ref.indices(group.size)].reshape(group.size, -1))
    if not columns:
        return np.zeros((group.size, 0))
    return np.concatenate(columns, axis=1)


def cluster_channels(model, counts, seed=0):
    """k-means clusters of the channels of each group, `counts[group_id]` clusters each.

    Args:
        model: a functional `keras.Model`.
        counts: `{group_id: number of clusters}` (e.g. the kept counts of a
            `PruningPlan`: `{g: len(keep) for g, keep in plan.items()}`);
            groups left out, or given their full size, are not clustered.
        seed: k-means seed.

    Returns:
        A validated clustering (`validate_clusters`).

    Raises:
        ValueError: for an unknown or unprunable group, or a count outside
            `[1, group size]`.

    Example:
        >>> from tfkdp import models
        >>> model = models.resnet_cifar(8, width=4)
        >>> clusters = cluster_channels(model, {"stem_conv": 2})
        >>> len(clusters["stem_conv"])
        2
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    analysis = analyze(model)
    clusters = {}
    for group_id, count in counts.items():
        group = analysis.group_by_id.get(group_id)
        if group is None or not group.prunable:
            validate_clusters(model, {group_id: []})  # raises, naming the valid groups
        count = int(count)
        if not 1 <= count <= group.size:
            raise ValueError(
                f"group {group_id!r}: {count} clusters requested; must lie in [1, {group.size}]"
            )
        if count == group.size:
            continue
        features = channel_features(model, group)
        with warnings.catch_warnings():
            # Duplicate filters leave fewer distinct points than clusters; handled below.
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = KMeans(n_clusters=count, n_init=10, random_state=seed).fit_predict(features)
        clusters[group_id] = _fill_empty(labels, count)
    return validate_clusters(model, clusters)


def _fill_empty(labels, count):
    """Clusters from k-means labels; an empty cluster takes a member of the largest one."""
    members = [list(np.flatnonzero(labels == c)) for c in range(count)]
    for cluster in members:
        if not cluster:
            largest = max(members, key=len)
            cluster.append(largest.pop())
    return members


def cluster_plan(clusters):
    """The `PruningPlan` keeping each cluster's representative (its first channel)."""
    return PruningPlan({gid: sorted(c[0] for c in members) for gid, members in clusters.items()})


def intra_cluster_distance(model, clusters):
    """The largest distance of a cluster member from its cluster's mean, relative to its norm.

    For every cluster of two or more channels, each member's owned
    trainable slices (`channel_features`) are compared with the cluster
    mean: ‖fⱼ − f̄‖ / mean‖fᵢ‖ over the members. 0 means every cluster has
    collapsed to one filter, when merging loses nothing.

    Args:
        model: the model.
        clusters: a clustering of `model`'s groups.

    Returns:
        The largest relative distance (a float ≥ 0; 0.0 without clusters of
        two or more channels).
    """
    clusters = validate_clusters(model, clusters)
    worst = 0.0
    for group_id, members in clusters.items():
        features = channel_features(model, group_id)
        for cluster in members:
            if len(cluster) < 2:
                continue
            rows = features[cluster]
            scale = float(np.linalg.norm(rows, axis=1).mean()) or 1.0
            spread = float(np.linalg.norm(rows - rows.mean(axis=0), axis=1).max())
            worst = max(worst, spread / scale)
    return worst
