"""Turning a bench run into figures: medians, ratios, targets, a table, a chart, the delta."""

from __future__ import annotations

import json
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

RSS_LIMIT_MB = 250.0
# (id, what, threshold, how the value compares)
TARGETS = (
    ("a", "no added latency: Cancelflow jobs/s / baseline jobs/s", 1.0, ">="),
    ("b", "200 ms per provider call: jobs/s / Cancelflow's no-latency jobs/s", 0.9, ">="),
    ("c", "peak worker RSS with the window of jobs in flight, MB", RSS_LIMIT_MB, "<"),
    ("d", "API enqueue rate / loop of plain send_task", 0.8, ">="),
)


def _median(values: list[Any]) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), 3) if found else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario: medians over rounds, and ratios to the baseline (and, for the latency
    scenario, to the no-latency scenario) as the median of same-round ratios."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by[run["scenario"]].append(run)
    rounds: dict[tuple[str, int], dict[str, Any]] = {(r["scenario"], r["round"]): r for r in runs}
    out: dict[str, dict[str, Any]] = {}
    for scenario, items in by.items():
        s: dict[str, Any] = {
            "system": items[0]["system"],
            "rounds": len(items),
            "jobs_per_s": _median([r["jobs_per_s"] for r in items]),
            "latency_ms": {
                p: _median([r["latency_ms"][p] for r in items]) for p in ("p50", "p95", "p99")
            },
            "completion_ms": {
                p: _median([r["completion_ms"][p] for r in items]) for p in ("p50", "p95", "p99")
            },
            "peak_rss_mb": max(
                (r["peak_rss_mb"] for r in items if r["peak_rss_mb"] is not None), default=None
            ),
            "max_in_flight": max(r["max_in_flight"] for r in items),
            "completed": sum(r["completed"] for r in items),
            "jobs": sum(r["jobs"] for r in items),
            "retries": sum(r.get("retries", 0) for r in items),
            "cpu_ms_per_job": {
                kind: _median([r.get("cpu_ms_per_job", {}).get(kind) for r in items])
                for kind in sorted({k for r in items for k in r.get("cpu_ms_per_job", {})})
            },
        }
        segments = {name for r in items for name in r.get("segments_ms", {})}
        if segments:
            s["segments_ms"] = {
                name: {
                    p: _median(
                        [r["segments_ms"][name][p] for r in items if name in r["segments_ms"]]
                    )
                    for p in ("p50", "p95")
                }
                for name in sorted(segments, key=_segment_order(items))
            }

        def paired(other: str, metric: Any, _items: list[dict[str, Any]] = items) -> float | None:
            ratios = [
                _ratio(metric(r), metric(rounds[(other, r["round"])]))
                for r in _items
                if (other, r["round"]) in rounds
            ]
            return _median(ratios)

        if scenario != "baseline" and any(("baseline", r["round"]) in rounds for r in items):
            s["ratio_to_baseline"] = {
                "jobs_per_s": paired("baseline", lambda r: r["jobs_per_s"]),
                "latency_p50": paired("baseline", lambda r: r["latency_ms"]["p50"]),
                "latency_p95": paired("baseline", lambda r: r["latency_ms"]["p95"]),
                "peak_rss": paired("baseline", lambda r: r["peak_rss_mb"]),
            }
        if scenario not in ("baseline", "no_latency") and "no_latency" in by:
            s["ratio_to_no_latency"] = {
                "jobs_per_s": paired("no_latency", lambda r: r["jobs_per_s"])
            }
        out[scenario] = s
    return out


def scaling(runs: list[dict[str, Any]], base: int) -> dict[str, Any]:
    """Jobs/s of the baseline and of Cancelflow's no-latency scenario with each count of
    worker processes per side (medians over rounds), and each count's over ``base``'s."""
    out: dict[str, Any] = {}
    for scenario in ("baseline", "no_latency"):
        by: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            if r["scenario"] == scenario and "workers" in r:
                by[r["workers"]].append(r)
        if len(by) < 2 or base not in by:
            continue
        rates = {n: _median([r["jobs_per_s"] for r in items]) for n, items in sorted(by.items())}
        out[scenario] = {
            "jobs_per_s": {str(n): v for n, v in rates.items()},
            "worker_cpu_ms_per_job": {
                str(n): _median([r.get("cpu_ms_per_job", {}).get("workers") for r in items])
                for n, items in sorted(by.items())
            },
            "x_base": {str(n): _rounded_ratio(v, rates[base]) for n, v in rates.items()},
        }
    if "baseline" in out and "no_latency" in out:
        out["ratio_to_baseline"] = {
            n: round(v / b, 3) if v and (b := out["baseline"]["jobs_per_s"].get(n)) else None
            for n, v in out["no_latency"]["jobs_per_s"].items()
        }
    return out


