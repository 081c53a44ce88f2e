"""Load one split of a ModelScope dataset as a ``datasets`` dataset: the ``hf`` source's ``hub: modelscope``.

ModelScope's ``MsDataset.load`` returns a plain ``datasets.Dataset`` for hub datasets (general datasets are loaded
with the ``datasets`` library under the hood, so there is no ``.to_hf_dataset()``) but a wrapped ``MsDataset`` for
local paths; :func:`as_hf_dataset` accepts both. The package is optional: ``pip install 'mmdata[modelscope]'``.
"""

from __future__ import annotations

import os
from typing import Any


def load_from_modelscope(params: Any, dataset_id: str, split: str):
    """``MsDataset.load(dataset_id, subset_name, split, ...)`` with the ``hf`` source's parameters, one split."""
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError as e:
        raise ModuleNotFoundError(
            f"ModelScope needs the modelscope package ({e}): pip install 'mmdata[modelscope]'"
        ) from None
    kwargs = dict(
        subset_name=params.subset, split=split, version=params.revision, data_dir=params.data_dir,
        data_files=params.data_files, token=params.token or os.environ.get("MODELSCOPE_API_TOKEN"),
    )
    if params.streaming:
        kwargs["use_streaming"] = True
    if params.trust_remote_code:
        kwargs["trust_remote_code"] = True
    ds = MsDataset.load(dataset_id, **{k: v for k, v in kwargs.items() if v is not None})
    return as_hf_dataset(ds)


def as_hf_dataset(ds):
    """The ``datasets`` object inside whatever ``MsDataset.load`` returned."""
    to_hf = getattr(ds, "to_hf_dataset", None)
    return to_hf() if callable(to_hf) else ds
