"""Latency budgets: the cost model, its cache, make_plan in milliseconds, methods and pipeline."""

import keras
import pytest
from keras import layers

from tfkdp import methods
from tfkdp.methods import Budget
from tfkdp.pruning import make_plan
from tfkdp.pruning.cost import CostModel
from tfkdp.pruning.latency_model import LatencyModel, layer_kind


def _net():
    inputs = keras.Input((12, 12, 1))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", name="c1")(inputs)))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same", name="c2")(x)))
    x = layers.ReLU()(layers.Conv2D(16, 1, name="c3")(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x), name="net")  # fmt: skip


def _fake_measure(calls, out_tile=1):
    """A runtime whose latency is 0.02 ms + 3e-6 ms per kxk MAC + 1e-6 ms per 1x1 MAC.

    With `out_tile > 1` it computes output channels in tiles of `out_tile`.
    """

    def measure(self, keeps):
        calls.append(len(keeps))
        out = []
        for keep in keeps:
            macs = self.cost.term_macs(self._pruned(keep), out_tile=out_tile)
            kinds = [layer_kind(layer) for layer in self.cost.term_layers]
            per = {"Conv2D kxk": 3e-6, "Conv2D 1x1": 1e-6}
            out.append(0.02 + sum(m * per.get(k, 0.0) for m, k in zip(macs, kinds, strict=True)))
        return out

    return measure


@pytest.fixture
def fake_runtime(monkeypatch):
    from tfkdp.pruning import alignment

    calls = []
    monkeypatch.setattr(LatencyModel, "measure", _fake_measure(calls))
    # Budgets fit with tile="auto": this fake runtime rewards no alignment.
    monkeypatch.setattr(alignment, "measure_alignment", lambda runtime, threads, **kw: {"round_to": 1})
    return calls


def test_the_fit_recovers_a_linear_runtime_and_is_monotone(fake_runtime, tmp_path):
    model = _net()
    lat = LatencyModel(model, cache_dir=str(tmp_path))
    assert fake_runtime == [1 + 3 + 4]  # full model, 3 widths, 4 random plans, one interleaved run
    assert lat.coefficients["Conv2D kxk"] == pytest.approx(3e-6, rel=1e-3)
    assert lat.coefficients["Conv2D 1x1"] == pytest.approx(1e-6, rel=1e-3)
    assert lat.coefficients["intercept_ms"] == pytest.approx(0.02, rel=1e-3)
    for row in lat.measurements:
        assert row["predicted_ms"] == pytest.approx(row["measured_ms"], rel=1e-6)
    previous = None
    for k in range(16, 0, -3):  # fewer channels in c2's group: never slower
        value = lat.predict({"c2": k})
        assert previous is None or value <= previous
        previous = value


def test_a_tiled_runtime_is_fitted_exactly_with_its_tile_and_not_with_exact_macs(monkeypatch, tmp_path):
    # A runtime that computes output channels in tiles of 4: 5 channels cost what 8 do.
    measure = _fake_measure([], out_tile=4)
    monkeypatch.setattr(LatencyModel, "measure", measure)
    exact = LatencyModel(_net(), cache_dir=str(tmp_path), random_plans=8)
    tiled = LatencyModel(_net(), cache_dir=str(tmp_path), random_plans=8, tile=4)
    assert not tiled.from_cache  # the tile is part of the cache key
    assert tiled.coefficients["Conv2D kxk"] == pytest.approx(3e-6, rel=1e-3)
    plans = [{"c1": 5, "c2": 9}, {"c1": 3, "c2": 13}, {"c1": 7, "c2": 6}]
    truth = measure(tiled, plans)
    for plan, t in zip(plans, truth, strict=True):
        assert tiled.predict(plan) == pytest.approx(t, rel=1e-4)
    assert max(abs(exact.predict(p) - t) / t for p, t in zip(plans, truth, strict=True)) > 0.01
    # c1 keeping 5 of 8 channels: its own MACs are counted as all 8 under tile 4 (c2's input
    # side, not an output axis, shrinks either way).
    cost = tiled.cost
    c1 = [i for i, layer in enumerate(cost.term_layers) if layer.name == "c1"]
    assert len(c1) == 1
    pruned = cost._pruned({"c1": 5})
    assert cost.term_macs(pruned, out_tile=4)[c1[0]] == cost.term_macs(pruned * 0)[c1[0]]
    assert cost.term_macs(pruned)[c1[0]] == pytest.approx(5 / 8 * cost.term_macs(pruned * 0)[c1[0]])
    with pytest.raises(ValueError, match="tile"):
        LatencyModel(_net(), cache_dir=False, tile=0)


