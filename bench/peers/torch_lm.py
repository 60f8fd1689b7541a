#!/usr/bin/env python3
"""The PyTorch twin of `moe-bench train`: the same byte-level MoE language model, data and training,
written the way a careful PyTorch user would write it, run eager or under torch.compile.

  python3 bench/peers/torch_lm.py --config-from run.jsonl --mode eager   --out twin_eager.jsonl
  python3 bench/peers/torch_lm.py --config-from run.jsonl --mode compile --out twin_compile.jsonl
  python3 bench/peers/torch_lm.py --router noisy_topk --steps 200 --device cpu   # small test
  python3 bench/peers/twin_check.py --build build   # the twin in fp32 against our CPU reference

--config-from reads the "config" record of one of our runs (kind == "config", field "config" =
config_json) so the twin trains exactly that configuration; explicit flags override single fields.
Without it the defaults are `moe-bench train`'s (L=2, D=64, NH=4, S=32, E=8, K=2, I=128, B=32,
600 steps, lr 3e-3, warm-up 30, eval every 100, 16 validation windows per domain, seed 0).

What is the same as our trainer
- Data: the five corpus files (md5-checked), the same document rules, every 20th document of a
  domain to validation; train_batch is the same pure function of (seed, step) on the same
  splitmix64 counter RNG (numpy uint64 arithmetic), validation_batches cuts the same windows, so
  both trainers see the same bytes at every step and score the same validation bytes.
  (Checked bit for bit against the C++ functions for several seeds, steps and shapes.)
  One MoE layer call with the same weights and input (routers as below, not training) gives our
  auxiliary loss to 1e-7 relative, its gradient of the gate to 1e-6, and y to bf16 rounding.
  bench/peers/twin_check.py repeats this in fp32 (autocast off) for expert_choice, soft_moe,
  chain_of_experts and softmax_topk: a `moe-bench export` layer case gives y, aux loss and every
  gradient to 1e-6 relative and the same routing; our weights after N steps (checkpoint) give our
  validation bits per byte (and per domain) to 1e-8 relative and the next step's loss, aux loss
  and gradient norm to 2e-6.
- Model: byte embedding tied to the output head, learned positions, L pre-norm blocks (LayerNorm
  with bias, eps 1e-5; causal multi-head attention with qkv and projection biases), the FFN, final
  LayerNorm, cross-entropy. The objective is mean cross-entropy + the sum over layers of the
  router's auxiliary loss. Parameter count equals ours for every MoE router.
- FFN: SwiGLU experts ([gate | up] halves of the first projection, silu(gate) * up, no biases),
  dropless. Routers: softmax_topk (fp32 softmax, top-k on the logits, renormalised over the kept
  k; balance loss coef*E*sum_e f_e P_e with f_e over all T*K choices, plus z-loss, defaults 1e-2
  and 1e-3), chain_of_experts (Wang 2025: `iterations` C steps of top_k/C experts each, one router
  per step (w_gate (C, H, E)) over the one expert pool, u_{c+1} = u_c + MoE_c(u_c) routed on u_c,
  the layer returns u_C - x; softmax over E, top-k on the logits, weights the kept
  probabilities, not renormalised; per step a sequence-wise balance loss (groups of S tokens, f_e
  over its top_k/C choices), default coefficient 1e-3, no z-loss by default), noisy_topk
  (Shazeer: logits + N(0,1)*(softplus(x W_noise) + eps) in training, softmax over the kept k;
  importance and smooth load losses, CV^2 with 1e-10, 0.1 each), switch (top-1,
  router input times U[1-eps, 1+eps] in training, balance loss and z-loss), sigmoid_bias (sigmoid
  scores, selection on scores + bias, weights route_scale * s / sum of the kept s; the bias buffer
  moves by rate * sign(mean load - load) after each step; sequence-wise balance loss when
  aux_coef > 0), and the dense baselines dense_active (I = K*I) and dense_params (I = E*I).
  expert_choice and soft_moe run with groups across the batch at each position, as ours: the
  layer is S calls, call s routing the B tokens at position s (mixing positions would leak the
  future), and the layer's auxiliary loss is the mean over the S calls. expert_choice (Zhou 2022):
  fp32 softmax over the experts per token; in each group every expert takes its top C tokens by
  probability, C = min(B, ceil(capacity_factor * B / E)) (1.25 by default: 1.25 experts per token
  on average), ties to the lower token as ours; combine weight = that probability (a token gets 0
  to E experts); no balance loss, z-loss only when z_coef > 0. soft_moe (Puigcerver 2023): logits
  = scale * x_hat phi_hat, x and the slot parameters phi (H, E*slots_per_expert) L2-normalised
  with eps 1e-6, scale a learnable scalar starting at 1; dispatch = softmax over the group's B
  tokens per slot, combine = softmax over the slots per token, slots = dispatch^T x, expert e runs
  its slots of every group, y = combine slots_out; no auxiliary loss. Both are batched over the S
  groups (tensors (S, B, ...), sort/softmax over the token axis, bmm), no loop over positions.
- Initialisation law: GPT-2's N(0, 0.02), attention projection and the experts' w_down scaled by
  1/sqrt(2L); router and experts as init_params (gate N(0, sqrt(0.1/H)), every chain router
  too; noisy_topk's gate and noise weights zero; soft_moe's phi N(0, 1/sqrt(H)) and scale 1;
  w_up N(0, 1/sqrt(H)), w_down N(0, 1/sqrt(I)), bias buffer zero).
- Training: AdamW (betas, eps, decoupled weight decay on matrices only: wte, wpe, qkv/proj
  weights, gate/noise/slot/expert weights; no decay on LayerNorm gains and biases, linear
  biases, soft_moe's scale, and the sigmoid_bias buffer, which is not a parameter), linear
  warm-up then cosine to min_lr_fraction * lr, global-norm clipping (scale clip/norm when norm >
  clip), evaluation at step 0, every eval_every steps and at the end; val bits per byte over all
  scored bytes and per domain, as EvalRecord.
- Precision: fp32 master weights, bf16 matmuls (torch.autocast bf16), fp32 residual stream,
  LayerNorm, softmax and loss, as our GPU trainer.

What differs
- Random numbers: initial weights, router noise and jitter come from torch's generator (seeded by
  --seed), not our counter RNG, so runs agree in distribution, not bit for bit: compare curves
  within seed-to-seed noise, over several seeds. Eager and compiled runs of one seed also part
  ways after a hundred steps or so, as bf16 rounding differs between their kernels. At the default
  configuration on an H100 (torch 2.11), val bits/byte at step 600: ours (CPU) seeds 0-3 3.434,
  3.337, 3.368, 3.454; the twin eager, seeds 1-4, 3.353, 3.377, 3.386, 3.446; compiled, seeds
  1, 3, 4, 3.387, 3.392, 3.398; seed 0 compiled 3.433, but eager 3.928 and compiled with
  reduce-overhead 3.941 (longer on the early loss plateau).
- The router runs in fp32 (gate GEMM and all routing math; Switch's "selective precision"); ours
  multiplies bf16 operands with fp32 accumulation into fp32 logits.
- Ties in top-k are broken by torch.topk, ours by the lower expert index (measure zero in training).
  Expert choice breaks ties as ours (lower token first: a stable descending sort), which matters
  when a batch holds the same window twice.
- The dense baselines have no gate: ours are the MoE layer with E = 1 and keep its one-column gate
  (softmax of one logit is 1, so it never changes the output), D parameters per layer more.
- Clipping norm and the loss sums are fp32 on the device (ours: double on the host).
- Not supported (refused with a one-line error): shared experts, GELU experts, padded/block
  layouts for token choice (expert choice fills every expert's C rows, so its layout changes
  nothing), GShard second-choice policies.

The experts, the idiomatic fast way: stable sort of the T*K chosen experts -> row_token = order //
K -> index_select of the bf16 tokens -> torch._grouped_mm up-projection (offsets = cumulative
segment ends, int32) -> silu(gate) * up -> torch._grouped_mm down-projection -> index_add of the
weighted rows into an fp32 y. Weights are stored like nn.Linear, (E, 2I, H) and (E, H, I), and
passed transposed (as bench/peers/torch_moe_layer.py). torch._grouped_mm needs a recent PyTorch
(2.8 or later; Hopper kernels). Without it on CUDA the run stops with a one-line error; on
--device cpu, where older versions have no CPU kernel for it, a per-expert loop of F.linear
replaces it (only there; --experts-impl auto probes forward and backward once, and the config
record names the path used). chain_of_experts runs that path once per iteration.
expert_choice and soft_moe give every expert the same number of rows (S*C, S*slots_per_expert), so
their experts are two torch.bmm over (E, rows, H) (see swiglu_experts_uniform; the config record
says "bmm", whatever --experts-impl says).

--mode eager runs the model as written. --mode compile wraps the training forward+loss (and,
separately, the evaluation forward) in torch.compile with the default mode: what a plain
torch.compile(fn) gets and what most users run, with compile time in seconds. max-autotune spends
minutes benchmarking kernel choices and reduce-overhead adds CUDA-graph capture; both are tuning
steps beyond "run it with torch.compile", available through --compile-mode. At the default
(tiny, launch-bound) configuration reduce-overhead ran 2.8 ms per step against 6-7.5 ms for the
default mode on an H100, so quote it beside the default when the question is PyTorch's best.
Backward is compiled by AOTAutograd with the forward; the optimiser step is the fused AdamW
kernel on CUDA.

Timing: each step is timed with a synchronised wall clock (torch.cuda.synchronize before and after)
around the whole step: batch construction and upload, forward, backward, clipping, AdamW, router
buffer update; as our StepRecord. tokens_per_s = B*S / step time. The summary's tokens_per_s is
B*S / the median step time (as our RunSummary) over the steps after the first --exclude-steps
(default 5), which hold compilation (compile mode) or cuBLAS / allocator warm-up (eager); those
steps' times are recorded, and compile_s = their total time minus that many median steps. The
evaluation graph is compiled during the first evaluation (step 0): "first_eval_ms" in the summary.

Output: JSON lines (appended to --out, or stdout) like ours: "config", "step", "eval", "summary"
records, each with "peer" ("pytorch-eager" / "pytorch-compile"), the torch version, device name
and git revision. Bad arguments or an unwritable --out: one line on stderr, exit status 2.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROG = "torch_lm.py"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN_CHOICE_ROUTERS = ("softmax_topk", "noisy_topk", "switch", "sigmoid_bias", "chain_of_experts")
# ModelConfig::groups_across_batch: these routers mix the tokens of a group, so a layer call is
# one position s and its group the B tokens at s (S groups per layer): nothing leaks along the
# sequence, so the model stays causal.
GROUPED_ROUTERS = ("expert_choice", "soft_moe")
ROUTERS = TOKEN_CHOICE_ROUTERS + GROUPED_ROUTERS
DENSE = ("dense_active", "dense_params")
LAYERNORM_EPS = 1e-5  # include/moe/model/layers.hpp kLayerNormEps


class UsageError(Exception):
    """A bad argument or configuration: one line on stderr, exit status 2."""


# ---------------------------------------------------------------------------------------------
# data: the corpus, train_batch and validation_batches of src/data/*.cpp

# (domain, file, md5, document rule): include/moe/data.hpp corpus_manifest()
CORPUS_MANIFEST = [
    ("gcide", "gcide.txt", "08095e86ac84966845f4c51af97111a0", "line"),
    ("kjv", "kjv.txt", "0442864d38d37131885626cd0cfa2a12", "line"),
    ("wordnet", "wordnet.txt", "562fe6746284abb7202a1a5b8754834d", "line"),
    ("fortunes", "fortunes.txt", "4f76c26646f7055c0a751e679800855b", "record"),
    ("devil", "devil.txt", "32575e028933fa7d92a0b058c13cf133", "paragraph"),
]
VALIDATION_EVERY = 20  # document i of a domain goes to validation when i % 20 == 19


class Domain:
    def __init__(self, name, train, val, train_documents, val_documents):
        self.name = name
        self.train = train  # (bytes,) uint8: the training documents, concatenated in order
        self.val = val      # (bytes,) uint8: the validation documents
        self.train_documents = train_documents
        self.val_documents = val_documents


def split_documents(text, rule):
    """Cuts text into documents (each keeps its lines and their newlines; a missing final newline
    is added) and returns (train bytes, val bytes, train documents, val documents)."""
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":  # text ends with a newline (or is empty): no line after it
        lines.pop()
    parts = ([], [])  # (train, val) lists of documents
    doc = []
    has_text = False
    index = 0

    def emit():
        nonlocal doc, has_text, index
        parts[index % VALIDATION_EVERY == VALIDATION_EVERY - 1].append(b"".join(doc))
        doc = []
        has_text = False
        index += 1

    for line in lines:
        doc.append(line + b"\n")
        if rule == "line":
            closes = True
        elif rule == "record":
            closes = line == b"%"
        else:  # paragraph: a blank line closes a block that has text
            blank = line.strip(b" \t\r") == b""
            closes = blank and has_text
            has_text = has_text or not blank
        if closes:
            emit()
    if doc:
        emit()
    train, val = (np.frombuffer(b"".join(p), dtype=np.uint8) for p in parts)
    return train, val, len(parts[0]), len(parts[1])


def load_corpus(folder):
    rebuild = f"scripts/build_corpus.sh {folder}"
    domains = []
    for name, file, md5, rule in CORPUS_MANIFEST:
        path = os.path.join(folder, file)
        try:
            text = open(path, "rb").read()
        except OSError:
            raise UsageError(f"corpus file {path} is missing; build the corpus with: {rebuild}")
        digest = hashlib.md5(text).hexdigest()
        if digest != md5:
            raise UsageError(f"corpus file {path} is corrupt: md5 {digest} differs from the "
                             f"recorded {md5}; rebuild it with: {rebuild}")
        domains.append(Domain(name, *split_documents(text, rule)))
    return domains


U64 = np.uint64


def splitmix64(z):
    """splitmix64 of each element of a uint64 array (include/moe/rng.hpp), wrapping mod 2^64."""
    z = np.asarray(z, dtype=U64)
    with np.errstate(over="ignore"):
        z = z + U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
        return z ^ (z >> U64(31))


def data_uniform(seed, step, draws):
    """Uniform in [0, 1) of the data sampler's stream: src/data/batches.cpp data_uniform."""
    data_stream = U64(0x64617461)  # "data"
    key = splitmix64(np.array([seed], dtype=U64) ^ (data_stream << U64(32)))
    key = key ^ splitmix64(np.array([step], dtype=U64))
    bits = splitmix64(key ^ np.asarray(draws, dtype=U64))
    return (bits >> U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def train_batch(domains, seed, step, batch, seq):
    """Rows pick a domain with probability proportional to its training bytes (domains shorter
    than one window never), then a uniform window start. Returns inputs, targets (B, S) int64 and
    the domain of each row (B) int64: the same bytes as data::train_batch."""
    sizes = np.array([len(d.train) for d in domains], dtype=np.float64)
    cumulative = np.cumsum(np.where(sizes >= seq + 1, sizes, 0.0))
    total = cumulative[-1]
    if total <= 0:
        raise UsageError(f"no domain of the corpus has {seq + 1} training bytes "
                         f"(one window of --seq + 1)")
    rows = np.arange(batch, dtype=U64)
    u = data_uniform(seed, step, U64(2) * rows) * total
    dom = np.minimum(np.searchsorted(cumulative, u, side="right"), len(domains) - 1)
    v = data_uniform(seed, step, U64(2) * rows + U64(1))
    inputs = np.empty((batch, seq), dtype=np.int64)
    targets = np.empty((batch, seq), dtype=np.int64)
    for r in range(batch):
        text = domains[dom[r]].train
        starts = len(text) - seq  # valid starts [0, starts)
        start = min(starts - 1, int(v[r] * float(starts)))
        inputs[r] = text[start:start + seq]
        targets[r] = text[start + 1:start + seq + 1]
    return inputs, targets, dom.astype(np.int64)


def validation_batches(domains, windows, batch, seq):
    """`windows` evenly spaced windows per domain, interleaved across domains, cut into batches of
    at most `batch` rows: the same bytes as data::validation_batches."""
    for d in domains:
        if len(d.val) < seq + 1:
            raise UsageError(f"validation text of domain '{d.name}' has {len(d.val)} bytes, "
                             f"fewer than --seq + 1 = {seq + 1}")
    rows = []  # (domain, start)
    for w in range(windows):
        for i, d in enumerate(domains):
            span = len(d.val) - seq - 1
            rows.append((i, span * w // (windows - 1) if windows > 1 else 0))
    out = []
    for first in range(0, len(rows), batch):
        part = rows[first:first + batch]
        inputs = np.stack([domains[i].val[s:s + seq] for i, s in part]).astype(np.int64)
        targets = np.stack([domains[i].val[s + 1:s + seq + 1] for i, s in part]).astype(np.int64)
        out.append((inputs, targets, np.array([i for i, _ in part], dtype=np.int64)))
    return out


# ---------------------------------------------------------------------------------------------
# configuration: our TrainConfig, read from flags or from a run's "config" record

# TrainSetup::default_train_config() and LayerConfig's defaults (apps/moe-bench/train_options.cpp,
# include/moe/config.hpp), grouped as config_json writes them.
DEFAULTS = {
    "model": {"vocab": 256, "layers": 2, "d_model": 64, "heads": 4, "seq": 32,
              "ffn": "softmax_topk"},
    "ffn": {"router": "softmax_topk", "experts": 8, "top_k": 2, "inter": 128,
            "shared_experts": 0, "activation": "swiglu", "layout": "dropless",
            "capacity_factor": 1.25, "block_size": 128, "renormalize": True,
            "second_policy": "all", "second_threshold": 0.2, "aux_coef": -1.0, "z_coef": -1.0,
            "importance_coef": 0.1, "load_coef": 0.1, "noise_epsilon": 1e-2, "jitter": 1e-2,
            "slots_per_expert": 1, "route_scale": 1.0, "bias_update_rate": 1e-3,
            "iterations": 2},
    "train": {"batch": 32, "steps": 600, "lr": 3e-3, "min_lr_fraction": 0.1, "warmup": 30,
              "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0,
              "eval_every": 100, "val_windows": 16, "seed": 0},
}
# flag -> (section, key, type)
FLAGS = {
    "layers": ("model", "layers", int), "d_model": ("model", "d_model", int),
    "heads": ("model", "heads", int), "seq": ("model", "seq", int),
    "experts": ("ffn", "experts", int), "top_k": ("ffn", "top_k", int),
    "inter": ("ffn", "inter", int), "aux_coef": ("ffn", "aux_coef", float),
    "z_coef": ("ffn", "z_coef", float), "route_scale": ("ffn", "route_scale", float),
    "capacity_factor": ("ffn", "capacity_factor", float),
    "slots_per_expert": ("ffn", "slots_per_expert", int),
    "iterations": ("ffn", "iterations", int),
    "batch": ("train", "batch", int), "steps": ("train", "steps", int),
    "lr": ("train", "lr", float), "warmup": ("train", "warmup", int),
    "eval_every": ("train", "eval_every", int), "val_windows": ("train", "val_windows", int),
    "seed": ("train", "seed", int),
}


class Config:
    """The run's configuration, flat: cfg.layers, cfg.experts, cfg.lr, ... plus cfg.name (the
    --router value: a router or a dense baseline)."""

    def __init__(self, sections):
        self.sections = sections
        for section in sections.values():
            self.__dict__.update(section)
        self.name = sections["model"]["ffn"]
        self.router = self.name if self.name in DENSE else sections["ffn"]["router"]
        self.dense = self.name in DENSE
        self.grouped = not self.dense and self.router in GROUPED_ROUTERS

    def aux_coef_resolved(self):  # LayerConfig::resolved_aux_coef
        if self.dense:
            return 0.0
        if self.aux_coef >= 0:
            return self.aux_coef
        if self.router == "chain_of_experts":
            return 1e-3  # CoE (DeepSeek-V2's sequence-wise alpha)
        return 1e-2 if self.router in ("softmax_topk", "switch") else 0.0

    def choices_per_step(self):  # LayerConfig::choices_per_step
        if self.router == "chain_of_experts":
            return self.top_k // self.iterations
        return self.top_k

    def z_coef_resolved(self):  # LayerConfig::resolved_z_coef
        if self.dense:
            return 0.0
        if self.z_coef >= 0:
            return self.z_coef
        return 1e-3 if self.router in ("softmax_topk", "switch") else 0.0

    def ffn_inter(self):  # ModelConfig::layer_config: the dense baselines' width
        if self.name == "dense_active":
            return self.top_k * self.inter
        if self.name == "dense_params":
            return self.experts * self.inter
        return self.inter

    def description(self):  # ModelConfig::description
        if self.grouped:
            return f"{self.name} (groups across the batch at each position)"
        if self.dense:
            return f"{self.name} (dense FFN, I={self.ffn_inter()})"
        return self.name

    def validate(self):
        def need(ok, message):
            if not ok:
                raise UsageError(message)

        need(self.name in ROUTERS + DENSE,
             f"router: '{self.name}' is not supported by the twin (allowed: "
             f"{', '.join(ROUTERS + DENSE)})")
        need(1 <= self.layers <= 64, f"layers must be in [1, 64], got {self.layers}")
        need(self.d_model >= 1, f"d-model must be >= 1, got {self.d_model}")
        need(self.heads >= 1 and self.d_model % self.heads == 0,
             f"heads must divide d-model ({self.d_model}), got {self.heads}")
        need(1 <= self.seq <= 65536, f"seq must be in [1, 65536], got {self.seq}")
        need(self.experts >= 1, f"experts must be >= 1, got {self.experts}")
        need(self.router in GROUPED_ROUTERS or 1 <= self.top_k <= self.experts,
             f"top-k must be in [1, experts={self.experts}], got {self.top_k}")
        need(self.inter >= 1, f"inter must be >= 1, got {self.inter}")
        need(self.router != "switch" or self.top_k == 1, f"switch routes top-1, got top-k {self.top_k}")
        if self.router == "chain_of_experts":
            need(1 <= self.iterations <= 16,
                 f"iterations must be in [1, 16], got {self.iterations}")
            need(self.top_k % self.iterations == 0,
                 f"top-k ({self.top_k}) must be a multiple of iterations ({self.iterations}) "
                 f"for chain_of_experts")
        need(self.router != "expert_choice" or
             (math.isfinite(self.capacity_factor) and self.capacity_factor > 0),
             f"capacity-factor must be > 0 with the expert_choice router, got "
             f"{self.capacity_factor}")
        need(1 <= self.slots_per_expert <= 65536,
             f"slots-per-expert must be in [1, 65536], got {self.slots_per_expert}")
        need(self.dense or self.aux_coef < 0 or
             self.router not in ("noisy_topk", "expert_choice", "soft_moe"),
             f"aux-coef does not apply to the {self.router} router (noisy_topk has importance "
             f"and load losses; expert_choice and soft_moe have no balance loss)")
        need(self.shared_experts == 0, "shared experts are not supported by the twin")
        need(self.activation == "swiglu", "only SwiGLU experts are supported by the twin")
        # Expert choice fills every expert's C rows (no layout pads or drops anything) and soft
        # MoE has no plan, so the layout only matters to token choice.
        need(self.dense or self.grouped or self.layout == "dropless",
             f"layout '{self.layout}' is not supported: the twin is dropless")
        need(self.router != "softmax_topk" or self.top_k != 2 or self.second_policy == "all",
             f"second-policy '{self.second_policy}' is not supported by the twin (only 'all')")
        need(1 <= self.batch <= 65536, f"batch must be in [1, 65536], got {self.batch}")
        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_fraction <= 1,
             f"min-lr-fraction must be in [0, 1], got {self.min_lr_fraction}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "AdamW betas must be in [0, 1)")
        need(self.eps > 0, "AdamW eps must be > 0")
        need(self.eval_every >= 0, f"eval-every must be >= 0, got {self.eval_every}")
        need(self.val_windows >= 1, f"val-windows must be >= 1, got {self.val_windows}")
        need(0 <= self.seed < 2 ** 64, f"seed must be in [0, 2^64), got {self.seed}")


def read_config_record(path, router):
    """The "config" field of the run's config record. A file with several runs (`moe-bench
    compare`) needs --router to pick the one whose "run" it names."""
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise UsageError(f"--config-from {path}: {e.strerror}")
    found = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"--config-from {path}: line {n} is not JSON")
        if isinstance(rec, dict) and rec.get("kind") == "config" and "config" in rec:
            found.append(rec)
    if not found:
        raise UsageError(f"--config-from {path}: no config record")
    runs = sorted({str(r.get("run")) for r in found})
    if len(runs) > 1:
        if router is None:
            raise UsageError(f"--config-from {path} holds several runs ({', '.join(runs)}); "
                             f"pick one with --router")
        found = [r for r in found if r.get("run") == router]
        if not found:
            raise UsageError(f"--config-from {path}: no run '{router}' (runs: {', '.join(runs)})")
    return found[-1]["config"]


def build_config(args):
    sections = json.loads(json.dumps(DEFAULTS))  # a deep copy
    if args.config_from:
        recorded = read_config_record(args.config_from, args.router)
        for name, section in sections.items():
            for key, value in recorded.get(name, {}).items():
                if key in section:
                    section[key] = value
    if args.router is not None:
        sections["model"]["ffn"] = args.router
        if args.router not in DENSE:
            sections["ffn"]["router"] = args.router
        if args.router == "switch" and args.top_k is None:  # apply_router: switch is top-1
            sections["ffn"]["top_k"] = 1
    for flag, (section, key, kind) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            sections[section][key] = kind(value)
    cfg = Config(sections)
    cfg.validate()
    return cfg


def config_json(cfg):
    """Our config_json: "model", "ffn" and "train" as recorded by `moe-bench train`."""
    return cfg.sections


def learning_rate(cfg, step):
    """Linear warm-up to lr over `warmup` steps, then cosine to lr * min_lr_fraction (train.cpp)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = cfg.steps - cfg.warmup
    if decay_steps <= 0:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * cosine)


# ---------------------------------------------------------------------------------------------
# model

def cv_squared(v):
    """Population variance / (mean^2 + 1e-10) (Shazeer's cv_squared); 0 for one expert."""
    if v.numel() <= 1:
        return v.new_zeros(())
    mean = v.mean()
    return ((v - mean) ** 2).mean() / (mean * mean + 1e-10)


def balance_loss(coef, selected, q, group):
    """coef * E * mean over groups of sum_e f_e P_e: f_e = the group's choices of e / (L*K) (all K
    choices), P_e = the group's mean q[:, e]; groups of L = `group` consecutive tokens."""
    T, E = q.shape
    K = selected.shape[1]
    G = T // group
    ones = torch.ones(G, group * K, device=q.device, dtype=q.dtype)
    f = torch.zeros(G, E, device=q.device, dtype=q.dtype).scatter_add_(
        1, selected.reshape(G, group * K), ones) / (group * K)  # (G, E)
    P = q.reshape(G, group, E).mean(dim=1)                       # (G, E)
    return coef * E * (f * P).sum(dim=1).mean()


def grouped_mm_available(device):
    """torch._grouped_mm runs forward and backward on `device` (bf16, 2-D x 3-D with offsets)."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.randn(32, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(2, 32, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
        offs = torch.tensor([8, 32], device=device, dtype=torch.int32)
        y = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)  # (32, 32)
        (y * torch.randn_like(y)).sum().backward()  # a dense cotangent, as in the model
        return True, ""
    except Exception as e:  # the kernel's own message says what is missing
        return False, f"torch._grouped_mm failed on {device}: {str(e).splitlines()[0]}"


def expert_capacity(capacity_factor, tokens, experts):
    """LayerConfig::capacity for expert_choice: C = ceil(cf * T / E), at most T (T = one group)."""
    return min(tokens, int(math.ceil(capacity_factor * tokens / experts - 1e-9)))


def swiglu_experts_uniform(xp, w_up, w_down):
    """xp (E, R, H) -> yp (E, R, H): expert e's SwiGLU FFN on its R rows, all in two bmm.

    Expert choice (R = S*C) and soft MoE (R = S*slots) give every expert the same number of rows,
    so the experts are one strided-batched GEMM each way: torch.bmm is one cuBLAS call forward
    and two per GEMM backward, like torch._grouped_mm, but needs no offsets, no Hopper kernel and
    no CPU fallback, and cuBLAS's batched GEMM is at least as fast as a grouped GEMM whose groups
    all have one shape (the grouped kernel's scheduler buys nothing here)."""
    pre = torch.bmm(xp, w_up.transpose(1, 2))                  # (E, R, 2I)
    gate, up = pre.chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, w_down.transpose(1, 2))  # (E, R, H)


def to_groups(x, seq):
    """x (B*S, H) in (b, s) order -> (S, B, H): group s is the B tokens at position s."""
    return x.view(-1, seq, x.shape[-1]).transpose(0, 1)


def from_groups(y):
    """(S, B, H) -> (B*S, H) in (b, s) order."""
    return y.transpose(0, 1).reshape(-1, y.shape[-1])


class MoEFeedForward(nn.Module):
    """Token choice: router (fp32) -> sort by expert -> grouped GEMMs (bf16) -> index_add combine
    (fp32). chain_of_experts runs it `iterations` times, one router each, on u_c."""

    def __init__(self, cfg, experts_impl, compute_dtype=torch.bfloat16):
        super().__init__()
        H, E, I = cfg.d_model, cfg.experts, cfg.inter
        self.router, self.E, self.K = cfg.router, E, cfg.choices_per_step()
        self.chain = cfg.router == "chain_of_experts"
        self.iterations = cfg.iterations if self.chain else 1
        self.seq = cfg.seq
        self.renormalize = cfg.renormalize
        self.aux_coef, self.z_coef = cfg.aux_coef_resolved(), cfg.z_coef_resolved()
        self.importance_coef, self.load_coef = cfg.importance_coef, cfg.load_coef
        self.noise_epsilon, self.jitter = cfg.noise_epsilon, cfg.jitter
        self.route_scale = cfg.route_scale
        self.experts_impl = experts_impl
        self.compute_dtype = compute_dtype  # the experts' GEMMs (bf16; fp32 for the checks)
        if self.chain:
            self.w_gate = nn.Parameter(torch.empty(self.iterations, H, E))  # (C, H, E)
        else:
            self.w_gate = nn.Parameter(torch.empty(H, E))     # (H, E)
        if self.router == "noisy_topk":
            self.w_noise = nn.Parameter(torch.empty(H, E))    # (H, E)
        self.w_up = nn.Parameter(torch.empty(E, 2 * I, H))    # (E, 2I, H) rows [gate | up]
        self.w_down = nn.Parameter(torch.empty(E, H, I))      # (E, H, I)
        if self.router == "sigmoid_bias":
            self.register_buffer("expert_bias", torch.zeros(E))  # (E) selection bias

    def route(self, x, w_gate, training):
        """x (T, H), w_gate (H, E) -> chosen experts (T, K) int64, weights (T, K) fp32, aux."""
        E, K = self.E, self.K
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            xr = x
            if self.router == "switch" and training and self.jitter > 0:
                xr = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = xr @ w_gate  # (T, E) fp32
            aux = logits.new_zeros(())
            if self.router in ("softmax_topk", "switch", "chain_of_experts"):
                probs = torch.softmax(logits, dim=-1)
                selected = logits.topk(K, dim=-1).indices
                weight = probs.gather(1, selected)  # chain_of_experts: not renormalised
                if self.router == "softmax_topk" and self.renormalize:
                    weight = weight / weight.sum(dim=-1, keepdim=True)
                if self.aux_coef > 0:  # chain_of_experts: sequence-wise, groups of S tokens
                    group = self.seq if self.chain else x.shape[0]
                    aux = aux + balance_loss(self.aux_coef, selected, probs, group)
            elif self.router == "noisy_topk":
                sigma = F.softplus(x @ self.w_noise) + self.noise_epsilon  # (T, E)
                noisy = logits + torch.randn_like(logits) * sigma if training else logits
                top = noisy.topk(min(K + 1, E), dim=-1)
                selected = top.indices[:, :K]
                weight = torch.softmax(top.values[:, :K], dim=-1)
                importance = torch.zeros(E, device=x.device).index_add_(
                    0, selected.reshape(-1), weight.reshape(-1))
                if training and K < E:
                    # P(expert e stays in the top k when its noise is redrawn): the threshold is
                    # the (k+1)-th noisy logit for an expert in the top k, the k-th otherwise.
                    in_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, selected, True)
                    threshold = torch.where(in_top, top.values[:, K:K + 1], top.values[:, K - 1:K])
                    z = (logits - threshold) / sigma
                    load = (0.5 * torch.erfc(-z / math.sqrt(2.0))).sum(dim=0)
                else:
                    load = torch.zeros(E, device=x.device).index_add_(
                        0, selected.reshape(-1), torch.ones(selected.numel(), device=x.device))
                aux = aux + self.importance_coef * cv_squared(importance) \
                    + self.load_coef * cv_squared(load)
            else:  # sigmoid_bias
                scores = torch.sigmoid(logits)
                selected = (scores + self.expert_bias).topk(K, dim=-1).indices
                kept = scores.gather(1, selected)
                weight = self.route_scale * kept / kept.sum(dim=-1, keepdim=True)
                if self.aux_coef > 0:  # sequence-wise: groups are whole sequences
                    q = scores / scores.sum(dim=-1, keepdim=True)
                    aux = aux + balance_loss(self.aux_coef, selected, q, self.seq)
            if self.z_coef > 0 and self.router != "sigmoid_bias":
                aux = aux + self.z_coef * (torch.logsumexp(logits, dim=-1) ** 2).mean()
        return selected, weight, aux

    def moe(self, x, w_gate, training):
        """One routing step: x (T, H) fp32 -> y (T, H) fp32, aux, tokens per expert (E) int32."""
        T, H = x.shape
        E, K = self.E, self.K
        selected, weight, aux = self.route(x, w_gate, training)
        # plan: a stable sort of the T*K choices by expert; segment e is rows [ends[e-1], ends[e])
        sorted_expert, order = torch.sort(selected.reshape(-1), stable=True)      # (M,), M = T*K
        row_token = order // K                                                     # (M,)
        ends = torch.searchsorted(sorted_expert, torch.arange(E, device=x.device),
                                  right=True, out_int32=True)                      # (E,) int32
        dt = self.compute_dtype
        xp = x.to(dt).index_select(0, row_token)                                   # (M, H) bf16
        w_up = self.w_up.to(dt)
        w_down = self.w_down.to(dt)
        if self.experts_impl == "grouped_mm":
            pre = torch._grouped_mm(xp, w_up.transpose(-2, -1), offs=ends)         # (M, 2I)
            gate, up = pre.chunk(2, dim=-1)
            yp = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=ends)
        else:  # per-expert loop: --device cpu when torch._grouped_mm does not run there
            bounds = [0] + ends.tolist()
            parts = []
            for e in range(E):
                gate, up = F.linear(xp[bounds[e]:bounds[e + 1]], w_up[e]).chunk(2, dim=-1)
                parts.append(F.linear(F.silu(gate) * up, w_down[e]))
            yp = torch.cat(parts)                                                  # (M, H)
        row_weight = weight.reshape(-1).index_select(0, order)                     # (M,) fp32
        y = torch.zeros(T, H, device=x.device, dtype=torch.float32).index_add_(
            0, row_token, yp.float() * row_weight[:, None])                        # (T, H)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))                       # (E,)
        return y, aux, counts

    def forward(self, x, training):
        """x (T, H) fp32 -> y (T, H) fp32, auxiliary loss, tokens per expert (E) int32."""
        if not self.chain:
            return self.moe(x, self.w_gate, training)
        # chain_of_experts: u_{c+1} = u_c + MoE_c(u_c); the layer returns u_C - x = sum_c MoE_c.
        u = x.float()
        y = aux = counts = None
        for c in range(self.iterations):
            y_c, aux_c, counts_c = self.moe(u, self.w_gate[c], training)
            y = y_c if y is None else y + y_c
            aux = aux_c if aux is None else aux + aux_c
            counts = counts_c if counts is None else counts + counts_c
            if c + 1 < self.iterations:
                u = u + y_c
        return y, aux, counts

    @torch.no_grad()
    def update_expert_bias(self, counts, tokens, rate):
        """sigmoid_bias: b_e += rate * sign(mean load - load_e) (update_expert_bias)."""
        mean = tokens * self.K / self.E
        self.expert_bias += rate * torch.sign(mean - counts.float())


class ExpertChoiceFeedForward(nn.Module):
    """Expert choice (Zhou 2022), one group per position: in each group of B tokens every expert
    takes its top-C tokens by router probability; batched over the S groups."""

    def __init__(self, cfg, compute_dtype=torch.bfloat16):
        super().__init__()
        H, E, I = cfg.d_model, cfg.experts, cfg.inter
        self.E, self.seq = E, cfg.seq
        self.capacity_factor = cfg.capacity_factor
        self.z_coef = cfg.z_coef_resolved()  # no balance loss (validate refuses aux_coef)
        self.compute_dtype = compute_dtype
        self.w_gate = nn.Parameter(torch.empty(H, E))         # (H, E)
        self.w_up = nn.Parameter(torch.empty(E, 2 * I, H))    # (E, 2I, H) rows [gate | up]
        self.w_down = nn.Parameter(torch.empty(E, H, I))      # (E, H, I)

    def forward(self, x, training):
        """x (B*S, H) fp32 -> y (B*S, H) fp32, auxiliary loss, None (no token counts)."""
        N, H = x.shape
        E, S = self.E, self.seq
        B = N // S
        C = expert_capacity(self.capacity_factor, B, E)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xg = to_groups(x.float(), S)                                      # (S, B, H)
            logits = xg @ self.w_gate                                         # (S, B, E) fp32
            probs = torch.softmax(logits, dim=-1)   # over the experts of each token
            # Each expert's top-C tokens of its group by (prob desc, token asc), the CPU's rule:
            # a stable descending sort over the B tokens keeps the lower token first on a tie.
            pick = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :C]  # (S,C,E)
            weight = probs.gather(1, pick)          # (S, C, E) combine weight = the probability
            aux = logits.new_zeros(())
            if self.z_coef > 0:  # mean over each group's tokens, then over the S groups
                aux = aux + self.z_coef * (torch.logsumexp(logits, dim=-1) ** 2).mean()
        # rows: expert e's S*C picks, group by group; row_token indexes the (S*B) grouped tokens
        group_start = torch.arange(S, device=x.device)[:, None, None] * B
        row_token = (pick + group_start).permute(2, 0, 1).reshape(-1)        # (E*S*C,)
        row_weight = weight.permute(2, 0, 1).reshape(-1)                      # (E*S*C,) fp32
        dt = self.compute_dtype
        xp = xg.reshape(S * B, H).to(dt).index_select(0, row_token).view(E, S * C, H)
        yp = swiglu_experts_uniform(xp, self.w_up.to(dt), self.w_down.to(dt))  # (E, S*C, H)
        y = torch.zeros(S * B, H, device=x.device, dtype=torch.float32).index_add_(
            0, row_token, yp.reshape(-1, H).float() * row_weight[:, None])    # (S*B, H)
        return from_groups(y.view(S, B, H)), aux, None


