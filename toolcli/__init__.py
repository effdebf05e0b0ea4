"""toolcli: what every command of the project shares: absl flags of its own, `--help`, and a quiet start."""
