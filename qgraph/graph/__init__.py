"""What every layer of qgraph reads and writes models with, apart from any pass: facts about
ONNX operators and domains (``ops``), walking graphs and carrying node provenance
(``traversal``), adding constants under free names (``building``), name patterns for
exclusions and overrides (``patterns``), and loading and saving models by qgraph's conventions
(``model_io``)."""
