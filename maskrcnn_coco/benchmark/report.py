"""The report: the default JSON path, the headline numbers (``summarize``: the JSON's ``summary``) and
the printed summary of a benchmark's results."""

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


def _median(stats: dict[str, Any] | None) -> float | None:
    return (stats or {}).get("median")


def summarize(report: dict[str, Any], budget_s: float | None = None) -> dict[str, Any]:
    """The headline numbers of ``report`` in one flat place (the GPU-ready check reads these): per amp
    mode ours and bare images/s and their ratio, bit-identity and peak GPU memory (MiB, null on CPU) or
    why the mode was skipped; the loader's wait share; the evaluation ratio; JPEG images/s per decoder;
    the checkpoint's save time and size; the elapsed time against ``budget_s``. A section that did not
    run gives nulls."""
    train: dict[str, Any] = {}
    for label, entry in (report.get("train") or {}).items():
        if "skipped" in entry:
            train[label] = {"skipped": entry["skipped"]}
            continue
        peaks = entry.get("peak_memory_mb") or {}
        train[label] = {"ours_images_per_s": _median(entry["ours"].get("images_per_s")),
                        "bare_images_per_s": _median(entry["bare"].get("images_per_s")),
                        "ours_over_bare_wall": _median(entry["ratio"]["wall"]),
                        "ours_over_bare_cpu": _median(entry["ratio"]["cpu"]),
                        "bit_identical": entry["bit_identical"], "peak_memory_mb": max(peaks.values()) if peaks else None}
    peaks = [t["peak_memory_mb"] for t in train.values() if t.get("peak_memory_mb") is not None]
    data = report.get("data") or {}
    compute = data.get("with_compute") or {}
    ev = report.get("eval") or {}
    jpeg = report.get("jpeg") or {}
    ckpt = report.get("checkpoint") or {}
    elapsed = report["meta"].get("elapsed_s")
    return {
        "device": report["meta"]["device"], "device_name": report["meta"]["device_name"], "model": report["meta"]["model"],
        "image_size": report["meta"]["image_size"], "batch_size": report["meta"]["batch_size"],
        "train": train,
        "peak_memory_mb": max(peaks) if peaks else None,
        "data_workers": data.get("num_workers"),
        "data_wait_share": compute.get("share", data.get("fraction")),
        "data_loader_images_per_s": (data.get("loader_only") or {}).get("images_per_s"),
        "eval_ratio_wall": _median((ev.get("ratio") or {}).get("wall")),
        "eval_ratio_cpu": _median((ev.get("ratio") or {}).get("cpu")),
        "eval_metrics_equal": ev.get("metrics_equal"),
        "jpeg_images_per_s": {name: {"wall": _median(jpeg[name]["images_per_s"]),
                                     "cpu": _median(jpeg[name]["images_per_cpu_s"])}
                              for name in ("pil", "decode_jpeg") if name in jpeg} or None,
        "jpeg_faster": (jpeg.get("faster") or {}).get("cpu"),
        "checkpoint_save_s": _median((ckpt.get("save") or {}).get("wall")),
        "checkpoint_mb": ckpt.get("file_mb"),
        "elapsed_s": elapsed,
        "budget_s": budget_s,
        "within_budget": None if budget_s is None or elapsed is None else elapsed <= budget_s,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Benchmark on {report['meta']['device']} ({report['meta']['threads']} threads), "
             f"{report['meta']['iters']} iterations x {report['meta']['repeats']} repeats; median [min..max]"]
    for label, entry in (report.get("train") or {}).items():
        if "skipped" in entry:
            lines.append(f"train {label:<22} skipped: {entry['skipped']}")
            continue
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
        if entry.get("peak_memory_mb"):
            peaks = ", ".join(f"{k} {v:.0f} MiB" for k, v in entry["peak_memory_mb"].items())
            lines.append(f"      peak GPU memory: {peaks}")
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
    if data and "loader_only" in data:
        lo, wc = data["loader_only"], data.get("with_compute")
        wait = (f"; after each {wc['mode']} iteration ({wc['iteration_s']:.3f} s) the loop waits "
                f"{1e3 * wc['mean_wait_s']:.1f} ms = {100 * wc['share']:.1f}% of an iteration" if wc else "")
        lines.append(f"data ({data['loader']}, {data['num_workers']} workers, batch {data['batch_size']}): "
                     f"first batch {data['first_batch_s']:.2f} s, loader alone {lo['images_per_s']:.1f} img/s "
                     f"({lo['images_per_s_per_worker']:.1f} per worker){wait}")
    jp = report.get("jpeg")
    if jp:
        rates = {n: f"{_fmt(jp[n]['images_per_s'], ' img/s', 0)} (cpu {_fmt(jp[n]['images_per_cpu_s'], '', 0)})"
                 for n in ("pil", "decode_jpeg")}
        lines.append(f"jpeg ({jp['files']} files {jp['file_kb']['min']:.0f}-{jp['file_kb']['max']:.0f} kB, 1 thread): "
                     f"PIL {rates['pil']}, decode_jpeg {rates['decode_jpeg']}; decode_jpeg x{jp['faster']['speedup_cpu']:.2f} "
                     f"cpu, x{jp['faster']['speedup_wall']:.2f} wall; pixels max |diff| {jp['max_abs_diff']}")
    ck = report.get("checkpoint")
    if ck:
        lines.append(f"checkpoint ({ck['model']}, {ck['file_mb']:.1f} MiB: weights {ck['weights_mb']:.1f}, "
                     f"optimizer {ck['optimizer_mb']:.1f}): snapshot {_fmt(ck['snapshot']['wall'], ' s')}, "
                     f"save {_fmt(ck['save']['wall'], ' s')}, last.pth copy {_fmt(ck['copy_last']['wall'], ' s')}")
    su = report.get("summary")
    if su and su.get("elapsed_s") is not None:
        met = "met" if su["within_budget"] else "NOT met"
        budget = f" (budget {su['budget_s']:.0f} s: {met})" if su.get("budget_s") else ""
        lines.append(f"elapsed {su['elapsed_s']:.1f} s{budget}")
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
