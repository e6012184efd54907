"""Builtin plugins, one concern a module, loaded like any third-party plugin.

Installed as ``gemma_profiles.hooks``; the list is
``gemma_profiles.plugin.manager.DEFAULT_PLUGINS``.  Block one with
``GEMMA_PROFILE_DISABLE_PLUGINS=<name>``.
"""
