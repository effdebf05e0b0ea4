"""toolcli: what every command of the project shares: absl flags of its own, `--help`, a quiet start, the flag page."""
