"""The cowfs installer: resolves, fetches and installs distributions into cowfs venvs."""
