"""Stand-in for the ``gemma`` package of google/gemma_pytorch.

Written by gemma-profiles from public API facts only (no upstream source was
read or copied), for CI where google/gemma_pytorch cannot be fetched. It keeps
the public module layout (``gemma.config``, ``gemma.model``,
``gemma.gemma3_model``, ``gemma.tokenizer``) and the names and numbers of the
API, with a small but real, deterministic inference implementation. The vision
tower of Gemma 3 is not implemented.

Check ``gemma.__standin__`` to tell it apart from the real package.
"""

__standin__ = True
