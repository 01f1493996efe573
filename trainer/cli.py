"""`prx-train`: train the PRX denoiser on encoded shards.

    prx-train --shards enc/ --out runs/a [--config manifests/train/base.yaml] [--mix MIX.yaml]
              [--caption long=0.5,short=0.5] [--model prx-small|tiny] [--steps N] [--batch-size B]
              [--grad-accum K] [--loader-workers W] [--open-shards K] [--shuffle-buffer S]
    prx-train --resume RUN_DIR [--steps N] [--log-every N] ...   (only options safe to change; see docs)
    torchrun --nproc-per-node 8 -m trainer.cli --mix manifests/mixtures/example.yaml --out runs/b

Every option can be set in the YAML file given to --config (same names); the command line wins. The
effective config is saved as RUN_DIR/config.yaml; `--resume RUN_DIR` continues from it. docs/training.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from contract.config import ConfigError, add_arguments
from trainer.config import TrainConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prx-train", description=__doc__.split("\n\n")[0],
        epilog="Objective, numerics and data options default to PRX's baseline recipe (manifests/train/base.yaml).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, TrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from contract.encoded import EncoderMismatch
    from contract.errors import PrxError
    from trainer.data import DataError
    from trainer.model import PrecisionError

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(vars(args))
        from trainer.train import run

        run(cfg)
        sys.stdout.flush()   # here, so a reader that left is met below, not at exit
    except (ConfigError, PrxError, EncoderMismatch, DataError, PrecisionError, FileNotFoundError,
            FileExistsError, ValueError) as exc:
        sys.stderr.write(f"prx-train: error: {exc}\n")  # one write: ranks sharing a pipe do not interleave lines
        sys.stderr.flush()
        if getattr(exc, "agreed", False):
            _after_every_rank_printed()
        return 2
    except KeyboardInterrupt:
        print("interrupted; `prx-train --resume RUN_DIR` continues from the last checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:   # stdout's reader left (`prx-train ... | head`): quiet, as a tool SIGPIPE ends
        return _stdout_gone()
    return 0


def _stdout_gone() -> int:
    """Exit status 141 (128 + SIGPIPE) with stdout sent to /dev/null, so Python's flush at exit stays quiet."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # no real stdout (a caller's replacement)
        pass
    return 128 + 13


def _after_every_rank_printed() -> None:
    """An error every rank raised together (a data error under DDP): wait until each has printed it, so torchrun,
    which stops the other ranks when the first one exits, cannot cut a rank's message off."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
