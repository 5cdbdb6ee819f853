"""The training loop and its parts: data sampling, optimizer and schedules, checkpoints, DDP, metrics, MFU.

Entry point: `from lmforge.train.pretrain import PretrainConfig, pretrain` (not re-exported here, so that the
name `lmforge.train.pretrain` always means the module).
"""
