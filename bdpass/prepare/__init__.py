"""Prepared models: the ``bd`` backend's rewrites applied once to the model's own modules.

``bdpass.prepare(model, *example_args, options=None, inplace=True, **example_kwargs)`` runs
the model on the example inputs under ``torch.compile`` with the backend's analysis
(:func:`bdpass.backend.rewrite_graph`, any number of graphs), and edits the model: ``B`` is
folded into the partner weights in place, each rewritten source projection module becomes a
:class:`BDLinear`, each rewritten low-rank chain ``u(v(x))`` a :class:`PivotLinear` (plus an
:class:`Absorbed` identity). The result is the user's own model, an ordinary ``nn.Module``,
smaller in memory, working at any input shape, eager or under ``torch.compile`` /
``torch.export``. Save and load it with :func:`save_prepared` / :func:`load_prepared`
(safetensors), or ``save_pretrained`` / transformers' own ``from_pretrained`` (bdpass is a
transformers quantization method; :func:`from_pretrained` also reads older folders); the
:func:`plan_of` / :func:`apply_plan` pair serves any other checkpoint format that stores a
``state_dict``. See ``docs/prepare.md``.

Modules: :mod:`.capture` (the compiled run, graph instances, layer splitting), :mod:`.edits`
(decisions to module edits and their checks), :mod:`.modules` (the replacing modules),
:mod:`.apply` (``prepare`` and its report), :mod:`.checkpoint` (plans and files),
:mod:`.hf_quantizer` (the transformers quantization method), :mod:`.stream` (a checkpoint
folder prepared layer by layer: :func:`prepare_folder`, ``bdpass prepare SRC DST``).
"""
from .._callable import make_callable as _make_callable
from .apply import PrepareReport, prepare, state_bytes
from .checkpoint import (METADATA_KEY, PLAN_FORMAT, apply_plan, from_pretrained, load_prepared, plan_of, read_plan,
                         save_prepared)
from .edits import NotPreparable
from .modules import Absorbed, BDLinear, PivotLinear
from .stream import FolderReport, prepare_folder

__all__ = ["prepare", "PrepareReport", "NotPreparable", "save_prepared", "load_prepared", "from_pretrained",
           "plan_of", "apply_plan", "read_plan", "state_bytes", "prepare_folder", "FolderReport", "BDLinear",
           "PivotLinear", "Absorbed",
           "PLAN_FORMAT", "METADATA_KEY"]


_make_callable(__name__, prepare)
