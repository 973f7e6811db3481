"""The method layer: `Method`, its registry, `Budget` and `CompressionResult`.

A compression recipe is a `Method` subclass registered under a name. Every
method runs the same three steps, which the pipeline runs as its
`compress`, `finetune` and `strip` stages and `Method.compress` runs in one
call, so the library and the pipeline run one algorithm:

1. `prune(teacher, student, train_data, val_data, budget)` → `Pruned`: the
   student with its pruned channels masked (same graph), the plan, history;
2. `finetune(teacher, pruned, train_data, val_data)` → `Pruned`: the masked
   student trained further and its batch norms re-estimated;
3. `finalize(pruned)` → the deployable model (`strip_channels`; a merging
   recipe merges instead).

Example:
    >>> from tfkdp import methods
    >>> methods.names()[:3]
    ['kdp', 'prune_only', 'kd_only']
    >>> kdp = methods.get("kdp", admm_epochs=2, finetune_epochs=1)
    >>> kdp.name
    'kdp'
"""

import dataclasses
import difflib

from absl import logging

from tfkdp import checks

__all__ = [
    "Budget", "Pruned", "CompressionResult", "Method", "Recipe", "register", "get", "get_class",
    "names",
]

_BUDGET_KINDS = ("macs", "params", "latency", "latency_ms")
_LATENCY_RUNTIMES = ("litert", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class Budget:
    """A compression budget: MACs, parameters or latency to remove.

    Attributes:
        kind: `"macs"` (multiply-accumulates of one forward pass at batch 1),
            `"params"`, `"latency"` (a fraction of the predicted latency on
            `runtime`) or `"latency_ms"` (a predicted latency to reach, in
            milliseconds at batch 1); a channel ratio is never a budget.
        reduction: the fraction to remove, in (0, 1); for `"latency_ms"`, the
            target latency in ms (> 0).
        runtime: the latency kinds' runtime, `"litert"` or `"onnxruntime"`.
        threads: the latency kinds' runtime threads.

    Example:
        >>> Budget.macs(0.5).plan_kwargs()
        {'target_macs_reduction': 0.5}
        >>> Budget.from_dict(Budget.params(0.3).to_dict())
        Budget(kind='params', reduction=0.3, runtime='litert', threads=1)
        >>> Budget.latency_ms(2.5).plan_kwargs()
        {'target_latency_ms': 2.5}
    """

    kind: str
    reduction: float
    runtime: str = "litert"
    threads: int = 1

    def __post_init__(self):
        checks.check_choice("budget kind", self.kind, _BUDGET_KINDS)
        if self.kind == "latency_ms":
            checks.check_number("target_latency_ms", self.reduction, 0, strict=True)
        else:
            checks.check_fraction(f"target_{self.kind}_reduction", self.reduction)
        checks.check_choice("latency runtime", self.runtime, _LATENCY_RUNTIMES)
        checks.check_int("latency threads", self.threads, 1)

    @property
    def is_latency(self):
        """True for the latency kinds (they need a `LatencyModel`)."""
        return self.kind.startswith("latency")

    @classmethod
    def latency(cls, reduction, runtime="litert", threads=1):
        """Remove `reduction` of the predicted latency on `runtime` with `threads`."""
        return cls("latency", reduction, runtime, threads)

    @classmethod
    def latency_ms(cls, ms, runtime="litert", threads=1):
        """Reach a predicted latency of `ms` milliseconds (batch 1) on `runtime` with `threads`."""
        return cls("latency_ms", ms, runtime, threads)

    def latency_model(self, model, groups=None):
        """The `LatencyModel` of `model` for this budget's runtime and threads (cached on disk).

        Its features count output channels in the tiles the runtime computes
        on this CPU (`tile="auto"`, measured once by
        `tfkdp.pruning.alignment.measure_alignment` and cached).
        """
        from tfkdp.pruning.latency_model import LatencyModel

        return LatencyModel(model, runtime=self.runtime, threads=self.threads, groups=groups, tile="auto")

    @classmethod
    def macs(cls, reduction):
        """Remove `reduction` of the MACs."""
        return cls("macs", reduction)

    @classmethod
    def params(cls, reduction):
        """Remove `reduction` of the parameters."""
        return cls("params", reduction)

    @classmethod
    def of(cls, value):
        """A `Budget` from a `Budget`, a dict (`to_dict`) or a number (a MAC reduction)."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if value is None:
            raise ValueError(
                "a budget is required: Budget.macs(r), Budget.params(r) or a MAC reduction in (0, 1)"
            )
        return cls.macs(value)

    def plan_kwargs(self):
        """The `make_plan` keyword for this budget."""
        if self.kind == "latency_ms":
            return {"target_latency_ms": self.reduction}
        return {f"target_{self.kind}_reduction": self.reduction}

    def to_dict(self):
        config = {"kind": self.kind, "reduction": self.reduction}
        if self.is_latency:
            config.update(runtime=self.runtime, threads=self.threads)
        return config

    @classmethod
    def from_dict(cls, config):
        return cls(config["kind"], config["reduction"], config.get("runtime", "litert"),
                   config.get("threads", 1))  # fmt: skip


@dataclasses.dataclass
class Pruned:
    """The state between a method's steps.

    Attributes:
        model: the student with pruned channels masked (same graph as the
            student); for a method that does not prune, the student itself.
        plan: the `PruningPlan` (empty when nothing is pruned).
        history: `{phase name: History.history}` of the phases so far.
        record: JSON-serialisable facts the method decided (for the report).
    """

    model: object
    plan: object
    history: dict = dataclasses.field(default_factory=dict)
    record: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CompressionResult:
    """What a method returns.

    Attributes:
        model: the final deployable model (stripped or merged).
        plan: the `PruningPlan` applied to the student (empty for `kd_only`).
        history: `{phase name: History.history}`.
        record: JSON-serialisable record of what the method decided: its
            name and options, the budget, the channels kept per group, the
            phases and their epochs.
        masked: the model before `finalize` (same graph as the student).

    A result unpacks as `(model, plan, history)`.
    """

    model: object
    plan: object
    history: dict
    record: dict
    masked: object = None

    def __iter__(self):
        return iter((self.model, self.plan, self.history))


class Method:
    """Base class of compression recipes.

    Subclasses set `name`, take their options as keyword arguments in
    `__init__` (validated there, returned by `get_config`), and implement
    `prune`; `finetune` and `finalize` have defaults (no further training;
    strip the masked channels).

    Args:
        **options: the method's options (see each method).
    """

    name = None
    #: whether the method prunes to a budget (the pipeline checks the budget early).
    prunes = True
    #: A folder where a method may keep resumable state *within* one of its
    #: steps (e.g. scores of finished candidates), or None (library use: no
    #: resume). The pipeline sets it per stage; it survives a killed run.
    state_dir = None

    @classmethod
    def pipeline_options(cls, flags, training):
        """The method's options from the pipeline's resolved flags (a dict).

        Args:
            flags: `{flag name: value}` of `tfkdp-compress` (e.g.
                `compress_epochs`, `criterion`, `round_to` and the method's
                own flags).
            training: the `Training` the pipeline built from its flags.

        Returns:
            Keyword arguments for `cls(**options)`.
        """
        return {"training": training}

    @classmethod
    def split_epochs(cls, total, finetune_epochs, flags):
        """The pipeline flags that give this method `total` training epochs in all.

        `tfkdp-compress --method=a,b,...` trains every method for the same
        number of epochs; each method splits them over its own phases. The
        base class has no phases the pipeline knows of and keeps the flags.

        Args:
            total: epochs every compared method trains, in all (>= 1).
            finetune_epochs: the fine-tune share the user asked for
                (`--finetune_epochs`).
            flags: the other resolved pipeline flags (e.g. the method's own).

        Returns:
            `{flag name: value}` to override, e.g. `{"compress_epochs": 2,
            "finetune_epochs": 1}`; `{}` keeps the user's flags.
        """
        return {}

    def load_state(self, filename):
        """The JSON object saved as `filename` in `state_dir`, or None (no `state_dir` or no file)."""
        import json
        import os

        if self.state_dir is None:
            return None
        path = os.path.join(self.state_dir, filename)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def save_state(self, filename, state):
        """Writes `state` as JSON to `state_dir/filename` atomically (nothing without a `state_dir`)."""
        import os

        from tfkdp.export._atomic import write_json_atomic

        if self.state_dir is None:
            return
        os.makedirs(self.state_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.state_dir, filename), state)

    def report(self, record, out_dir):
        """Method-specific report parts from a finished run's `record`.

        Args:
            record: the `record` of the method's `Pruned` after `finetune`.
            out_dir: the folder to write plots into.

        Returns:
            `{"markdown": str, "plots": {key: file path}}` (default: nothing).
        """
        return {"markdown": "", "plots": {}}

    def check_budget(self, budget):
        """Raises `ValueError` when the options cannot work with `budget` (default: nothing).

        The pipeline calls it before any training.
        """
        del budget

    def get_config(self):
        """The method's options (JSON-serialisable); `type(m)(**m.get_config())` rebuilds it."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def prune(self, teacher, student, train_data, val_data, budget):
        """Trains and prunes; returns a `Pruned` with the masked student."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement prune(teacher, student, train_data, "
            "val_data, budget) -> Pruned"
        )

    def finetune(self, teacher, pruned, train_data, val_data):
        """Trains the masked student further; returns a `Pruned` (default: unchanged)."""
        return pruned

    def finalize(self, pruned):
        """The deployable model of a fine-tuned `Pruned` (default: strip the plan)."""
        from tfkdp.pruning.surgery import strip_channels

        if not len(pruned.plan):
            return pruned.model
        return strip_channels(pruned.model, pruned.plan)

    def compress(self, teacher, student, train_data, val_data=None, budget=None):
        """Runs `prune`, `finetune` and `finalize`; returns a `CompressionResult`.

        Args:
            teacher: the trained teacher (`keras.Model` or path).
            student: the model to compress (trained in place); `None` means a
                copy of the teacher (self-compression).
            train_data: a finite, batched `tf.data.Dataset` of `(x, y)`.
            val_data: optional validation dataset.
            budget: a `Budget` (or a MAC reduction in (0, 1)).

        Returns:
            A `CompressionResult`.
        """
        student = self.prepare_student(teacher, student)
        if train_data is None:
            raise ValueError("train_data is required (a finite, batched tf.data.Dataset of (x, y))")
        pruned = self.prune(teacher, student, train_data, val_data, budget)
        pruned = self.finetune(teacher, pruned, train_data, val_data)
        model = self.finalize(pruned)
        return CompressionResult(model, pruned.plan, pruned.history, pruned.record, pruned.model)

    @staticmethod
    def prepare_student(teacher, student):
        """`student`, or a trainable copy of the teacher when `student` is None."""
        import keras

        from tfkdp.train.clone import copy_model

        if student is None:
            if teacher is None or not isinstance(teacher, keras.Model):
                raise ValueError(
                    "student=None means a copy of the teacher, which must then be a keras.Model; "
                    f"received teacher={teacher!r}"
                )
            student = copy_model(teacher, name=f"{teacher.name}_student")
        if not isinstance(student, keras.Model):
            raise ValueError(f"student must be a keras.Model; received {type(student).__name__}")
        return student

    def base_record(self, budget):
        """The record every method starts from: name, options, budget."""
        return {
            "method": self.name,
            "options": self.get_config(),
            "budget": None if budget is None else Budget.of(budget).to_dict(),
        }


_REGISTRY = {}


def register(cls):
    """Registers a `Method` subclass under `cls.name` (usable as a decorator).

    Raises:
        ValueError: if `cls` is not a `Method` subclass with a string name.
    """
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise ValueError(f"register expects a Method subclass; received {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string; received {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def names():
    """The registered method names, in registration order (built-ins first)."""
    return list(_REGISTRY)


def get_class(name):
    """The `Method` subclass registered as `name`.

    Raises:
        ValueError: for an unknown name (listing the valid ones, with the
            closest match).
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown method={name!r}; valid names: {names()}.{hint}")
    return _REGISTRY[name]


def get(name, **options):
    """A new instance of the method registered as `name`, with `options`.

    Raises:
        ValueError: for an unknown name (listing the valid ones, with the
            closest match) or bad options.
    """
    if isinstance(name, Method):
        if options:
            raise ValueError("options cannot be given with a Method instance")
        return name
    return get_class(name)(**options)


class Recipe(Method):
    """A method with the shared options of the channel-pruning recipes.

    Subclasses (`kdp`, `prune_only`, `kd_only` and the other recipes) take
    these options plus their own; `pipeline_options` maps the pipeline's
    flags onto them (`--compress_epochs` → `admm_epochs`, the first phase).

    Args:
        admm_epochs: epochs of the first phase (ADMM + KD for `kdp`, >= 1
            there); the baselines train `admm_epochs + finetune_epochs`.
        finetune_epochs: epochs after the hard prune (>= 0); default 1, or 0
            for a recipe with `no_finetune`.
        criterion: importance criterion (`tfkdp.pruning.criteria.names()`).
        allocation: `"global"` or `"uniform"` (see `make_plan`).
        min_channels: fewest channels a pruned group keeps.
        round_to: kept channel counts are multiples of this.
        training: a `tfkdp.train.phases.Training`, or a dict of its fields.
        onednn_guard: `make_plan`'s guard for groups feeding strided 1×1
            convolutions (`"auto"`, `"keep"`, `"raise"`, `"off"`; see
            `tfkdp.make_plan`); what it did is in the record.
    """

    first_phase_minimum = 0
    #: Why a recipe has no separate fine-tune phase, or None. When set,
    #: `finetune_epochs` defaults to 0 and any other value is a `ValueError`
    #: giving this reason; `pipeline_options` ignores `--finetune_epochs` (logged).
    no_finetune = None

    def __init__(self, admm_epochs=1, finetune_epochs=None, criterion="l1", allocation="global",
                 min_channels=1, round_to=1, training=None, onednn_guard="auto"):  # fmt: skip
        self.admm_epochs = checks.check_int("admm_epochs", admm_epochs, self.first_phase_minimum)
        if finetune_epochs is None:
            finetune_epochs = 0 if self.no_finetune else 1
        if self.no_finetune and finetune_epochs != 0:
            raise ValueError(
                f"{self.name} {self.no_finetune}; received finetune_epochs={finetune_epochs!r}"
            )
        self.finetune_epochs = checks.check_int("finetune_epochs", finetune_epochs, 0)
        if self.admm_epochs + self.finetune_epochs < 1:
            raise ValueError(
                "admm_epochs + finetune_epochs must be >= 1; received "
                f"{admm_epochs} + {finetune_epochs}"
            )
        from tfkdp.pruning import allocation as allocation_lib
        from tfkdp.pruning import criteria
        from tfkdp.train.phases import Training

        criteria.get(criterion)  # fails early, listing the valid names
        self.criterion = criterion
        self.allocation = checks.check_choice("allocation", allocation, allocation_lib.ALLOCATIONS)
        self.min_channels = checks.check_int("min_channels", min_channels, 1)
        self.round_to = checks.check_int("round_to", round_to, 1)
        self.onednn_guard = checks.check_choice(
            "onednn_guard", onednn_guard, ("auto", "keep", "raise", "off")
        )
        self.training = Training.of(training)

    @classmethod
    def pipeline_options(cls, flags, training):
        """`--compress_epochs` → `admm_epochs`, `--finetune_epochs`, `--criterion`, `--round_to`."""
        finetune_epochs = flags["finetune_epochs"]
        if cls.no_finetune and finetune_epochs:
            logging.info("%s: --finetune_epochs=%d ignored (%s)", cls.name, finetune_epochs,
                         cls.no_finetune)  # fmt: skip
            finetune_epochs = 0
        return {
            "admm_epochs": flags["compress_epochs"], "finetune_epochs": finetune_epochs,
            "criterion": flags["criterion"], "round_to": flags["round_to"], "training": training,
        }  # fmt: skip

    @classmethod
    def split_epochs(cls, total, finetune_epochs, flags):
        """`total − finetune_epochs` compress epochs and `finetune_epochs`; all of them compress
        epochs for a recipe without a fine-tune phase (`no_finetune`).

        The first phase keeps at least `first_phase_minimum` epochs (and one).
        """
        if cls.no_finetune:
            return {"compress_epochs": total, "finetune_epochs": 0}
        finetune = min(finetune_epochs, total - max(1, cls.first_phase_minimum))
        return {"compress_epochs": total - max(0, finetune), "finetune_epochs": max(0, finetune)}

    @property
    def total_epochs(self):
        return self.admm_epochs + self.finetune_epochs

    def get_config(self):
        return {
            "admm_epochs": self.admm_epochs,
            "finetune_epochs": self.finetune_epochs,
            "criterion": self.criterion,
            "allocation": self.allocation,
            "min_channels": self.min_channels,
            "round_to": self.round_to,
            "training": self.training.to_dict(),
            "onednn_guard": self.onednn_guard,
        }

    def make_plan(self, student, groups, budget, train_data):
        """The criterion's plan for `budget` (`tfkdp.make_plan`)."""
        from tfkdp.pruning import allocation, criteria

        crit = criteria.get(self.criterion)
        budget = Budget.of(budget)
        latency = budget.latency_model(student, groups) if budget.is_latency else None
        return allocation.make_plan(
            student, groups=groups, criterion=crit, allocation=self.allocation,
            min_channels=self.min_channels, round_to=self.round_to, onednn_guard=self.onednn_guard,
            data=train_data if crit.requires_data else None, latency_model=latency,
            **budget.plan_kwargs(),
        )  # fmt: skip

    def record(self, student, budget, groups, plan, phase_epochs):
        from tfkdp.pruning.allocation import onednn_hazards

        record = self.base_record(budget)
        record["phases"] = phase_epochs
        mode, hazards = onednn_hazards(student, groups, self.onednn_guard)
        record["onednn_guard"] = {"mode": mode, "groups": {gid: list(v) for gid, v in hazards.items()}}
        record["channels"] = {
            g.id: {"size": g.size, "kept": len(plan[g.id]) if g.id in plan else g.size}
            for g in groups if g.prunable
        }  # fmt: skip
        return record
