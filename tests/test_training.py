import numpy as np
import pytest
import tensorflow as tf

from tfkdp import data, models
from tfkdp.train import recipe as training


def test_train_classifier_learns_structured_data(tiny_images):
    x, y = tiny_images
    model = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    ds = data.make_dataset(x, y, batch_size=16, training=True, augment=False)
    history = training.train_classifier(model, ds, epochs=8, learning_rate=0.05, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert history.history["accuracy"][-1] >= 0.9


def test_train_classifier_passes_steps_per_execution(tiny_images):
    import keras

    x, y = tiny_images
    model = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    ds = data.make_dataset(x, y, batch_size=16, training=False)  # 4 batches
    batch_ends = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batch_ends.append(b))
    training.train_classifier(model, ds, epochs=1, verbose=0, steps_per_execution=2, callbacks=[counter])
    assert int(model.optimizer.iterations.numpy()) == 4
    assert len(batch_ends) == 2  # one batch hook per compiled call of 2 steps


def test_make_optimizer_warms_up_then_decays_to_zero():
    opt = training.make_optimizer(100, learning_rate=0.2, warmup_fraction=0.1)
    schedule = opt.learning_rate if callable(opt.learning_rate) else opt._learning_rate
    values = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    assert values[0] == pytest.approx(0.0)
    assert values[1] == pytest.approx(0.1, rel=1e-5)  # halfway through warm-up
    assert values[2] == pytest.approx(0.2, rel=1e-5)
    assert values[3] == pytest.approx(0.1, rel=1e-4)  # cosine midpoint
    assert values[4] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"optimizer": "rmsprop"}, "optimizer"), ({"total_steps": 0}, "total_steps"),
     ({"learning_rate": 0}, "learning_rate")],
)
def test_make_optimizer_rejects_bad_arguments(kwargs, message):
    args = {"total_steps": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        training.make_optimizer(**args)


def test_infinite_dataset_is_rejected():
    ds = tf.data.Dataset.from_tensors((np.zeros((1, 4, 4, 1)), np.zeros(1))).repeat()
    with pytest.raises(ValueError, match="infinite"):
        training.steps_in(ds)