def _rounded_ratio(a: float | None, b: float | None) -> float | None:
    found = _ratio(a, b)
    return round(found, 3) if found is not None else None


def _legs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each broker's figures (a document of before the legs: its own, as Redis's)."""
    return doc.get("brokers") or {doc.get("broker", "redis"): doc}


def _segment_order(items: list[dict[str, Any]]) -> Any:
    order = [name for r in items for name in r.get("segments_ms", {})]
    return lambda name: order.index(name)


def targets(doc: dict[str, Any], window: int) -> list[dict[str, Any]]:
    """Each target with its value and PASS, FAIL or SKIP (not measured in this run)."""
    sc = doc.get("scenarios", {})
    rss_runs = [
        s for name, s in sc.items() if name != "baseline" and s["max_in_flight"] >= min(window, 500)
    ]
    values = {
        "a": sc.get("no_latency", {}).get("ratio_to_baseline", {}).get("jobs_per_s"),
        "b": sc.get("latency_200ms", {}).get("ratio_to_no_latency", {}).get("jobs_per_s"),
        "c": max((s["peak_rss_mb"] for s in rss_runs if s["peak_rss_mb"] is not None), default=None)
        if window >= 500
        else None,
        "d": doc.get("api", {}).get("ratio"),
    }
    out = []
    for tid, what, threshold, op in TARGETS:
        value = values[tid]
        if value is None:
            status = "SKIP"
        else:
            status = "PASS" if (value >= threshold if op == ">=" else value < threshold) else "FAIL"
        out.append(
            {
                "id": tid,
                "target": what,
                "value": value,
                "threshold": threshold,
                "op": op,
                "status": status,
            }
        )
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(doc: dict[str, Any]) -> str:
    """The results as a Markdown table (what the README shows), a row per scenario of each
    broker; then the scaling, the load and the enqueue rates."""
    head = (
        "| broker | scenario | jobs/s | p50 ms | p95 ms | p99 ms | peak RSS MB "
        "| worker CPU ms/job | jobs/s x baseline | p50 x baseline | jobs/s x no-latency |"
    )
    lines = [head, "|" + " --- |" * 11]
    legs = _legs(doc)
    for broker, leg in legs.items():
        for name, s in leg["scenarios"].items():
            rb = s.get("ratio_to_baseline", {})
            lines.append(
                f"| {broker} | {name} | {_fmt(s['jobs_per_s'])} "
                f"| {_fmt(s['latency_ms']['p50'], 0)} "
                f"| {_fmt(s['latency_ms']['p95'], 0)} | {_fmt(s['latency_ms']['p99'], 0)} "
                f"| {_fmt(s['peak_rss_mb'], 0)} "
                f"| {_fmt(s.get('cpu_ms_per_job', {}).get('workers'))} "
                f"| {_fmt(rb.get('jobs_per_s'), 2)} "
                f"| {_fmt(rb.get('latency_p50'), 2)} "
                f"| {_fmt(s.get('ratio_to_no_latency', {}).get('jobs_per_s'), 2)} |"
            )
    for broker, leg in legs.items():
        sc = leg.get("scaling") or {}
        if "baseline" not in sc and "no_latency" not in sc:
            continue
        lines += ["", f"Scaling ({broker}), jobs/s by worker processes per side:"]
        for name in ("baseline", "no_latency"):
            if name in sc:
                rates = ", ".join(
                    f"{n}: {_fmt(v)} (x{_fmt(sc[name]['x_base'][n], 2)})"
                    for n, v in sc[name]["jobs_per_s"].items()
                )
                lines.append(f"  {name}: {rates}")
        if "ratio_to_baseline" in sc:
            lines.append(
                "  Cancelflow x baseline: "
                + ", ".join(f"{n}: {_fmt(v, 2)}" for n, v in sc["ratio_to_baseline"].items())
            )
    loads = [r["load_1m"] for r in doc.get("runs", []) if r.get("load_1m") is not None]
    if loads:
        lines += [
            "",
            f"Load average (1 min) at the end of the runs: {min(loads):.1f} to {max(loads):.1f} "
            f"on {doc['machine']['cpus']} CPUs.",
        ]
    for broker, leg in legs.items():
        api = leg.get("api")
        if api:
            lines += [
                "",
                f"Enqueue ({broker}): API {_fmt(api['api_per_s'], 0)}/s ({api['connections']} "
                f"connections) vs send_task loop {_fmt(api['send_task_loop_per_s'], 0)}/s: "
                f"x {_fmt(api['ratio'], 2)}",
            ]
    return "\n".join(lines)


def profile_text(doc: dict[str, Any]) -> str:
    """Where a job's time goes and what it costs, Cancelflow's and the baseline's, for each
    broker's leg (the profile runs)."""
    return "\n".join(
        _leg_profile_text(broker, leg) for broker, leg in _legs(doc).items() if leg.get("profile")
    )


