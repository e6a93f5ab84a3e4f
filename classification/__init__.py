"""Image classification transfer of MAE encoders: end-to-end fine-tuning, linear probing and
partial fine-tuning (``python -m classification --protocol {finetune,linprobe,partial}``)."""
