"""The reference zoo: what each shipped network is, how it is trained, and where its files live.

Each :class:`ZooEntry` builds its network, states its :class:`~dmquant.zoo.training.TrainingPlan`
and loss, and exports a trained run to the directory that ships inside the package
(``zoo/weights/<name>/``, fp16 safetensors plus a model card). ``dmquant zoo train <name>`` runs
the plan (on a GPU; resumable), ``dmquant zoo evaluate <name>`` measures the shipped files and
writes the model card's quality section.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import write_atomically
from ..catalog import REFERENCE_MODELS
from ..errors import ModelError
from ..provenance import environment
from . import WEIGHTS_DIR
from .autoencoder import AUTOENCODER_NAME, autoencoder_loss, export_autoencoder, glyph_autoencoder, measure_autoencoder
from .datasets import NUM_CLASSES, GlyphBatch
from .diffusion import NUM_TRAIN_TIMESTEPS, dropped_conditions, epsilon_loss
from .glyphnet import GlyphNet
from .latent import TextToImage, class_latent_loss, dit_glyphs, export_dit, export_text_to_image, text_to_image_loss
from .quality import classifier_accuracy
from .training import TrainingPlan, TrainingResult

MODEL_CARD_FILE = "model_card.json"
GLYPHNET_FILE = "model.safetensors"


@dataclass(frozen=True)
class ZooEntry:
    """One reference network: ``build()`` makes it untrained; ``export`` writes a trained one.

    ``measure``, when set, gives numbers measured on the trained network that its model card
    records at export (e.g. a classifier's held-out accuracy).
    """

    name: str
    description: str
    plan: TrainingPlan
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, GlyphBatch, torch.Generator], Tensor]
    export: Callable[[nn.Module, Path], None]
    measure: Callable[[nn.Module], dict] | None = None

    @property
    def directory(self) -> Path:
        return WEIGHTS_DIR / self.name


def read_model_card(directory: Path) -> dict:
    path = directory / MODEL_CARD_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_model_card(directory: Path, card: dict) -> Path:
    return write_atomically(directory / MODEL_CARD_FILE, lambda f: f.write(json.dumps(card, indent=2).encode()))


def architecture(model: nn.Module) -> dict:
    """The network's constructor config: diffusers' ``config`` where there is one, else its class name."""
    config = getattr(model, "config", None)
    if config is None:
        return {"_class_name": type(model).__name__}
    return {"_class_name": type(model).__name__, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}


def training_card(entry: ZooEntry, result: TrainingResult) -> dict:
    """The model card's head: name, parameters, architecture config, and the training section."""
    parameters = sum(p.numel() for p in result.model.parameters())
    return {
        "name": entry.name,
        "description": entry.description,
        "parameters": parameters,
        "config": architecture(result.model),
        "training": {
            "plan": asdict(entry.plan),
            "steps_done": result.step,
            "images_seen": result.step * entry.plan.batch_size,
            "wall_time_s": round(result.elapsed_s, 1),
            "weights": "EMA" if entry.plan.ema_decay else "last",
            **environment(),
        },
    }


# --- GlyphNet -------------------------------------------------------------------------------


def classifier_loss(model: nn.Module, batch: GlyphBatch, generator: torch.Generator) -> Tensor:
    """Cross-entropy of the glyph class."""
    return F.cross_entropy(model(batch.images).float(), batch.labels)


def measure_glyphnet(model: nn.Module) -> dict:
    """Top-1 accuracy on 10k held-out glyphs."""
    return {"test_accuracy": classifier_accuracy(model.float().eval())}


def export_glyphnet(model: nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / GLYPHNET_FILE)


# --- ddpm-glyphs32 --------------------------------------------------------------------------


def ddpm_glyphs32() -> UNet2DModel:
    """Class-conditional pixel-space UNet (32×32×3), self-attention at 16×16 and 8×8, ~2.8 M parameters.

    Label ``NUM_CLASSES`` is the null class of classifier-free guidance.
    """
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=16,
        num_class_embeds=NUM_CLASSES + 1,
    )