def _leg_profile_text(broker: str, leg: dict[str, Any]) -> str:
    prof = leg["profile"]
    lines = [
        f"Profile [{broker}] ({prof['jobs']} jobs, no added latency, counted workers):",
        "  stretches of a job (timeline), p50 / p95 ms:",
    ]
    for name, v in prof["segments_ms"].items():
        lines.append(f"    {name:28} {_fmt(v['p50'])} / {_fmt(v['p95'])}")
    lines.append("  inside each task, mean ms per task:")
    for step, row in prof["time_by_step_ms"].items():
        parts = ", ".join(
            f"{k[:-3]} {v}" for k, v in row.items() if k.endswith("_ms") and k != "task_ms"
        )
        lines.append(f"    {step:12} {row['task_ms']} ms: {parts}")
    rt = prof["round_trips_per_job"]
    lines.append(
        f"  Redis round trips per job: {rt['total']} (producer {rt.get('producer')}, "
        f"worker broker {rt.get('worker_broker')}, worker job store {rt.get('worker_store')})"
    )
    for step, items in rt["by_step"].items():
        shown = ", ".join(f"{k} {v}" for k, v in items.items() if v >= 0.5)
        lines.append(f"    {step}: {shown}")
    cpu = prof.get("cpu")
    if cpu:
        lines.append(
            f"  CPU of a worker (py-spy, {cpu['samples']} samples holding the GIL), "
            "share by package:"
        )
        lines.append(
            "    "
            + ", ".join(f"{k} {v:.0%}" for k, v in cpu["self_by_package"].items() if v >= 0.02)
        )
        lines.append(
            "    inclusive: " + ", ".join(f"{k} {v:.0%}" for k, v in cpu["inclusive"].items())
        )
    base = prof.get("baseline")
    if base:
        brt = base["round_trips_per_job"]
        lines.append(
            f"  baseline ({base['jobs']} chains): Redis round trips per job {brt['total']} "
            f"(producer {brt.get('producer')}, worker broker {brt.get('worker_broker')})"
        )
        for step, items in brt["by_step"].items():
            shown = ", ".join(f"{k} {v}" for k, v in items.items() if v >= 0.5)
            lines.append(f"    {step}: {shown}")
        bcpu = base.get("cpu")
        if bcpu:
            lines.append(
                f"    CPU of a baseline worker (py-spy, {bcpu['samples']} samples): "
                + ", ".join(f"{k} {v:.0%}" for k, v in bcpu["self_by_package"].items() if v >= 0.02)
            )
    cost = [
        (name, s.get("cpu_ms_per_job", {}).get("workers"))
        for name, s in leg.get("scenarios", {}).items()
        if name in ("baseline", "no_latency")
    ]
    if cost:
        lines.append(
            "  worker CPU ms per job (scored runs, median): "
            + ", ".join(f"{name} {_fmt(v, 2)}" for name, v in cost)
        )
    return "\n".join(lines)


def targets_text(doc: dict[str, Any]) -> str:
    lines = []
    for broker, leg in _legs(doc).items():
        lines.append(f"Targets [{broker}]:")
        for t in leg["targets"]:
            value = _fmt(t["value"], 3) if t["value"] is not None else "not measured"
            lines.append(
                f"  {t['status']:4}  ({t['id']}) {t['target']}: {value} "
                f"(needs {t['op']} {t['threshold']})"
            )
    return "\n".join(lines)


def delta(previous: dict[str, Any], doc: dict[str, Any]) -> str:
    """What changed since the previous latest.json, per broker (a leg is compared with the
    previous run's leg on the same broker only), per scenario and for the API."""
    lines = [f"Change since the previous run ({previous.get('started_at', '?')}):"]
    legs = doc.get("brokers") or {"": doc}
    old_legs = previous.get("brokers") or {}
    for broker, leg in legs.items():
        old_leg = old_legs.get(broker) if broker else previous
        if not old_leg:
            lines.append(f"  [{broker}] no leg on this broker in the previous run")
            continue
        lines += [f"  [{broker}]" if broker else "", *("  " + d for d in _leg_delta(old_leg, leg))]
    return "\n".join(line for line in lines if line)


