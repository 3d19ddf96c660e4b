"""Tiny options for every built-in backbone and their norm-site counts (the model tests share them)."""

TINY = {
    "resnet20": {}, "resnet56": {"width": 4}, "resnet18": {},
    "vgg11": {"width": 0.125}, "vgg16": {"width": 0.125},
    "vit": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "transformer_lm": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16},
}
# norm sites with the default options above: conv+norm per conv (option-A shortcuts have none)
EXPECTED_SITES = {"resnet20": 19, "resnet56": 55, "resnet18": 20, "vgg11": 8, "vgg16": 13, "vit": 5,
                  "transformer_lm": 5}
