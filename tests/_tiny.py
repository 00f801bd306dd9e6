"""The tiny SD-architecture preset the tests build their seeded models from (nothing downloaded)."""

PRESET = {
    "vae": {"block_out_channels": (8, 16), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4},
    "unet": {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "norm_num_groups": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    },
    "text": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
}
