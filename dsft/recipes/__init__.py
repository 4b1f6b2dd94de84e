"""The commands: one module per ``dsft`` command, each a leaf that nothing but ``dsft.cli`` imports."""
