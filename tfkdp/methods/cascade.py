"""Cascade: channel pruning with teaching assistants that share the student's kernels.

`cascade` (class `Cascade`) keeps a chain of models over one set of
convolution kernels (`tfkdp.pruning.views.SharedViews`): the student T0 at
the budget, `num_tas` teaching assistants T1…Tk at smaller reductions, and
the unpruned, trainable T(k+1); above them the frozen original teacher.
Every model has its own batch norms, classifier, per-channel scores γ and
binary masks M.

1. **Stage 1** (`admm_epochs`): all models train jointly. Each pair
   T(i+1) → Ti contributes `(1 − λ)·CE + λ·T²·KL(T(i+1) ‖ Ti)` at
   temperature T (the teacher side detached; the frozen teacher teaches the
   top model). Scores get the straight-through gradient
   `∂L/∂γₙ = Σ ∂L/∂Yₙ · Yₙ` of the producers' outputs `Y`, and the cascade
   rule: model i's scores are moved by model i+1's gradient
   (`γᵢ ← γᵢ − α·∂L/∂γᵢ₊₁`), so a filter the student pruned still moves when
   its teacher keeps it. Every `mask_every` steps each pruned model's mask
   is recomputed from its scores by `make_plan` at its MAC (or parameter)
   level: coupled groups, `round_to` and `min_channels` respected.
2. **Stage 2** (`stage2_epochs`): the student's mask is frozen; the student
   (a plain masked model) is distilled from its teacher T1 (a frozen
   snapshot); once the student's validation accuracy passes the current
   teacher's, the teacher is swapped for the next one up (T2, …, then the
   original teacher).

Which part comes from where: the paper gives the shared kernels with
per-model masks, batch norms and classifiers, the unpruned trainable top
model under a frozen teacher, the straight-through score gradient and the
cascade rule, the per-pair loss (λ = 0.4, T = 15 by default), the two stages
and the teacher swap. Ours: MAC-budget levels (the student at the budget,
TAs evenly spaced between it and 0) instead of the paper's global top-k by
filter count, masks from `make_plan` on the scores (a global, MAC-aware
allocation per coupled group, refreshed every `mask_every` steps instead of
every step), scores initialised from the `criterion` (L1 by default)
normalised to mean 1 per group, RMSProp for γ (the paper used it on
ImageNet), and stage-2 teachers as frozen snapshots of the TAs at the end
of stage 1 (so the student's updates cannot move its teacher).

Reference:
    Miles & Mikolajczyk, "Cascaded channel pruning using hierarchical
    self-distillation", BMVC 2020, arXiv 2008.06814.
"""

import dataclasses
import os
import time

import keras
import numpy as np
from absl import logging
from keras import ops

from tfkdp import checks
from tfkdp.methods.base import Budget, Pruned, Recipe, register
from tfkdp.train import phases

__all__ = ["Cascade", "CascadeTrainer", "TeacherSwitch", "TeacherSwap", "model_names"]

_STATE_FILE = "cascade_state.json"
_SCORE_OPTIMIZERS = ("rmsprop", "sgd")


def model_names(num_tas):
    """The chain's names, student first: `student`, `ta1`, …, `full`."""
    return ["student", *(f"ta{j}" for j in range(1, num_tas + 1)), "full"]


def _replicas():
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


