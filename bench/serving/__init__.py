"""Serving benchmark: ModelPort's runtime vs mlflow models serve vs MLServer vs in-process."""
