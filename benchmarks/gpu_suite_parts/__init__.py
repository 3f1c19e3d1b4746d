"""The parts of ``benchmarks/gpu_suite.py``, one job each (the command and its JSON are
described in that file's docstring; it is the driver that runs these in order).

Sections of the suite, as mixin classes of ``gpu_suite.Suite``:

* ``kernel_checks.KernelChecks``: the Triton kernels and the ops against float64;
* ``compile_checks.CompileChecks``: ``torch.compile`` with the ``bd`` backend on whole models;
* ``measurements.Measurements``: bd against Inductor, entry by entry within the budget
  (the modules it times and the MLA FLOP model: ``models``; the bd report's form:
  ``bd_report``), timed by ``timing.Timing``.

They use the suite's state and plumbing, defined in ``gpu_suite.Suite``: ``data`` (the
record), ``args``, ``dry``, ``device``, ``lowering``, ``budget``, ``costs``, ``torch``;
``log``, ``save`` (writes the record), ``error`` (records an exception), ``bd`` (the
backend with options), ``compile_plain`` (the Inductor baseline), ``sync``.

Plain functions:

* ``gpu_pytest``: ``pytest -m gpu`` in a subprocess and its summary counts;
* ``targets``: the speed targets and their evaluation on a record;
* ``record``: the output path and the JSON writer; ``plot``: the ratio plot;
* ``budget``: the time budget and the per-section cost estimates.

Imported as a top-level package: ``gpu_suite.py`` puts ``benchmarks/`` on ``sys.path``.
"""
