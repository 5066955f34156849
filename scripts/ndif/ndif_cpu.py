"""A CPU-only NDIF server for tests on a machine without a GPU (ndif 0.1.2, nnsight 0.8.1).

Imported by the Ray workers of the local server that `scripts/ndif/local_server.sh`
starts (it puts this folder on their PYTHONPATH). Two adjustments to the stock
services, selected through their environment:

- `CpuModelActor` (NDIF_MODEL_IMPORT_PATH): the stock model actor places the
  weights on the GPUs the controller assigned, measures CUDA memory around
  each request and synchronizes CUDA after it; this one loads them on the CPU
  and makes no CUDA call. Ray is
  started with one logical GPU so that the controller places the model at all.
- `CpuController` (NDIF_CONTROLLER_IMPORT_PATH): ndif's evaluator asks nnsight
  to describe a checkpoint with a `trust_remote_code` argument that nnsight
  0.8.1 no longer takes; this controller drops it.
"""

from __future__ import annotations

import gc
from typing import Any

import ray
from ndif.services.ray.deployments.controller.controller import _ControllerActor
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel
from nnsight.modeling.mixins.remotable import Remotable


def _drop_trust_remote_code() -> None:
    describe, max_tp = Remotable.describe_checkpoint.__func__, Remotable.max_tp_size.__func__

    def describe_checkpoint(cls, model_key: str, dtype: str, trust_remote_code: bool = False):
        return describe(cls, model_key, dtype)

    def max_tp_size(cls, model_key: str, trust_remote_code: bool = False):
        return max_tp(cls, model_key)

    Remotable.describe_checkpoint = classmethod(describe_checkpoint)
    Remotable.max_tp_size = classmethod(max_tp_size)


@ray.remote(num_cpus=0, num_gpus=0, max_restarts=0, resources={"head": 1})
class CpuController(_ControllerActor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _drop_trust_remote_code()
        super().__init__(*args, **kwargs)


@ray.remote(num_cpus=0, max_restarts=0)
class CpuModelActor(BaseModelDeployment):
    """Weights on the CPU; no CUDA calls."""

    CACHEABLE = False

    def load_from_disk(self) -> HuggingFaceModel:
        self.gpu_mem_bytes_by_id = {}  # nothing to pin, cap or measure
        kwargs = {k: v for k, v in self.kwargs.items() if k != "trust_remote_code"}
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, **kwargs)
        model._module.requires_grad_(False)
        return model

    def cleanup(self) -> None:
        """The stock cleanup, less its CUDA synchronize and cache release."""
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()
