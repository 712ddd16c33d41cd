"""Serving: the BentoML service and the small runtime it loads models with. Nothing here imports the training
side of toolkit, so a bento carries only this package and starts fast."""
