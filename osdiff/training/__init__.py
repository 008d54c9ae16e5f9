"""Training: typed config, data, losses, discriminators, the run context (run.py), one module per
stage (stages/), the entry point (trainer.Trainer) and run export (export.export_run)."""
