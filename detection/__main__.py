from detection.train import cli

cli()
