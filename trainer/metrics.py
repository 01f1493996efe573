"""Training metrics: loss (overall and per timestep bin), grad norm, lr, rolling batches/s and samples/s, MFU.

MFU = achieved model FLOP/s / device peak. Model FLOPs per sample are `trainer.model.train_flops_per_sample`
(3 x the forward FLOPs of the denoiser at the batch's latent size and padded text length); peaks are dense
BF16 tensor-core figures from the vendors' datasheets (table below) or `--peak-tflops`. On CPU MFU is "n/a".
"""
from __future__ import annotations

import collections
import time

import torch

# Dense (no sparsity) BF16 tensor-core peak, TFLOP/s, matched on the CUDA device name (first match wins).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),       # SXM
    ("H800", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8),
    ("V100", 125.0),       # FP16 (no BF16 on Volta)
]

TIMESTEP_BINS = ((0.0, 0.3), (0.3, 0.6), (0.6, 1.0000001))
BIN_NAMES = ("t0.0-0.3", "t0.3-0.6", "t0.6-1.0")


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of the device, or None (CPU, unknown GPU without --peak-tflops)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def bin_losses(per_sample: torch.Tensor, t: torch.Tensor) -> dict[str, tuple[float, int]]:
    """{bin: (sum of losses, count)} over the timestep bins [0, .3), [.3, .6), [.6, 1]."""
    out = {}
    per_sample, t = per_sample.detach().float().cpu(), t.detach().float().cpu()
    for name, (lo, hi) in zip(BIN_NAMES, TIMESTEP_BINS):
        sel = (t >= lo) & (t < hi)
        out[name] = (float(per_sample[sel].sum()), int(sel.sum()))
    return out


class Meter:
    """Accumulates between log lines; keeps a rolling window of step times for the rates."""

    def __init__(self, window: int = 20, peak_flops: float | None = None):
        self.window = collections.deque(maxlen=max(1, window))
        self.peak_flops = peak_flops
        self.reset()
        self._last = time.perf_counter()

    def reset(self):
        self.loss_sum = 0.0
        self.loss_n = 0
        self.bins = {name: [0.0, 0] for name in BIN_NAMES}
        self.grad_norm = 0.0

    def restart_clock(self):
        self._last = time.perf_counter()

    def step(self, loss: float, bins: dict[str, tuple[float, int]], grad_norm: float, batches: int, samples: int,
             flops: float):
        self.tick(batches, samples, flops)
        self.record([loss], bins, grad_norm)

    def tick(self, batches: int, samples: int, flops: float):
        """One step's timing (every step; no values, so no host sync)."""
        now = time.perf_counter()
        self.window.append((now - self._last, batches, samples, flops))
        self._last = now

    def record(self, losses: list[float], bins: dict[str, tuple[float, int]], grad_norm: float):
        """Values of the steps since the last record (read from the device on log/checkpoint steps)."""
        self.loss_sum += sum(losses)
        self.loss_n += len(losses)
        for name, (s, n) in bins.items():
            self.bins[name][0] += s
            self.bins[name][1] += n
        self.grad_norm = grad_norm

    def rates(self) -> dict[str, float | None]:
        secs = sum(w[0] for w in self.window)
        if secs <= 0:
            return {"batches_per_s": None, "samples_per_s": None, "model_tflops_per_s": None, "mfu": None}
        flops = sum(w[3] for w in self.window) / secs
        return {"batches_per_s": sum(w[1] for w in self.window) / secs,
                "samples_per_s": sum(w[2] for w in self.window) / secs,
                "model_tflops_per_s": flops / 1e12,
                "mfu": flops / self.peak_flops if self.peak_flops else None}

    def summary(self, lr: float) -> dict[str, float | None]:
        out: dict[str, float | None] = {"loss": self.loss_sum / max(1, self.loss_n), "grad_norm": self.grad_norm,
                                        "lr": lr}
        for name, (s, n) in self.bins.items():
            out[f"loss/{name}"] = s / n if n else None
        out.update(self.rates())
        return out


def format_line(step: int, total: int, values: dict, counts: dict | None = None) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    bins = " ".join(f"{name}={f(values.get(f'loss/{name}'), '.4f')}" for name in BIN_NAMES)
    mfu = values.get("mfu")
    line = (f"step {step}/{total} loss={values['loss']:.4f} [{bins}] grad_norm={values['grad_norm']:.3f} "
            f"lr={values['lr']:.2e} batches/s={f(values.get('batches_per_s'), '.2f')} "
            f"samples/s={f(values.get('samples_per_s'), '.1f')} "
            f"MFU={'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
    if counts:
        line += " | " + " ".join(f"{k}={v}" for k, v in counts.items())
    return line
