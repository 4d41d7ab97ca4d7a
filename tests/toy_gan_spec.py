"""A toy two-engine TrainSpec: a generator and a discriminator on vectors made from token shards.

It exercises what the codec stage needs from the engine (``TrainSpec.custom_step``,
``Trainer.make_engine``): two DeepSpeed engines in one loop, each with its own optimizer and
learning-rate schedule, the discriminator's gradients never leaking into the generator's step,
both engines checkpointed and resumed, eval through ``eval_step``. Registered as ``toy_gan`` when
a run config lists this file under ``imports:``.

Config section ``toy: {dim: 8, d_lr_scale: 1.0}``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from musiclm.train.spec import TrainSpec, register_train_spec

DEFAULT_DIM = 8


def _dim(cfg: dict) -> int:
    return int((cfg.get("toy") or {}).get("dim", DEFAULT_DIM))


class Generator(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, dim))

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def build_model(cfg: dict) -> nn.Module:
    return Generator(_dim(cfg))


def build_example(sample: dict, rng: np.random.Generator, cfg: dict) -> dict:
    """Real data: the first ``dim`` semantic ids scaled to [-1, 1]; noise drawn from the sample's rng
    (so the same example comes back after a resume)."""
    d = _dim(cfg)
    ids = np.asarray(sample["semantic.npy"][:d], dtype=np.float32)
    real = ids / max(float(ids.max()), 1.0) * 2 - 1 if ids.size == d else np.zeros(d, np.float32)
    return {
        "real": torch.from_numpy(real.astype(np.float32)),
        "z": torch.from_numpy(rng.standard_normal(d).astype(np.float32)),
    }


def collate(examples: list[dict]) -> dict:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def _discriminator(trainer) -> object:
    """The discriminator's engine, made on the first step (same initial weights on every rank)."""
    if "disc" not in trainer.engines:
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            module = Discriminator(_dim(trainer.cfg))
        scale = float((trainer.cfg.get("toy") or {}).get("d_lr_scale", 1.0))
        lr = trainer.ds_config["optimizer"]["params"]["lr"] * scale
        trainer.make_engine(module, "disc", {"optimizer": {"params": {"lr": lr}}})
    return trainer.engines["disc"]


def custom_step(trainer, batch: dict):
    gen, disc = trainer.engine, _discriminator(trainer)
    real, z = batch["real"], batch["z"]
    # discriminator step (hinge), the generator's output detached
    fake = gen(z)
    d_real, d_fake = disc(real), disc(fake.detach())
    d_loss = torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()
    disc.backward(d_loss)
    disc.step()
    # generator step through a frozen discriminator: no gradient reaches D's parameters
    for p in disc.module.parameters():
        p.requires_grad_(False)
    try:
        g_adv = -disc(fake).mean()
        g_loss = g_adv + (fake.mean(0) - real.mean(0)).pow(2).mean()
        gen.backward(g_loss)
        gen.step()
    finally:
        for p in disc.module.parameters():
            p.requires_grad_(True)
    acc = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean())
    return g_loss, {"d_loss": d_loss.detach(), "g_adv": g_adv.detach(), "d_accuracy": acc}


def loss(model, batch: dict, cfg: dict):
    """Generator objective without the discriminator (used only if no custom_step)."""
    fake = model(batch["z"])
    return (fake.mean(0) - batch["real"].mean(0)).pow(2).mean(), {}


def eval_step(model, batch: dict, cfg: dict):
    """Held-out: distance between the generated and the real batch means (no discriminator step)."""
    fake = model(batch["z"])
    return (fake.mean(0) - batch["real"].mean(0)).pow(2).mean(), {"fake_std": fake.std()}


SPEC = register_train_spec(
    TrainSpec(
        name="toy_gan",
        data_kind="tokens",
        build_model=build_model,
        build_example=build_example,
        collate=collate,
        loss=loss,
        custom_step=custom_step,
        eval_step=eval_step,
        config_keys=("toy",),
        description="toy generator + discriminator (engine tests)",
    ),
    overwrite=True,
)