@lru_cache(maxsize=1)
def training_scheduler() -> DDPMScheduler:
    """1000-step linear β schedule (1e-4 → 0.02), ε-prediction, as DDPM trains on CIFAR-10."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="epsilon")


def sampling_scheduler() -> DDIMScheduler:
    """The shipped sampler: DDIM over the training schedule, clipping x̂_0 to the image range."""
    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="epsilon", clip_sample=True
    )


def denoising_loss(model: nn.Module, batch: GlyphBatch, generator: torch.Generator) -> Tensor:
    """DDPM's simple loss on pixels (:func:`~dmquant.zoo.diffusion.epsilon_loss`), labels dropped to the null class.

    Draws, in order: timesteps, noise, dropped labels.
    """

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        dropped = dropped_conditions(len(batch), generator, x_t.device)
        labels = torch.where(dropped, torch.full_like(batch.labels, NUM_CLASSES), batch.labels)
        return model(x_t, t, class_labels=labels).sample

    return epsilon_loss(predict, batch.images, training_scheduler(), generator)


def export_diffusion_model(model: nn.Module, directory: Path) -> None:
    """A diffusers model directory dmquant loads by path: fp16 weights, DDIM scheduler, conditioning."""
    model = copy.deepcopy(model).cpu().half()
    model.save_pretrained(directory, safe_serialization=True)
    sampling_scheduler().save_pretrained(directory)
    info = {"conditioning": "class", "num_classes": NUM_CLASSES, "null_class": NUM_CLASSES, "guidance_scale": 1.0}
    write_atomically(directory / "dmquant_model.json", lambda f: f.write(json.dumps(info, indent=2).encode()))


#: Both latent diffusion models train by the same plan (on 64×64 glyphs through the frozen autoencoder).
LATENT_PLAN = TrainingPlan(
    steps=40_000, batch_size=256, learning_rate=3e-4, warmup_steps=500, ema_decay=0.9995, resolution=64, save_every=2000
)

#: The diffusion models' names are :data:`dmquant.catalog.REFERENCE_MODELS` (torch-free, for the command line);
#: their entries are here.
DDPM_GLYPHS32, LDM_GLYPHS64, DIT_GLYPHS = REFERENCE_MODELS

ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="glyphnet",
            description="glyph classifier whose features serve FID/sFID/KID/IS/precision-recall proxies",
            plan=TrainingPlan(
                steps=4000, batch_size=512, learning_rate=2e-3, warmup_steps=200, weight_decay=0.05, ema_decay=0.999
            ),
            build=GlyphNet,
            loss=classifier_loss,
            export=export_glyphnet,
            measure=measure_glyphnet,
        ),
        ZooEntry(
            name=DDPM_GLYPHS32,
            description="class-conditional pixel-space DDPM (UNet2DModel) on 32×32 glyphs",
            plan=TrainingPlan(
                steps=40_000, batch_size=256, learning_rate=3e-4, warmup_steps=500, ema_decay=0.9995, save_every=2000
            ),
            build=ddpm_glyphs32,
            loss=denoising_loss,
            export=export_diffusion_model,
        ),
        ZooEntry(
            name=AUTOENCODER_NAME,
            description="AutoencoderKL between 64×64 glyphs and 16×16×4 latents, shared by the latent models",
            plan=TrainingPlan(
                steps=8000, batch_size=128, learning_rate=5e-4, warmup_steps=200, ema_decay=0.999, resolution=64
            ),
            build=glyph_autoencoder,
            loss=autoencoder_loss,
            export=export_autoencoder,
            measure=measure_autoencoder,
        ),
        ZooEntry(
            name=LDM_GLYPHS64,
            description="latent text-to-image (CLIP text encoder + UNet2DConditionModel) on 64×64 glyphs",
            plan=LATENT_PLAN,
            build=TextToImage,
            loss=text_to_image_loss,
            export=export_text_to_image,
        ),
        ZooEntry(
            name=DIT_GLYPHS,
            description="class-conditional latent DiT (DiTTransformer2DModel) on 64×64 glyphs",
            plan=LATENT_PLAN,
            build=dit_glyphs,
            loss=class_latent_loss,
            export=export_dit,
        ),
    )
}


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    return ZOO[name]