class SoftMoEFeedForward(nn.Module):
    """Soft MoE (Puigcerver 2023), one group per position: the n = E*slots slots of a group are
    softmax mixtures of its B tokens (dispatch), each token a softmax mixture of the slots'
    outputs (combine); expert e runs its slots of all S groups. Batched over the S groups."""

    def __init__(self, cfg, compute_dtype=torch.bfloat16):
        super().__init__()
        H, E, I = cfg.d_model, cfg.experts, cfg.inter
        self.E, self.seq, self.slots = E, cfg.seq, cfg.slots_per_expert
        # No auxiliary loss: ours computes none for soft MoE (a z-coef is not read, as ours).
        self.compute_dtype = compute_dtype
        self.w_gate = nn.Parameter(torch.empty(H, E * self.slots))  # (H, n) slot parameters phi
        self.slot_scale = nn.Parameter(torch.ones(1))               # (1) learnable logit scale
        self.w_up = nn.Parameter(torch.empty(E, 2 * I, H))          # (E, 2I, H) rows [gate | up]
        self.w_down = nn.Parameter(torch.empty(E, H, I))            # (E, H, I)

    def forward(self, x, training):
        """x (B*S, H) fp32 -> y (B*S, H) fp32, auxiliary loss (zero), None (no token counts)."""
        N, H = x.shape
        E, S, P = self.E, self.seq, self.slots
        B = N // S
        n = E * P
        norm_eps = 1e-6  # src/cpu/soft_moe.cpp kNormEps
        with torch.autocast(device_type=x.device.type, enabled=False):
            xg = to_groups(x.float(), S)                                              # (S, B, H)
            x_hat = xg * torch.rsqrt((xg * xg).sum(dim=-1, keepdim=True) + norm_eps)
            phi = self.w_gate
            phi_hat = phi * torch.rsqrt((phi * phi).sum(dim=0, keepdim=True) + norm_eps)  # (H, n)
            logits = self.slot_scale * (x_hat @ phi_hat)                              # (S, B, n)
            dispatch = torch.softmax(logits, dim=1)  # over the group's tokens, per slot
            combine = torch.softmax(logits, dim=2)   # over the slots, per token
        dt = self.compute_dtype
        slots_in = torch.bmm(dispatch.transpose(1, 2).to(dt), xg.to(dt))            # (S, n, H)
        # expert e's rows: slots [e*P, (e+1)*P) of every group, (E, S*P, H)
        xp = slots_in.view(S, E, P, H).transpose(0, 1).reshape(E, S * P, H)
        yp = swiglu_experts_uniform(xp, self.w_up.to(dt), self.w_down.to(dt))      # (E, S*P, H)
        slots_out = yp.view(E, S, P, H).transpose(0, 1).reshape(S, n, H)            # (S, n, H)
        y = torch.bmm(combine.to(dt), slots_out)                                     # (S, B, H)
        return from_groups(y.float()), x.new_zeros((), dtype=torch.float32), None


