"""bench.md and the PNG plots from bench.json's document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchship.bench.inprocess import LABELS, VARIANTS
from torchship.bench.served import UNBATCHED


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# torchship benchmarks",
        "",
        f"{m['date']}, {m['cores']} cores ({m['cpu']}), torch {m['torch']}, {m['threads']} threads, Python {m['python']}"
        + (" — QUICK mode (counts too small to read speed from)" if doc["quick"] else ""),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['value']:.2f} {t['unit']} | {'yes' if t['met'] else 'no'} |" for t in doc["targets"]]
    lines += ["", "## Formats in-process (p50 ms; speedup over eager in the same run)", ""]
    for label in sorted({r["workload"] for r in doc["inprocess"]}):
        rows = [r for r in doc["inprocess"] if r["workload"] == label]
        batches = sorted({r["batch"] for r in rows})
        lines += [f"### {label}", "", "| variant | " + " | ".join(f"batch {b}" for b in batches) + " | verified |",
                  "|---|" + "---|" * len(batches) + "---|"]  # fmt: skip
        for v in VARIANTS:
            cells = {r["batch"]: r for r in rows if r["variant"] == v}
            if not cells:
                continue
            text = [f"{cells[b]['p50_ms']:.2f} ({cells[b]['speedup_vs_eager']:.2f}x)" if b in cells else "-" for b in batches]
            ok = all(c["verified"] for c in cells.values())
            lines.append(f"| {LABELS[v]} | " + " | ".join(text) + f" | {'yes' if ok else 'NO'} |")
        lines.append("")
    if doc.get("cpp"):
        lines += ["## The C++ loader (simple_cnn, 3x224x224; the file as it is, no optimize_for_inference)", "",
                  "| format | batch | C++ p50 ms | Python p50 ms (same file) | C++ / Python |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in doc["cpp"]:
            lines.append(f"| {r['format']} | {r['batch']} | {r['cpp_p50_ms']:.2f} | {r['python_p50_ms']:.2f} "
                         f"| {r['cpp_p50_ms'] / r['python_p50_ms']:.2f}x |")  # fmt: skip
        lines.append("")
    srv = doc["served"]
    base = srv["inprocess"]
    lines += ["## Served", "", f"Workload: {srv['workload']}. In-process on the same artifact: batch 1 p50 "
              f"{base['batch1_p50_ms']:.2f} ms, batch 8 {base['batch8_rows_per_s']:.1f} img/s.", "",
              "| engine | cold start to first correct answer | resident memory | batch 1 p50 / p99 | overhead p50 |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, e in srv["engines"].items():
        s = e["sequential"]
        memory = f"{e['rss_mib']:.0f} MiB" + (f" ({e['endpoints']} endpoints, {e['rss_per_endpoint_mib']:.0f} MiB each)"
                                               if "endpoints" in e else "")  # fmt: skip
        lines.append(f"| {name} | {e['cold_start_s']:.1f} s | {memory} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} ms "
                     f"| {s['overhead_p50_ms']:.2f} ms |")  # fmt: skip
    lines += breakdown_table(srv["engines"])
    lines += sweep_table(srv["engines"])
    lines += peer_table(srv["engines"])
    lines += foreign_table(srv.get("foreign", {}))
    lines += models_table(srv["engines"])
    lines += ray_sweep_table(srv["engines"])
    lines += outside_table(srv.get("outside"), srv["engines"], base["batch8_rows_per_s"])
    lines += design_table(srv.get("design", []))
    lines += profile_table(srv["engines"])
    lines += ["", "| engine | batching | clients | img/s | p50 ms | p99 ms | requests | verified | errors | wrong |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in srv["engines"].items():
        for t in e["throughput"]:
            mode = "on" if t["batching"] else "off"
            lines.append(f"| {name} | {mode} | {t['clients']} | {t['rows_per_s']:.1f} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} "
                         f"| {t['requests']} | {t['verified']} | {t['errors']} | {t['wrong']} |")  # fmt: skip
    lines += ["", "| engine | body | size | p50 ms | JSON / binary |", "|---|---|---|---|---|"]
    for name, e in srv["engines"].items():
        lb = e["large_body"]
        ratio = lb["json"]["p50_ms"] / lb["binary"]["p50_ms"]
        for enc in ("json", "binary"):
            lines.append(f"| {name} | {enc} | {lb[enc]['body_bytes'] / 2**20:.1f} MiB | {lb[enc]['p50_ms']:.0f} | {ratio:.1f}x |")
    lines += observe_table(doc.get("observe"))
    if doc.get("dashboard"):
        d = doc["dashboard"]
        counts = "; ".join(
            f"{engine}: " + ", ".join(f"{n} {k}" for k, n in sorted(o.items())) for engine, o in d["outcomes"].items()
        )
        lines += ["", f"The dashboard's panels from a real run ({d['endpoint']}, each engine alone, checked load: {counts}): "
                  "bench/dashboard.png."]  # fmt: skip
    lines += ["", f"Run time: {doc['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def breakdown_table(engines: dict[str, Any]) -> list[str]:
    """One request, sequential, batch 1: where its milliseconds go (p50 per phase; TorchServe's front end and queue
    are its own counters' means over the same requests)."""
    lines = ["", "### Where one request's time goes (batch 1, sequential, p50 ms)", "",
             "client = the whole request as the client saw it; outside = client minus the server's own total (HTTP on "
             "both sides; on Ray also the proxy hop); engine = server total minus the handler's call (TorchServe: front "
             "end, queue incl. batch window, IPC; Ray: ingress-to-replica routing incl. batch window); queue = "
             "TorchServe's queue latency; decode/model/encode/handler = the handler's own Server-Timing; in-process = the "
             "same forward pass in the bench process.", "",
             "| engine | endpoint | request | client | outside | engine | queue | handler | decode | model | encode "
             "| in-process | overhead | wrong |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in engines.items():
        for r in e.get("breakdown", []):
            cells = [_ms(r, k) for k in ("client_ms", "outside_server_ms", "engine_ms", "queue_ms", "handler_ms",
                                         "decode_ms", "model_ms", "encode_ms", "inprocess_model_ms", "overhead_ms")]  # fmt: skip
            lines.append(f"| {name} | {r['endpoint']} | {r['case']} | " + " | ".join(cells) + f" | {r['wrong']} |")
    return lines


def peer_table(engines: dict[str, Any]) -> list[str]:
    """torchship next to the stock peer on the same engine, same model file, same run (OIP v2 JSON: all the peers
    read), plus torchship's binary body."""
    lines = ["", "### Against the stock peers (same frozen file; the peer is what each engine's docs lead a user to)", "",
             "| engine | server | 3x32x32 JSON batch 1 p50 ms | overhead ms | 3x224x224 JSON img/s (clients) | errors | wrong |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in engines.items():
        for who, runs in (("stock", e.get("peer")), ("torchship", e.get("json"))):
            if not runs:
                continue
            seq, load = runs["sequential_json32"], runs["clients_json224"]
            errors, wrong = seq["errors"] + load["errors"], seq["wrong"] + load["wrong"]
            lines.append(f"| {name} | {who} | {seq['p50_ms']:.2f} | {seq['overhead_p50_ms']:.2f} | {load['rows_per_s']:.1f} "
                         f"({load['clients']}) | {errors} | {wrong} |")  # fmt: skip
    return lines


def observe_table(observe: dict[str, Any] | None) -> list[str]:
    """Parity before ready (start-up cost, first request) and the metrics' cost per request."""
    if not observe:
        return []
    lines = ["", "## Parity in production (in-process, the endpoint core both engines run)", "",
             "| endpoint | format | load with check | the check | cases | worst abs diff | request 1 / 10 after it "
             "| the artifact unchecked: call 1 / 10 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in observe["startup"]:
        lines.append(f"| {r['endpoint']} | {r['format']} | {r['load_ms']:.0f} ms | {r['check_ms']:.0f} ms | {r['cases']} "
                     f"| {r['worst_abs']:.2g} | {r['first_ms']:.2f} / {r['warm_ms']:.2f} ms "
                     f"| {r['unchecked_first_ms']:.2f} / {r['unchecked_warm_ms']:.2f} ms |")  # fmt: skip
    m = observe["metrics"]
    lines += ["", f"Metrics on {m['endpoint']}, {m['requests']} batch-1 requests each, alternating: p50 "
              f"{m['on_p50_ms']:.4f} ms on, {m['off_p50_ms']:.4f} ms off: {m['cost_ms'] * 1000:+.1f} us per request "
              f"(means {m['on_mean_ms']:.4f} / {m['off_mean_ms']:.4f} ms)."]  # fmt: skip
    return lines


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def foreign_table(foreign: dict[str, Any]) -> list[str]:
    """The stock handler's archive (not built by torchship) alone on each engine: TorchServe natively, Ray Serve through
    torchship's TorchServe worker."""
    if not foreign:
        return []
    apart = all("rss_mib" in runs for runs in foreign.values())
    where = "alone on each engine" if apart else "in each engine's main start (quick: no memory of its own)"
    lines = ["", f"### A .mar torchship did not build (the stock handler's archive), {where}", "",
             "| engine | 3x32x32 JSON batch 1 p50 ms | overhead ms | 3x224x224 JSON img/s (clients) | resident memory "
             "| errors | wrong |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in foreign.items():
        seq, load = runs["sequential_json32"], runs["clients_json224"]
        errors, wrong = seq["errors"] + load["errors"], seq["wrong"] + load["wrong"]
        lines.append(f"| {name} | {seq['p50_ms']:.2f} | {seq['overhead_p50_ms']:.2f} | {load['rows_per_s']:.1f} "
                     f"({load['clients']}) | {_mib(runs.get('rss_mib'))} | {errors} | {wrong} |")  # fmt: skip
    if {"torchserve", "ray"} <= set(foreign):
        ts, ray = foreign["torchserve"], foreign["ray"]

        def ratio(key: str, field: str) -> float:
            return float(ray[key][field]) / max(float(ts[key][field]), 1e-9)

        lines += [
            "",
            f"Ray Serve / TorchServe: batch-1 overhead {ratio('sequential_json32', 'overhead_p50_ms'):.2f}x, "
            f"throughput {ratio('clients_json224', 'rows_per_s'):.2f}x"
            + (f", memory {ray['rss_mib'] / ts['rss_mib']:.2f}x." if apart else "."),
        ]
    return lines


def sweep_table(engines: dict[str, Any]) -> list[str]:
    lines = ["", "### Dynamic batching sweep (the same archive under each model config; torch threads 0 = every core; "
             "queue = jobQueueSize, shed = answered 503 at once because the queue was full)",
             "", "| engine | endpoint | batchSize | maxBatchDelay ms | torch threads | queue | clients | img/s | p50 ms "
             "| p99 ms | shed | errors | wrong |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in engines.items():
        for r in e.get("sweep", []):
            lines.append(f"| {name} | {r['endpoint']} | {r['batchSize']} | {r['maxBatchDelay']} | {r['torchThreads'] or 'all'} "
                         f"| {r.get('jobQueueSize') or '-'} | {r['clients']} | {r['rows_per_s']:.1f} | {r['p50_ms']:.1f} "
                         f"| {r['p99_ms']:.1f} | {r.get('shed', 0)} | {r['errors']} | {r['wrong']} |")  # fmt: skip
    return lines


def models_table(engines: dict[str, Any]) -> list[str]:
    rows = [(name, r) for name, e in engines.items() for r in e.get("models", [])]
    if not rows:
        return []
    lines = ["", "### More models (each one's default endpoint; binary bodies, batch 1, every answer checked)", "",
             "| engine | endpoint | format | in-process p50 ms | served p50 / p99 ms | overhead p50 ms | rows/s (clients) "
             "| errors | wrong |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows:
        seq, load = r["sequential"], r["load"]
        lines.append(f"| {name} | {r['endpoint']} | {r['format']} | {r['inprocess_p50_ms']:.2f} | {seq['p50_ms']:.2f} / "
                     f"{seq['p99_ms']:.2f} | {r['overhead_p50_ms']:.2f} | {load['rows_per_s']:.1f} ({r['clients']}) "
                     f"| {seq['errors'] + load['errors']} | {seq['wrong'] + load['wrong']} |")  # fmt: skip
    return lines


def outside_table(outside: dict[str, Any] | None, engines: dict[str, Any], batched_rows_per_s: float) -> list[str]:
    """LitServe and PyTriton next to torchship on both engines: batch-1 overhead and 16-client throughput, each
    against the in-process speed of the model it serves."""
    if not outside:
        return []
    inp = outside["inprocess"]
    lines = ["", "### Against the servers a user would pick instead (the same frozen file; each one's batching)", "",
             f"The peers load the frozen file as it is: in-process {inp['batch_rows_per_s']:.1f} img/s at batch {inp['batch']} "
             f"(torchship serves its optimized format: {batched_rows_per_s:.1f} img/s at batch 8).", "",
             "| server | body | overhead p50, batch 1 3x32x32 | clients | img/s, 3x224x224 | x in-process batched "
             "| errors / wrong |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    if "failed" in outside:
        return [*lines, f"| LitServe, PyTriton | | not run: {outside['failed']} | | | | |"]
    for row in outside["peers"]:
        if "failed" in row:
            lines.append(f"| {row['peer']} | | not run: {row['failed']} | | | | |")
            continue
        seq, load = row["sequential"], row["load"]
        lines.append(f"| {row['peer']} | {row['body']} | {row['overhead_p50_ms']:.2f} ms | {row['clients']} "
                     f"| {load['rows_per_s']:.1f} | {row['x_inprocess_batched']:.2f}x "
                     f"| {seq['errors'] + load['errors']} / {seq['wrong'] + load['wrong']} |")  # fmt: skip
    clients = next((r["clients"] for r in outside["peers"] if "clients" in r), None)
    for name, e in engines.items():
        small = next((r for r in e.get("breakdown", []) if r["endpoint"] == UNBATCHED and r["hw"] == 32
                      and r["binary"]), None)  # fmt: skip
        tp = next((t for t in e["throughput"] if t["batching"] and t["clients"] == clients), None)
        if small is not None and tp is not None:
            lines.append(f"| torchship on {name} | binary | {small['overhead_ms']:.2f} ms | {clients} | {tp['rows_per_s']:.1f} "
                         f"| {tp['rows_per_s'] / batched_rows_per_s:.2f}x | {tp['errors']} / {tp['wrong']} |")  # fmt: skip
    return lines


def design_table(rows: list[dict[str, Any]]) -> list[str]:
    """Ray Serve's design space (bench/design.py), one Ray start per variant, the same store and requests."""
    if not rows:
        return []
    clients = [r["clients"] for r in next((row["load"] for row in rows if "load" in row), [])]
    heads = " | ".join(f"{c} clients, img/s (x in-process batched; x own peak)" for c in clients)
    lines = ["", "### Ray Serve's design space (each variant in a Ray start of its own; two endpoints; binary bodies)", "",
             f"| variant | how | overhead p50, batch 1 3x32x32 | {heads} | resident memory | errors / wrong |",
             "|---|---|---|" + "---|" * len(clients) + "---|---|"]  # fmt: skip
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['variant']} | {row['note']} | did not start: {row['failed']} |" + " |" * (len(clients) + 2))
            continue
        loads = " | ".join(
            f"{t['rows_per_s']:.0f} ({t['x_inprocess_batched']:.2f}x; {t['x_own_peak']:.2f}x)" for t in row["load"]
        )
        bad = [sum(t[k] for t in [row["sequential"], *row["load"]]) for k in ("errors", "wrong")]
        lines.append(f"| {row['variant']} | {row['note']} | {row['overhead_p50_ms']:.2f} ms | {loads} | {row['rss_mib']:.0f} MiB "
                     f"| {bad[0]} / {bad[1]} |")  # fmt: skip
    for row in [r for r in rows if "processes_mib" in r and (r is rows[0] or r.get("default"))]:
        parts = ", ".join(f"{name} {mib:.0f}" for name, mib in row["processes_mib"].items())
        lines += ["", f"Resident MiB per process, {row['variant']}: {parts}."]
    for row in rows:
        lines += [line for note in row.get("notes", []) for line in ("", f'{row["variant"]}: Ray said "{note}"')]
    return lines


def ray_sweep_table(engines: dict[str, Any]) -> list[str]:
    rows = engines.get("ray", {}).get("ray_sweep", [])
    if not rows:
        return []
    lines = ["", "### Ray Serve deployment settings (the same archive and model config; batching on)", "",
             "| endpoint | replicas | max_ongoing_requests | clients | img/s | p50 ms | p99 ms | errors | wrong |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['endpoint']} | {r['num_replicas']} | {r['max_ongoing_requests']} | {r['clients']} "
                     f"| {r['rows_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} "
                     f"| {r['wrong']} |")  # fmt: skip
    return lines


def profile_table(engines: dict[str, Any]) -> list[str]:
    """py-spy's samples per process: how much of a core each Python process used, and its hottest functions."""
    lines: list[str] = []
    for name, e in engines.items():
        prof = e.get("profile")
        if not prof:
            continue
        if "error" in prof:
            lines += ["", f"{name}: no py-spy profile ({prof['error']})"]
            continue
        lines += ["", f"### {name}: py-spy, {prof['seconds']:.0f} s of sequential batch-1 requests ({prof['requests']} "
                  f"requests, p50 {prof['p50_ms']:.2f} ms, wrong {prof['wrong']}), {prof['rate_hz']} samples/s", "",
                  "| process | on-CPU (cores) | hottest functions (share of the process's samples) |",
                  "|---|---|---|"]  # fmt: skip
        for row in prof["processes"][:8]:
            top = "; ".join(f"{t['function']} {t['share']:.0%}" for t in row["top"][:4]).replace("|", "/")
            lines.append(f"| {row['process']} | {row['cpu_share']:.2f} | {top} |")
    return lines


def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    labels = sorted({r["workload"] for r in doc["inprocess"]})
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        rows = [r for r in doc["inprocess"] if r["workload"] == label]
        batches = sorted({r["batch"] for r in rows})
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ys = [next((r["speedup_vs_eager"] for r in rows if r["variant"] == v and r["batch"] == b), 0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], ys, width, label=LABELS[v])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(label)
        ax.set_ylabel("speedup over eager (p50)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "inprocess_speedup.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    srv = doc["served"]
    for name, e in srv["engines"].items():
        for batching in (True, False):
            pts = [t for t in e["throughput"] if t["batching"] is batching]
            ax.plot([t["clients"] for t in pts], [t["rows_per_s"] for t in pts], marker="o",
                    linestyle="-" if batching else "--", label=f"{name}, batching {'on' if batching else 'off'}")  # fmt: skip
    ax.axhline(srv["inprocess"]["batch8_rows_per_s"], color="gray", linestyle=":", label="in-process, batch 8")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images / s (every answer checked)")
    ax.set_title(srv["workload"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "served_throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(srv["engines"])
    seq = [srv["engines"][n]["sequential"]["p50_ms"] for n in names]
    ax.bar(["in-process", *names], [srv["inprocess"]["batch1_p50_ms"], *seq], color=["gray", "C0", "C1"][: len(names) + 1])
    ax.set_ylabel("batch 1 latency p50 (ms)")
    ax.set_title("per-request overhead, sequential requests")
    fig.tight_layout()
    written.append(out / "served_latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # The batching curve: each model config's throughput against its median latency, at the most clients swept.
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, e in srv["engines"].items():
        most = max((r["clients"] for r in e.get("sweep", [])), default=0)
        pts = sorted((r for r in e.get("sweep", []) if r["clients"] == most), key=lambda r: r["p50_ms"])
        ax.plot([r["p50_ms"] for r in pts], [r["rows_per_s"] for r in pts], marker="o", label=f"{name}, {most} clients")
        for r in pts:
            ax.annotate(_config_label(r), (r["p50_ms"], r["rows_per_s"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("latency p50 (ms)")
    ax.set_ylabel("images / s (every answer checked)")
    ax.set_title("dynamic batching: batchSize / maxBatchDelay ms / torch threads", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "batching_curve.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def _config_label(row: dict[str, Any]) -> str:
    return f"b{row['batchSize']}/d{row['maxBatchDelay']}/t{row['torchThreads'] or 'all'}"
