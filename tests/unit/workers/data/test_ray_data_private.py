"""The private Ray Data methods the stream uses (workers/data/stream.py ``RAY_DATA_PRIVATE``) are where
this Ray keeps them, with the arguments the stream passes: an upgrade that moves one fails here, by
name, instead of in the middle of a training run."""

from __future__ import annotations

import inspect

import pytest
import ray
from ray.data import Dataset
from ray.data._internal.execution.streaming_executor import StreamingExecutor

from workers.data.stream import RAY_DATA_PRIVATE


@pytest.mark.parametrize("name", RAY_DATA_PRIVATE)
def test_the_private_dataset_methods_the_stream_uses_are_there(name):
    method = getattr(Dataset, name, None)
    if method is None:
        pytest.fail(f"Ray {ray.__version__} has no Dataset.{name} (workers/data/stream.py RAY_DATA_PRIVATE)")
    params = list(inspect.signature(method).parameters)
    assert params[:2] == (["self", "executor"] if name == "_build_bundle_iterator" else ["self"]), params


def test_an_executor_can_be_shut_down_by_force():
    assert "force" in inspect.signature(StreamingExecutor.shutdown).parameters
