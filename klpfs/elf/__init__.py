"""Kernel modules as ELF files: reading real .ko files, and writing module files out as .ko."""
