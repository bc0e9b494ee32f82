"""qgraph's passes (installed as ``qgraph.passes``), one module or package per pass family.

A pass family is the passes and rewrite rules behind one job of the compile: canonicalize,
fusion, smoothquant, rotation, annotate, qdq (insert Q/DQ), lowering, runtime_check and
finalize; gptq and rule_table are helpers the families share. Each family's module exports
``PASSES``, its ``qgraph.registry.PassInfo`` records: a name, the ``qgraph.pipeline.Phase`` it
runs in, and a ``build`` function that makes the pass for a target and options.

The pipeline's order lives outside this package: phases run in the order of ``Phase``, and
within a phase passes run in the order of ``qgraph.registry.BUILTIN_PASS_MODULES``, then of
each module's ``PASSES`` (``qgraph passes`` lists the result). docs/architecture.md describes
each phase.
"""
