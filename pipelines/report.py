"""The pipeline's report: report.json, report.md and PNG plots.

Plots use matplotlib's object API with the Agg canvas directly, so producing
them changes no global backend or rc state.
"""

import os

from tfkdp.export._atomic import write_bytes_atomic, write_json_atomic

REPORT_SCHEMA_VERSION = 1


def _fmt(value, spec=".4f"):
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _count(value):
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return str(value)


def markdown(report):
    """The report as Markdown tables."""
    teacher, student = report["teacher"], report["student"]
    lines = [
        "# tfkdp compression report",
        "",
        f"Method `{report['flags'].get('method')}`, "
        + (f"target weight sparsity {report['flags'].get('target_sparsity')}"
           if report["flags"].get("method") == "weight"
           else f"target MAC reduction {report['flags'].get('target_macs_reduction')}")
        + f", dataset `{report['flags'].get('dataset')}`.",
        "",
        "| model | accuracy | MACs | params | non-zero params |",
        "|---|---|---|---|---|",
        f"| teacher | {_fmt(teacher['accuracy'])} | {_count(teacher['macs'])} | "
        f"{_count(teacher['params'])} | {_count(teacher.get('nonzero_params'))} |",
        f"| student | {_fmt(student['accuracy'])} | {_count(student['macs'])} | "
        f"{_count(student['params'])} | {_count(student.get('nonzero_params'))} |",
    ]
    if teacher.get("macs") and student.get("macs"):
        lines += [
            "",
            f"MAC reduction: {1 - student['macs'] / teacher['macs']:.1%}; "
            f"parameter reduction: {1 - student['params'] / teacher['params']:.1%}.",
        ]
    efficiency = student.get("performance_efficiency") or {}
    if efficiency.get("nonzero_params") is not None or efficiency.get("macs") is not None:
        lines += [
            "",
            f"Performance Efficiency (accuracy kept / cost kept, teacher = 1): non-zero params "
            f"{_fmt(efficiency.get('nonzero_params'), '.2f')}, MACs "
            f"{_fmt(efficiency.get('macs'), '.2f')}; per artifact below (file, gzip, p50 "
            "against the teacher's float32 tflite).",
        ]
    lines += [
        "",
        "| format | size | gzip | max abs diff | top-1 agreement | accuracy | p50 ms | p90 ms "
        "| threads | PE size | PE gzip | PE p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report["artifacts"]:
        pe = a.get("performance_efficiency") or {}
        gz = a.get("gzip_bytes")
        lines.append(
            f"| {a['format']} | {a['size_bytes'] / 1024:.1f} KiB "
            f"| {'-' if gz is None else f'{gz / 1024:.1f} KiB'} "
            f"| {_fmt(a.get('max_abs_diff'), '.2e')} "
            f"| {_fmt(a.get('top1_agreement'))} | {_fmt(a.get('accuracy'))} "
            f"| {_fmt(a.get('latency_ms_p50'), '.3f')} | {_fmt(a.get('latency_ms_p90'), '.3f')} "
            f"| {a.get('threads', '-')} | {_fmt(pe.get('size_bytes'), '.2f')} "
            f"| {_fmt(pe.get('gzip_bytes'), '.2f')} | {_fmt(pe.get('latency_ms_p50'), '.2f')} |"
        )
    lines += _comparison_markdown(report.get("latency_comparison") or [])
    lines += _rejected_markdown(report.get("rejected") or [])
    lines += _unprunable_markdown((report.get("student") or {}).get("unprunable_groups") or [])
    extra = (report.get("method_report") or {}).get("markdown")
    if extra:
        lines += ["", extra.rstrip("\n")]
    lines += ["", "| stage | seconds |", "|---|---|"]
    for stage, seconds in report["stages"].items():
        lines.append(f"| {stage} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def _cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")


def _comparison_markdown(rows):
    """Teacher vs student latency per runtime and threads, with the speedup over the MAC speedup."""
    if not rows:
        return []
    lines = [
        "",
        "## Teacher vs student latency",
        "",
        "Float32 models on each runtime, batch 1, timed in the same interleaved blocks. A "
        "speedup ÷ MAC speedup below 1 means the runtime gains less than the MAC count promises.",
        "",
        "| runtime | format | threads | teacher p50 ms | teacher p90 ms | student p50 ms "
        "| student p90 ms | speedup | MAC speedup | speedup ÷ MAC speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['format']} | {r['threads']} | {_fmt(r['teacher_p50_ms'], '.3f')} "
            f"| {_fmt(r['teacher_p90_ms'], '.3f')} | {_fmt(r['student_p50_ms'], '.3f')} "
            f"| {_fmt(r['student_p90_ms'], '.3f')} | {_fmt(r['speedup'], '.2f')} "
            f"| {_fmt(r['mac_speedup'], '.2f')} | {_fmt(r['speedup_over_mac_speedup'], '.2f')} |"
        )
    return lines


def _unprunable_markdown(groups):
    """The "Groups left unpruned" section: which channel groups tfkdp may not prune, and why."""
    if not groups:
        return []
    lines = [
        "",
        "## Groups left unpruned",
        "",
        "Channel groups the analysis refuses to prune (their channels stay as they are).",
        "",
        "| group | channels | producers | reason |",
        "|---|---|---|---|",
    ]
    for g in groups:
        producers = ", ".join(g.get("producers") or []) or "-"
        lines.append(f"| {_cell(g['group'])} | {g['size']} | {_cell(producers)} | {_cell(g['reason'])} |")
    return lines


def _rejected_markdown(rejected):
    """The "Rejected artifacts" section: one row per failed check (or per artifact that did not run)."""
    if not rejected:
        return []
    lines = [
        "",
        "## Rejected artifacts",
        "",
        "Failed verification against the Keras student: moved to `export/rejected/` with "
        "`<file>.reason.txt` beside each, not timed, not in the table above. The run exits "
        "with code 1.",
        "",
        "| format | runtime | n | failed check | measured | allowed | file |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rejected:
        head = f"| {r['format']} | {r.get('runtime') or '-'} | {_fmt(r.get('n'))} "
        checks = r.get("failed_checks") or []
        if not checks:
            reason = r.get("error") or r.get("reason")
            lines.append(f"{head}| {_cell(reason)} | - | - | `{r['path']}` |")
        for c in checks:
            bound = "<=" if c["metric"] == "max_abs_diff" else ">="
            lines.append(
                f"{head}| {c['metric']} | {_fmt(c['measured'], '.4g')} "
                f"| {bound} {_fmt(c['allowed'], '.4g')} | `{r['path']}` |"
            )
    return lines


def _figure(width=6.0, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    tmp = path + ".tmp.png"
    figure.tight_layout()
    figure.savefig(tmp)
    os.replace(tmp, path)


def plots(report, out_dir):
    """Writes accuracy-vs-MACs, latency-per-format and kept-channels plots; returns their paths."""
    paths = {}
    points = [("teacher", report["teacher"]), ("student", report["student"])]
    points += [(b["name"], b) for b in report.get("baselines", [])]
    figure = _figure()
    axis = figure.add_subplot()
    for name, entry in points:
        if entry.get("macs") and entry.get("accuracy") is not None:
            axis.scatter(entry["macs"] / 1e6, entry["accuracy"] * 100, s=40)
            axis.annotate(name, (entry["macs"] / 1e6, entry["accuracy"] * 100),
                          textcoords="offset points", xytext=(5, 5))
    axis.set_xlabel("MACs (millions, batch 1)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("accuracy vs MACs")
    axis.grid(alpha=0.3)
    paths["accuracy_vs_macs"] = os.path.join(out_dir, "accuracy_vs_macs.png")
    _save(figure, paths["accuracy_vs_macs"])

    timed = [a for a in report["artifacts"] if a.get("latency_ms_p50") is not None]
    if timed:
        figure = _figure()
        axis = figure.add_subplot()
        labels = [f"{a['format']}\n{a.get('runtime', '')} t{a.get('threads', '')}" for a in timed]
        teacher_p50 = {(r["format"], r["threads"]): r["teacher_p50_ms"]
                       for r in report.get("latency_comparison") or []}  # fmt: skip
        positions = range(len(timed))
        axis.bar([p + 0.2 for p in positions], [a["latency_ms_p50"] for a in timed], width=0.4,
                 color="tab:blue", label="student")  # fmt: skip
        teacher_bars = [(p, teacher_p50.get((a["format"], a.get("threads"))))
                        for p, a in zip(positions, timed, strict=True)]  # fmt: skip
        teacher_bars = [(p, v) for p, v in teacher_bars if v is not None]
        if teacher_bars:
            axis.bar([p - 0.2 for p, _ in teacher_bars], [v for _, v in teacher_bars], width=0.4,
                     color="tab:gray", label="teacher (float32)")  # fmt: skip
            axis.legend(fontsize=7)
        axis.set_xticks(positions, labels, rotation=45, ha="right", fontsize=7)
        axis.set_ylabel("p50 latency (ms, batch 1)")
        axis.set_title("latency per format (teacher next to the student)")
        paths["latency"] = os.path.join(out_dir, "latency.png")
        _save(figure, paths["latency"])

    channels = report["student"].get("channels") or {}
    if channels:
        figure = _figure(max(6.0, 0.25 * len(channels)), 4.0)
        axis = figure.add_subplot()
        names = list(channels)
        axis.bar(range(len(names)), [channels[n]["size"] for n in names], color="lightgray",
                 label="original")
        axis.bar(range(len(names)), [channels[n]["kept"] for n in names], color="tab:green",
                 label="kept")
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        axis.set_ylabel("channels")
        axis.set_title("kept channels per group")
        axis.legend()
        paths["channels"] = os.path.join(out_dir, "kept_channels.png")
        _save(figure, paths["channels"])
    return paths


def write(report, out_dir):
    """Writes report.json, report.md and the plots into `out_dir`; returns the Markdown."""
    report = dict(report, schema_version=REPORT_SCHEMA_VERSION)
    report["plots"] = {k: os.path.basename(v) for k, v in plots(report, out_dir).items()}
    method_report = dict(report.get("method_report") or {})
    if method_report:
        method_plots = {k: os.path.basename(v) for k, v in method_report.get("plots", {}).items()}
        report["method_report"] = dict(method_report, plots=method_plots)
        report["plots"].update(method_plots)
    write_json_atomic(os.path.join(out_dir, "report.json"), report)
    text = markdown(report)
    write_bytes_atomic(os.path.join(out_dir, "report.md"), text.encode("utf-8"))
    return text
