"""The entry point of training: a config's stages, run (or resumed) in order on one TrainingRun
(osdiff.training.run: run folder layout, processes, checkpoints)."""
from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .run import TrainingRun
from .stages import stage_trainer


class Trainer:
    """Trains every stage of `config`; relative paths in it are relative to `config_dir`
    (default: the working directory)."""

    def __init__(self, config: TrainConfig, config_dir: Path | None = None) -> None:
        self.config = config
        self.context = TrainingRun(config, config_dir)

    def run(self, max_steps: int | None = None, max_minutes: float | None = None) -> Path | None:
        """Run (or resume) every unfinished stage. `max_steps` / `max_minutes` stop early
        after a checkpoint (for chunked runs); returns the model folder once all are done."""
        run = self.context
        done = run.start(max_steps, max_minutes)
        for index, stage in enumerate(self.config.stages):
            if index in done:
                continue
            finished = stage_trainer(stage.name)(run, index, stage)
            if not finished:
                run.wait()
                return None
            run.mark_done(index)
            if run.stopped_by and index + 1 < len(self.config.stages):  # stopped in a stage's last step:
                run.wait()  # the next stage starts with the next run
                return None
        return run.out / "model"
