"""Train Mask R-CNN: ``maskrcnn-train [hydra overrides]`` (also ``python -m maskrcnn_coco`` and
``python maskrcnn_coco/main_mlops.py`` from a checkout).

Composes the shipped ``conf/config.yaml`` (typed by ``maskrcnn_coco.config``), trains into the Hydra
run folder (``runs/maskrcnn/<timestamp>/`` or ``runs/maskrcnn/multirun/<timestamp>/<job>/``) and
returns the objective (``objective.metric``, final segm AP by default) for Hydra's sweepers.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import tempfile

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.cli.experiment import run_training
from maskrcnn_coco.config import config_dir, register_configs
from maskrcnn_coco.engine.fit import RunInterrupted
from maskrcnn_coco.engine.signals import GracefulStop, StopRequested
from maskrcnn_coco.utils import dist
from maskrcnn_coco.utils.errors import UserError

log = logging.getLogger("maskrcnn_coco")
register_configs()
register_resolvers()


# An absolute config_path: the shipped conf/ is found the same way from a checkout or a wheel.
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    try:
        return run_training(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as err:
        # Bad input: the message says what to fix; a stack trace would only hide it.
        log.debug("Stopped on bad input", exc_info=True)
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as stop:
        # SIGTERM/SIGINT: a resumable checkpoint is written; 128 + signal number, as a shell reports it.
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except FloatingPointError as err:
        # NaN or diverged loss: the message ranks the causes; no checkpoint was written from those weights.
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(3)
    except StopRequested as stop:
        print(f"Stopped by {signal.Signals(stop.signum).name} before training started; nothing to save", file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        dist.destroy_distributed()


def main() -> None:
    """``maskrcnn-train``: Hydra composes the config from the command line and trains.

    Under torchrun or SLURM only rank 0 writes under ``runs/``: the other processes get a Hydra
    folder of their own in the temp directory (nothing is written there but Hydra's bookkeeping)
    and train into rank 0's run folder, which it broadcasts.
    """
    scratch = None
    if dist.rank() != 0 and not any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in sys.argv[1:]):
        scratch = tempfile.mkdtemp(prefix=f"maskrcnn_coco_rank{dist.rank()}_")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    try:
        with GracefulStop():  # until fit takes over: a signal during start-up ends the run with one line
            hydra_main()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
