"""The installer's `cowfs` commands: the command line only; the logic lives in the packages
next door."""
