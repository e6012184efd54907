"""The runtime that arms gemma_pytorch: the active profile (``session``), the import hook and
the patch on gemma's model classes (``patch``), the applied profile of an environment
(``state``), and which gemma is installed (``gemma_info``).
"""