class DenseFeedForward(nn.Module):
    """One SwiGLU FFN of width I (dense_active: K*I, dense_params: E*I)."""

    def __init__(self, cfg):
        super().__init__()
        H, I = cfg.d_model, cfg.ffn_inter()
        self.w_up = nn.Parameter(torch.empty(2 * I, H))    # (2I, H) rows [gate | up]
        self.w_down = nn.Parameter(torch.empty(H, I))      # (H, I)

    def forward(self, x, training):
        gate, up = F.linear(x, self.w_up).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, self.w_down)
        return y.float(), x.new_zeros((), dtype=torch.float32), None


def make_ffn(cfg, experts_impl, compute_dtype):
    if cfg.dense:
        return DenseFeedForward(cfg)
    if cfg.router == "expert_choice":
        return ExpertChoiceFeedForward(cfg, compute_dtype)
    if cfg.router == "soft_moe":
        return SoftMoEFeedForward(cfg, compute_dtype)
    return MoEFeedForward(cfg, experts_impl, compute_dtype)


class Block(nn.Module):
    def __init__(self, cfg, experts_impl, compute_dtype):
        super().__init__()
        D = cfg.d_model
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(D, eps=LAYERNORM_EPS)
        self.qkv = nn.Linear(D, 3 * D)   # [q | k | v], head h at h*hs
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D, eps=LAYERNORM_EPS)
        self.ffn = make_ffn(cfg, experts_impl, compute_dtype)

    def forward(self, x, training):
        B, S, D = x.shape                                                 # x fp32 residual
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)                  # (B, S, D) each
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # (B, NH, S, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, S, D))
        f, aux, counts = self.ffn(self.ln2(x).reshape(B * S, D), training)
        return x + f.view(B, S, D), aux, counts


