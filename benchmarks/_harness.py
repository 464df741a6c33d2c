"""Shared benchmark plumbing: each configuration runs in a fresh subprocess (the script re-invoked with
a hidden `--only CONFIG`) so one's allocations cannot hide or inflate another's memory numbers.

Peak memory = peak resident memory (RSS) increase during the timed calls: RSS just before timing is
subtracted from the kernel's peak counter (VmHWM), which is reset first via /proc/self/clear_refs;
elsewhere it falls back to the growth of getrusage's ru_maxrss, which can read 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable


def make_logger(prefix: str) -> Callable[[str], None]:
    return lambda msg: print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)


def _maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def measure(step: Callable[[], object], *, name: str, warmup: int, repeats: int, log, device: str = "cpu") -> dict:
    """Time `repeats` calls of `step` after `warmup` untimed ones; wall and process CPU time, peak RSS.
    On CUDA each call is synchronised and `peak_growth_mib` is the caching allocator's peak over the timed
    calls minus what was allocated before them (on the CPU: the peak RSS increase)."""
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    rss_before, maxrss_before = _proc_status_mib("VmRSS"), _maxrss_mib()
    reset = rss_before is not None and _reset_peak_rss()
    times, cpu_times = [], []
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del out
        log(f"{name}: repeat {i + 1}/{repeats} {times[-1]:.2f}s")
    hwm = _proc_status_mib("VmHWM") if reset else None
    rss_growth = hwm - rss_before if hwm is not None else _maxrss_mib() - maxrss_before
    gpu_growth = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20 if cuda else None
    return {"config": name, "device": device, "median_s": statistics.median(times), "mean_s": statistics.mean(times),
            "times_s": times, "peak_growth_mib": gpu_growth if cuda else rss_growth, "peak_gpu_growth_mib": gpu_growth,
            "median_cpu_s": statistics.median(cpu_times),  # process CPU time: less sensitive to other load
            "peak_rss_growth_mib": rss_growth,
            "peak_rss_method": "VmHWM-reset" if reset else "ru_maxrss-delta",
            "total_peak_rss_mib": _maxrss_mib(), "threads": torch.get_num_threads()}


def run_worker(args, run_config: Callable, run_check: Callable) -> bool:
    """In a `--only` subprocess: run one configuration, print its JSON line, return True."""
    if not args.only:
        return False
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run_check(args) if args.only == "check" else run_config(args.only, args)), flush=True)
    return True


def parse_args(ap, configs) -> "argparse.Namespace":
    """Add the options every benchmark has (warmup, repeats, threads, the hidden --only) and parse."""
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--only", choices=(*configs, "check"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def run_all(script: str, names, args, log) -> dict:
    """Run every configuration (and "check") in its own subprocess with the same options; collect
    their JSON lines."""
    def flag(k, v):  # booleans are argparse.BooleanOptionalAction flags: --name / --no-name
        name = k.replace("_", "-")
        return (f"--{name}" if v else f"--no-{name}") if isinstance(v, bool) else f"--{name}={v}"

    passthrough = [flag(k, v) for k, v in vars(args).items() if k != "only" and v is not None]
    results = {}
    for name in (*names, "check"):
        log(f"running {name} in a subprocess")
        proc = subprocess.run([sys.executable, script, *passthrough, f"--only={name}"], stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed with exit code {proc.returncode}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results
