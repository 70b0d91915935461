"""The one training loop (loop.py) and its parts: objectives, checkpoints, distributed, schedule, logging, plots."""