def _leg_delta(previous: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []

    def pct(new: float | None, old: float | None) -> str:
        if new is None or not old:
            return "-"
        return f"{(new - old) / old * 100:+.1f}%"

    for name, s in doc["scenarios"].items():
        old = previous.get("scenarios", {}).get(name)
        if not old:
            lines.append(f"  {name}: new")
            continue
        lines.append(
            f"  {name}: jobs/s {_fmt(old['jobs_per_s'])} -> {_fmt(s['jobs_per_s'])} "
            f"({pct(s['jobs_per_s'], old['jobs_per_s'])}), "
            f"p50 {pct(s['latency_ms']['p50'], old['latency_ms']['p50'])}, "
            f"p95 {pct(s['latency_ms']['p95'], old['latency_ms']['p95'])}, "
            f"peak RSS {pct(s['peak_rss_mb'], old['peak_rss_mb'])}"
            + (
                f", x baseline {_fmt(old.get('ratio_to_baseline', {}).get('jobs_per_s'), 2)} -> "
                f"{_fmt(s['ratio_to_baseline']['jobs_per_s'], 2)}"
                if "ratio_to_baseline" in s
                else ""
            )
        )
    if doc.get("api") and previous.get("api"):
        a, b = previous["api"], doc["api"]
        lines.append(
            f"  api: {_fmt(a['api_per_s'], 0)}/s -> {_fmt(b['api_per_s'], 0)}/s "
            f"({pct(b['api_per_s'], a['api_per_s'])}), "
            f"ratio {_fmt(a['ratio'], 2)} -> {_fmt(b['ratio'], 2)}"
        )
    rt_old = previous.get("profile", {}).get("round_trips_per_job", {}).get("total")
    rt_new = doc.get("profile", {}).get("round_trips_per_job", {}).get("total")
    if rt_old is not None and rt_new is not None:
        lines.append(f"  Redis round trips per job: {rt_old} -> {rt_new}")
    return lines


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """``latest.json``, a timestamped copy, and ``latest.png``."""
    out.mkdir(parents=True, exist_ok=True)
    latest = out / "latest.json"
    latest.write_text(json.dumps(doc, indent=2) + "\n")
    stamp = doc["started_at"].replace(":", "").replace("-", "").replace("+0000", "Z")
    copy = out / f"run-{stamp}.json"
    shutil.copyfile(latest, copy)
    paths = [latest, copy]
    png = chart(doc, out / "latest.png")
    if png is not None:
        paths.append(png)
    return paths


def targets_line(doc: dict[str, Any]) -> str:
    """Every leg's targets in one line (the chart's title): each leg's own, not the first's."""
    legs = doc.get("brokers") or {doc.get("broker", "redis"): doc}
    return "; ".join(
        f"{'RabbitMQ' if kind == 'amqp' else 'Redis'}: "
        + ", ".join(f"({t['id']}) {t['status']}" for t in leg["targets"])
        for kind, leg in legs.items()
    )


def chart(doc: dict[str, Any], path: Path) -> Path | None:
    """jobs/s, latency percentiles and peak RSS per scenario, and where a job's time goes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (uv sync --group bench): no chart")
        return None
    legs = _legs(doc)
    # One bar per scenario of each broker (named by both when there are several).
    sc = {
        (f"{broker}\n{name}" if len(legs) > 1 else name): s
        for broker, leg in legs.items()
        for name, s in leg["scenarios"].items()
    }
    names = list(sc)
    colors = ["#888888" if sc[n]["system"] == "baseline" else "#1f77b4" for n in names]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    ax.bar(names, [sc[n]["jobs_per_s"] or 0 for n in names], color=colors)
    ax.set_title("jobs per second (median of rounds)")
    for i, n in enumerate(names):
        r = sc[n].get("ratio_to_baseline", {}).get("jobs_per_s")
        if r is not None:
            ax.annotate(f"x{r:.2f}", (i, sc[n]["jobs_per_s"] or 0), ha="center", va="bottom")
    ax = axes[0][1]
    width = 0.27
    for k, p in enumerate(("p50", "p95", "p99")):
        ax.bar(
            [i + (k - 1) * width for i in range(len(names))],
            [sc[n]["latency_ms"][p] or 0 for n in names],
            width,
            label=p,
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_title("enqueue to final status, ms")
    ax.legend()
    ax = axes[1][0]
    ax.bar(names, [sc[n]["peak_rss_mb"] or 0 for n in names], color=colors)
    ax.axhline(RSS_LIMIT_MB, color="red", linestyle="--", label=f"target < {RSS_LIMIT_MB:.0f} MB")
    ax.set_title("peak RSS of a worker, MB")
    ax.legend()
    ax = axes[1][1]
    ours = [n for n in names if "segments_ms" in sc[n]]
    bottoms = [0.0] * len(ours)
    segment_names = list(sc[ours[0]]["segments_ms"]) if ours else []
    for seg in segment_names:
        values = [sc[n]["segments_ms"].get(seg, {}).get("p50") or 0 for n in ours]
        ax.bar(ours, values, bottom=bottoms, label=seg)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_title("where a job's time goes (p50 of each stretch, ms)")
    if segment_names:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Cancelflow bench {doc['started_at']}: {doc['config']['jobs']} jobs x "
        f"{doc['config']['rounds']} rounds, {doc['machine']['cpus']} CPUs\n{targets_line(doc)}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