class TwinLM(nn.Module):
    def __init__(self, cfg, experts_impl, compute_dtype=torch.bfloat16):
        """compute_dtype: bf16 (autocast, as our GPU trainer); float32 turns autocast off, for
        checks against our fp32 CPU reference (bench/peers/twin_check.py)."""
        super().__init__()
        self.compute_dtype = compute_dtype
        V, D = 256, cfg.d_model
        self.wte = nn.Parameter(torch.empty(V, D))        # (V, D) bytes, also the output head
        self.wpe = nn.Parameter(torch.empty(cfg.seq, D))  # (S, D)
        self.blocks = nn.ModuleList(Block(cfg, experts_impl, compute_dtype)
                                    for _ in range(cfg.layers))
        self.lnf = nn.LayerNorm(D, eps=LAYERNORM_EPS)

    def forward(self, inputs, targets, training):
        """inputs, targets (B, S) int64 -> per-byte losses (B*S) fp32 nats, auxiliary loss summed
        over layers, tokens per expert of each layer."""
        B, S = inputs.shape
        with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16,
                            enabled=self.compute_dtype != torch.float32):
            x = F.embedding(inputs, self.wte) + self.wpe[:S]              # (B, S, D) fp32
            aux = x.new_zeros(())
            counts = []
            for block in self.blocks:
                x, block_aux, block_counts = block(x, training)
                aux = aux + block_aux
                counts.append(block_counts)
            logits = F.linear(self.lnf(x), self.wte)                      # (B, S, V) bf16
        losses = F.cross_entropy(logits.float().view(B * S, -1), targets.reshape(B * S),
                                 reduction="none")                        # (B*S) fp32
        return losses, aux, counts


