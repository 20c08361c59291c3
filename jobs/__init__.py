"""imgcurate jobs: entrypoints, config schema and the `imgcurate` command."""
