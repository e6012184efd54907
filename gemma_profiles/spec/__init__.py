"""Profile data: YAML -> validated `Profile`, and finding profiles by name (no torch).

``yamlio`` reads YAML keeping each value's file:line; ``schema`` is the typed shape of a
profile; ``variants`` what we know of gemma_pytorch's variants; ``profile`` resolves
``extends`` and variant overrides; ``registry`` finds a profile across builtin, user and
plugin sources.
"""
