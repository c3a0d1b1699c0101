"""The finetune stage: labelled images -> a network with a new classification head, trained on Ray workers."""
