"""A tiny Hugging Face transformers model built from a config at test time (no download),
in the transformers converter image: ``python hf_models.py OUT`` writes OUT/bert (the
folder save_pretrained writes) and OUT/tokens.npz (a sample of token ids and mask)."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

LABELS = 3
VOCAB = 50


def build(out: Path) -> None:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(str(out / "bert"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(3, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 5:] = 0
    np.savez(out / "tokens.npz", input_ids=ids, attention_mask=mask)


def folder_tar_gz(folder: Path, path: Path) -> None:
    """The model folder as users upload it: one archive."""
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname="bert")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
