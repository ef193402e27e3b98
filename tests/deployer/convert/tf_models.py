"""Tiny Keras 3 and TensorFlow SavedModel models, built at test time in the tensorflow
converter image (TensorFlow is never installed next to the portal): ``python
tf_models.py OUT`` writes ``model.keras`` and ``saved/`` (a SavedModel folder) into OUT."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

FEATURES = 4


def train(out: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(FEATURES,), name="features")
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    keras.Model(inputs, outputs).save(out / "model.keras")

    class Scorer(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((FEATURES, 2), seed=(1, 2)))
            self.b = tf.Variable(tf.constant([0.5, -0.25]))

        @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            scores = tf.nn.sigmoid(tf.matmul(x, self.w) + self.b)
            return {"scores": scores, "total": tf.reduce_sum(scores, axis=1)}

    scorer = Scorer()
    tf.saved_model.save(scorer, str(out / "saved"), signatures={"serving_default": scorer.serve})
    np.save(out / "sample.npy", np.random.default_rng(0).normal(size=(3, FEATURES)).astype("f4"))


def saved_model_tar_gz(folder: Path, path: Path) -> None:
    """The SavedModel folder as users upload it: one archive, relative paths."""
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname="saved")


if __name__ == "__main__":
    train(Path(sys.argv[1]))
