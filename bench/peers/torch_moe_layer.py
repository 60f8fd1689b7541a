#!/usr/bin/env python3
"""The PyTorch MoE-layer peer of `moe-bench bench --layer`, timed on the same card.

Forward: gate x @ W_gate (bf16) -> fp32 softmax -> top-k (weights renormalised over the kept k)
-> stable argsort of the chosen experts (permute: index_select of the tokens) -> torch._grouped_mm
up-projection (E, 2I, H weights, passed transposed) -> SwiGLU silu(gate) * up -> torch._grouped_mm
down-projection -> index_add combine of the weighted rows into y. bf16 storage, dropless.
No auxiliary loss (ours adds the softmax_topk balance and z-loss terms; the peer does less work).

The per-expert loop (*_loop_*): the same routing, then a Python loop over the experts, each
taking its rows with index_select, two F.linear and SwiGLU, and adding its weighted rows into y
with index_add_ -- the way many MoE codebases write the layer (an expert module per expert, so
each expert's weights are their own tensors: indexing one stacked parameter instead would make
autograd add a full-size gradient per expert); the row counts come to the host once per call (a
synchronisation the grouped form does not have).

fwd: the forward under torch.no_grad(). fwd_bwd: forward with autograd, then y.backward(dy) into
x.grad and the three weights' .grad (allocated by a warm-up step before measuring), so autograd
adds into them; fwd_bwd_fresh: the same with every .grad set to None first (zero_grad's default),
so backward writes fresh gradients, as ours with the expert weight gradients overwritten.
FLOPs: forward 6*T*K*H*I, fwd+bwd 3x that (the gate not counted), as ours.
Peak memory: torch.cuda.max_memory_allocated() during one forward+backward minus
torch.cuda.memory_allocated() before it (inputs, weights and their .grad buffers excluded).
Method: CUDA events around each run, warm-up first, median of --reps runs. One JSON object per line.
Clocks: where the driver's NVML loads, the median SM clock and the share of samples in which the
driver names its power cap, under the forward and the fresh forward+backward loops (sm_clock_mhz,
power_capped_share, clock_samples), read every 2 ms as moe-bench bench --layer reads them, and the
board's energy per run and mean power of the forward and the fresh step (energy_per_run_j,
mean_power_w) from a second of each after all timed loops, as moe-bench's energy loops.

  python3 bench/peers/torch_moe_layer.py --build build/gg --out peer_layer.jsonl
  python3 bench/peers/torch_moe_layer.py --shape 16384,2048,1408,64,6   # as moe-bench's --shape
"""
import argparse
import contextlib
import ctypes
import datetime
import json
import os
import re
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

CONFIGS = {
    "olmoe": (16384, 2048, 1024, 64, 8),
    "qwen3": (16384, 2048, 768, 128, 8),
    "qwen3_32k": (32768, 2048, 768, 128, 8),
    "mixtral": (8192, 4096, 14336, 8, 2),
    "brief_small": (8192, 1024, 4096, 16, 2),
    "decode": (64, 2048, 768, 128, 8),
    "lm_gpu": (8192, 512, 1024, 16, 2),
}


