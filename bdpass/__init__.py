"""bdpass: a torch.compile backend (``backend="bd"``) that rewrites low-rank linear chains
(pivoting factorization) and attention head pairs (basis decomposition) with exact
identities, then lowers through Inductor.

The backend is registered through the ``torch_dynamo_backends`` entry point; importing
this package does not register it again.
"""
from .api import collect_reports, explain
from .backend import bd_backend
from . import diff  # callable: bdpass.diff(model, *args, options=None, **kwargs)
from .options import BDOptions
from .prepare import prepare, save_prepared, load_prepared, PreparedModule
from .report import GraphReport, Report, RewriteRecord, SkipRecord
from .runtime import VerificationError

__version__ = "0.1.0"

__all__ = ["bd_backend", "explain", "collect_reports", "BDOptions", "Report", "GraphReport",
           "RewriteRecord", "SkipRecord", "VerificationError", "prepare", "save_prepared",
           "load_prepared", "PreparedModule", "__version__"]
