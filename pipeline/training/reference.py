"""The reference model's top-K log-probs at every SFT loss token, computed once (stage
`reference`), so that EKSFT can train without the reference model in memory.

A folder holds `ids.npy` [tokens, K] (int32), `logp.npy` [tokens, K] (float32) and
`index.json`: for each training row, keyed by a digest of its token ids, the offset and count
of its loss tokens. The arrays are memory-mapped, so the cache may be larger than memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch import Tensor

from pipeline.losses.chunked import tokens_per_chunk
from pipeline.losses.stats import IGNORE_INDEX, TopK
from pipeline.results.manifest import atomic_write_text

Batch = dict[str, Tensor]


class ReferenceMismatch(ValueError):
    """A training row that the cache was not built from."""


def row_keys(batch: Batch) -> list[tuple[str, int]]:
    """Per row of a collated batch: a digest of its unpadded token ids and loss mask, and its count of loss tokens."""
    if "attention_mask" not in batch:
        raise ReferenceMismatch("the cached reference needs padded batches with an attention_mask: "
                                "packing and padding_free are not supported with sft.reference: cached")
    rows = []
    for ids, attention, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = attention.bool()
        loss = labels[real] != IGNORE_INDEX
        tokens = ids[real].to("cpu", torch.int64).numpy().tobytes() + loss.cpu().numpy().tobytes()
        rows.append((hashlib.blake2b(tokens, digest_size=16).hexdigest(), int((labels[1:] != IGNORE_INDEX).sum())))
    return rows


def write_reference_topk(hidden_states, lm_head: torch.nn.Linear, batches: Iterable[Batch], folder: Path,
                         k: int) -> dict[str, float]:
    """Fill `folder` with the top K of softmax(lm_head(hidden_states(batch))) at each loss token of
    `batches` (an iterable that can be walked twice: once to count, once to compute).
    Returns the token count and the mean reference mass outside the top K."""
    index: dict[str, list[int]] = {}
    total = 0
    for batch in batches:
        for key, count in row_keys(batch):
            if key not in index:
                index[key] = [total, count]
                total += count
    folder.mkdir(parents=True, exist_ok=True)
    ids = open_memmap(folder / "ids.npy", mode="w+", dtype=np.int32, shape=(total, k))
    logp = open_memmap(folder / "logp.npy", mode="w+", dtype=np.float32, shape=(total, k))
    chunk = tokens_per_chunk(lm_head.weight.size(0), lm_head.weight.device)
    tail = 0.0
    written = set()
    with torch.no_grad():
        for batch in batches:
            hidden = hidden_states(batch)[:, :-1]
            for row, (key, count) in enumerate(row_keys(batch)):
                if key in written:
                    continue
                written.add(key)
                h = hidden[row][batch["labels"][row, 1:] != IGNORE_INDEX]
                start = index[key][0]
                for begin in range(0, count, chunk):
                    top = F.log_softmax(lm_head(h[begin:begin + chunk]).float(), dim=-1).topk(k, dim=-1)
                    rows = slice(start + begin, start + begin + len(top.values))
                    ids[rows] = top.indices.cpu().numpy()
                    logp[rows] = top.values.cpu().numpy()
                    tail += float((1 - top.values.exp().sum(-1)).sum())
    ids.flush()
    logp.flush()
    atomic_write_text(folder / "index.json", json.dumps(index))
    return {"tokens": float(total), "rows": float(len(index)), "topk": float(k),
            "tail_mass": tail / max(total, 1)}


class ReferenceTopK:
    """A cache written by `write_reference_topk`, looked up by the rows of a collated batch."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")
        self.logp = np.load(folder / "logp.npy", mmap_mode="r")
        self.index = json.loads((folder / "index.json").read_text())

    def lookup(self, batch: Batch) -> TopK:
        """The top K at the batch's loss tokens, in the order `losses.select_tokens` keeps them."""
        ids, logp = [], []
        for row, (key, count) in enumerate(row_keys(batch)):
            offset, cached = self.index.get(key, (None, None))
            if cached != count:
                raise ReferenceMismatch(
                    f"training row {row} of this batch ({count} loss tokens) is not in the cached reference "
                    f"{self.folder} (built from other data or tokenization): run the `reference` stage again "
                    "(posttrain run CONFIG --force reference)")
            ids.append(self.ids[offset:offset + count])
            logp.append(self.logp[offset:offset + count])
        device = batch["input_ids"].device
        return TopK(torch.from_numpy(np.concatenate(ids)).to(device), torch.from_numpy(np.concatenate(logp)).to(device))