def test_the_cache_is_keyed_by_structure_and_reused_without_timing(fake_runtime, tmp_path):
    first = LatencyModel(_net(), cache_dir=str(tmp_path))
    renamed = keras.models.clone_model(_net())
    renamed.name = "another_name"
    second = LatencyModel(renamed, cache_dir=str(tmp_path))
    assert not first.from_cache and second.from_cache and len(fake_runtime) == 1
    assert second.coefficients == first.coefficients
    LatencyModel(_net(), threads=2, cache_dir=str(tmp_path))  # another thread count: timed again
    assert len(fake_runtime) == 2


def test_latency_budgets_plan_in_predicted_milliseconds(fake_runtime, tmp_path):
    model = _net()
    lat = LatencyModel(model, cache_dir=str(tmp_path))
    mac_plan = make_plan(model, target_macs_reduction=0.5)
    fast = make_plan(model, target_latency_ms=0.5 * lat.base_ms, latency_model=lat)
    slow = make_plan(model, target_latency_reduction=0.2, latency_model=lat)
    assert lat.predict(fast) <= 0.5 * lat.base_ms * 1.02
    assert lat.predict(fast) < lat.predict(slow) < lat.base_ms
    cost = CostModel(model)
    # The plan with fewer MACs is predicted faster (the fake runtime is linear in MACs).
    plans = sorted([mac_plan, fast, slow], key=cost.macs)
    assert [lat.predict(p) for p in plans] == sorted(lat.predict(p) for p in plans)
    with pytest.raises(ValueError, match=r"fastest reachable predicted latency is 0\.0\d+ ms"):
        make_plan(model, target_latency_ms=0.001, latency_model=lat)
    with pytest.raises(ValueError, match="exactly one of"):
        make_plan(model, target_macs_reduction=0.5, target_latency_ms=1.0, latency_model=lat)


def test_a_real_fit_on_litert_times_each_width_once(tmp_path):
    model = _net()
    lat = LatencyModel(model, widths=(0.5,), random_plans=0, repeat=6, cache_dir=str(tmp_path))
    assert len(lat.measurements) == 2 and all(r["measured_ms"] > 0 for r in lat.measurements)
    assert lat.build_seconds > 0 and lat.predict({"c2": 4}) <= lat.base_ms
    assert LatencyModel(model, widths=(0.5,), random_plans=0, repeat=6,
                        cache_dir=str(tmp_path)).from_cache  # fmt: skip


