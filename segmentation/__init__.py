"""ADE20K semantic segmentation: UperNet on the MAE ViT (model, data, train, evaluate, recipes)."""
