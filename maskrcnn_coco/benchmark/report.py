"""The report: the default JSON path and the printed summary of a benchmark's results."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any


def default_output() -> Path:
    return Path("runs") / "benchmark" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.json"


def _fmt(stats: dict[str, Any] | None, unit: str = "", digits: int = 3) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return f"{stats['median']:.{digits}f}{unit} [{stats['min']:.{digits}f}..{stats['max']:.{digits}f}]"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Benchmark on {report['meta']['device']} ({report['meta']['threads']} threads), "
             f"{report['meta']['iters']} iterations x {report['meta']['repeats']} repeats; median [min..max]"]
    for label, entry in (report.get("train") or {}).items():
        lines.append(
            f"train {label:<22} ours {_fmt(entry['ours'].get('images_per_s'), ' img/s', 2)}  bare {_fmt(entry['bare'].get('images_per_s'), ' img/s', 2)}"
            f"  ratio wall {_fmt(entry['ratio']['wall'])} cpu {_fmt(entry['ratio']['cpu'])}  bit-identical: {entry['bit_identical']}")
        if "overhead" in entry:
            o = entry["overhead"]
            lines.append(f"      GradNormMeter.update {o['grad_norm_update_ms']:.1f} ms = x{o['estimated_ratio_every_1']:.4f} of a bare "
                         f"iteration every iteration, x{o['estimated_ratio']:.4f} every {o['grad_norm_every']}")
        if "hooks_us_per_iteration" in entry:
            h = entry["hooks_us_per_iteration"]
            lines.append(f"      default hooks per iteration: {h['default_hooks']:.0f} us (their work + dispatch; gradient norms "
                         f"every {report['meta']['grad_norm_every']}), dispatch alone {h['dispatch_only']:.1f} us")
        if "iteration_log" in entry:
            il = entry["iteration_log"]
            workers = (f"; {il['workers']} loader workers' memory {il['workers_memory_us']['cpu'] / 1e3:.1f} ms cpu a read, "
                       f"at most {100 * il['workers_share']:.1f}% of the time" if "workers_memory_us" in il else "")
            lines.append(f"      iteration log per read-back: {il['read_back_us']['wall']:.0f} us wall, {il['read_back_us']['cpu']:.0f} us cpu "
                         f"(main memory {il['main_memory_us']['cpu']:.0f} us) = x{il['estimated_ratio']:.5f} of a bare iteration "
                         f"every {il['print_freq']}{workers}")
        if "speedup_vs_off" in entry:
            lines.append(f"      {label} vs off (ours): wall x{_fmt(entry['speedup_vs_off']['wall'])} cpu x{_fmt(entry['speedup_vs_off']['cpu'])}")
    ev = report.get("eval")
    if ev:
        lines.append(f"eval ({ev['backend']}, {ev['images']} images, {ev['detections']} detections): ours {_fmt(ev['ours']['wall'], ' s')} "
                     f"(cpu {_fmt(ev['ours']['cpu'], ' s')}), bare {_fmt(ev['bare']['wall'], ' s')} (cpu {_fmt(ev['bare']['cpu'], ' s')}); "
                     f"ratio wall {_fmt(ev['ratio']['wall'])} cpu {_fmt(ev['ratio']['cpu'])}; metrics equal: {ev['metrics_equal']}")
        st = ev.get("stages") or {}
        parts = ", ".join(f"{n} {v['wall']['median']:.3f}" for n, v in st.items() if isinstance(v, dict) and "wall" in v)
        lines.append(f"      stages (wall s over {ev['images']} images): {parts}")
        if st.get("losses_over_rest", {}).get("median") is not None:
            lines.append(f"      the val losses' own stages are x{st['losses_over_rest']['median']:.3f} of the rest: "
                         f"no exact val loss can bring the ratio below {1 + st['losses_over_rest']['median']:.3f}")
    data = report.get("data")
    if data and "per_batch" in data:
        frac = data.get("fraction")
        lines.append(f"data ({data['num_workers']} workers): {_fmt(data['per_batch']['wall'], ' s')} per batch"
                     + (f", {100 * frac:.1f}% of an iteration" if frac is not None else ""))
    ce = report.get("cocoeval")
    if ce:
        parts = ", ".join(f"{b} {_fmt(t['wall'], ' s')} (cpu {_fmt(t['cpu'], ' s')})" for b, t in ce["backends"].items())
        lines.append(f"COCOeval on {ce['detections']} detections: {parts}; identical: {ce['identical']}")
    opt = report.get("optimizer")
    if opt:
        parts = ", ".join(f"{k} {1e3 * v['step']['wall']['median']:.1f} ms" for k, v in opt.items()
                          if isinstance(v, dict) and "step" in v)
        lines.append(f"optimizer step ({opt['parameters'] / 1e6:.1f}M parameters): {parts}")
    return "\n".join(lines)