def test_a_budget_fits_its_latency_model_with_the_tile_the_runtime_rewards(monkeypatch, tmp_path):
    from tfkdp.pruning import alignment

    monkeypatch.setenv("TFKDP_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(LatencyModel, "measure", _fake_measure([], out_tile=4))
    monkeypatch.setattr(alignment, "measure_alignment",
                        lambda runtime, threads, **kw: seen.append((runtime, threads)) or {"round_to": 4})  # fmt: skip
    lat = Budget.latency_ms(1.0, runtime="onnxruntime", threads=2).latency_model(_net())
    assert lat.tile == 4 and seen == [("onnxruntime", 2)]
    for row in lat.measurements:  # the runtime's tiles are the features': an exact fit
        assert row["predicted_ms"] == pytest.approx(row["measured_ms"], rel=1e-6)
    with pytest.raises(ValueError, match="tile"):
        LatencyModel(_net(), tile="fastest", cache_dir=False)


def test_budget_kinds_round_trip_and_reject_bad_values():
    budget = Budget.latency_ms(2.5, runtime="onnxruntime", threads=2)
    assert Budget.from_dict(budget.to_dict()) == budget and budget.is_latency
    assert budget.plan_kwargs() == {"target_latency_ms": 2.5}
    assert Budget.latency(0.4).plan_kwargs() == {"target_latency_reduction": 0.4}
    with pytest.raises(ValueError, match="target_latency_ms"):
        Budget.latency_ms(0.0)
    with pytest.raises(ValueError, match="latency runtime"):
        Budget.latency_ms(1.0, runtime="tensorrt")


@pytest.mark.parametrize("name", ["kdp", "prune_only", "ddsl", "pdc"])
def test_the_recipes_plan_to_a_latency_budget(name, fake_runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("TFKDP_CACHE", str(tmp_path))
    from tfkdp.pruning.analysis import channel_groups

    model = _net()
    method = methods.get(name)
    plan = method.make_plan(model, channel_groups(model), Budget.latency(0.4), None)
    lat = LatencyModel(model, tile="auto")  # from the cache the method filled
    assert lat.from_cache and len(fake_runtime) == 1
    assert lat.predict(plan) <= 0.6 * lat.base_ms * 1.02
    assert method.base_record(Budget.latency(0.4))["budget"] == {
        "kind": "latency", "reduction": 0.4, "runtime": "litert", "threads": 1,
    }  # fmt: skip
    assert CostModel(model).macs(plan) < CostModel(model).base_macs


def test_pipeline_checks_a_latency_budget_before_training(fake_runtime, tmp_path, monkeypatch, tiny_teacher):
    import os

    from test_pipeline import _values

    from tfkdp.pipelines import workflow

    monkeypatch.setenv("TFKDP_CACHE", str(tmp_path / "cache"))
    values = _values(tmp_path, teacher=tiny_teacher, target_latency_ms=1e-6)
    with pytest.raises(ValueError, match="--target_latency_ms=1e-06 is not reachable.*fastest reachable"):
        workflow.run(values)
    assert not os.path.exists(os.path.join(values["output_dir"], "compress"))
    with pytest.raises(ValueError, match="does not apply to --method=weight"):
        workflow.run(_values(tmp_path, teacher=tiny_teacher, method="weight", target_latency_ms=1.0))
    # the same budget as a share of the predicted latency: checked before training too
    values = _values(tmp_path, teacher=tiny_teacher, target_latency_reduction=0.999)
    with pytest.raises(ValueError, match="target_latency_reduction=0.999 is unreachable.*fastest reachable"):
        workflow.run(values)
    assert not os.path.exists(os.path.join(values["output_dir"], "compress"))
    with pytest.raises(ValueError, match="pass one latency budget: --target_latency_ms=1 or "
                                         "--target_latency_reduction=0.4, not both"):  # fmt: skip
        workflow.run(_values(tmp_path, teacher=tiny_teacher, target_latency_ms=1.0, target_latency_reduction=0.4))
    with pytest.raises(ValueError, match=r"target_latency_reduction.*1\.5"):
        workflow.run(_values(tmp_path, teacher=tiny_teacher, target_latency_reduction=1.5))


def test_pipeline_flags_make_the_budget_every_method_gets():
    from tfkdp.methods import Budget
    from tfkdp.pipelines.workflow import budget_of

    base = {"target_macs_reduction": 0.5, "latency_runtime": "onnxruntime", "latency_threads": 2}
    assert budget_of(base) == Budget.macs(0.5)
    assert budget_of(dict(base, target_latency_ms=1.5)) == Budget.latency_ms(1.5, "onnxruntime", 2)
    assert budget_of(dict(base, target_latency_reduction=0.4)) == Budget.latency(0.4, "onnxruntime", 2)
