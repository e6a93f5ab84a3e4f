from maecore.data.packed.cli import cli

cli()
