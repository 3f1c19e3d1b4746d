"""bdpass: a torch.compile backend (``backend="bd"``) that rewrites low-rank linear chains
(pivoting factorization) and attention head pairs (basis decomposition) with exact
identities, then lowers through Inductor.

The backend is registered through the ``torch_dynamo_backends`` entry point; importing
this package does not register it again. Importing it registers ``"bdpass"`` as a
transformers quantization method where transformers is installed (when transformers
imports its quantizers), so that prepared checkpoints load with
``AutoModel*.from_pretrained`` (``bdpass.prepare.hf_quantizer``).
"""
from .api import collect_reports, explain
from .backend import bd_backend
from . import diff  # callable: bdpass.diff(model, *args, options=None, **kwargs)
from .options import BDOptions
from . import prepare  # callable: bdpass.prepare(model, *args, options=None, inplace=True, **kwargs)
from .prepare import (Absorbed, BDLinear, PivotLinear, PrepareReport, apply_plan, from_pretrained, load_prepared,
                      plan_of, prepare_folder, save_prepared)
from .report import GraphReport, Report, RewriteRecord, SkipRecord
from . import shard  # tensor-parallel shards of a prepared model (docs/serving.md)
from .shard import ShardError, load_sharded
from .runtime import VerificationError

__version__ = "0.1.0"

# Prepared checkpoints load with transformers' own from_pretrained ("quant_method": "bdpass"),
# where transformers is installed (bdpass does not need it): registered now if transformers'
# quantizers are imported, else as soon as they are (importing bdpass does not import them).
from .prepare import hf_quantizer as _hf_quantizer

_hf_quantizer.install()

__all__ = ["bd_backend", "explain", "collect_reports", "BDOptions", "Report", "GraphReport",
           "RewriteRecord", "SkipRecord", "VerificationError", "prepare", "PrepareReport", "save_prepared",
           "load_prepared", "from_pretrained", "plan_of", "apply_plan", "prepare_folder", "BDLinear",
           "PivotLinear", "Absorbed",
           "shard", "load_sharded", "ShardError", "diff", "__version__"]
