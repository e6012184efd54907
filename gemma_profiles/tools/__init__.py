"""Tools built on the runtime, for the CLI, the benchmarks and ``make demo``: the GGUF importer
(``gguf_import``), ``bench``, answer ``quality`` against a reference, and ``demo``.
"""
