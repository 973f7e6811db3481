"""The comparison report of `tfkdp-compress --method=a,b,...`: one row per method, Pareto plots, the best.

Each finished run of a method (one per seed) left its own `report.json`
(`tfkdp.pipelines.report`); this module reads them and writes
`comparison.json`, `comparison.md`, `pareto_macs.png` and
`pareto_latency.png`. With several seeds a method's row holds the mean, the
sample standard deviation and the range of its test accuracy, and the plots
draw the spread as error bars.

The best method, by a stated rule: among the methods within the budget (a
MAC budget: MAC reduction ≥ target − 0.02, the tolerance of `make_plan`; a
latency budget: measured LiteRT p50 of the deploy format ≤ 1.1 × the budget; a latency
reduction r: ≤ 1.1 × (1 − r) × the teacher's p50 timed in the same runs),
the highest mean test accuracy; ties by the lower mean LiteRT p50.
"""

import os
import statistics

from tfkdp.export._atomic import write_bytes_atomic, write_json_atomic
from tfkdp.pipelines import report as report_lib

SCHEMA_VERSION = 1
MAC_TOLERANCE = 0.02  # make_plan lands within 2 % of a MAC budget
LATENCY_TOLERANCE = 0.10  # a latency budget is met within 10 % as measured
RULE = (
    "highest mean test accuracy among the methods within the budget (MAC budget: MAC reduction "
    f">= target - {MAC_TOLERANCE}; latency budget: measured LiteRT p50 of the deploy format "
    f"<= {1 + LATENCY_TOLERANCE:g} x the budget, or x (1 - reduction) x the teacher's p50); "
    "ties: lower mean LiteRT p50"
)


def run_row(report, entry, deploy_format, threads):
    """One finished run as a row: accuracy, costs, the deploy format's size and LiteRT p50.

    Args:
        report: the run's `report.json` (a dict).
        entry: the run's record in the comparison state (`method`, `seed`,
            `epochs`, `status`, `dir`, `rejected`).
        deploy_format: the export format whose file size and latency are compared.
        threads: the LiteRT thread count whose p50 is compared.

    Returns:
        A dict; sizes in bytes, latency in ms (batch 1), wall time in seconds
        (every stage of the method's run but the teacher's).
    """
    student, teacher = report["student"], report["teacher"]
    artifact = next(
        (a for a in report.get("artifacts", [])
         if a["format"] == deploy_format and a.get("runtime") == "litert"
         and str(a.get("threads")) == str(threads)),
        None,
    )  # fmt: skip
    if artifact is None:  # not timed on LiteRT (or rejected): its size still counts
        artifact = next((a for a in report.get("artifacts", []) if a["format"] == deploy_format), {})
    macs, teacher_macs = student.get("macs"), teacher.get("macs")
    reference = teacher.get("reference_artifact") or {}
    return {
        "method": entry["method"], "seed": entry["seed"], "dir": entry["dir"],
        "test_accuracy": student.get("accuracy"), "macs": macs, "params": student.get("params"),
        "nonzero_params": student.get("nonzero_params"),
        "macs_reduction": 1.0 - macs / teacher_macs if macs and teacher_macs else None,
        "deploy_format": deploy_format,
        "size_bytes": artifact.get("size_bytes"), "gzip_bytes": artifact.get("gzip_bytes"),
        "litert_p50_ms": artifact.get("latency_ms_p50") if artifact.get("runtime") == "litert" else None,
        "teacher_litert_p50_ms": reference.get("latency_ms_p50", {}).get(str(threads)),
        "teacher_nonzero_params": teacher.get("nonzero_params"),
        # The teacher's reference artifact is its float32 tflite: comparable with a tflite deploy format.
        "teacher_size_bytes": reference.get("size_bytes") if deploy_format == "tflite" else None,
        "teacher_gzip_bytes": reference.get("gzip_bytes") if deploy_format == "tflite" else None,
        "wall_seconds": round(sum(v for k, v in report.get("stages", {}).items() if k != "teacher"), 1),
        "epochs": entry.get("epochs"),
        "rejected": entry.get("rejected", []),
    }  # fmt: skip


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def method_row(name, runs, failed):
    """A method's row: the means of its runs, and the spread of their test accuracy."""
    accuracies = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
    row = {
        "method": name, "seeds": [r["seed"] for r in runs], "runs_ok": len(runs),
        "runs_failed": len(failed), "errors": [f"seed {f['seed']}: {f['error']}" for f in failed],
        "test_accuracy": _mean(accuracies),
        "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0 if accuracies else None,
        "test_accuracy_min": min(accuracies) if accuracies else None,
        "test_accuracy_max": max(accuracies) if accuracies else None,
        "epochs": runs[0]["epochs"] if runs else (failed[0].get("epochs") if failed else None),
    }  # fmt: skip
    for key in ("macs", "params", "nonzero_params", "macs_reduction", "size_bytes", "gzip_bytes",
                "litert_p50_ms", "wall_seconds"):
        row[key] = _mean([r[key] for r in runs])
    latencies = [r["litert_p50_ms"] for r in runs if r["litert_p50_ms"] is not None]
    row["litert_p50_ms_std"] = statistics.stdev(latencies) if len(latencies) > 1 else 0.0 if latencies else None
    # "pending": neither finished nor failed yet (the comparison is rewritten after every run).
    row["status"] = "ok" if runs else "failed" if failed else "pending"
    return row


