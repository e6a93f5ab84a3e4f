from classification.train import cli

cli()