def init_weights(model, cfg, generator):
    """GPT-2 init with our residual scaling, the FFN as init_params (see the file header)."""
    residual = 1.0 / math.sqrt(2.0 * cfg.layers)

    def normal(p, std):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator) * std)

    normal(model.wte, 0.02)
    normal(model.wpe, 0.02)
    H = cfg.d_model
    for block in model.blocks:
        normal(block.qkv.weight, 0.02)
        normal(block.proj.weight, 0.02 * residual)
        nn.init.zeros_(block.qkv.bias)
        nn.init.zeros_(block.proj.bias)
        ffn = block.ffn
        I = cfg.ffn_inter()
        if not cfg.dense:
            if cfg.router == "noisy_topk":  # Shazeer: gate and noise weights start at zero
                nn.init.zeros_(ffn.w_gate)
                nn.init.zeros_(ffn.w_noise)
            elif cfg.router == "soft_moe":  # slot parameters N(0, 1/sqrt(H)), scale 1
                normal(ffn.w_gate, 1.0 / math.sqrt(H))
                nn.init.ones_(ffn.slot_scale)
            else:                           # Switch's reduced init (each chain router too)
                normal(ffn.w_gate, math.sqrt(0.1 / H))
        normal(ffn.w_up, 1.0 / math.sqrt(H))
        normal(ffn.w_down, residual / math.sqrt(I))


