"""MAE pretraining (He et al., CVPR 2022)."""