def within_budget(row, budget, teacher_p50_ms=None):
    """Whether a method's row meets the run's budget (see the module docstring), or None if unknown.

    `teacher_p50_ms` (LiteRT, the deploy format) is needed for a `target_latency_reduction` budget.
    """
    if row["status"] != "ok":
        return False
    if budget.get("target_latency_reduction"):
        p50 = row.get("litert_p50_ms")
        if p50 is None or not teacher_p50_ms:
            return None
        return p50 <= (1 - budget["target_latency_reduction"]) * teacher_p50_ms * (1 + LATENCY_TOLERANCE)
    if budget.get("target_latency_ms"):
        p50 = row.get("litert_p50_ms")
        return None if p50 is None else p50 <= budget["target_latency_ms"] * (1 + LATENCY_TOLERANCE)
    reduction = row.get("macs_reduction")
    return None if reduction is None else reduction >= budget["target_macs_reduction"] - MAC_TOLERANCE


def best_method(rows):
    """The name of the best row by `RULE` (rows carry `within_budget`), or None."""
    eligible = [r for r in rows if r.get("within_budget") and r["test_accuracy"] is not None]
    if not eligible:
        return None
    inf = float("inf")
    return min(eligible, key=lambda r: (-round(r["test_accuracy"], 6), r["litert_p50_ms"] or inf))["method"]


def build(teacher, runs, failures, names, budget, setup):
    """The comparison as a JSON-able dict.

    Args:
        teacher: `{accuracy, macs, params, seconds}` of the shared teacher.
        runs: rows of the finished runs (`run_row`).
        failures: `{method, seed, error, epochs}` of the failed runs.
        names: the compared methods, in order.
        budget: `{target_macs_reduction, target_latency_ms, target_latency_reduction}`.
        setup: what the rows share (`total_epochs`, `seeds`, `deploy_format`, `threads`, ...).
    """
    p50s = [r["teacher_litert_p50_ms"] for r in runs if r.get("teacher_litert_p50_ms")]
    # Every run timed the teacher next to its student: the median of those p50s.
    teacher = dict(teacher, litert_p50_ms=statistics.median(p50s) if p50s else None)
    rows = []
    for name in names:
        row = method_row(name, [r for r in runs if r["method"] == name],
                         [f for f in failures if f["method"] == name])  # fmt: skip
        row["within_budget"] = within_budget(row, budget, teacher["litert_p50_ms"])
        rows.append(row)
    for key in ("nonzero_params", "size_bytes", "gzip_bytes"):
        teacher[key] = next((r[f"teacher_{key}"] for r in runs if r.get(f"teacher_{key}")), None)
    for row in rows:
        p50 = row.get("litert_p50_ms")
        row["speedup"] = teacher["litert_p50_ms"] / p50 if p50 and teacher["litert_p50_ms"] else None
    return {
        "schema_version": SCHEMA_VERSION, "teacher": teacher, "budget": budget, "setup": setup,
        "rule": RULE, "best": best_method(rows), "rows": rows, "runs": runs, "failed": failures,
    }  # fmt: skip


