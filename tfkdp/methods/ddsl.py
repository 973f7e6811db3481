"""DDSL: KDP whose distillation and sparsity weights a meta-learned dean sets.

`ddsl` (class `DDSL`) is `kdp` (same budget, plan, criteria, `round_to`,
ρ and sparsity schedules, hard prune, masked KD fine-tune, BN re-estimation,
strip) with one change in the ADMM + KD phase: a *dean*
(`tfkdp.distill.dean.Dean`) reads the student's distillability and
sparsability on a held-out validation batch and sets the two loss weights
`w_distill` (every distillation loss) and `w_sparsity` (the ADMM penalty)
every `dean_every` optimizer steps, moving its own parameters down the
hypergradient of the hard-pruned look-ahead student's task loss on that batch
(see `tfkdp.distill.dean` for the definitions). The fine-tune phase uses the
distillation weight of KDP (the dean acts while the sparsity is being found).

With `dean_lr=0` the dean keeps the initial weights bit for bit, and `ddsl`
trains exactly as `kdp`.

Reference:
    Liu, Cao, Li, Hu, Maybank, "Learning to explore distillability and
    sparsability: a joint framework for model compression", IEEE TPAMI
    45(3), 2023. From the paper: teacher, student and dean; meta-learned
    weights of the distillation and sparsity supervision; ADMM KDP. Ours:
    the attributes' definitions, the dean's form, the meta-objective and the
    one-step look-ahead.
"""

import os

from tfkdp import checks
from tfkdp.methods.base import register
from tfkdp.methods.kdp import KDP
from tfkdp.train import phases

__all__ = ["DDSL"]


