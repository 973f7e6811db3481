"""KDP: knowledge distillation with ADMM structured pruning, and its two baselines.

`kdp` (class `KDP`) runs, as a short sequence of phases:

1. **budget**: `make_plan` turns the MAC (or parameter) budget into a number
   of channels to keep per group (global, MAC-aware allocation by default);
2. **ADMM + KD phase** (`admm_epochs`): the student is distilled from the
   teacher while the ADMM penalty ρ/2·Σ_g ‖W_g − Z_g + U_g‖²/(ms_g·N) pulls it
   towards the channel-sparse set (ms_g: the group's mean square weight at the
   start, N: the number of regularised weights, so one ρ suits models of any
   size and weight magnitude); the sparsity ramps up (polynomial schedule)
   and ρ grows;
3. **hard prune** from Z's support (masks that stay in force);
4. **masked KD fine-tune** (`finetune_epochs`), then batch-norm re-estimation;
5. **strip** (`Method.finalize`): the smaller model.

Baselines, trained for the same total number of epochs
(`admm_epochs + finetune_epochs`):

- `prune_only` (`PruneOnly`): no teacher signal: the criterion picks the
  channels, then plain supervised fine-tuning of the masked model, then strip;
- `kd_only` (`KDOnly`): no pruning: the (dense, presumably smaller) student
  is distilled from the teacher; the plan is empty.

A non-finite loss stops training with `NonFiniteLossError`, after restoring
the weights of the last finite epoch end (or of the start of the phase).

Reference:
    Liu, Cao, Li, Hu, Maybank, "Learning to explore distillability and
    sparsability: a joint framework for model compression", IEEE TPAMI
    45(3), 2023 (its KDP algorithm).
"""

import math

import keras
from absl import logging

from tfkdp import checks
from tfkdp.methods.base import Pruned, Recipe, register
from tfkdp.train import phases

__all__ = ["KDP", "PruneOnly", "KDOnly"]


