"""``gemma-profile``, the command line: ``main`` (the group and its profile commands),
``model`` (import, generate), ``contrib`` (new, schema)."""
