from pretrain.train import cli

cli()