def parse_shape(text):
    """T,H,I,E,K -> (name, shape), the name moe-bench bench --layer --shape gives it."""
    try:
        v = [int(f) for f in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not five integers T,H,I,E,K")
    if len(v) != 5 or min(v) < 1 or v[4] > v[3]:
        raise argparse.ArgumentTypeError(f"{text}: expected T,H,I,E,K, positive, K <= E")
    T, H, I, E, K = v
    return f"T{T}_H{H}_I{I}_E{E}_K{K}", tuple(v)


def git_revision(build_dir):
    try:
        text = open(os.path.join(build_dir, "generated", "moe_build_info.hpp")).read()
        return re.search(r'MOE_GIT_REVISION "([^"]*)"', text).group(1)
    except (OSError, AttributeError):
        return "unknown"


def route(x, wg, K):
    """Softmax top-k, weights renormalised over the kept k, choices sorted by expert (stable):
    each sorted choice's token, its weight, and the number of choices per expert."""
    E = wg.shape[1]
    probs = torch.softmax((x @ wg).float(), dim=-1)
    topw, topi = probs.topk(K, dim=-1)
    topw = topw / topw.sum(dim=-1, keepdim=True)
    flat = topi.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order // K, topw.reshape(-1).index_select(0, order), torch.bincount(flat, minlength=E)


def moe_layer(x, wg, wu, wd, K):
    tok, w, counts = route(x, wg, K)
    xp = x.index_select(0, tok)
    offs = counts.cumsum(0).to(torch.int32)
    pre = torch._grouped_mm(xp, wu.transpose(-2, -1), offs=offs)
    g, u = pre.chunk(2, dim=-1)
    act = F.silu(g) * u
    yp = torch._grouped_mm(act, wd.transpose(-2, -1), offs=offs)
    y = torch.zeros_like(x).index_add_(0, tok, yp * w.to(yp.dtype)[:, None])
    return y


def moe_layer_loop(x, wg, wu, wd, K):
    """wu, wd: sequences of E per-expert weights, (2I, H) and (H, I)."""
    tok, w, counts = route(x, wg, K)
    counts = counts.tolist()
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = tok[start:start + n]
        g, u = F.linear(x.index_select(0, rows), wu[e]).chunk(2, dim=-1)
        ye = F.linear(F.silu(g) * u, wd[e])
        y.index_add_(0, rows, ye * w[start:start + n, None].to(ye.dtype))
        start += n
    return y


def peak_extra_bytes(step):
    """Peak device memory of one call of step above what is allocated before it, after a first
    call has allocated the .grad buffers (which step keeps, so they count as allocated before)."""
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class _NvmlValue(ctypes.Union):
    _fields_ = [("d", ctypes.c_double), ("ui", ctypes.c_uint), ("ul", ctypes.c_ulong),
                ("ull", ctypes.c_ulonglong), ("sll", ctypes.c_longlong), ("si", ctypes.c_int),
                ("us", ctypes.c_ushort)]


class _NvmlFieldValue(ctypes.Structure):  # nvmlFieldValue_t
    _fields_ = [("field_id", ctypes.c_uint32), ("scope_id", ctypes.c_uint32),
                ("timestamp_us", ctypes.c_int64), ("latency_us", ctypes.c_int64),
                ("value_type", ctypes.c_int), ("nvml_return", ctypes.c_int),
                ("value", _NvmlValue)]


class ClockSampler:
    """The SM clock, whether the driver names its power cap (clock-event reason 0x4) and the
    board's instantaneous power (NVML_FI_DEV_POWER_INSTANT), read from NVML (the driver's
    libnvidia-ml.so.1, through ctypes) every 2 ms on a thread while a section runs: the figures of
    moe-bench's ClockSampler (src/cuda/clock_sampler.cpp), which says why NVML's energy counter
    is not used."""

    POWER_INSTANT = 186
    VALUE_FIELDS = ("d", "ui", "ul", "ull", "sll", "si", "us")  # by nvmlValueType_t

    def __init__(self, device_index):
        self.nvml = None
        self.handle = ctypes.c_void_p()
        self.samples = {}
        self.energy = {}
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return
        if nvml.nvmlInit_v2() != 0:
            return
        p = torch.cuda.get_device_properties(device_index)
        try:
            bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0".encode()
        except AttributeError:  # a torch without the PCI ids: no clocks rather than wrong ones
            nvml.nvmlShutdown()
            return
        if nvml.nvmlDeviceGetHandleByPciBusId_v2(bus, ctypes.byref(self.handle)) != 0:
            nvml.nvmlShutdown()
            return
        self.nvml = nvml

    def _power_w(self):
        f = _NvmlFieldValue(field_id=self.POWER_INSTANT)
        if (self.nvml.nvmlDeviceGetFieldValues(self.handle, 1, ctypes.byref(f)) != 0 or
                f.nvml_return != 0 or not 0 <= f.value_type < len(self.VALUE_FIELDS)):
            return None
        return getattr(f.value, self.VALUE_FIELDS[f.value_type]) * 1e-3

    def _run(self, stop, mhz, capped, watts):
        clock, reasons = ctypes.c_uint(), ctypes.c_ulonglong()
        while not stop.is_set():
            if (self.nvml.nvmlDeviceGetClockInfo(self.handle, 1, ctypes.byref(clock)) == 0 and
                    self.nvml.nvmlDeviceGetCurrentClocksThrottleReasons(
                        self.handle, ctypes.byref(reasons)) == 0):
                mhz.append(clock.value)
                capped.append(bool(reasons.value & 0x4))
            w = self._power_w()
            if w is not None:
                watts.append(w)
            time.sleep(0.002)

    def _sample(self, mhz, capped):
        """Starts sampling into mhz and capped; returns a stop() that joins the thread and
        gives the section's mean power (W, None without a reading) and wall time (s)."""
        t0, watts = time.monotonic(), []
        flag = threading.Event()
        thread = threading.Thread(target=self._run, args=(flag, mhz, capped, watts))
        thread.start()

        def stop():
            flag.set()
            thread.join()
            # evenly spaced samples: their mean is the section's mean power
            return (statistics.fmean(watts) if watts else None), time.monotonic() - t0
        return stop

    @contextlib.contextmanager
    def section(self, key):
        """with sampler.section("forward"): ... -- appends that loop's clock samples under key."""
        if self.nvml is None:
            yield
            return
        s = self.samples.setdefault(key, {"mhz": [], "capped": []})
        stop = self._sample(s["mhz"], s["capped"])
        try:
            yield
        finally:
            stop()

    def energy_loop(self, key, fn):
        """The board's energy per run of fn under key, as moe-bench's energy_loop: 0.3 s of the
        loop unsampled, so the power reading (refreshed about every 20 ms, trailing the load) has
        caught up with it, then at least 1 s sampled, whole runs only (the queue is kept a few
        runs deep and drained before sampling stops)."""
        if self.nvml is None:
            return

        def loop(seconds):
            t0, n = time.monotonic(), 0
            while time.monotonic() - t0 < seconds:
                fn()
                n += 1
                if n % 4 == 0:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            return n

        loop(0.3)
        stop = self._sample([], [])
        runs = loop(1.0)
        watts, seconds = stop()
        self.energy[key] = None if watts is None else (watts * seconds / runs, watts)

    def record(self):
        """The record's fields: per clock section the median MHz, power-capped share and sample
        count; per energy loop the energy per run (J) and mean power (W)."""
        if self.nvml is None:
            return {}
        v = self.samples.items()
        e = self.energy.items()
        return {"sm_clock_mhz": {k: statistics.median(s["mhz"]) if s["mhz"] else None
                                 for k, s in v},
                "power_capped_share": {k: sum(s["capped"]) / len(s["capped"])
                                       if s["capped"] else None for k, s in v},
                "clock_samples": {k: len(s["mhz"]) for k, s in v},
                "energy_per_run_j": {k: None if r is None else r[0] for k, r in e},
                "mean_power_w": {k: None if r is None else r[1] for k, r in e}}


def time_runs(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="*", default=None, choices=list(CONFIGS),
                    help="named configurations (default: all, unless --shape is given)")
    ap.add_argument("--shape", nargs="*", default=[], type=parse_shape,
                    help="shapes of your own, T,H,I,E,K, after the --config ones")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--build", default="build/gg", help="build folder (for the git revision)")
    ap.add_argument("--out", default="", help="append JSON lines here (default: stdout)")
    args = ap.parse_args()
    command = "python3 bench/peers/torch_moe_layer.py " + " ".join(sys.argv[1:])
    out = open(args.out, "a") if args.out else sys.stdout
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    configs = args.config if args.config is not None else ([] if args.shape else list(CONFIGS))
    shapes = [(name, CONFIGS[name]) for name in configs] + args.shape
    for name, shape in shapes:
        try:
            run_config(name, shape, args, command, out, dev, gen)
        except Exception as e:  # one failing configuration does not stop the others
            print(f"peer {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()


def run_config(name, shape, args, command, out, dev, gen):
    if True:
        T, H, I, E, K = shape
        bf = torch.bfloat16
        x = torch.randn(T, H, device=dev, dtype=bf, generator=gen)
        dy = torch.randn(T, H, device=dev, dtype=bf, generator=gen)
        wg = (torch.randn(H, E, device=dev, generator=gen) / H ** 0.5).to(bf)
        wu = (torch.randn(E, 2 * I, H, device=dev, generator=gen) / H ** 0.5).to(bf)
        wd = (torch.randn(E, H, I, device=dev, generator=gen) / I ** 0.5).to(bf)
        clocks = ClockSampler(dev.index if dev.index is not None else torch.cuda.current_device())
        with torch.no_grad(), clocks.section("forward"):
            fwd_ms = time_runs(lambda: moe_layer(x, wg, wu, wd, K), args.warmup, args.reps)
        xs, wgs, wus, wds = (t.detach().clone().requires_grad_() for t in (x, wg, wu, wd))

        def step():
            y = moe_layer(xs, wgs, wus, wds, K)
            y.backward(dy)

        peak_extra = peak_extra_bytes(step)
        step_ms = time_runs(step, args.warmup, args.reps)

        def fresh_step():
            # zero_grad(set_to_none=True), PyTorch's default: backward writes new gradients
            # instead of adding into the existing ones
            for t in (xs, wgs, wus, wds):
                t.grad = None
            step()

        with clocks.section("fwd_bwd_fresh"):
            fresh_ms = time_runs(fresh_step, args.warmup, args.reps)

        # the per-expert loop: forward, and forward+backward with fresh gradients
        wul = [w.detach().clone().requires_grad_() for w in wu.unbind(0)]
        wdl = [w.detach().clone().requires_grad_() for w in wd.unbind(0)]
        with torch.no_grad():
            loop_fwd_ms = time_runs(lambda: moe_layer_loop(x, wg, wul, wdl, K), args.warmup,
                                    args.reps)

        def loop_step():
            moe_layer_loop(xs, wgs, wul, wdl, K).backward(dy)

        def loop_fresh_step():
            for t in [xs, wgs] + wul + wdl:
                t.grad = None
            loop_step()

        loop_peak_extra = peak_extra_bytes(loop_step)
        loop_fresh_ms = time_runs(loop_fresh_step, args.warmup, args.reps)
        # energy per run, after every timed loop (moe-bench's energy loops come last too)
        with torch.no_grad():
            clocks.energy_loop("forward", lambda: moe_layer(x, wg, wu, wd, K))
        clocks.energy_loop("fwd_bwd_fresh", fresh_step)
        flops = 6.0 * T * K * H * I
        rec = {"command": command, "git": git_revision(args.build),
               "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "stage": "torch_moe_layer", "config": name,
               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "T": T, "H": H, "I": I, "E": E, "K": K, "dtype": "bf16",
               "reps": args.reps, "warmup": args.warmup,
               "forward_ms": fwd_ms, "forward_tflops": flops / (fwd_ms * 1e9),
               "fwd_bwd_ms": step_ms, "fwd_bwd_tflops": 3 * flops / (step_ms * 1e9),
               "fwd_bwd_fresh_ms": fresh_ms,
               "fwd_bwd_fresh_tflops": 3 * flops / (fresh_ms * 1e9),
               "peak_extra_bytes": peak_extra,
               "forward_loop_ms": loop_fwd_ms, "forward_loop_tflops": flops / (loop_fwd_ms * 1e9),
               "fwd_bwd_fresh_loop_ms": loop_fresh_ms,
               "fwd_bwd_fresh_loop_tflops": 3 * flops / (loop_fresh_ms * 1e9),
               "peak_extra_loop_bytes": loop_peak_extra, **clocks.record()}
        print(json.dumps(rec), file=out, flush=True)
        print(f"peer {name:<12} fwd {fwd_ms:.3f} ms ({rec['forward_tflops']:.0f} TF/s) | "
              f"fwd+bwd {step_ms:.3f} ms ({rec['fwd_bwd_tflops']:.0f} TF/s), "
              f"fresh grads {fresh_ms:.3f} ms | "
              f"peak extra {peak_extra / 2**30:.2f} GiB | "
              f"per-expert loop: fwd {loop_fwd_ms:.3f} ms, "
              f"fresh fwd+bwd {loop_fresh_ms:.3f} ms, peak extra {loop_peak_extra / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
