"""Bundled profiles (YAML). This file only makes the folder installable as gemma_profiles.profiles."""