def parameter_groups(model):
    """(decayed, not decayed) as our tensor_list: matrices decay; LayerNorm gains and biases,
    linear biases and soft MoE's slot_scale do not. Buffers (the sigmoid_bias selection bias) are
    not parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        matrix = name in ("wte", "wpe") or name.endswith(("qkv.weight", "proj.weight")) or \
            (".ffn." in name and not name.endswith("slot_scale"))
        assert matrix == (p.dim() >= 2), name
        (decay if matrix else no_decay).append(p)
    return decay, no_decay


# ---------------------------------------------------------------------------------------------
# training

def git_revision(build_dir=""):
    """The revision our binaries were built from (BUILD/generated/moe_build_info.hpp) when a build
    folder is given: on a GPU machine the working tree's git metadata may be older than the code
    that travelled with it. Else `git rev-parse` of this checkout."""
    if build_dir:
        try:
            with open(os.path.join(build_dir, "generated", "moe_build_info.hpp")) as f:
                for line in f:
                    if "MOE_GIT_REVISION" in line and '"' in line:
                        return line.split('"')[1]
        except OSError:
            pass
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def json_safe(v):
    """Non-finite floats become null (as nlohmann::json writes them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


class JsonLines:
    """Appends one record per line (one write per line) to a file, or prints to stdout."""

    def __init__(self, path):
        self.path = path
        if path:
            if os.path.isdir(path):
                raise UsageError(f"--out {path}: is a folder")
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
            except OSError as e:
                raise UsageError(f"--out {path}: cannot open for appending: {e.strerror}")

    def write(self, record):
        line = json.dumps(json_safe(record)) + "\n"
        if not self.path:
            sys.stdout.write(line)
            sys.stdout.flush()
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            before = os.lseek(fd, 0, os.SEEK_END)
            data = line.encode()
            if os.write(fd, data) != len(data):  # a short write (disk full): cut it off again
                os.ftruncate(fd, before)
                raise OSError(f"{self.path}: short write")
        finally:
            os.close(fd)


class Twin:
    def __init__(self, cfg, args, device, compute_dtype=torch.bfloat16):
        self.cfg, self.args, self.device = cfg, args, device
        self.peer = f"pytorch-{args.mode}"
        torch.manual_seed(cfg.seed % 2 ** 63)  # router noise and jitter
        self.model = TwinLM(cfg, args.experts_impl, compute_dtype)
        init_weights(self.model, cfg, torch.Generator().manual_seed(cfg.seed % 2 ** 63))
        self.model.to(device)
        decay, no_decay = parameter_groups(self.model)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            **({"fused": True} if device.type == "cuda" else {}))
        self.train_fn = self.train_objective
        self.eval_fn = self.eval_losses
        if args.mode == "compile":
            self.train_fn = torch.compile(self.train_objective, mode=args.compile_mode)
            self.eval_fn = torch.compile(self.eval_losses, mode=args.compile_mode)

    def parameter_count(self):
        return sum(p.numel() for p in self.model.parameters())

    def train_objective(self, inputs, targets):
        losses, aux, counts = self.model(inputs, targets, True)
        loss = losses.mean()
        return loss + aux, loss, aux, counts

    def eval_losses(self, inputs, targets):
        return self.model(inputs, targets, False)[0]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to_device(self, array):
        return torch.from_numpy(array).to(self.device, non_blocking=False)

    def train_step(self, domains, step):
        """One step; returns (loss, aux, lr, grad_norm, step ms)."""
        cfg = self.cfg
        self.sync()
        t0 = time.perf_counter()
        inputs, targets, _ = train_batch(domains, cfg.seed, step, cfg.batch, cfg.seq)
        inputs, targets = self.to_device(inputs), self.to_device(targets)
        lr = learning_rate(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        objective, loss, aux, counts = self.train_fn(inputs, targets)
        objective.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if cfg.grad_clip > 0:  # scale clip / norm when norm > clip, as ours
            torch._foreach_mul_(grads, torch.clamp(cfg.grad_clip / grad_norm, max=1.0))
        self.optimizer.step()
        if cfg.router == "sigmoid_bias" and not cfg.dense:
            for block, c in zip(self.model.blocks, counts):
                block.ffn.update_expert_bias(c, cfg.batch * cfg.seq, cfg.bias_update_rate)
        self.sync()
        step_ms = (time.perf_counter() - t0) * 1000.0
        loss_v = loss.item()
        if not math.isfinite(loss_v):
            raise RuntimeError(f"training diverged at step {step}: the loss is not finite "
                               f"(try a lower --lr)")
        return loss_v, aux.item(), lr, grad_norm.item(), step_ms

    @torch.no_grad()
    def evaluate(self, domains, val, step):
        """Val bits per byte over all scored bytes and per domain. A short last batch is padded
        to B rows (repeating its first row) so that one compiled graph serves every batch; token-
        choice routing is per token and dropless, so padding rows change no scored byte. Expert
        choice and soft MoE mix the B tokens at each position, so there the short batch runs at
        its own size, as ours (its groups have n tokens; compile mode compiles a second graph)."""
        self.sync()
        t0 = time.perf_counter()
        B, S = self.cfg.batch, self.cfg.seq
        loss_sum = np.zeros(len(domains))
        scored = np.zeros(len(domains))
        for inputs, targets, dom in val:
            n = inputs.shape[0]
            if n < B and not self.cfg.grouped:
                inputs = np.concatenate([inputs, np.repeat(inputs[:1], B - n, axis=0)])
                targets = np.concatenate([targets, np.repeat(targets[:1], B - n, axis=0)])
            losses = self.eval_fn(self.to_device(inputs), self.to_device(targets))
            row_sums = losses.view(-1, S)[:n].double().sum(dim=1).cpu().numpy()
            np.add.at(loss_sum, dom, row_sums)
            np.add.at(scored, dom, S)
        self.sync()
        ln2 = math.log(2.0)
        return {"step": step, "val_bpb": loss_sum.sum() / scored.sum() / ln2,
                "val_bpb_domain": {d.name: loss_sum[i] / scored[i] / ln2
                                   for i, d in enumerate(domains)},
                "eval_ms": (time.perf_counter() - t0) * 1000.0}


def run(args):
    cfg = build_config(args)
    if args.exclude_steps < 0:
        raise UsageError(f"exclude-steps must be >= 0, got {args.exclude_steps}")
    # The one fp32 matmul is the router gate, kept in full fp32 on purpose (see the file header);
    # inductor's advice to enable TF32 for it does not apply.
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device (use --device cpu to test)")
    device = torch.device(args.device)
    if cfg.grouped:
        args.experts_impl = "bmm"  # every expert has the same rows: see swiglu_experts_uniform
    elif not cfg.dense:
        ok, why = grouped_mm_available(device)
        if args.experts_impl == "auto":
            if ok:
                args.experts_impl = "grouped_mm"
            elif device.type == "cpu":
                args.experts_impl = "loop"
            else:
                raise UsageError(f"{why}; the twin needs it on CUDA (PyTorch 2.8 or later)")
        elif args.experts_impl == "grouped_mm" and not ok:
            raise UsageError(why)
        elif args.experts_impl == "loop" and device.type != "cpu":
            raise UsageError("--experts-impl loop is the CPU test path; CUDA runs use "
                             "torch._grouped_mm")
    else:
        args.experts_impl = "dense"
    out = JsonLines(args.out)
    domains = load_corpus(args.corpus)
    val = validation_batches(domains, cfg.val_windows, cfg.batch, cfg.seq)
    train_batch(domains, cfg.seed, 0, 1, cfg.seq)  # fail now when no domain has one window

    twin = Twin(cfg, args, device)
    command = "python3 bench/peers/torch_lm.py " + " ".join(sys.argv[1:])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    base = {"command": command, "git": git_revision(args.build), "peer": twin.peer, "torch": torch.__version__,
            "run": cfg.name, "router": cfg.description(), "device": device_name,
            "dtype": "bf16 autocast, fp32 master weights"}

    def record(kind, **fields):
        rec = dict(base)
        rec["timestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        rec["kind"] = kind
        rec.update(fields)
        out.write(rec)

    label = f"{twin.peer} {cfg.name}"
    parameters = twin.parameter_count()
    record("config", config=config_json(cfg), parameters=parameters, start_step=0,
           mode=args.mode, compile_mode=args.compile_mode if args.mode == "compile" else None,
           experts_impl=args.experts_impl, config_from=args.config_from or None)
    print(f"{label}: {parameters} parameters, experts {args.experts_impl}, device {device_name}, "
          f"torch {torch.__version__}", file=sys.stderr, flush=True)

    def emit_eval(ev):
        record("eval", **ev)
        per = " ".join(f"{k} {v:.3f}" for k, v in ev["val_bpb_domain"].items())
        print(f"{label} eval step {ev['step']}: val {ev['val_bpb']:.3f} bits/byte | {per}",
              file=sys.stderr, flush=True)
        return ev

    final_eval = emit_eval(twin.evaluate(domains, val, 0))
    first_eval_ms = final_eval["eval_ms"]  # compile mode: includes compiling the evaluation graph
    step_ms = []
    final_loss = 0.0
    every = max(1, cfg.steps // 10)
    for step in range(cfg.steps):
        loss, aux, lr, grad_norm, ms = twin.train_step(domains, step)
        step_ms.append(ms)
        final_loss = loss
        done = step + 1
        tokens_per_s = cfg.batch * cfg.seq / (ms / 1000.0)
        record("step", step=done, loss=loss, aux_loss=aux, lr=lr, grad_norm=grad_norm,
               tokens_per_s=tokens_per_s, time_ms={"step": ms})
        if done % every == 0 or done == cfg.steps:
            print(f"{label} step {done}/{cfg.steps} loss {loss:.3f} ({loss / math.log(2):.3f} bpb) "
                  f"{tokens_per_s / 1000:.1f}k tok/s", file=sys.stderr, flush=True)
        if done == cfg.steps or (cfg.eval_every > 0 and done % cfg.eval_every == 0):
            final_eval = emit_eval(twin.evaluate(domains, val, done))

    summary = {k: v for k, v in final_eval.items() if k != "step"}
    summary["step"] = final_eval["step"]
    if step_ms:
        excluded = args.exclude_steps if len(step_ms) > args.exclude_steps else 0
        median_ms = statistics.median(step_ms[excluded:])
        tokens = cfg.batch * cfg.seq
        summary.update(
            steps_run=len(step_ms), train_seconds=sum(step_ms) / 1000.0,
            tokens_per_s=tokens / (median_ms / 1000.0),
            mean_tokens_per_s=len(step_ms) * tokens / (sum(step_ms) / 1000.0),
            excluded_steps=excluded, excluded_step_ms=step_ms[:excluded],
            compile_s=(sum(step_ms[:excluded]) - excluded * median_ms) / 1000.0,
            time_ms_per_step={"median_step": median_ms}, final_train_loss=final_loss,
            first_eval_ms=first_eval_ms)
    record("summary", config=config_json(cfg), parameters=parameters, mode=args.mode,
           experts_impl=args.experts_impl, **summary)
    if step_ms:
        print(f"{label}: val {final_eval['val_bpb']:.4f} bits/byte at step {final_eval['step']}; "
              f"{summary['tokens_per_s']:.0f} tokens/s (median step {median_ms:.2f} ms over steps "
              f"after the first {excluded}; those took {summary['compile_s']:.1f} s more)",
              file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main():
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-from", metavar="RUN.jsonl",
                    help="train the configuration of this run's \"config\" record")
    ap.add_argument("--router", choices=ROUTERS + DENSE,
                    help="FFN: a router or a dense baseline (default softmax_topk)")
    for flag, (_, _, kind) in FLAGS.items():
        ap.add_argument("--" + flag.replace("_", "-"), type=kind, metavar=kind.__name__.upper())
    ap.add_argument("--mode", choices=("eager", "compile"), default="eager")
    ap.add_argument("--compile-mode", default="default",
                    choices=("default", "reduce-overhead", "max-autotune",
                             "max-autotune-no-cudagraphs"),
                    help="torch.compile mode (default: default, see above)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--experts-impl", choices=("auto", "grouped_mm", "loop"), default="auto",
                    help="token choice: auto = torch._grouped_mm, or on the CPU a per-expert "
                         "loop where it does not run; expert_choice and soft_moe always use "
                         "torch.bmm (every expert has the same rows)")
    ap.add_argument("--exclude-steps", type=int, default=5,
                    help="first steps left out of the median speed (compilation, warm-up)")
    ap.add_argument("--corpus", default=os.path.join(REPO, "data", "corpus"))
    ap.add_argument("--build", default="",
                    help="our build folder: its revision is recorded (default: git rev-parse)")
    ap.add_argument("--out", default="", help="append JSON lines here (default: stdout)")
    args = ap.parse_args()
    try:
        run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        print(f"{PROG}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
