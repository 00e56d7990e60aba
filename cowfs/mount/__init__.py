"""The client side of mounts: what a mount is made of (spec), starting and stopping daemons
(mount), their control socket (control), and why a mount fails (mount_errors)."""
