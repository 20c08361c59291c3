"""imgcurate operators: one module per pipeline stage (see README, "Architecture")."""

__version__ = "0.1.0"
