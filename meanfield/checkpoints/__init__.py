"""Real checkpoints without network or torch: safetensors readers, per-architecture tensor-name tables, and the
1:1 rule's per-layer matrices (`layer_matrices`).

    ckpt = load_checkpoint("path/to/Qwen2.5-0.5B")      # config.json + model.safetensors (or sharded index)
    W_mlp, W_attn = layer_matrices(ckpt, "value")        # (L, d, d) each
    meanfield.rule.propagate(W_mlp, W_attn)              # the rule's erank / condition number per layer

Command line: ``meanfield weights PATH`` (`meanfield.checkpoints.cli`).
"""

from ._io import TensorStore as TensorStore
from ._layouts import LAYOUTS as LAYOUTS
from ._layouts import checkpoint_from_tensors as checkpoint_from_tensors
from ._layouts import load_checkpoint as load_checkpoint
from ._types import Checkpoint as Checkpoint
from ._types import CheckpointError as CheckpointError
from ._types import LayerWeights as LayerWeights
from .matrices import ATTENTION_MATRICES as ATTENTION_MATRICES
from .matrices import layer_matrices as layer_matrices
from .matrices import value_matrix as value_matrix

__all__ = ["Checkpoint", "LayerWeights", "CheckpointError", "load_checkpoint", "checkpoint_from_tensors", "layer_matrices", "value_matrix",
           "TensorStore", "LAYOUTS", "ATTENTION_MATRICES"]
