"""`round_to="auto"`: the channel alignment the runtime rewards, measured and cached."""

import types

import pytest

from tfkdp.pruning import alignment


def test_probe_counts_have_exactly_their_alignment_and_similar_sizes():
    counts = alignment.probe_counts()
    assert sorted(counts) == [1, 2, 4, 8, 16]
    for a, cs in counts.items():
        assert cs and all(33 <= c <= 64 and c % a == 0 for c in cs)
        if a < 16:
            assert all(c % (2 * a) for c in cs)  # not also a multiple of the next alignment
    assert counts[16] == [48, 64] and counts[8] == [40, 56]


@pytest.mark.parametrize(
    "per_mac, tolerance, want",
    [
        ({1: 1.30, 2: 1.21, 4: 1.03, 8: 1.00, 16: 0.99}, 0.05, 4),
        ({1: 1.30, 2: 1.21, 4: 1.03, 8: 1.00, 16: 0.99}, 0.0, 16),
        ({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0}, 0.05, 1),  # nothing rewarded: no rounding
        ({1: 2.0, 8: 1.0}, 0.5, 8),
    ],
)
def test_choose_alignment_takes_the_smallest_within_tolerance_of_the_best(per_mac, tolerance, want):
    assert alignment.choose_alignment(per_mac, tolerance) == want


def test_measure_alignment_times_probes_once_then_reads_the_cache(tmp_path, monkeypatch):
    counts = {1: [7], 8: [8]}
    first = alignment.measure_alignment(
        "litert", 1, counts=counts, repeat=3, cache_dir=str(tmp_path / "fresh" / "alignment")
    )
    assert first["cached"] is False and first["round_to"] in (1, 8)
    assert set(first["measured_ms"]) == {"7", "8"} and all(
        v > 0 for v in first["measured_ms"].values()
    )
    # per-MAC cost of each alignment is its probe's time over its MACs
    for a, c in ((1, 7), (8, 8)):
        want = first["measured_ms"][str(c)] / alignment._probe_macs(c) * 1e6
        assert first["per_mac_ns"][str(a)] == pytest.approx(want)

    def no_timing(*args, **kwargs):
        raise AssertionError("the cached result should have been used")

    monkeypatch.setattr(alignment, "_time_probes", no_timing)
    second = alignment.measure_alignment(
        "litert", 1, counts=counts, repeat=3, cache_dir=str(tmp_path / "fresh" / "alignment")
    )
    assert second["cached"] is True and second["round_to"] == first["round_to"]
    with pytest.raises(ValueError, match="runtime must be one of"):
        alignment.measure_alignment("tensorrt", 1, counts=counts, cache_dir=False)


def test_resolve_round_to_accepts_integers_digits_and_auto(monkeypatch):
    assert alignment.resolve_round_to(3) == 3
    assert alignment.resolve_round_to("8") == 8
    monkeypatch.setattr(
        alignment, "measure_alignment", lambda runtime, threads, **kw: {"round_to": 16}
    )
    assert alignment.resolve_round_to("auto", "onnxruntime", 2) == 16
    for bad in (0, -4, "abc", True, 2.5):
        with pytest.raises(ValueError, match="round_to must be 'auto' or a positive integer"):
            alignment.resolve_round_to(bad)


def _ctx(**flags):
    values = {"round_to": "auto", "method": "kdp", "strategy": "default",
              "latency_runtime": "litert", "latency_threads": 1, **flags}  # fmt: skip
    return types.SimpleNamespace(flags=values)


def test_pipeline_resolves_auto_on_the_latency_runtime_and_keeps_the_measurement(
    monkeypatch, capsys
):
    from tfkdp.pipelines import workflow

    seen = []

    def fake(runtime, threads, **kwargs):
        seen.append((runtime, threads))
        return {"round_to": 8, "per_mac_ns": {"1": 1.2, "8": 1.0}, "cached": False}

    monkeypatch.setattr(alignment, "measure_alignment", fake)
    ctx = _ctx(latency_runtime="onnxruntime", latency_threads=2)
    workflow._resolve_round_to(ctx)
    assert ctx.flags["round_to"] == 8 and seen == [("onnxruntime", 2)]
    assert ctx.alignment["per_mac_ns"] == {"1": 1.2, "8": 1.0}
    assert "--round_to=auto: multiples of 8" in capsys.readouterr().out
    # an integer is taken as it is, without measuring
    ctx = _ctx(round_to="4")
    workflow._resolve_round_to(ctx)
    assert ctx.flags["round_to"] == 4 and ctx.alignment is None and len(seen) == 1
    # a method that removes no channels needs no alignment
    ctx = _ctx(method="kd_only")
    workflow._resolve_round_to(ctx)
    assert ctx.flags["round_to"] == 1 and len(seen) == 1
    # hosts could measure differently: refused under multiworker
    with pytest.raises(ValueError, match="pass an integer under --strategy=multiworker"):
        workflow._resolve_round_to(_ctx(strategy="multiworker"))


def test_auto_falls_back_to_a_finer_alignment_when_the_budget_needs_it(monkeypatch, capsys):
    """resnet8 (16/32/64 channels) cannot lose half its MACs in steps of 16; auto then uses 8."""
    from tfkdp import make_plan, models
    from tfkdp.methods import Budget
    from tfkdp.pipelines import validate

    model = models.get("resnet8", input_shape=(12, 12, 1), num_classes=3)
    budget = Budget.macs(0.5)
    ctx = _ctx()
    ctx.flags["round_to"] = 16
    ctx.alignment = {"round_to": 16}
    with pytest.raises(ValueError, match="unreachable"):
        make_plan(model, target_macs_reduction=0.5, round_to=16)
    plan = validate.check_budget_with_alignment(ctx, model, budget)
    assert ctx.flags["round_to"] == 8 and ctx.alignment["fallback"] == {"measured": 16, "used": 8}
    assert all(len(keep) % 8 == 0 for keep in plan.values())
    assert "using multiples of 8" in capsys.readouterr().out
    # An integer --round_to is the user's: no fallback, the error stands.
    ctx = _ctx(round_to=16)
    ctx.alignment = None
    with pytest.raises(ValueError, match="--round_to=16"):
        validate.check_budget_with_alignment(ctx, model, budget)