class CascadeTrainer(keras.Model):
    """Stage 1 of the cascade: every model of the chain in one training step.

    Args:
        teacher: the frozen original teacher (logits model).
        views: a `SharedViews` whose view 0 is the student and whose last
            view is the unpruned top model.
        names: one name per view (`model_names`), used in the metrics.
        kd_weight: λ, the weight of the KD term of each pair.
        temperature: T of the KD term.

    Compile with `optimizer=` (the kernels, batch norms and classifiers) and
    give `score_optimizer=` (the scores γ) to the constructor.
    """

    def __init__(self, teacher, views, names, kd_weight, temperature, score_optimizer, **kwargs):
        super().__init__(**kwargs)
        from tfkdp.distill.losses import SoftTargetKD

        self.teacher = teacher
        self.teacher.trainable = False
        self.views = list(views.views)
        self.states = list(views.states)
        self.names = list(names)
        self.kd_weight = float(kd_weight)
        self.kd = SoftTargetKD(temperature)
        self.score_optimizer = score_optimizer
        self.ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.view_loss = [keras.metrics.Mean(name=f"{n}_loss") for n in self.names]
        self.view_accuracy = [
            keras.metrics.SparseCategoricalAccuracy(name=f"{n}_accuracy") for n in self.names
        ]
        seen = set()
        self.params = []
        for view in self.views:
            for w in view.trainable_weights:
                if id(w) not in seen:
                    seen.add(id(w))
                    self.params.append(w)

    @property
    def metrics(self):
        return [self.loss_tracker, *self.view_loss, *self.view_accuracy]

    def build_optimizers(self):
        """Creates both optimizers' slots (before a checkpoint is restored)."""
        if not self.optimizer.built:
            self.optimizer.build(self.params)
        if not self.score_optimizer.built:
            self.score_optimizer.build([s for state in self.states[:-1] for s in state.scores])
        self.built = True  # the views are built: nothing is created on the first call

    def _pair_losses(self, x, y, sample_weight, training):
        teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        logits = [view(x, training=training) for view in self.views]
        losses = []
        for i, z in enumerate(logits):
            above = logits[i + 1] if i + 1 < len(logits) else teacher_logits
            kd = self.kd.compute_loss(ops.stop_gradient(above), z, sample_weight)
            ce = self.ce(y, z, sample_weight=sample_weight)
            losses.append((1.0 - self.kd_weight) * ce + self.kd_weight * kd)
        return logits, losses

    def _update_metrics(self, y, logits, losses, total, sample_weight):
        self.loss_tracker.update_state(total)
        for i, (z, loss) in enumerate(zip(logits, losses, strict=True)):
            self.view_loss[i].update_state(loss)
            self.view_accuracy[i].update_state(y, z, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        scores = [state.scores for state in self.states]
        flat_scores = [s for group in scores for s in group]
        with tf.GradientTape() as tape:
            logits, losses = self._pair_losses(x, y, sample_weight, training=True)
            total = ops.sum(ops.stack(losses))
            regularization = self.views[0].losses
            if regularization:
                total = total + ops.sum(ops.stack(regularization))
            scaled = total / float(_replicas())
        gradients = tape.gradient(scaled, self.params + flat_scores)
        self.optimizer.apply(gradients[: len(self.params)], self.params)
        score_grads = gradients[len(self.params) :]
        by_view = []
        start = 0
        for group in scores:
            by_view.append(score_grads[start : start + len(group)])
            start += len(group)
        # The cascade rule: model i's scores move with model i+1's gradient.
        pairs = [
            (g if g is not None else ops.zeros_like(s), s)
            for i in range(len(scores) - 1)
            for g, s in zip(by_view[i + 1], scores[i], strict=True)
        ]  # fmt: skip
        if pairs:
            self.score_optimizer.apply([g for g, _ in pairs], [s for _, s in pairs])
        return self._update_metrics(y, logits, losses, total, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits, losses = self._pair_losses(x, y, sample_weight, training=False)
        total = ops.sum(ops.stack(losses))
        return self._update_metrics(y, logits, losses, total, sample_weight)

    def call(self, x, training=False):
        return self.views[0](x, training=training)


class MaskRefresh(keras.callbacks.Callback):
    """Recomputes each pruned model's mask from its scores every `every` steps.

    Also records, per epoch, the overlap of consecutive models' masks
    (`overlap[i]`: the share of model i's kept channels that model i+1
    keeps; 1 = nested).
    """

    def __init__(self, views, plan_fn, levels, every, overlap=None):
        super().__init__()
        self.views = views
        self.plan_fn = plan_fn
        self.levels = levels
        self.every = every
        self.steps = 0
        self.refreshes = 0
        self.overlap = list(overlap or [])

    def refresh(self):
        for state, level in zip(self.views.states, self.levels, strict=False):
            if level > 0:
                state.set_plan(self.plan_fn(state.score_values(), level))
        self.refreshes += 1

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps % self.every == 0:
            self.refresh()

    def on_epoch_end(self, epoch, logs=None):
        self.overlap.append(mask_overlap(self.views))


class StepTimer(keras.callbacks.Callback):
    """Median wall time of a training step (s), the first step (tracing) excluded."""

    def __init__(self):
        super().__init__()
        self.times = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)

    @property
    def median(self):
        times = self.times[1:] or self.times
        return float(np.median(times)) if times else None


def mask_overlap(views):
    """`[share of model i's kept channels that model i+1 keeps]` for consecutive models."""
    kept = []
    for state in views.states:
        kept.append(np.concatenate([keras.ops.convert_to_numpy(m) > 0.5 for m in state.masks]))
    return [
        float(np.sum(kept[i] & kept[i + 1]) / max(1, np.sum(kept[i])))
        for i in range(len(kept) - 1)
    ]  # fmt: skip


class TeacherSwitch(keras.Model):
    """Several frozen teachers behind one model; `index` (a variable) picks the one called.

    Only the chosen teacher runs (`keras.ops.switch`), and changing `index`
    needs no retracing of a compiled step.
    """

    def __init__(self, teachers, **kwargs):
        super().__init__(**kwargs)
        self.teachers = list(teachers)
        for teacher in self.teachers:
            teacher.trainable = False
        self.index = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False, name="teacher_index",
            aggregation="only_first_replica",
        )  # fmt: skip
        self.built = True  # the teachers are built

    def call(self, x, training=False):
        branches = [lambda v, t=t: t(v, training=False) for t in self.teachers]
        return ops.switch(ops.convert_to_tensor(self.index), branches, x)


