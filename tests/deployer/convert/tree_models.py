"""Tiny gradient-boosted tree models, trained at test time inside the trees converter image.

The frameworks live only in that image (never next to the portal), so the tests copy
this file into a container from it and run it there: ``python tree_models.py OUT``
writes every model below into OUT, and ``build_in_container`` brings them back.
"""

from __future__ import annotations

import io
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

FEATURES = 6
# name -> (format, kind): what each file is, for the tests' expectations.
MODELS = {
    "xgb_binary.json": ("xgboost", "classifier"),
    "xgb_multi.ubj": ("xgboost", "classifier"),
    "xgb_reg.json": ("xgboost", "regressor"),
    "lgb_binary.txt": ("lightgbm", "classifier"),
    "lgb_multi.txt": ("lightgbm", "classifier"),
    "lgb_reg.txt": ("lightgbm", "regressor"),
    "cb_binary.cbm": ("catboost", "classifier"),
    "cb_multi.cbm": ("catboost", "classifier"),
    "cb_reg.cbm": ("catboost", "regressor"),
}
# A LightGBM model with linear trees: onnxmltools drops the leaves' linear parts, so
# the converted model computes something else, and the check must stop it.
UNFAITHFUL = "lgb_linear.txt"
_PYTHON = "/opt/convert/bin/python"


def train(out: Path) -> None:
    """Train every model on a small synthetic table and save it with the framework."""
    import catboost
    import lightgbm
    import numpy as np
    import xgboost

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, FEATURES)).astype(np.float32)
    binary = (x[:, 0] + x[:, 1] > 0).astype(int)
    multi = np.digitize(x[:, 0] + 0.5 * x[:, 2], [-0.5, 0.5])
    target = (2 * x[:, 0] - x[:, 3] + 0.1 * rng.normal(size=300)).astype(np.float32)
    trees = {"n_estimators": 8, "max_depth": 3, "n_jobs": 1}
    xgboost.XGBClassifier(**trees).fit(x, binary).save_model(out / "xgb_binary.json")
    xgboost.XGBClassifier(**trees).fit(x, multi).save_model(out / "xgb_multi.ubj")
    xgboost.XGBRegressor(**trees).fit(x, target).save_model(out / "xgb_reg.json")
    params = {"num_leaves": 7, "verbose": -1, "min_data_in_leaf": 5, "num_threads": 1}
    for name, objective, labels in (
        ("lgb_binary.txt", {"objective": "binary"}, binary),
        ("lgb_multi.txt", {"objective": "multiclass", "num_class": 3}, multi),
        ("lgb_reg.txt", {"objective": "regression"}, target),
        (UNFAITHFUL, {"objective": "regression", "linear_tree": True}, target),
    ):
        dataset = lightgbm.Dataset(x, labels)
        lightgbm.train({**params, **objective}, dataset, 8).save_model(str(out / name))
    common = {"iterations": 8, "depth": 3, "verbose": 0, "thread_count": 1}
    common["allow_writing_files"] = False
    catboost.CatBoostClassifier(**common).fit(x, binary).save_model(str(out / "cb_binary.cbm"))
    catboost.CatBoostClassifier(loss_function="MultiClass", **common).fit(x, multi).save_model(
        str(out / "cb_multi.cbm")
    )
    catboost.CatBoostRegressor(**common).fit(x, target).save_model(str(out / "cb_reg.cbm"))
    np.save(out / "sample.npy", x[:5])


def build_in_container(
    client: Any, image: str, dest: Path, *, script: str = __file__
) -> dict[str, Path]:
    """Run ``script OUT`` (by default this file's ``train``) in a throwaway container from
    ``image``, without network; return the files it wrote by name."""
    container = client.containers.create(
        image,
        entrypoint=[_PYTHON, "/tmp/models.py", "/tmp/out"],
        network_mode="none",
        labels={"modelport.test": "tree-models"},
        environment={"OMP_NUM_THREADS": "1"},
    )
    try:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            archive.add(script, arcname="models.py")
        container.put_archive("/tmp", buffer.getvalue())
        container.start()
        deadline = time.monotonic() + 300
        while True:
            container.reload()
            if container.status in ("exited", "dead"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{Path(script).name} took more than 300 s in {image}")
            time.sleep(0.5)
        code = container.attrs["State"]["ExitCode"]
        if code != 0:
            raise RuntimeError(container.logs().decode(errors="replace")[-3000:])
        stream, _stat = container.get_archive("/tmp/out")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            archive.extractall(dest, filter="data")
    finally:
        container.remove(force=True)
    return {p.name: p for p in (dest / "out").iterdir()}


if __name__ == "__main__":
    train(Path(sys.argv[1]))
