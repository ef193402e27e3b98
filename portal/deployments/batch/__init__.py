"""Batch jobs: a dataset scored by a model version, deployed or not (the engine side is
``deployer.batch``)."""