class TeacherSwap(keras.callbacks.Callback):
    """Stage 2's rule: swap to the next teacher up once the student passes the current one.

    At the end of every epoch the student's accuracy on `data` is compared
    with the current teacher's (`teacher_accuracy[index]`, measured once);
    when it is strictly higher and a next teacher exists, `switch.index`
    moves up by one and the event is recorded.

    Args:
        switch: the `TeacherSwitch`.
        student: the student being trained.
        data: the validation batches.
        teacher_accuracy: accuracy of each teacher of the switch on `data`.
        names: the teachers' names.
        events: earlier events (resume).
        on_change: optional `fn(callback)` called after every epoch (saving state).
    """

    def __init__(self, switch, student, data, teacher_accuracy, names, events=None, on_change=None):
        super().__init__()
        self.switch = switch
        self.student = student
        self.data = data
        self.teacher_accuracy = list(teacher_accuracy)
        self.names = list(names)
        self.events = list(events or [])
        self.on_change = on_change
        self.curve = []

    def decide(self, epoch, student_accuracy):
        """Applies the rule for one epoch's student accuracy; returns the event or None."""
        index = int(keras.ops.convert_to_numpy(self.switch.index))
        self.curve.append(float(student_accuracy))
        if student_accuracy > self.teacher_accuracy[index] and index + 1 < len(
            self.teacher_accuracy
        ):
            event = {
                "epoch": int(epoch) + 1, "from": self.names[index], "to": self.names[index + 1],
                "student_accuracy": float(student_accuracy),
                "teacher_accuracy": float(self.teacher_accuracy[index]),
            }  # fmt: skip
            self.switch.index.assign(index + 1)
            self.events.append(event)
            logging.info("cascade stage 2: student %.4f > %s %.4f: teacher is now %s",
                         student_accuracy, event["from"], event["teacher_accuracy"], event["to"])  # fmt: skip
            return event
        return None

    def on_epoch_end(self, epoch, logs=None):
        self.decide(epoch, accuracy(self.student, self.data))
        if self.on_change is not None:
            self.on_change(self)


