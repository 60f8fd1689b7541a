#!/usr/bin/env python3
"""Checks the PyTorch twin (bench/peers/torch_lm.py) against our fp32 CPU reference, with the
same weights and inputs, the twin run in fp32 (autocast off) on the CPU.

  python3 bench/peers/twin_check.py --build build/gg                       # every router
  python3 bench/peers/twin_check.py --build build/gg --router soft_moe --what layer

layer: `moe-bench export` writes one layer call (x, random parameters, dy, y, aux loss, every
       gradient and, for expert choice and chain_of_experts, the routing) at a small shape; the
       twin's FFN module gets the same parameters and x as one group (expert_choice, soft_moe: the
       T tokens of one position; chain_of_experts: sequence-wise balance groups of
       --sequence-length tokens) and must give y, aux_loss, the gradient of <dy, y> + aux_loss
       for x and every parameter, and the chosen tokens/experts.
model: `moe-bench train --steps N --checkpoint` gives our weights after N steps (--after, default
       1) and the validation bits per byte there; resuming that checkpoint for one step gives the
       next step's loss, aux_loss and gradient norm (before clipping). The twin loads those
       weights and must give the same numbers at the default configuration: this covers the S
       groups across the batch at each position, the short
       last validation batch and every layer's parameter layout.

Compares max |a - b| / (max |b| + atol) <= rtol per tensor (fp32 vs fp32 with other summation
orders). Prints one line per tensor, then Passed / Failed; exit 1 on any failure.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_lm  # noqa: E402  (the twin)

# Routers without random numbers in training (noisy_topk's noise and switch's jitter come from
# other generators in the twin, sigmoid_bias's layer case has a random bias the twin would need).
ROUTERS = ("expert_choice", "soft_moe", "chain_of_experts", "softmax_topk")
SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64}


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=SAFETENSORS_DTYPES[h["dtype"]]).reshape(
            h["shape"])
    return out, meta


def read_checkpoint(path):
    """Weights and buffers of a `moe-bench train --checkpoint` file: {name: float32 array}."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"MOECKPT1", f"{path}: not a checkpoint"
    n = struct.unpack("<Q", raw[8:16])[0]
    header = json.loads(raw[16:16 + n])
    cursor = 16 + n
    out = {}
    for t in header["tensors"]:
        size = t["size"]
        out[t["name"]] = np.frombuffer(raw[cursor:cursor + 4 * size], dtype=np.float32).copy()
        cursor += 4 * size
    return out, header


class Report:
    def __init__(self):
        self.failed = 0

    def compare(self, name, got, want, rtol, atol=1e-12):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            print(f"  {name:34s} NOT OK: shape {got.shape}, expected {want.shape}")
            self.failed += 1
            return
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        rel = diff / (float(np.max(np.abs(want))) + atol) if got.size else 0.0
        ok = rel <= rtol
        self.failed += not ok
        print(f"  {name:34s} {'OK    ' if ok else 'NOT OK'} max diff {diff:.3e}, "
              f"relative {rel:.3e} (rtol {rtol:g})")

    def exact(self, name, got, want):
        ok = np.array_equal(np.asarray(got), np.asarray(want))
        self.failed += not ok
        print(f"  {name:34s} {'OK    ' if ok else 'NOT OK'} (exact)")


def twin_config(router, **fields):
    """A twin Config: the defaults with `fields` set (section found by key)."""
    sections = json.loads(json.dumps(torch_lm.DEFAULTS))
    sections["model"]["ffn"] = router
    sections["ffn"]["router"] = router
    for key, value in fields.items():
        for section in sections.values():
            if key in section:
                section[key] = value
    cfg = torch_lm.Config(sections)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# layer