@register
class DDSL(KDP):
    """KDP with a meta-learned dean setting the distillation and sparsity weights.

    Args:
        dean_every: optimizer steps between the dean's meta-updates (>= 1).
        dean_lr: step length of the dean's normalised update (>= 0; 0: fixed
            weights, i.e. KDP).
        distill_max: upper bound of `w_distill` (> the initial
            `1 − training.student_loss_weight`).
        sparsity_max: upper bound of `w_sparsity` (> 1, its initial value).
        distill_min: lower bound of `w_distill` (>= 0, < the initial value).
        sparsity_min: lower bound of `w_sparsity` (>= 0, < 1).
        **kwargs: KDP's options (`normalize`, `rho_initial`, `rho_final`, `update_every`,
            `sparsity_ramp`, `admm_epochs`, `finetune_epochs`, `criterion`,
            `allocation`, `min_channels`, `round_to`, `training`). ddsl's own
            penalty defaults are `normalize=True`, `rho_initial=0.001`,
            `rho_final=0.05`: the per-group penalty its dean was tuned and
            measured with, not KDP's per-weight mean.

    Raises:
        ValueError: for `dean_every < 1`, `dean_lr < 0`, reversed or
            non-positive bounds, initial weights outside them, and (in
            `prune`) `val_data=None`.

    Example:
        >>> from tfkdp import methods
        >>> ddsl = methods.get("ddsl", admm_epochs=2, finetune_epochs=1, dean_every=10)
        >>> ddsl.get_config()["dean_every"]
        10

    Reference:
        Liu et al., "Learning to explore distillability and sparsability: a
        joint framework for model compression", IEEE TPAMI 2023.
    """

    name = "ddsl"

    def __init__(self, dean_every=10, dean_lr=0.05, distill_max=2.0, sparsity_max=2.0,
                 distill_min=0.0, sparsity_min=0.0, **kwargs):  # fmt: skip
        # The penalty the dean was tuned and measured with (BENCHMARKS, recipes table):
        # per-group normalisation, not KDP's per-weight mean.
        kwargs.setdefault("normalize", True)
        kwargs.setdefault("rho_initial", 1e-3)
        kwargs.setdefault("rho_final", 0.05)
        super().__init__(**kwargs)
        from tfkdp.distill.dean import _check_range

        self.dean_every = checks.check_int("dean_every", dean_every, 1)
        self.dean_lr = float(checks.check_number("dean_lr", dean_lr, 0))
        w_distill, w_sparsity = self.initial_weights
        self.distill_min, self.distill_max = _check_range("distill", distill_min, distill_max, w_distill)
        self.sparsity_min, self.sparsity_max = _check_range(
            "sparsity", sparsity_min, sparsity_max, w_sparsity
        )

    @property
    def initial_weights(self):
        """`(w_distill, w_sparsity)` of KDP: `1 − student_loss_weight` and 1."""
        return 1.0 - self.training.student_loss_weight, 1.0

    @classmethod
    def pipeline_options(cls, flags, training):
        """KDP's options plus `--dean_every`, `--dean_lr`, `--dean_distill_max`, `--dean_sparsity_max`."""
        options = super().pipeline_options(flags, training)
        options.update(
            dean_every=flags["dean_every"], dean_lr=flags["dean_lr"],
            distill_max=flags["dean_distill_max"], sparsity_max=flags["dean_sparsity_max"],
        )  # fmt: skip
        return options

    def get_config(self):
        config = super().get_config()
        config.update(
            dean_every=self.dean_every, dean_lr=self.dean_lr, distill_max=self.distill_max,
            sparsity_max=self.sparsity_max, distill_min=self.distill_min,
            sparsity_min=self.sparsity_min,
        )  # fmt: skip
        return config

    def prune(self, teacher, student, train_data, val_data, budget):
        if teacher is not None and val_data is None:
            raise ValueError(
                "method='ddsl' needs validation data (the dean's held-out batches); received "
                "val_data=None. Pass a validation split of the training data (never the test set)"
            )
        return super().prune(teacher, student, train_data, val_data, budget)

    def admm_phase(self, teacher, student, train_data, val_data, admm, steps):
        """KDP's ADMM + KD phase with the dean setting the loss weights; records its trace."""
        import functools

        from tfkdp.distill import dean as dean_lib

        losses = self.training.distillation_losses
        temperature = getattr(losses[0], "temperature", 1.0) if losses else 4.0
        dean = dean_lib.Dean(
            next(iter(val_data)), total_steps=steps, initial_weights=self.initial_weights,
            dean_every=self.dean_every, dean_lr=self.dean_lr, distill_min=self.distill_min,
            distill_max=self.distill_max, sparsity_min=self.sparsity_min,
            sparsity_max=self.sparsity_max, temperature=temperature,
        )  # fmt: skip
        trace = dean_lib.DeanTrace(dean)
        history = phases.distill(
            teacher, student, train_data, val_data, self.admm_epochs, self.training,
            "ddsl ADMM phase", sparsity=admm,
            distiller_factory=functools.partial(dean_lib.DeanDistiller, dean=dean),
            callbacks=(dean_lib.ValidationBatch(dean, teacher, val_data), trace),
        )  # fmt: skip
        return history, {"dean": trace.subsampled()}

    def report(self, record, out_dir):
        """`dean.png` (weights and attributes over the steps) and a short summary."""
        trace = (record or {}).get("dean")
        if not trace or not trace.get("step"):
            return {"markdown": "", "plots": {}}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for key in ("w_distill", "w_sparsity"):
            top.plot(trace["step"], trace[key], label=key)
        top.set_ylabel("loss weight")
        top.legend()
        for key in ("distillability", "sparsability", "progress"):
            bottom.plot(trace["step"], trace[key], label=key)
        bottom.set_ylabel("attribute")
        bottom.set_xlabel("optimizer step")
        bottom.legend()
        fig.suptitle("DDSL dean")
        fig.tight_layout()
        path = os.path.join(out_dir, "dean.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        last = {k: trace[k][-1] for k in ("w_distill", "w_sparsity", "distillability", "sparsability")}
        markdown = (
            f"**Dean** ({len(trace['step'])} meta-updates recorded): final w_distill "
            f"{last['w_distill']:.3f} (start {trace['w_distill'][0]:.3f}), w_sparsity "
            f"{last['w_sparsity']:.3f} (start {trace['w_sparsity'][0]:.3f}); distillability "
            f"{last['distillability']:.3f}, sparsability {last['sparsability']:.3f} at the end."
        )
        return {"markdown": markdown, "plots": {"dean": path}}