def _num(value, spec, scale=1.0):
    return "-" if value is None else format(value * scale, spec)


def _pct(value):
    return _num(value, ".2f", 100.0)


def _k(value):
    return _num(value, ".1f", 1e-3)


def _accuracy_cell(row):
    if row["test_accuracy"] is None:
        return "-"
    if row["runs_ok"] > 1:
        return f"{100 * row['test_accuracy']:.2f} ± {100 * row['test_accuracy_std']:.2f}"
    return _pct(row["test_accuracy"])


def _epochs_cell(epochs):
    if not epochs:
        return "-"
    return " + ".join(f"{v} {k.replace('_epochs', '')}" for k, v in epochs.items() if v)


def markdown(comparison):
    """The comparison as Markdown: setup, one row per method, the best, the failures."""
    teacher, setup, budget = comparison["teacher"], comparison["setup"], comparison["budget"]
    if budget.get("target_latency_ms"):
        budget_text = f"latency ≤ {budget['target_latency_ms']:g} ms (measured within 10 %)"
    elif budget.get("target_latency_reduction"):
        budget_text = (f"{100 * budget['target_latency_reduction']:g} % less latency than the teacher "
                       "(measured within 10 %)")  # fmt: skip
    else:
        budget_text = f"{100 * budget['target_macs_reduction']:.0f} % MAC reduction (within 2 %)"
    fmt, threads = setup["deploy_format"], setup["threads"]
    lines = [
        "# tfkdp: which recipe?",
        "",
        f"Teacher `{setup['teacher']}`; budget {budget_text}; {setup['total_epochs']} training "
        f"epochs per method (split over its phases as the `epochs` column says); seed(s) "
        f"{', '.join(str(s) for s in setup['seeds'])} (the same data order for every method); "
        f"deploy format `{fmt}`, LiteRT p50 at {threads} thread(s), batch 1.",
        "",
        "| method | test acc % | MACs (M) | MAC reduction | params (k) | non-zero params (k) | "
        f"{fmt} (kB) | gzip (kB) | LiteRT p50 (ms) | speedup | epochs | wall (s) | within budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | {_pct(teacher.get('accuracy'))} | "
        f"{_num(teacher.get('macs'), '.2f', 1e-6)} | 0 | "
        f"{_k(teacher.get('params'))} | {_k(teacher.get('nonzero_params'))} | "
        f"{_k(teacher.get('size_bytes'))} | {_k(teacher.get('gzip_bytes'))} | "
        f"{_num(teacher.get('litert_p50_ms'), '.3f')} | 1 | "
        f"- | {_num(teacher.get('seconds'), '.0f')} | - |",
    ]
    for row in comparison["rows"]:
        if row["status"] != "ok":
            status = "failed" if row["status"] == "failed" else "not run yet"
            lines.append(f"| {row['method']} | {status} | - | - | - | - | - | - | - | - | "
                         f"{_epochs_cell(row['epochs'])} | - | - |")  # fmt: skip
            continue
        best = " **(best)**" if row["method"] == comparison["best"] else ""
        p50 = row["litert_p50_ms"]
        within = {True: "yes", False: "no", None: "?"}[row["within_budget"]]
        lines.append(
            f"| {row['method']}{best} | {_accuracy_cell(row)} | "
            f"{_num(row['macs'], '.2f', 1e-6)} | "
            f"{_num(row['macs_reduction'], '.3f')} | "
            f"{_k(row['params'])} | {_k(row['nonzero_params'])} | {_k(row['size_bytes'])} | "
            f"{_k(row['gzip_bytes'])} | {_num(p50, '.3f')} | "
            f"{_num(row['speedup'], '.2f')} | "
            f"{_epochs_cell(row['epochs'])} | {_num(row['wall_seconds'], '.0f')} | {within} |"
        )
    lines += ["", f"Best by the rule ({comparison['rule']}): "
              + (f"`{comparison['best']}`, copied to `best/`." if comparison["best"] else
                 "none (no method met the budget).")]  # fmt: skip
    errors = [(r["method"], e) for r in comparison["rows"] for e in r["errors"]]
    if errors:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{name}` {report_lib._cell(error)}" for name, error in errors]
    lines += ["", "![accuracy vs MACs](pareto_macs.png) ![accuracy vs latency](pareto_latency.png)", ""]
    return "\n".join(lines)


def row_colors(count):
    """`count` distinct RGBA colours: tab10's up to 10 rows, tab20's up to 20, then they repeat.

    Matplotlib's default cycle has 10 colours, so an 11th row would share the
    first one's colour in the legend.
    """
    import matplotlib

    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]


def pareto_plot(comparison, x_key, x_label, title, path, teacher_x, scale=1.0):
    """Accuracy against `x_key` for every ok row (seeds' spread as error bars), the teacher a star.

    `comparison` is `build`'s dict (or one with the same `rows` and `teacher`
    fields); the best row is drawn as a diamond. Writes a PNG to `path`.
    """
    figure = report_lib._figure()
    axis = figure.add_subplot()
    teacher = comparison["teacher"]
    if teacher_x is not None and teacher.get("accuracy") is not None:
        axis.scatter(teacher_x * scale, teacher["accuracy"] * 100, marker="*", s=160,
                     color="black", label="teacher", zorder=3)  # fmt: skip
        axis.annotate("teacher", (teacher_x * scale, teacher["accuracy"] * 100),
                      textcoords="offset points", xytext=(6, -10), fontsize=7)  # fmt: skip
    rows = [row for row in comparison["rows"]
            if row["status"] == "ok" and row.get(x_key) is not None and row["test_accuracy"] is not None]  # fmt: skip
    for row, color in zip(rows, row_colors(len(rows)), strict=True):
        x, y = row[x_key] * scale, row["test_accuracy"] * 100
        yerr = 100 * row["test_accuracy_std"] if row["runs_ok"] > 1 else None
        xerr = row.get("litert_p50_ms_std") if x_key == "litert_p50_ms" and row["runs_ok"] > 1 else None
        marker = "D" if row["method"] == comparison["best"] else "o"
        axis.errorbar(x, y, yerr=yerr, xerr=xerr, fmt=marker, capsize=3, color=color,
                      label=row["method"])  # fmt: skip
        axis.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    axis.set_xlabel(x_label)
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, loc="best")
    report_lib._save(figure, path)


def write(comparison, out_dir):
    """Writes comparison.json, comparison.md and the two Pareto plots; returns the Markdown."""
    pareto_plot(comparison, "macs", "MACs (millions, batch 1)", "accuracy vs MACs (error bars: seeds)",
            os.path.join(out_dir, "pareto_macs.png"), comparison["teacher"].get("macs"), 1e-6)  # fmt: skip
    pareto_plot(comparison, "litert_p50_ms",
            f"LiteRT p50 latency (ms, {comparison['setup']['deploy_format']}, batch 1)",
            "accuracy vs measured latency (error bars: seeds)",
            os.path.join(out_dir, "pareto_latency.png"), comparison["teacher"].get("litert_p50_ms"))  # fmt: skip
    write_json_atomic(os.path.join(out_dir, "comparison.json"), comparison)
    text = markdown(comparison)
    write_bytes_atomic(os.path.join(out_dir, "comparison.md"), text.encode("utf-8"))
    return text
