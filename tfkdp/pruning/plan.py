"""`PruningPlan`: which channels of each group survive.

A plan maps a `ChannelGroup.id` to the sorted indices of the channels kept in
that group. Groups absent from a plan keep all their channels. Plans are plain
data: they serialise to JSON and are checked against a model with
`validate`, which names the offending group.
"""

import collections.abc
import json

import keras

from tfkdp.pruning.analysis import channel_groups

__all__ = ["PruningPlan"]

_FORMAT = "tfkdp.PruningPlan"
_VERSION = 1


def _normalise_keep(group_id, keep):
    if isinstance(keep, (str, bytes)) or not isinstance(keep, collections.abc.Iterable):
        raise ValueError(
            f"Keep indices of group {group_id!r} must be an iterable of ints; received {keep!r}"
        )
    values = []
    for index in keep:
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise ValueError(
                f"Keep indices of group {group_id!r} must be integers; received {index!r}"
            )
        values.append(int(index.__index__()))
    if not values:
        raise ValueError(
            f"Group {group_id!r} keeps no channel; a plan must keep at least one channel per "
            "group (omit a group from the plan to keep all its channels)"
        )
    if min(values) < 0:
        raise ValueError(f"Keep indices of group {group_id!r} must be >= 0; received {min(values)}")
    if len(set(values)) != len(values):
        seen, duplicates = set(), []
        for value in values:
            if value in seen:
                duplicates.append(value)
            seen.add(value)
        raise ValueError(
            f"Keep indices of group {group_id!r} contain duplicates: {sorted(set(duplicates))}"
        )
    return tuple(sorted(values))


class PruningPlan(collections.abc.Mapping):
    """Immutable mapping `{group_id: sorted tuple of kept channel indices}`.

    Args:
        keep: a mapping from `ChannelGroup.id` to an iterable of the channel
            indices to keep. Groups left out keep every channel.

    Raises:
        ValueError: for a non-string id, non-integer or negative indices,
            duplicate indices, or an empty keep list.

    Example:
        >>> plan = PruningPlan({"stem_conv": [3, 0, 1]})
        >>> plan.keep("stem_conv")
        (0, 1, 3)
        >>> PruningPlan.from_json(plan.to_json()) == plan
        True
    """

    def __init__(self, keep=None):
        if keep is None:
            keep = {}
        if isinstance(keep, PruningPlan):
            keep = keep._keep
        if not isinstance(keep, collections.abc.Mapping):
            raise ValueError(
                f"PruningPlan expects a mapping {{group_id: keep indices}}; received {keep!r}"
            )
        normalised = {}
        for group_id, indices in keep.items():
            if not isinstance(group_id, str) or not group_id:
                raise ValueError(f"Group ids must be non-empty strings; received {group_id!r}")
            normalised[group_id] = _normalise_keep(group_id, indices)
        self._keep = dict(sorted(normalised.items()))

    def __getitem__(self, group_id):
        return self._keep[group_id]

    def __iter__(self):
        return iter(self._keep)

    def __len__(self):
        return len(self._keep)

    def __eq__(self, other):
        if isinstance(other, PruningPlan):
            return self._keep == other._keep
        if isinstance(other, collections.abc.Mapping):
            try:
                return self._keep == PruningPlan(other)._keep
            except ValueError:
                return False
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        body = ", ".join(f"{k!r}: {len(v)} kept" for k, v in self._keep.items())
        return f"PruningPlan({{{body}}})"

    def keep(self, group_id, size=None):
        """Kept channel indices of a group.

        Args:
            group_id: a `ChannelGroup.id`.
            size: the group's size; when given, a group absent from the plan
                returns `tuple(range(size))` (it keeps everything).

        Returns:
            A sorted tuple of ints.

        Raises:
            KeyError: if the group is absent and `size` is None.
        """
        if group_id in self._keep:
            return self._keep[group_id]
        if size is None:
            raise KeyError(
                f"Group {group_id!r} is not in the plan (it keeps all channels); pass size= to "
                "get the full index range"
            )
        return tuple(range(int(size)))

    def to_json(self):
        """The plan as a JSON string (`PruningPlan.from_json` reads it back)."""
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "keep": {k: list(v) for k, v in self._keep.items()},
        }
        return json.dumps(payload, indent=None, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Reads a plan written by `to_json` (a bare `{group_id: [...]}` object works too).

        Raises:
            ValueError: if `text` is not valid plan JSON.
        """
        try:
            payload = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"Not a JSON pruning plan: {error}; received {str(text)[:80]!r}"
            ) from None
        if isinstance(payload, dict) and payload.get("format") == _FORMAT:
            if payload.get("version") != _VERSION:
                raise ValueError(
                    f"Unsupported PruningPlan JSON version {payload.get('version')!r}; "
                    f"this tfkdp reads version {_VERSION}"
                )
            payload = payload.get("keep", {})
        if not isinstance(payload, dict):
            raise ValueError(f"A pruning plan is a JSON object; received {str(text)[:80]!r}")
        return cls(payload)

    def validate(self, model_or_groups):
        """Checks the plan against a model (or its `channel_groups`).

        Args:
            model_or_groups: a `keras.Model` or a list of `ChannelGroup`.

        Returns:
            The plan itself, for chaining.

        Raises:
            ValueError: naming the group, for an unknown id, an unprunable
                group, or an index outside `[0, group.size)`.
        """
        if isinstance(model_or_groups, keras.Model):
            groups = channel_groups(model_or_groups)
        else:
            groups = list(model_or_groups)
        by_id = {g.id: g for g in groups}
        for group_id, keep in self._keep.items():
            group = by_id.get(group_id)
            if group is None:
                prunable = [g.id for g in groups if g.prunable]
                shown = ", ".join(repr(i) for i in prunable[:12])
                more = f" and {len(prunable) - 12} more" if len(prunable) > 12 else ""
                raise ValueError(
                    f"Unknown group id {group_id!r}; prunable groups are: {shown}{more}"
                )
            if not group.prunable:
                raise ValueError(f"Group {group_id!r} is not prunable: {group.reason}")
            if keep[-1] >= group.size:
                raise ValueError(
                    f"Group {group_id!r} has {group.size} channels; keep index {keep[-1]} is "
                    f"out of range [0, {group.size})"
                )
        return self

    def num_kept(self, group):
        """Channels a `ChannelGroup` keeps under this plan."""
        return len(self._keep.get(group.id, range(group.size)))
