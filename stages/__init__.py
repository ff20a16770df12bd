"""Stage scripts of dvc.yaml: each one is `probegen.cli.stage(<command>)`."""
