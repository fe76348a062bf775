"""GPT pre-training as a library: `trainer.train.run(cfg)` takes a plain config object."""
