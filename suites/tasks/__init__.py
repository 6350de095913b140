"""Trained tasks: MQAR, ListOps and character LM, learned by a small Transformer whose attention
is a registered variant (`catalog` makes the data, `model` the network, `train` the loop,
`presets` the settings of each preset)."""
