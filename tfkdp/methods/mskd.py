"""MS-KD: several criteria propose sub-networks, model selection picks one, KD trains it.

`mskd` (class `MSKD`) runs, as a short sequence of phases:

1. **candidates**: for one budget (MAC or parameter reduction), one plan per
   (criterion × allocation) with `make_plan` (each within its 2 % tolerance),
   every one on the teacher's inherited weights (the student is a copy of
   the teacher). Candidates whose plans keep exactly the same channels are
   one candidate, scored once (the others point at it: `duplicate_of`).
2. **zero-shot rung**: each candidate, masked, gets its batch-norm statistics
   re-estimated on `bn_batches` training batches (adaptive BN, as in
   EagleEye) and is scored on the validation split: top-1 accuracy and the
   soft-target KD loss to the teacher (KL at the KD temperature, × T²).
3. **short-KD rung**: the `top_k` best of the zero-shot rung (accuracy, ties:
   lower KD loss) each get `select_steps` steps of KD (the `Training`'s KD
   losses), BN re-estimation, and are scored again. The winner is the best
   on validation accuracy, ties broken by the lower KD loss.
4. **KD of the winner**, continuing from its short-KD weights, masked:
   `admm_epochs` epochs in `prune` (minus the selection's steps, see below)
   and `finetune_epochs` more in `finetune`, then BN re-estimation;
5. **strip** (`Method.finalize`).

Same total training as the other recipes: every candidate and the winner
see the same fixed batches during selection, and the selection's optimizer
steps (`top_k · select_steps`) are taken from the winner's first phase, whose
epochs are shortened by `ceil(top_k · select_steps / admm_epochs)` steps each
(a fresh shuffle per epoch), so the optimizer steps of the whole method are
`(admm_epochs + finetune_epochs) · steps_per_epoch`, less at most
`admm_epochs − 1` of rounding. The record holds the exact counts. BN
re-estimation, the criteria's scoring passes and validation are forward (or
gradient-only) passes without weight updates and are counted in seconds, not
steps.

Validation: the `val_data` given; when it is None, a held-out split is carved
from one pass of `train_data`: its first `P` batches are the selection's
training pool (BN re-estimation, short KD, the data-driven criteria) and the
next `holdout_batches` (default a tenth of an epoch) are the validation
split, so within the selection the two never share an image. The winner's
own KD then trains on all of `train_data` (the held-out images included, as
after any model selection). The test set is never used.

Resumable selection: with `state_dir` set (the pipeline sets it), every
finished candidate's plan and scores are written there atomically (and the
short-KD weights of the top `k`), and a rerun skips them.

Which parts are the paper's: several criteria each propose a sub-network,
model selection picks one, KD trains it. Ours (the paper's text is not
available): the criteria and allocations, the two rungs and their scores,
the step accounting, the defaults.

Reference:
    Chen, Yuan, Wang, Li, Xing, Feng, "Model Selection - Knowledge
    Distillation Framework for Model Compression", IEEE SSCI 2021; Li et al.,
    "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning",
    ECCV 2020 (adaptive-BN scoring of candidate sub-networks).
"""

import hashlib
import json
import math
import os
import time

import numpy as np
from absl import logging

from tfkdp import checks
from tfkdp.methods.base import Budget, Pruned, Recipe, register
from tfkdp.train import phases

__all__ = ["MSKD", "DEFAULT_CRITERIA", "DEFAULT_ALLOCATIONS"]

DEFAULT_CRITERIA = ("l1", "l2", "bn_gamma", "taylor", "fpgm", "hessian")
DEFAULT_ALLOCATIONS = ("global", "uniform")
STATE_FILE = "mskd_selection.json"
_DEFAULT_TEMPERATURE = 4.0


def _names(option, values, check):
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{option} must be a non-empty list of names; received {option}={values!r}")
    values = list(values)
    for value in values:
        check(value)
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"{option} names {duplicates} more than once; received {option}={values!r}")
    return values


def _plan_key(plan):
    keep = {gid: sorted(int(c) for c in channels) for gid, channels in plan.items()}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kd_loss(teacher_logits, student_logits, temperature):
    """Mean over examples of KL(softmax(t/T) ‖ softmax(s/T)) × T² (soft-target KD, nats)."""
    log_t = _log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
    log_s = _log_softmax(np.asarray(student_logits, np.float64) / temperature)
    return float(np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=1)) * temperature**2)


