"""The plugin contract: the hooks (``hookspecs``), the values that cross them (``types``) and
the manager facade that loads builtin and third-party plugins and calls them (``manager``).
"""
