#!/usr/bin/env python3
"""Which cuBLAS kernels the dense-equivalent GEMMs of the layer benchmark run, and how long each
takes: bf16 (M, K) x (K, N) with fp32 accumulation through torch.mm, under torch.profiler, for the
up and down projections of the Qwen3 and OLMoE shapes (M = T*k = 131072). The kernel names carry
cuBLAS's tile, cluster and schedule, the configuration our grouped GEMM is measured against
(experts_lab D1 / D2 call cublasGemmEx with the same shapes; cuBLASLt's heuristics may pick
differently for the two entry points, so the name is a lead, not a proof).

  python3 bench/lab/cublas_kernels.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

SHAPES = [  # name, M, K, N
    ("qwen3 up", 131072, 2048, 1536),
    ("qwen3 down", 131072, 768, 2048),
    ("olmoe up", 131072, 2048, 2048),
    ("olmoe down", 131072, 1024, 2048),
]


def main():
    torch.manual_seed(0)
    for name, m, k, n in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.mm(a, b)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                torch.mm(a, b)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type == torch.autograd.DeviceType.CUDA or "gemm" in ev.key.lower():
                us = ev.device_time_total / max(ev.count, 1)
                tflops = 2 * m * k * n / (us * 1e-6) / 1e12 if us > 0 else 0
                print(f"{name:<11} {us:8.1f} us  {tflops:6.0f} TFLOP/s  x{ev.count}  {ev.key}")


if __name__ == "__main__":
    main()