@register
class MSKD(Recipe):
    """Model selection among criteria's sub-networks, then KD (see the module docstring).

    Args:
        criteria: names of registered criteria (`tfkdp.criteria.names()`),
            each proposing candidates.
        allocations: allocations of the candidates (`"global"`, `"uniform"`).
        top_k: candidates given a short KD after the zero-shot rung (>= 1;
            clamped, with a logged note, to the number of distinct
            candidates).
        select_steps: KD steps per short-KD candidate (>= 1); `None` is a
            tenth of an epoch (at least 1).
        bn_batches: training batches of each adaptive-BN re-estimation in
            the selection (>= 1).
        holdout_batches: batches carved off as the validation split when
            `val_data` is None (>= 1); `None` is a tenth of an epoch.
        **kwargs: the shared options (`admm_epochs`: KD epochs of the winner
            in `prune`, >= 1, shortened by the selection's steps;
            `finetune_epochs`: further KD epochs in `finetune`;
            `min_channels`, `round_to`, `training`, `onednn_guard`).
            `criterion` and `allocation` are replaced by `criteria` and
            `allocations`.

    Raises:
        ValueError: for an unknown criterion or allocation (listing the valid
            ones), duplicates, or numbers out of range (naming the value).

    Example:
        >>> from tfkdp import methods
        >>> mskd = methods.get("mskd", criteria=["l1", "fpgm"], allocations=["global"], top_k=1,
        ...                    select_steps=1, admm_epochs=1, finetune_epochs=0)
        >>> result = mskd.compress(teacher, None, train_ds, val_ds, methods.Budget.macs(0.5))
        >>> [r["id"] for r in result.record["mskd"]["candidates"]]
        ['l1/global', 'fpgm/global']
        >>> result.record["mskd"]["steps"]["selection"]
        1

    Reference:
        Chen et al., "Model Selection - Knowledge Distillation Framework for
        Model Compression", IEEE SSCI 2021.
    """

    name = "mskd"
    first_phase_minimum = 1

    def __init__(self, criteria=DEFAULT_CRITERIA, allocations=DEFAULT_ALLOCATIONS, top_k=3,
                 select_steps=None, bn_batches=20, holdout_batches=None, **kwargs):  # fmt: skip
        from tfkdp.pruning import allocation as allocation_lib
        from tfkdp.pruning import criteria as criteria_lib

        for replaced, by in (("criterion", "criteria"), ("allocation", "allocations")):
            if replaced in kwargs:
                raise ValueError(
                    f"mskd takes {by}= (a list), not {replaced}=; received {replaced}={kwargs[replaced]!r}"
                )
        super().__init__(**kwargs)
        self.criteria = _names("criteria", criteria, criteria_lib.get)
        self.allocations = _names(
            "allocations", allocations,
            lambda a: checks.check_choice("allocation", a, allocation_lib.ALLOCATIONS),
        )  # fmt: skip
        self.top_k = checks.check_int("top_k", top_k, 1)
        self.select_steps = None if select_steps is None else checks.check_int("select_steps", select_steps, 1)
        self.bn_batches = checks.check_int("bn_batches", bn_batches, 1)
        self.holdout_batches = (
            None if holdout_batches is None else checks.check_int("holdout_batches", holdout_batches, 1)
        )

    @classmethod
    def pipeline_options(cls, flags, training):
        """`--compress_epochs` → `admm_epochs`, `--finetune_epochs`, `--round_to`, `--mskd_*`.

        `--mskd_select_steps=0` means the default (a tenth of an epoch);
        `--criterion` is not used (`--mskd_criteria` lists the criteria).
        """
        return {
            "admm_epochs": flags["compress_epochs"], "finetune_epochs": flags["finetune_epochs"],
            "round_to": flags["round_to"], "training": training,
            "criteria": list(flags.get("mskd_criteria", DEFAULT_CRITERIA)),
            "allocations": list(flags.get("mskd_allocations", DEFAULT_ALLOCATIONS)),
            "top_k": flags.get("mskd_top_k", 3),
            "select_steps": flags.get("mskd_select_steps", 0) or None,
        }  # fmt: skip

    def get_config(self):
        config = super().get_config()
        del config["criterion"], config["allocation"]
        config.update(
            criteria=list(self.criteria), allocations=list(self.allocations), top_k=self.top_k,
            select_steps=self.select_steps, bn_batches=self.bn_batches,
            holdout_batches=self.holdout_batches,
        )  # fmt: skip
        return config

    # ------------------------------------------------------------------ helpers

    def _temperature(self):
        for loss in self.training.distillation_losses or ():
            if getattr(loss, "temperature", None):
                return float(loss.temperature)
        return _DEFAULT_TEMPERATURE

    def _selection_data(self, train_data, val_data, steps_per_epoch, select_steps):
        """`(pool, val_batches, val_source)`: fixed training batches and numpy validation batches."""
        import tensorflow as tf

        holdout = 0
        if val_data is None:
            holdout = self.holdout_batches or max(1, round(steps_per_epoch / 10))
            if holdout >= steps_per_epoch:
                raise ValueError(
                    f"holdout_batches={holdout} leaves no training batch of the {steps_per_epoch} "
                    "batches of one epoch; pass val_data or fewer holdout_batches"
                )
        pool_size = min(max(self.bn_batches, select_steps), steps_per_epoch - holdout)
        xs, ys, held = [], [], []
        for i, batch in enumerate(train_data.take(pool_size + holdout)):  # one pass
            x, y = np.asarray(batch[0]), np.asarray(batch[1])
            if i < pool_size:
                xs.append(x)
                ys.append(y)
            else:
                held.append((x, y))
        batch_size = len(xs[0])
        pool = tf.data.Dataset.from_tensor_slices((np.concatenate(xs), np.concatenate(ys)))
        pool = pool.batch(batch_size)
        if val_data is None:
            source = (
                f"carved: training batches {pool_size}..{pool_size + holdout - 1} of one pass "
                f"({sum(len(y) for _, y in held)} images, disjoint from the selection's "
                f"{pool_size} training batches)"
            )
            return pool, held, source
        val = [(np.asarray(b[0]), np.asarray(b[1])) for b in val_data]
        return pool, val, f"val_data ({sum(len(y) for _, y in val)} images)"

    @staticmethod
    def _evaluate(model, val, teacher_logits, temperature):
        logits = [np.asarray(model(x, training=False)) for x, _ in val]
        labels = np.concatenate([y for _, y in val]).reshape(-1)
        logits = np.concatenate(logits)
        return {
            "val_accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)),
            "val_kd_loss": kd_loss(teacher_logits, logits, temperature),
        }

    def _load_state(self, signature):
        fresh = {"signature": signature, "plans": {}, "zero_shot": {}, "short_kd": {}}
        state = self.load_state(STATE_FILE)
        if state is None:
            return fresh
        if state.get("signature") == signature:
            logging.info(
                "mskd: resuming the selection (%d plans, %d zero-shot and %d short-KD scores done)",
                len(state["plans"]), len(state["zero_shot"]), len(state["short_kd"]),
            )  # fmt: skip
            return state
        logging.info("mskd: selection state in %s is for other settings; starting over",
                     os.path.join(self.state_dir, STATE_FILE))  # fmt: skip
        return fresh

    def _weights_path(self, key):
        return os.path.join(self.state_dir, f"short_kd_{key}.weights.h5")

    def _save_weights(self, model, key):
        if self.state_dir is None:
            return
        tmp = os.path.join(self.state_dir, f".tmp-{key}.weights.h5")
        model.save_weights(tmp)
        os.replace(tmp, self._weights_path(key))

    # ------------------------------------------------------------------ steps

    def _zero_shot(self, student, plan, pool, val, teacher_logits, temperature, bn_batches):
        """The masked candidate after adaptive BN, scored on validation."""
        from tfkdp.train.batchnorm import recalibrate_batchnorm

        masked = phases.hard_prune(student, plan)
        recalibrate_batchnorm(masked, pool, bn_batches)
        return masked, self._evaluate(masked, val, teacher_logits, temperature)

    def _short_kd(self, teacher, masked, pool, select_steps, val, teacher_logits, temperature,
                  bn_batches, label):  # fmt: skip
        """`select_steps` KD steps on the pool, adaptive BN, scored on validation."""
        from tfkdp.train.batchnorm import recalibrate_batchnorm

        steps = pool.repeat().take(select_steps)
        phases.distill(teacher, masked, steps, None, 1, self.training, f"mskd select {label}")
        recalibrate_batchnorm(masked, pool, bn_batches)
        return self._evaluate(masked, val, teacher_logits, temperature)

    def select(self, teacher, student, train_data, val_data, budget):
        """The two-rung model selection alone (no training of the winner beyond its short KD).

        Args:
            teacher: the teacher `keras.Model`.
            student: the model the candidates are cut from (its weights are
                inherited; not modified).
            train_data: a finite, batched `tf.data.Dataset` of `(x, y)`.
            val_data: the validation dataset, or None (a split is carved, see
                the module docstring).
            budget: a `Budget` (or a MAC reduction in (0, 1)).

        Returns:
            A dict: `model` (the winner, masked, after its short KD),
            `plan`, `groups`, `epoch_steps` (steps per epoch left to the
            winner's first phase) and `record` (the `record["mskd"]` part:
            candidates with both rungs' scores, winner, seconds, steps).
        """
        from tfkdp import metrics
        from tfkdp.pruning import allocation as allocation_lib
        from tfkdp.pruning import criteria as criteria_lib
        from tfkdp.pruning.analysis import channel_groups
        from tfkdp.pruning.cost import plan_macs, plan_params
        from tfkdp.pruning.plan import PruningPlan
        from tfkdp.train import recipe

        if teacher is None:
            raise ValueError("method='mskd' needs a teacher; received teacher=None")
        budget = Budget.of(budget)
        steps_per_epoch = recipe.steps_in(train_data)
        select_steps = self.select_steps or max(1, round(steps_per_epoch / 10))
        temperature = self._temperature()
        groups = channel_groups(student)
        base_macs, base_params = metrics.count_macs(student), metrics.count_params(student)
        pool, val, val_source = self._selection_data(train_data, val_data, steps_per_epoch, select_steps)
        pool_batches = int(pool.cardinality())
        bn_batches = min(self.bn_batches, pool_batches)
        teacher_logits = np.concatenate([np.asarray(teacher(x, training=False)) for x, _ in val])
        signature = {
            "criteria": self.criteria, "allocations": self.allocations, "budget": budget.to_dict(),
            "min_channels": self.min_channels, "round_to": self.round_to, "top_k": self.top_k,
            "select_steps": select_steps, "bn_batches": bn_batches, "pool_batches": pool_batches,
            "val_images": int(len(teacher_logits)), "steps_per_epoch": steps_per_epoch,
        }  # fmt: skip
        state = self._load_state(signature)

        # 1. candidates: one plan per (criterion × allocation); identical plans scored once.
        candidates, first_of = [], {}
        latency = budget.latency_model(student, groups) if budget.is_latency else None
        for criterion in self.criteria:
            for allocation in self.allocations:
                cid = f"{criterion}/{allocation}"
                if cid not in state["plans"]:
                    t0 = time.perf_counter()
                    crit = criteria_lib.get(criterion)
                    plan = allocation_lib.make_plan(
                        student, groups=groups, criterion=crit, allocation=allocation,
                        min_channels=self.min_channels, round_to=self.round_to,
                        onednn_guard=self.onednn_guard,
                        data=pool if crit.requires_data else None, latency_model=latency,
                        **budget.plan_kwargs(),
                    )  # fmt: skip
                    state["plans"][cid] = {
                        "plan": plan.to_json(), "seconds": time.perf_counter() - t0,
                    }  # fmt: skip
                    self.save_state(STATE_FILE, state)
                plan = PruningPlan.from_json(state["plans"][cid]["plan"])
                key = _plan_key(plan)
                macs, params = plan_macs(student, plan), plan_params(student, plan)
                candidates.append({
                    "id": cid, "criterion": criterion, "allocation": allocation, "key": key,
                    "macs": int(macs), "params": int(params),
                    "macs_reduction": 1.0 - macs / base_macs,
                    "params_reduction": 1.0 - params / base_params,
                    "duplicate_of": first_of.get(key), "plan": plan,
                })  # fmt: skip
                first_of.setdefault(key, cid)
        unique = [c for c in candidates if c["duplicate_of"] is None]

        notes = []
        top_k = self.top_k
        if top_k > len(unique):
            note = (
                f"top_k={self.top_k} is larger than the {len(unique)} distinct candidates; "
                f"clamped to {len(unique)}"
            )
            logging.warning("mskd: %s", note)
            notes.append(note)
            top_k = len(unique)
        # The selection's KD steps come out of the winner's first phase: check they fit now.
        selection_steps = top_k * select_steps
        cut = math.ceil(selection_steps / self.admm_epochs)
        epoch_steps = steps_per_epoch - cut
        if epoch_steps < 1:
            raise ValueError(
                f"the selection's {selection_steps} KD steps (top_k={top_k} × "
                f"select_steps={select_steps}) leave no step of the {self.admm_epochs} × "
                f"{steps_per_epoch} steps of admm_epochs={self.admm_epochs}; lower select_steps "
                "or top_k, or raise admm_epochs"
            )

        # 2. zero-shot rung.
        for c in unique:
            if c["key"] not in state["zero_shot"]:
                t0 = time.perf_counter()
                _, scores = self._zero_shot(
                    student, c["plan"], pool, val, teacher_logits, temperature, bn_batches
                )
                state["zero_shot"][c["key"]] = dict(scores, seconds=time.perf_counter() - t0)
                self.save_state(STATE_FILE, state)
                logging.info("mskd zero-shot %s: %s", c["id"], state["zero_shot"][c["key"]])

        def rank(scores):
            return (-scores["val_accuracy"], scores["val_kd_loss"])

        # 3. short-KD rung for the top k.
        top = sorted(unique, key=lambda c: rank(state["zero_shot"][c["key"]]))[:top_k]
        trained = {}
        for c in top:
            if c["key"] in state["short_kd"]:
                continue
            t0 = time.perf_counter()
            masked, _ = self._zero_shot(student, c["plan"], pool, val, teacher_logits, temperature,
                                        bn_batches)  # fmt: skip
            scores = self._short_kd(teacher, masked, pool, select_steps, val, teacher_logits,
                                    temperature, bn_batches, c["id"])  # fmt: skip
            self._save_weights(masked, c["key"])
            trained[c["key"]] = masked
            state["short_kd"][c["key"]] = dict(scores, seconds=time.perf_counter() - t0)
            self.save_state(STATE_FILE, state)
            logging.info("mskd short KD %s: %s", c["id"], state["short_kd"][c["key"]])
        winner = min(top, key=lambda c: rank(state["short_kd"][c["key"]]))
        model = trained.get(winner["key"])
        if model is None:  # resumed: the winner's short-KD weights are in state_dir
            model = phases.hard_prune(student, winner["plan"])
            model.load_weights(self._weights_path(winner["key"]))
        selection_seconds = sum(
            [p["seconds"] for p in state["plans"].values()]
            + [s["seconds"] for s in state["zero_shot"].values()]
            + [s["seconds"] for s in state["short_kd"].values()]
        )

        rows = []
        for c in candidates:
            key = c["key"]
            rows.append({
                **{k: v for k, v in c.items() if k != "plan"},
                "zero_shot": state["zero_shot"][key],
                "short_kd": state["short_kd"].get(key) if key in {t["key"] for t in top} else None,
                "chosen": c["id"] == winner["id"],
            })  # fmt: skip
        record = {
            "candidates": rows, "winner": winner["id"], "top_k": top_k, "select_steps": select_steps,
            "bn_batches": bn_batches, "pool_batches": pool_batches, "val_source": val_source,
            "kd_temperature": temperature, "notes": notes, "selection_seconds": selection_seconds,
            "steps": {
                "selection": selection_steps, "winner_kd": self.admm_epochs * epoch_steps,
                "finetune": self.finetune_epochs * steps_per_epoch,
                "budget": self.total_epochs * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            },
        }  # fmt: skip
        logging.info("mskd: winner %s (selection %.1f s)", winner["id"], selection_seconds)
        return {
            "model": model, "plan": winner["plan"], "groups": groups, "epoch_steps": epoch_steps,
            "record": record,
        }  # fmt: skip

    def prune(self, teacher, student, train_data, val_data, budget):
        start = time.perf_counter()
        if teacher is None:
            raise ValueError("method='mskd' needs a teacher; received teacher=None")
        selection = self.select(teacher, student, train_data, val_data, budget)
        # KD of the winner from its short-KD weights, its epochs shortened by the selection's steps.
        epoch_steps = selection["epoch_steps"]
        steps_per_epoch = selection["record"]["steps"]["steps_per_epoch"]
        winner_data = train_data
        if epoch_steps < steps_per_epoch:
            winner_data = train_data.repeat().take(epoch_steps)  # a fresh shuffle per epoch
        history = phases.distill(
            teacher, selection["model"], winner_data, val_data, self.admm_epochs, self.training,
            "mskd KD (winner)",
        )  # fmt: skip
        plan = selection["plan"]
        record = self.record(student, budget, selection["groups"], plan,
                             {"kd": self.admm_epochs, "finetune": self.finetune_epochs})  # fmt: skip
        record["mskd"] = dict(selection["record"], prune_seconds=time.perf_counter() - start)
        return Pruned(selection["model"], plan, {"kd": history}, record)

    def finetune(self, teacher, pruned, train_data, val_data):
        start = time.perf_counter()
        if self.finetune_epochs:
            pruned.history["finetune"] = phases.distill(
                teacher, pruned.model, train_data, val_data, self.finetune_epochs, self.training,
                "mskd fine-tune", learning_rate=self.training.finetune_lr,
            )  # fmt: skip
        phases.recalibrate(pruned.model, train_data, self.training)
        mskd = pruned.record.get("mskd")
        if mskd is not None:
            mskd["finetune_seconds"] = time.perf_counter() - start
            total = mskd["prune_seconds"] + mskd["finetune_seconds"]
            mskd["total_seconds"] = total
            mskd["selection_share"] = mskd["selection_seconds"] / total if total > 0 else 0.0
        return pruned

    # ------------------------------------------------------------------ report

    def report(self, record, out_dir):
        """The candidates table (Markdown) and `mskd_candidates.png` (val accuracy per rung)."""
        mskd = (record or {}).get("mskd")
        if not mskd:
            return {"markdown": "", "plots": {}}
        rows = mskd["candidates"]

        def pct(scores):
            return "–" if not scores else f"{100 * scores['val_accuracy']:.2f}"

        lines = [
            "### MS-KD model selection",
            "",
            "| candidate | criterion | allocation | MACs | params | zero-shot val acc % "
            "| short-KD val acc % | chosen |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            same = f" (= {r['duplicate_of']})" if r["duplicate_of"] else ""
            lines.append(
                f"| {r['id']}{same} | {r['criterion']} | {r['allocation']} | {r['macs']} | "
                f"{r['params']} | {pct(r['zero_shot'])} | {pct(r['short_kd'])} | "
                f"{'**yes**' if r['chosen'] else ''} |"
            )
        steps = mskd["steps"]
        share = mskd.get("selection_share")
        lines += [
            "",
            f"Winner: **{mskd['winner']}**. Validation: {mskd['val_source']}. Selection: "
            f"{mskd['selection_seconds']:.1f} s"
            + (f" ({100 * share:.1f} % of the method's {mskd['total_seconds']:.1f} s)" if share is not None else "")
            + f"; {steps['selection']} KD steps (top_k={mskd['top_k']} × {mskd['select_steps']}) "
            f"taken from the winner's {steps['budget']}-step budget (winner KD "
            f"{steps['winner_kd']} + fine-tune {steps['finetune']} steps).",
        ]
        lines += [f"Note: {n}." for n in mskd.get("notes", [])]
        plots = {}
        path = self._plot(rows, out_dir)
        if path:
            plots["mskd_candidates"] = path
        return {"markdown": "\n".join(lines) + "\n", "plots": plots}

    @staticmethod
    def _plot(rows, out_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in rows if not r["duplicate_of"]]
        x = np.arange(len(rows))
        zero = [100 * r["zero_shot"]["val_accuracy"] for r in rows]
        short = [100 * r["short_kd"]["val_accuracy"] if r["short_kd"] else np.nan for r in rows]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 2), 3.6))
        ax.bar(x - 0.2, zero, 0.4, label="zero-shot (adaptive BN)")
        ax.bar(x + 0.2, short, 0.4, label="short KD")
        for i, r in enumerate(rows):
            if r["chosen"]:
                ax.annotate("chosen", (i + 0.2, short[i]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [r["id"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("val accuracy (%)")
        ax.set_title("MS-KD candidates")
        ax.legend(fontsize=8)
        fig.tight_layout()
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "mskd_candidates.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