def accuracy(model, data):
    """Top-1 accuracy of a logits model over batches of `(x, y)`."""
    correct = total = 0
    for batch in data:
        x, y = batch[0], batch[1]
        logits = keras.ops.convert_to_numpy(model(x, training=False))
        y = np.asarray(y).reshape(-1)
        correct += int(np.sum(np.argmax(logits, axis=-1) == y))
        total += int(y.size)
    return correct / max(1, total)


@register
class Cascade(Recipe):
    """Cascaded pruning with weight-sharing teaching assistants (see the module docstring).

    Args:
        num_tas: teaching assistants between the student and the unpruned
            model (0: the unpruned model teaches the student directly).
        levels: optional reductions of the TAs (same kind as the budget),
            each strictly between 0 and the budget's; default: evenly
            spaced, `budget · j / (num_tas + 1)`.
        stage2_epochs: epochs of stage 2 (student fine-tuned by KD with the
            teacher swap), >= 0.
        kd_weight: λ of each pair's loss (paper: 0.4).
        temperature: T of each pair's KD term (paper: 15).
        score_learning_rate: α of the scores' optimizer.
        score_optimizer: `"rmsprop"` or `"sgd"`.
        mask_every: optimizer steps between mask refreshes.
        **kwargs: the shared options (`admm_epochs` = stage-1 epochs, >= 1;
            `finetune_epochs` must be 0; `criterion` initialises the scores).

    Raises:
        ValueError: for bad options.

    Example:
        >>> from tfkdp import methods
        >>> methods.get("cascade", num_tas=2, admm_epochs=3, stage2_epochs=1).names
        ['student', 'ta1', 'ta2', 'full']

    Reference:
        Miles & Mikolajczyk, "Cascaded channel pruning using hierarchical
        self-distillation", BMVC 2020.
    """

    name = "cascade"
    first_phase_minimum = 1
    no_finetune = "fine-tunes in its stage 2: use stage2_epochs (--cascade_stage2_epochs)"

    def __init__(self, num_tas=1, levels=None, stage2_epochs=1, kd_weight=0.4, temperature=15.0,
                 score_learning_rate=1e-3, score_optimizer="rmsprop", mask_every=50, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.num_tas = checks.check_int("num_tas", num_tas, 0)
        if levels is not None and len(levels):
            levels = sorted((float(v) for v in levels), reverse=True)
            for v in levels:
                checks.check_fraction("cascade level", v)
            if len(set(levels)) != len(levels):
                raise ValueError(f"cascade levels must be distinct; received {levels}")
            if num_tas not in (len(levels), 1):
                raise ValueError(
                    f"num_tas={num_tas} but {len(levels)} levels were given ({levels}): "
                    "give one level per teaching assistant"
                )
            self.num_tas = len(levels)
        else:
            levels = None
        self.levels = levels
        self.stage2_epochs = checks.check_int("stage2_epochs", stage2_epochs, 0)
        self.kd_weight = checks.check_number("kd_weight", kd_weight, 0)
        if self.kd_weight > 1:
            raise ValueError(f"kd_weight must lie in [0, 1]; received kd_weight={kd_weight!r}")
        self.temperature = checks.check_number("temperature", temperature, 0, strict=True)
        self.score_learning_rate = checks.check_number(
            "score_learning_rate", score_learning_rate, 0, strict=True
        )
        self.score_optimizer = checks.check_choice(
            "score_optimizer", score_optimizer, _SCORE_OPTIMIZERS
        )
        self.mask_every = checks.check_int("mask_every", mask_every, 1)

    @property
    def names(self):
        return model_names(self.num_tas)

    @classmethod
    def split_epochs(cls, total, finetune_epochs, flags):
        """Stage 2 (the fine-tune) takes `--cascade_stage2_epochs` (or `finetune_epochs` if that is
        larger), at most `total − 1`; stage 1 the rest."""
        stage2 = min(max(flags.get("cascade_stage2_epochs", 1), finetune_epochs), total - 1)
        return {"compress_epochs": total - stage2, "finetune_epochs": 0, "cascade_stage2_epochs": stage2}

    @classmethod
    def pipeline_options(cls, flags, training):
        """The shared options plus `--cascade_num_tas`, `--cascade_levels`, `--cascade_stage2_epochs`."""
        options = super().pipeline_options(flags, training)
        levels = []
        for value in flags.get("cascade_levels") or []:
            try:
                levels.append(float(value))
            except (TypeError, ValueError):
                raise ValueError(
                    f"--cascade_levels must be MAC reductions in (0, 1); received {value!r}"
                ) from None
        options.update(
            num_tas=len(levels) if levels else flags["cascade_num_tas"], levels=levels or None,
            stage2_epochs=flags["cascade_stage2_epochs"],
        )  # fmt: skip
        return options

    def get_config(self):
        config = super().get_config()
        config.update(
            num_tas=self.num_tas, levels=self.levels, stage2_epochs=self.stage2_epochs,
            kd_weight=self.kd_weight, temperature=self.temperature,
            score_learning_rate=self.score_learning_rate, score_optimizer=self.score_optimizer,
            mask_every=self.mask_every,
        )  # fmt: skip
        return config

    def check_budget(self, budget):
        """The TAs' levels must lie below the student's budget (`chain_levels`).

        A budget in milliseconds is checked when the latency model is known (in `prune`).
        """
        if Budget.of(budget).kind != "latency_ms":
            self.chain_levels(budget)

    def chain_levels(self, budget, reduction=None):
        """The reduction of every model of the chain, student first, 0 for the unpruned top.

        Levels are fractions of the budget's kind (MACs, parameters or predicted
        latency); `reduction` overrides the student's (a `latency_ms` budget
        turned into a fraction of the predicted latency).
        """
        budget = Budget.of(budget)
        student = budget.reduction if reduction is None else reduction
        kind = "latency" if budget.kind == "latency_ms" else budget.kind
        if self.levels is not None:
            bad = [v for v in self.levels if not v < student]
            if bad:
                raise ValueError(
                    f"cascade levels {bad} are not below the student's target_{kind}_"
                    f"reduction={student}: TAs sit between the student and the unpruned model"
                )
            tas = list(self.levels)
        else:
            k = self.num_tas
            tas = [student * j / (k + 1) for j in range(k, 0, -1)]
        return [student, *tas, 0.0]

    # -- resumable state -------------------------------------------------------
    def _path(self, *parts):
        return None if self.state_dir is None else os.path.join(self.state_dir, *parts)

    # -- the method's steps ------------------------------------------------------
    def _plan_fn(self, student, budget, latency=None):
        from tfkdp.pruning import allocation

        kind = Budget.of(budget).kind
        kind = "latency" if kind == "latency_ms" else kind

        def plan_for(scores, level):
            low = min(float(np.min(s)) for s in scores.values())
            shifted = {gid: s - low + 1e-6 for gid, s in scores.items()}
            return allocation.make_plan(
                student, scores=shifted, allocation=self.allocation, min_channels=self.min_channels,
                round_to=self.round_to, onednn_guard=self.onednn_guard, verify=False,
                latency_model=latency, **{f"target_{kind}_reduction": level},
            )  # fmt: skip

        return plan_for

    def _initial_scores(self, student, groups, train_data):
        from tfkdp.pruning import criteria

        crit = criteria.get(self.criterion)
        raw = crit(student, groups, data=train_data if crit.requires_data else None)
        return {
            gid: (s / max(float(np.mean(s)), 1e-12)).astype(np.float32) for gid, s in raw.items()
        }

    def prune(self, teacher, student, train_data, val_data, budget):
        """Runs stages 1 and 2; returns a `Pruned` with the masked student.

        `record["models"]` lists each model's name, level, MACs, parameters
        and final stage-1 validation accuracy; `record["mask_overlap"]` the
        per-epoch overlap of consecutive masks; `record["swaps"]` the
        stage-2 teacher swaps; `record["step_time_ratio"]` a stage-1 step's
        time over a stage-2 (single KD student) step's.

        With a `state_dir`, stage 1 checkpoints each epoch and its result is
        kept, and stage 2 checkpoints each epoch with its teacher index: a
        killed run resumes in the stage and epoch it was in.
        """
        from tfkdp.pruning.analysis import channel_groups
        from tfkdp.pruning.cost import plan_macs, plan_params
        from tfkdp.pruning.views import SharedViews

        if teacher is None:
            raise ValueError("method='cascade' needs a teacher; received teacher=None")
        budget = Budget.of(budget)
        names = self.names
        groups = channel_groups(student)
        latency = budget.latency_model(student, groups) if budget.is_latency else None
        reduction = None
        if budget.kind == "latency_ms":
            reduction = 1.0 - budget.reduction / latency.base_ms
            if not 0.0 < reduction < 1.0:
                raise ValueError(
                    f"target_latency_ms={budget.reduction} is not below the unpruned model's "
                    f"predicted {latency.base_ms:.3f} ms on {budget.runtime}"
                )
        levels = self.chain_levels(budget, reduction)
        data = val_data if val_data is not None else train_data.take(20)
        data_name = "val" if val_data is not None else "train (first 20 batches)"
        state = self.load_state(_STATE_FILE) or {}
        plan_fn = self._plan_fn(student, budget, latency)
        stage1_dir = self._path("stage1")
        if state.get("stage1_done"):
            logging.info("cascade: stage 1 finished before; loading its models")
            masked = [keras.saving.load_model(os.path.join(stage1_dir, f"{n}.keras"))
                      for n in names]  # fmt: skip
            record = state["record"]
            history = {"stage1": state["history"]}
        else:
            masked, record, history = self._stage1(
                teacher, student, groups, train_data, val_data, data, budget, levels, plan_fn,
                SharedViews, state,
            )  # fmt: skip
            # Ours, not the paper's: stage 1 moved the shared kernels under every model's
            # batch statistics, which each model's moving averages follow with a lag (on a
            # short stage 1 they are far off). Re-estimate them before the TAs teach and
            # are compared with the student in stage 2.
            for name, model in zip(names, masked, strict=True):
                if phases.recalibrate(model, train_data, self.training):
                    record["final"][name]["val_accuracy_recalibrated"] = float(
                        accuracy(model, data)
                    )
            if self.state_dir is not None:
                os.makedirs(stage1_dir, exist_ok=True)
                for name, model in zip(names, masked, strict=True):
                    model.save(os.path.join(stage1_dir, f"{name}.keras"))
                state.update(stage1_done=True, record=record, history=history["stage1"])
                self.save_state(_STATE_FILE, state)
        plans = [record["plans"][n] for n in names]
        from tfkdp.pruning.plan import PruningPlan

        plan = PruningPlan(plans[0])
        record["models"] = [
            {"name": n, "level": lv, "macs": int(plan_macs(student, PruningPlan(p))),
             "params": int(plan_params(student, PruningPlan(p))), **record["final"][n]}
            for n, lv, p in zip(names, levels, plans, strict=True)
        ]  # fmt: skip
        record["data"] = data_name
        pruned_student = masked[0]
        h2, swaps, curve, s2_seconds = self._stage2(
            teacher, pruned_student, masked[1:], train_data, val_data, data, state
        )
        if h2 is not None:
            history["stage2"] = h2
        record["swaps"] = swaps
        record["stage2_student_accuracy"] = curve
        if s2_seconds and record.get("stage1_seconds_per_step"):
            record["step_time_ratio"] = record["stage1_seconds_per_step"] / s2_seconds
        phases.recalibrate(pruned_student, train_data, self.training)
        full = self.record(student, budget, groups, plan,
                           {"stage1": self.admm_epochs, "stage2": self.stage2_epochs})  # fmt: skip
        full.update({k: v for k, v in record.items() if k not in ("plans", "final")})
        return Pruned(pruned_student, plan, history, full)

    def _stage1(self, teacher, student, groups, train_data, val_data, data, budget, levels, plan_fn,
                views_cls, state):  # fmt: skip
        from tfkdp.train import recipe
        from tfkdp.train.guard import NonFiniteGuard

        scores = self._initial_scores(student, [g for g in groups if g.prunable], train_data)
        views = views_cls(student, len(levels), scores=scores)
        for s, level in zip(views.states, levels, strict=True):
            if level > 0:
                s.set_plan(plan_fn(s.score_values(), level))  # unreachable levels fail here
        score_opt = (keras.optimizers.RMSprop(self.score_learning_rate)
                     if self.score_optimizer == "rmsprop"
                     else keras.optimizers.SGD(self.score_learning_rate))  # fmt: skip
        trainer = CascadeTrainer(teacher, views, self.names, self.kd_weight, self.temperature,
                                 score_opt)  # fmt: skip
        steps = recipe.steps_in(train_data)
        trainer.compile(
            optimizer=recipe.make_optimizer(steps * self.admm_epochs, self.training.learning_rate,
                                            self.training.weight_decay, self.training.optimizer),
            jit_compile=self.training.jit_compile,
            steps_per_execution=self.training.steps_per_execution,
        )  # fmt: skip
        trainer.build_optimizers()
        refresh = MaskRefresh(views, plan_fn, levels, self.mask_every, state.get("overlap"))
        protected = trainer.params + [v for st in views.states for v in st.weights]
        timer = StepTimer()
        callbacks = [NonFiniteGuard(protected, phase="cascade stage 1"), refresh, timer]
        if self.state_dir is not None:
            method = self

            class _SaveOverlap(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    method.save_state(_STATE_FILE, dict(state, overlap=refresh.overlap))

            callbacks = [keras.callbacks.BackupAndRestore(self._path("stage1", "backup")),
                         *callbacks, _SaveOverlap()]  # fmt: skip
        if not refresh.overlap:
            refresh.overlap.append(mask_overlap(views))
        logging.info("cascade stage 1: %d models (%s) at reductions %s, %d epochs",
                     len(levels), ", ".join(self.names), [round(v, 3) for v in levels],
                     self.admm_epochs)  # fmt: skip
        fit = trainer.fit(train_data, validation_data=val_data, epochs=self.admm_epochs,
                          callbacks=[*callbacks, *self.training.callbacks],
                          verbose=self.training.verbose)  # fmt: skip
        refresh.refresh()
        final = {}
        for i, name in enumerate(self.names):
            final[name] = {"val_accuracy": float(accuracy(views.views[i], data))}
        masked = [views.masked_model(i) for i in range(len(levels))]
        x = next(iter(data))[0]
        diff = float(np.max(np.abs(keras.ops.convert_to_numpy(views.views[0](x, training=False))
                                   - keras.ops.convert_to_numpy(masked[0](x, training=False)))))  # fmt: skip
        record = {
            "levels": {n: lv for n, lv in zip(self.names, levels, strict=True)},
            "plans": {n: {g: list(k) for g, k in views.view_plan(i).items()}
                      for i, n in enumerate(self.names)},
            "history_stage1": {k: [float(v) for v in fit.history[k]] for k in fit.history
                               if k.endswith("_accuracy")},
            "final": final,
            "mask_overlap": refresh.overlap,
            "mask_refreshes": refresh.refreshes,
            "view_vs_masked_max_abs_diff": diff,
            "stage1_seconds_per_step": timer.median,
        }  # fmt: skip
        return masked, record, {"stage1": _plain(fit.history)}

    def _stage2(self, teacher, student, tas, train_data, val_data, data, state):
        """Stage 2: KD of the masked student from the chain, with the teacher swap."""
        from tfkdp.distill.losses import SoftTargetKD

        if not self.stage2_epochs:
            return None, [], [], None
        teachers = [*tas, teacher]
        names = [*self.names[1:], "teacher"]
        accs = state.get("teacher_accuracy") or [float(accuracy(t, data)) for t in teachers]
        switch = TeacherSwitch(teachers, name="cascade_teachers")
        switch.index.assign(int(state.get("teacher_index", 0)))
        method = self

        def save(callback):
            method.save_state(_STATE_FILE, dict(
                state, teacher_accuracy=accs, events=callback.events, curve=callback.curve,
                teacher_index=int(keras.ops.convert_to_numpy(switch.index)),
            ))  # fmt: skip

        swap = TeacherSwap(switch, student, data, accs, names, state.get("events"), on_change=save)
        swap.curve = list(state.get("curve") or [])
        timer = StepTimer()
        callbacks = [swap, timer]
        if self.state_dir is not None:
            callbacks.insert(0, keras.callbacks.BackupAndRestore(self._path("stage2", "backup")))
        training = dataclasses.replace(
            self.training, distillation_losses=(SoftTargetKD(self.temperature),),
            student_loss_weight=1.0 - self.kd_weight,
        )  # fmt: skip
        history = phases.distill(switch, student, train_data, val_data, self.stage2_epochs, training,
                                 "cascade stage 2", callbacks=callbacks)  # fmt: skip
        return _plain(history), swap.events, swap.curve, timer.median

    def report(self, record, out_dir):
        """Validation accuracy of every model per epoch and the masks' overlap (PNG), a table."""
        plots = {}
        models = record.get("models") or []
        history = record.get("history_stage1") or {}
        overlap = record.get("mask_overlap") or []
        if history or overlap:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib import pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
            for m in models:
                key = f"val_{m['name']}_accuracy" if f"val_{m['name']}_accuracy" in history \
                    else f"{m['name']}_accuracy"  # fmt: skip
                if key in history:
                    axes[0].plot(range(1, len(history[key]) + 1), history[key], marker="o",
                                 label=m["name"])  # fmt: skip
            curve = record.get("stage2_student_accuracy") or []
            if curve:
                first = len(next(iter(history.values()), [])) + 1
                axes[0].plot(range(first, first + len(curve)), curve, marker="s", linestyle="--",
                             label="student, stage 2")  # fmt: skip
            axes[0].set_xlabel("epoch")
            axes[0].set_ylabel("accuracy")
            axes[0].legend(fontsize=7)
            axes[0].set_title("every model of the chain")
            names = [m["name"] for m in models]
            for i in range(len(names) - 1):
                axes[1].plot(range(len(overlap)), [o[i] for o in overlap], marker="o",
                             label=f"{names[i]} ⊂ {names[i + 1]}")  # fmt: skip
            axes[1].set_xlabel("epoch of stage 1 (0 = start)")
            axes[1].set_ylabel("kept channels shared")
            axes[1].set_ylim(0, 1.05)
            axes[1].legend(fontsize=7)
            axes[1].set_title("mask overlap of consecutive models")
            fig.tight_layout()
            path = os.path.join(out_dir, "cascade.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            plots["cascade"] = path
        lines = ["### Cascade", "", f"Validation data: {record.get('data', '')}.", "",
                 "| model | reduction | MACs (M) | params (k) | accuracy after stage 1 |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for m in models:
            lines.append(f"| {m['name']} | {m['level']:.3f} | {m['macs'] / 1e6:.2f} | "
                         f"{m['params'] / 1e3:.1f} | {m['val_accuracy']:.4f} |")  # fmt: skip
        if overlap:
            lines.append(f"\nMask overlap of consecutive models at the end of stage 1: "
                         f"{', '.join(f'{o:.3f}' for o in overlap[-1])}.")  # fmt: skip
        swaps = record.get("swaps") or []
        lines.append("\nStage-2 teacher swaps: " + (
            "; ".join(f"epoch {e['epoch']}: {e['from']} → {e['to']} (student {e['student_accuracy']:.4f} "
                      f"> {e['teacher_accuracy']:.4f})" for e in swaps) or "none") + ".")  # fmt: skip
        if "step_time_ratio" in record:
            lines.append(f"\nA stage-1 step (every model) takes {record['step_time_ratio']:.2f}× "
                         "a stage-2 step (one KD student).")  # fmt: skip
        return {"markdown": "\n".join(lines) + "\n", "plots": plots}


def _plain(history):
    return {k: [float(v) for v in values] for k, values in history.items()}
