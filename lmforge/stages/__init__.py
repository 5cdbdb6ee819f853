"""Training stages, one small module each (pretrain, sft, ...): a stage builds the model, the batch source and the
objective and hands them to the one loop (lmforge.train.loop). Configs live in light modules so the CLI's help
needs no torch; import a stage module to run it."""
