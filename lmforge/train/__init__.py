"""The training loop and its parts: data sampling, optimizer and schedules, checkpoints, DDP, metrics, MFU.

The stages that run on the loop live in lmforge.stages (`from lmforge.stages.pretrain import pretrain`).
"""
