"""A cowfs venv over time: creating and finding it, syncing its distributions and reloading
its mount, what it changed, absorbing other installers' work, adopting plain venvs, and the
hook that mounts it again after a reboot."""