@register
class KDP(Recipe):
    """ADMM knowledge distillation with structured pruning (see the module docstring).

    Args:
        rho: ADMM ρ: a number, or a callable `step -> rho`; `None` ramps it
            geometrically from `rho_initial` to `rho_final` over the first
            3/4 of the ADMM phase.
        rho_initial: see `rho`.
        rho_final: see `rho`.
        normalize: `"mean"` (default), `True` or `False` (`ADMM(normalize=...)`).
            `"mean"`: the penalty is ρ/2 times the mean, over every
            regularised weight, of its squared distance to the sparse set in
            units of its group's mean square weight: unitless, in [0, ~ρ/2]
            whatever the model's size or weight scale, so the defaults
            ρ 0.5 → 25 keep the first ADMM epoch's `sparsity_loss` within
            10× the task loss (6.7× on a keras.applications MobileNetV2 α 0.35
            trained without weight decay, where the per-group `True` with
            ρ 0.001 → 0.05, the default before, was 83×). `True`: each group's
            term divided by its mean square, summed over the weights (ddsl's
            default). `False`: the plain penalty.
        update_every: optimizer steps between ADMM Z/U updates.
        sparsity_ramp: fraction of the ADMM phase over which the sparsity
            rises (polynomial, Zhu & Gupta) from 0 to the target.
        **kwargs: the shared options (`admm_epochs`, `finetune_epochs`,
            `criterion`, `allocation`, `min_channels`, `round_to`, `training`).

    Reference:
        Liu et al., "Learning to explore distillability and sparsability: a
        joint framework for model compression", IEEE TPAMI 2023.
    """

    name = "kdp"
    first_phase_minimum = 1

    def __init__(self, rho=None, rho_initial=0.5, rho_final=25.0, normalize="mean", update_every=4,
                 sparsity_ramp=0.25, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        from tfkdp.pruning.sparsity import admm as admm_lib
        from tfkdp.pruning.sparsity import schedules

        self.update_every = checks.check_int("update_every", update_every, 1)
        self.sparsity_ramp = checks.check_fraction("sparsity_ramp", sparsity_ramp, high_inclusive=True)
        self.rho_initial = checks.check_number("rho_initial", rho_initial, 0, strict=True)
        self.rho_final = checks.check_number("rho_final", rho_final, 0, strict=True)
        self.normalize = admm_lib.check_normalize(normalize)
        if isinstance(rho, dict):  # from get_config
            rho = keras.saving.deserialize_keras_object(rho)
        self.rho = None if rho is None else schedules.get_rho_schedule(rho)

    @classmethod
    def pipeline_options(cls, flags, training):
        """The shared options plus `--admm_rho_initial` / `--admm_rho_final` when given."""
        options = super().pipeline_options(flags, training)
        for flag, option in (("admm_rho_initial", "rho_initial"), ("admm_rho_final", "rho_final")):
            if flags.get(flag) is not None:
                options[option] = flags[flag]
        return options

    def get_config(self):
        config = super().get_config()
        rho = self.rho
        if rho is not None and not hasattr(rho, "get_config"):
            raise NotImplementedError(
                f"KDP.get_config: rho {rho!r} has no get_config (use a tfkdp RhoSchedule)"
            )
        config.update(
            rho=None if rho is None else keras.saving.serialize_keras_object(rho),
            rho_initial=self.rho_initial, rho_final=self.rho_final, normalize=self.normalize,
            update_every=self.update_every, sparsity_ramp=self.sparsity_ramp,
        )  # fmt: skip
        return config

    def _rho(self, steps):
        """ρ growing geometrically from `rho_initial` to `rho_final` over 3/4 of the steps."""
        from tfkdp.pruning.sparsity import schedules

        if self.rho is not None:
            return self.rho
        periods = max(1, int(0.75 * steps) // self.update_every)
        ratio = self.rho_final / self.rho_initial
        multiplier = ratio ** (1.0 / periods) if self.rho_final > self.rho_initial else 1.0
        return schedules.ExponentialRho(
            self.rho_initial, max(1.0, multiplier), self.update_every, self.rho_final
        )

    def admm_term(self, student, groups, plan, steps):
        """The ADMM sparsity term of the first phase: keep counts of `plan`, ramped sparsity.

        Args:
            student: the model being pruned.
            groups: its channel groups.
            plan: the budget's `PruningPlan` (only its keep counts are used).
            steps: optimizer steps of the ADMM phase.
        """
        from tfkdp.pruning.sparsity import admm as admm_lib
        from tfkdp.pruning.sparsity import schedules

        keep = {gid: len(indices) for gid, indices in plan.items()}
        sizes = {g.id: g.size for g in groups}
        removed = sum(sizes[g] - k for g, k in keep.items())
        target_sparsity = removed / max(1, sum(sizes[g] for g in keep))
        sparsity_schedule = schedules.PolynomialDecay(
            0.0, target_sparsity, begin_step=0,
            end_step=max(1, int(math.ceil(self.sparsity_ramp * steps))), frequency=self.update_every,
        )  # fmt: skip
        return admm_lib.ADMM(
            student, keep, sparsity_schedule=sparsity_schedule, rho=self._rho(steps),
            update_every=self.update_every, normalize=self.normalize, groups=groups,
        )  # fmt: skip

    def prune(self, teacher, student, train_data, val_data, budget):
        from tfkdp.pruning.analysis import channel_groups
        from tfkdp.train import recipe

        if teacher is None:
            raise ValueError(f"method={self.name!r} needs a teacher; received teacher=None")
        groups = channel_groups(student)
        plan = self.make_plan(student, groups, budget, train_data)
        steps = recipe.steps_in(train_data) * self.admm_epochs
        admm = self.admm_term(student, groups, plan, steps)
        history, extra_record = self.admm_phase(teacher, student, train_data, val_data, admm, steps)
        plan = admm.sparsity_plan()
        masked = phases.hard_prune(student, plan)
        record = self.record(student, budget, groups, plan,
                             {"admm": self.admm_epochs, "finetune": self.finetune_epochs})
        record["admm_final_penalty"] = float(admm.penalty().numpy())
        record.update(extra_record)
        return Pruned(masked, plan, {"admm": history}, record)

    def admm_phase(self, teacher, student, train_data, val_data, admm, steps):
        """The ADMM + KD phase; returns `(History.history, extra record entries)`.

        Args:
            admm: the phase's ADMM term (`admm_term`).
            steps: optimizer steps of the phase.
        """
        history = phases.distill(
            teacher, student, train_data, val_data, self.admm_epochs, self.training,
            f"{self.name} ADMM phase", sparsity=admm,
        )  # fmt: skip
        return history, {}

    def finetune(self, teacher, pruned, train_data, val_data):
        if self.finetune_epochs:
            pruned.history["finetune"] = phases.distill(
                teacher, pruned.model, train_data, val_data, self.finetune_epochs, self.training,
                "kdp fine-tune", learning_rate=self.training.finetune_lr,
            )  # fmt: skip
        phases.recalibrate(pruned.model, train_data, self.training)
        return pruned


@register
class PruneOnly(Recipe):
    """Baseline: the criterion's plan, then supervised fine-tuning (no teacher signal).

    Trains `admm_epochs + finetune_epochs` epochs after the prune, at
    `training.learning_rate`.
    """

    name = "prune_only"

    def prune(self, teacher, student, train_data, val_data, budget):
        from tfkdp.pruning.analysis import channel_groups

        groups = channel_groups(student)
        plan = self.make_plan(student, groups, budget, train_data)
        masked = phases.hard_prune(student, plan)
        record = self.record(student, budget, groups, plan, {"finetune": self.total_epochs})
        return Pruned(masked, plan, {}, record)

    def finetune(self, teacher, pruned, train_data, val_data):
        pruned.history["finetune"] = phases.finetune(
            pruned.model, train_data, val_data, self.total_epochs, self.training,
            "prune_only fine-tune",
        )  # fmt: skip
        phases.recalibrate(pruned.model, train_data, self.training)
        return pruned


@register
class KDOnly(Recipe):
    """Baseline: distil the (dense, presumably smaller) student; nothing is pruned.

    Trains `admm_epochs + finetune_epochs` epochs of KD in one phase.
    """

    name = "kd_only"
    prunes = False

    def prune(self, teacher, student, train_data, val_data, budget):
        from tfkdp.pruning.plan import PruningPlan

        if teacher is None:
            raise ValueError("method='kd_only' needs a teacher; received teacher=None")
        if budget is not None:
            logging.info("kd_only: the budget is ignored (no pruning)")
        record = self.base_record(budget)
        record["phases"] = {"kd": self.total_epochs}
        record["channels"] = {}
        return Pruned(student, PruningPlan({}), {}, record)

    def finetune(self, teacher, pruned, train_data, val_data):
        pruned.history["kd"] = phases.distill(
            teacher, pruned.model, train_data, val_data, self.total_epochs, self.training, "kd_only"
        )
        phases.recalibrate(pruned.model, train_data, self.training)
        return pruned