def check_layer(build, router, report, workdir):
    T, H, I, E = 64, 32, 48, 8
    seq = 16  # chain_of_experts: sequence-wise balance groups of 16 tokens
    case = os.path.join(workdir, f"{router}.safetensors")
    cmd = [os.path.join(build, "moe-bench"), "export", "--router", router, "--tokens", str(T),
           "--hidden", str(H), "--inter", str(I), "--experts", str(E), "--top-k", "2",
           "--seed", "3", "--out", case]
    if router == "chain_of_experts":
        cmd += ["--sequence-length", str(seq)]
    if router == "soft_moe":
        cmd += ["--slots-per-expert", "2"]
    if router == "expert_choice":  # its only auxiliary loss, off by default
        cmd += ["--z-coef", "1e-3"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ref, meta = read_safetensors(case)
    print(f"layer {router}: {meta['config']}")
    # One group: the grouped routers see the T tokens as one position (seq 1, batch T).
    group = {"expert_choice": 1, "soft_moe": 1, "chain_of_experts": seq}.get(router, T)
    cfg = twin_config(router, d_model=H, inter=I, experts=E, top_k=2, seq=group,
                      capacity_factor=float(meta["capacity_factor"]),
                      slots_per_expert=int(meta["slots_per_expert"]),
                      iterations=int(meta["iterations"]), z_coef=float(meta["z_coef"]))
    ffn = torch_lm.make_ffn(cfg, "loop", torch.float32)
    with torch.no_grad():
        ffn.w_gate.copy_(torch.from_numpy(ref["router.w_gate"].copy()).view(ffn.w_gate.shape))
        ffn.w_up.copy_(torch.from_numpy(ref["experts.w_up"].copy()).transpose(1, 2))
        ffn.w_down.copy_(torch.from_numpy(ref["experts.w_down"].copy()).transpose(1, 2))
        if router == "soft_moe":
            ffn.slot_scale.copy_(torch.from_numpy(ref["router.slot_scale"].copy()))
    x = torch.from_numpy(ref["x"].copy()).requires_grad_(True)
    training = meta["training"] == "true"
    y, aux, _ = ffn(x, training)
    ((y * torch.from_numpy(ref["dy"].copy())).sum() + aux).backward()
    report.compare("y", y.detach(), ref["y"], 1e-5)
    report.compare(f"aux_loss ({float(ref['aux_loss'][0]):.6g})", aux.detach().reshape(1),
                   ref["aux_loss"], 1e-6)
    report.compare("grad.x", x.grad, ref["grad.x"], 1e-5)
    report.compare("grad.router.w_gate", ffn.w_gate.grad.reshape(ref["grad.router.w_gate"].shape),
                   ref["grad.router.w_gate"], 1e-5)
    if router == "soft_moe":
        report.compare("grad.router.slot_scale", ffn.slot_scale.grad,
                       ref["grad.router.slot_scale"], 1e-5)
    report.compare("grad.experts.w_up", ffn.w_up.grad.transpose(1, 2), ref["grad.experts.w_up"],
                   1e-5)
    report.compare("grad.experts.w_down", ffn.w_down.grad.transpose(1, 2),
                   ref["grad.experts.w_down"], 1e-5)
    with torch.no_grad():
        if router == "expert_choice":  # expert e's C tokens, in the CPU's order
            probs = torch.softmax(x @ ffn.w_gate, dim=-1)
            C = torch_lm.expert_capacity(cfg.capacity_factor, T, E)
            pick = torch.sort(probs, dim=0, descending=True, stable=True).indices[:C]  # (C, E)
            report.exact("routing.token (E*C)", pick.t().reshape(-1).numpy(), ref["routing.token"])
        if router == "chain_of_experts":  # each iteration's chosen experts, from u_c
            u = x.detach()
            for c in range(cfg.iterations):
                selected, _, _ = ffn.route(u, ffn.w_gate[c], training)
                report.exact(f"routing.{c}.expert", selected.reshape(-1).numpy(),
                             ref[f"routing.{c}.expert"])
                u = u + ffn.moe(u, ffn.w_gate[c], training)[0]


# ---------------------------------------------------------------------------------------------
# model

def load_weights(model, cfg, weights):
    D = cfg.d_model

    def put(param, name, transform=None):
        value = torch.from_numpy(weights.pop(name))
        if transform is not None:
            value = transform(value)
        with torch.no_grad():
            param.copy_(value.reshape(param.shape))

    put(model.wte, "wte")
    put(model.wpe, "wpe")
    for l, block in enumerate(model.blocks):
        p = f"block{l}."
        put(block.ln1.weight, p + "ln1_w")
        put(block.ln1.bias, p + "ln1_b")
        put(block.qkv.weight, p + "qkv_w", lambda v: v.view(D, 3 * D).t())  # ours (C, OC)
        put(block.qkv.bias, p + "qkv_b")
        put(block.proj.weight, p + "proj_w", lambda v: v.view(D, D).t())
        put(block.proj.bias, p + "proj_b")
        put(block.ln2.weight, p + "ln2_w")
        put(block.ln2.bias, p + "ln2_b")
        ffn = block.ffn
        E, A, H = ffn.w_up.shape
        I = ffn.w_down.shape[2]
        put(ffn.w_gate, p + "ffn.router.w_gate")
        if hasattr(ffn, "w_noise"):
            put(ffn.w_noise, p + "ffn.router.w_noise")
        if hasattr(ffn, "slot_scale"):
            put(ffn.slot_scale, p + "ffn.router.slot_scale")
        put(ffn.w_up, p + "ffn.experts.w_up", lambda v: v.view(E, H, A).transpose(1, 2))
        put(ffn.w_down, p + "ffn.experts.w_down", lambda v: v.view(E, I, H).transpose(1, 2))
        if hasattr(ffn, "expert_bias"):
            put(ffn.expert_bias, p + "ffn.router.expert_bias")
    put(model.lnf.weight, "lnf_w")
    put(model.lnf.bias, "lnf_b")
    assert not weights, f"checkpoint tensors left over: {sorted(weights)}"


def records(path, kind):
    return [r for r in map(json.loads, open(path)) if r.get("kind") == kind]


def check_model(build, router, corpus, after, report, workdir):
    bench = os.path.join(build, "moe-bench")
    ckpt = os.path.join(workdir, f"{router}.ckpt")
    at1 = os.path.join(workdir, f"{router}_a.jsonl")
    at2 = os.path.join(workdir, f"{router}_b.jsonl")
    common = ["train", "--device", "cpu", "--router", router, "--corpus", corpus]
    # A checkpoint is written after the evaluations that follow a step: the one after step
    # `after` (the last). Resuming it for one more step gives that step's loss and gradient norm
    # from those weights. (The resumed run's schedule is longer; the loss does not depend on it.)
    subprocess.run([bench, *common, "--steps", str(after), "--eval-every", "0",
                    "--checkpoint", ckpt, "--jsonl", at1],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([bench, *common, "--steps", str(after + 1), "--eval-every", "0",
                    "--resume", ckpt, "--jsonl", at2], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    ours_config = records(at1, "config")[0]
    ours_eval = [r for r in records(at1, "eval") if r["step"] == after][0]
    ours_step = [r for r in records(at2, "step") if r["step"] == after + 1][0]
    weights, header = read_checkpoint(ckpt)
    args = types.SimpleNamespace(mode="eager", compile_mode="default", experts_impl="loop")
    cfg = torch_lm.build_config(types.SimpleNamespace(
        config_from=at1, router=None,
        **{flag: None for flag in torch_lm.FLAGS}))
    if cfg.grouped:
        args.experts_impl = "bmm"
    twin = torch_lm.Twin(cfg, args, torch.device("cpu"), compute_dtype=torch.float32)
    print(f"model {router}: {cfg.description()}, weights from our checkpoint after step "
          f"{header['step']}")
    report.exact("parameters", twin.parameter_count(), ours_config["parameters"])
    load_weights(twin.model, cfg, weights)
    domains = torch_lm.load_corpus(corpus)
    val = torch_lm.validation_batches(domains, cfg.val_windows, cfg.batch, cfg.seq)
    ev = twin.evaluate(domains, val, after)
    report.compare(f"val_bpb at step {after} ({ours_eval['val_bpb']:.6f})", ev["val_bpb"],
                   ours_eval["val_bpb"], 1e-6)
    for name, value in ev["val_bpb_domain"].items():
        report.compare(f"  {name}", value, ours_eval["val_bpb_domain"][name], 1e-6)
    loss, aux, _, grad_norm, _ = twin.train_step(domains, after)  # the batch of step after+1
    step = after + 1
    report.compare(f"loss at step {step} ({ours_step['loss']:.6f})", loss, ours_step["loss"], 1e-6)
    report.compare(f"aux_loss at step {step} ({ours_step['aux_loss']:.6g})", aux,
                   ours_step["aux_loss"], 1e-5, atol=1e-30)
    report.compare(f"grad_norm at step {step} ({ours_step['grad_norm']:.6f})", grad_norm,
                   ours_step["grad_norm"], 1e-5)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(torch_lm.REPO, "build"),
                    help="our build folder (its moe-bench)")
    ap.add_argument("--router", choices=ROUTERS, action="append",
                    help=f"router(s) to check (default: {', '.join(ROUTERS)})")
    ap.add_argument("--what", choices=("layer", "model", "both"), default="both")
    ap.add_argument("--after", type=int, default=1,
                    help="model: compare after this many of our training steps (default 1)")
    ap.add_argument("--corpus", default=os.path.join(torch_lm.REPO, "data", "corpus"))
    args = ap.parse_args()
    torch.manual_seed(0)
    report = Report()
    with tempfile.TemporaryDirectory() as workdir:
        for router in args.router or ROUTERS:
            if args.what in ("layer", "both"):
                check_layer(args.build, router, report, workdir)
            if args.what in ("model", "both"):
                check_model(args.build, router, args.corpus, args.after, report, workdir)
    print("Passed" if report.failed == 0 else f"Failed ({report.failed} checks)")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
