from segmentation.train import cli

cli()
