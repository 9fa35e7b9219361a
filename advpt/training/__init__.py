"""What the training commands (pretrain, finetune) share: the harness and the callbacks."""
