"""The open Distiller: per-term API, several teachers, shared-variable teachers,
config with an ADMM term; and ADMM honouring the schedule's `should_prune`."""

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkdp import losses as kd
from tfkdp import models
from tfkdp.distill.distiller import Distiller
from tfkdp.pruning.sparsity import schedules
from tfkdp.pruning.sparsity.admm import ADMM

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _net(name, width, seed):
    keras.utils.set_random_seed(seed)
    return models.resnet_cifar(8, width=width, input_shape=(12, 12, 1), num_classes=3, name=name)


def _batch(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 12, 12, 1)).astype("float32"), (np.arange(n) % 3).astype("int64")


def test_compute_terms_match_the_compiled_objective_and_their_gradients_exist():
    x, y = _batch()
    teacher, student = _net("t", 8, 0), _net("s", 4, 1)
    distiller = Distiller(teacher, student, [kd.SoftTargetKD(2.0), kd.SoftTargetKD(4.0)], [0.3, 0.7],
                          student_loss_weight=0.5)  # fmt: skip
    distiller.compile(loss=CE)
    terms = distiller.compute_terms(x, y)
    assert set(terms) == {"task", "distill_0", "distill_1", "sparsity", "regularization", "total"}
    want = 0.5 * terms["task"] + 0.3 * terms["distill_0"] + 0.7 * terms["distill_1"]
    np.testing.assert_allclose(float(terms["total"]), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(terms["task"]), float(CE(y, student(x))), rtol=1e-5)
    # The total equals what Keras' own compute_loss path gives.
    total = distiller.compute_loss(x, y, training=False)
    np.testing.assert_allclose(float(total), float(terms["total"]), rtol=1e-6)
    with tf.GradientTape(persistent=True) as tape:
        term = distiller.compute_terms(x, y, training=True)["distill_0"]
    grads = tape.gradient(term, student.trainable_variables)
    assert all(g is not None for g in grads)
    assert tape.gradient(term, teacher.trainable_variables[:1]) == [None]


def test_several_teachers_each_loss_reads_its_own_teacher():
    x, y = _batch()
    first, second, student = _net("t1", 8, 0), _net("t2", 6, 2), _net("s", 4, 1)
    distiller = Distiller([first, second], student, [kd.SoftTargetKD(4.0), kd.SoftTargetKD(4.0)],
                          [1.0, 1.0])  # fmt: skip
    terms = distiller.compute_terms(x)
    alone = [Distiller(t, student, [kd.SoftTargetKD(4.0)], [1.0]).compute_terms(x)["distill_0"]
             for t in (first, second)]  # fmt: skip
    np.testing.assert_allclose(float(terms["distill_0"]), float(alone[0]), rtol=1e-6)
    np.testing.assert_allclose(float(terms["distill_1"]), float(alone[1]), rtol=1e-6)
    assert float(alone[0]) != pytest.approx(float(alone[1]))
    with pytest.raises(ValueError, match="pass loss_teachers"):
        Distiller([first, second], student, [kd.SoftTargetKD()], [1.0])
    with pytest.raises(ValueError, match=r"loss_teachers\[0\] must be a teacher index in \[0, 2\)"):
        Distiller([first, second], student, [kd.SoftTargetKD()], [1.0], loss_teachers=[2])
    config = distiller.get_config()
    assert config["loss_teachers"] == [0, 1] and isinstance(config["teacher"], list)


def test_teacher_sharing_the_students_kernels_is_allowed_explicitly_and_trains_through_it():
    x, y = _batch(16)
    student = _net("s", 4, 1)
    # A 'teaching assistant' view: the same layers, so the same variables.
    assistant = keras.Model(student.input, student.output, name="assistant")
    with pytest.raises(ValueError, match="allow_shared_variables=True"):
        Distiller(assistant, student)
    distiller = Distiller(assistant, student, allow_shared_variables=True)
    assert [id(v) for v in distiller.trainable_variables] == [id(v) for v in student.trainable_variables]
    distiller.compile(optimizer=keras.optimizers.SGD(0.1), loss=CE)
    before = keras.ops.convert_to_numpy(student.trainable_variables[0]).copy()
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not np.allclose(before, keras.ops.convert_to_numpy(student.trainable_variables[0]))
    assert assistant.trainable  # the caller's model is not changed


def test_the_callers_teacher_is_never_mutated():
    teacher, student = _net("t", 8, 0), _net("s", 4, 1)
    flags = [layer.trainable for layer in teacher.layers]
    Distiller(teacher, student)
    assert teacher.trainable and [layer.trainable for layer in teacher.layers] == flags


def test_config_round_trips_with_an_admm_sparsity_term():
    teacher, student = _net("t", 8, 0), _net("s", 4, 1)
    admm = ADMM(student, {"stage1_block1_conv1": 2},
                sparsity_schedule=schedules.PolynomialDecay(0.0, 0.5, 0, 10, frequency=2),
                rho=schedules.ExponentialRho(0.1, 1.5, 2, 2.0), update_every=2)  # fmt: skip
    distiller = Distiller(teacher, student, sparsity=admm)
    config = distiller.get_config()
    reference = copy.deepcopy(config)
    restored = Distiller.from_config(config)
    assert isinstance(restored.sparsity, ADMM) and restored.sparsity is not admm
    assert restored.sparsity.keep_counts() == {"stage1_block1_conv1": 2}
    assert restored.get_config() == reference
    # The restored term regularises the restored student, not the original one.
    restored_ids = {id(v) for v in restored.student.weights}
    weight = restored.sparsity.slots("stage1_block1_conv1")[0][1]
    assert id(weight) in restored_ids


def test_admm_takes_a_new_sparsity_only_at_should_prune_steps():
    student = _net("s", 8, 1)
    schedule = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=12, frequency=4)
    admm = ADMM(student, {"stage1_block1_conv1": 4}, sparsity_schedule=schedule, rho=1.0,
                update_every=1)  # fmt: skip
    seen = []
    for step in range(1, 10):
        admm.on_train_step_end(tf.constant(step, tf.int64))
        seen.append(float(admm.sparsity.numpy()))
    levels = [float(schedule(tf.constant(s, tf.int64))[1]) for s in (0, 4, 8)]
    # Steps 1-3 keep step 0's sparsity, 4-7 step 4's, 8-9 step 8's.
    assert seen == pytest.approx([levels[0]] * 3 + [levels[1]] * 4 + [levels[2]] * 2)
    assert levels[0] < levels[1] < levels[2]
