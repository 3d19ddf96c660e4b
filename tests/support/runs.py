"""Command-line overrides of tiny runs that several test files train: ``TINY`` (a 4-step ResNet-20 on synthetic
images) and the DDP equality tests' ``IMAGE``/``LM`` bases with their ``COMMON`` trainer keys."""

TINY = [
    "model.backbone=resnet20", "model.width=4", "data.source=synthetic", "data.batch_size=32",
    "data.train_limit=256", "data.val_limit=64", "data.val_batch_size=64", "data.augment=false",
    "trainer.max_steps=4", "trainer.val_every=2", "trainer.progress=false", "experiment=h",
]

IMAGE = ["model.backbone=resnet20", "model.width=4", "model.norm=bn", "data.source=synthetic",
         "data.batch_size=16", "data.train_limit=512", "data.val_limit=64", "data.val_batch_size=32",
         "optim.name=adamw", "optim.lr=3e-3",
         # NCHW: oneDNN's channels-last convolutions round differently at per-rank batch 8 than at 16 (measured
         # 7e-4 relative after 4 steps), which is not what these tests are about
         "trainer.speed=eager"]
LM = ["model.backbone=transformer_lm", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.norm=masked_bn",
      "data.source=synthetic", "data.mode=samples", "data.block_size=32", "data.batch_size=8",
      "data.val_batch_size=16", "trainer.val_batches=2", "optim.name=adamw", "optim.lr=3e-3"]
COMMON = ["trainer.max_steps=4", "trainer.val_every=2", "trainer.progress=false", "trainer.sync_batchnorm=true",
          "trainer.precise_bn=2", "experiment=t"]
