"""One module per `preftune` subcommand, each with `main(args) -> exit code`; `preftune.cli` dispatches.

Every command reads the one typed config (`config.parse_command_line`, then `config.load_config`):
a YAML file (`--config FILE`, or train's positional), `--key value` overrides, aliases, the same
defaults and validation, unknown keys an error; plus a few flags of its own.
"""
