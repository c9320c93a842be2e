"""Model zoo: ViT encoder (big_vision names) and the MAE decoder."""
