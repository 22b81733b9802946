"""The chapter's models: its MLP (``SimpleNetwork``), and a small CNN and a small ViT-style
Transformer for 32 x 32 images, sized to train on a CPU in minutes on a subset.

Every model records the arguments it was built with (``config()``), so a checkpoint can rebuild it
(training.load_model).
"""

from __future__ import annotations

import torch
from torch import nn


def activation_name(act: nn.Module) -> str:
    return type(act).__name__


def make_activation(name: str) -> nn.Module:
    """``nn.<name>()``: the activation a checkpoint names."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"unknown activation {name!r} (expected a torch.nn module name such as 'ReLU')")
    return cls()


class SimpleNetwork(nn.Module):
    """The chapter's MLP: flatten, then ``Linear -> act`` per hidden width, then a linear classifier.

    ``input_shape`` is the number of input features (784 for 28 x 28 images, 64 for digits). Left
    out, as in the chapter's ``SimpleNetwork(act_func=nn.PReLU())``, it is taken from the data:
    784 until then, and :func:`fit_to_data` (which the toolkit's runners and ``train_model`` call
    on the first batch) resizes the first layer in place, before any step, keeping its Parameter
    objects, so an optimizer built on ``model.parameters()`` still holds them.
    """

    def __init__(self, act_func: nn.Module | None = None, input_shape: int | None = None,
                 hidden_shape: list[int] | tuple[int, ...] = (512, 64), num_labels: int = 10):
        super().__init__()
        self.act_func = act_func if act_func is not None else nn.ReLU()
        self.input_from_data = input_shape is None
        self.input_shape = 784 if input_shape is None else int(input_shape)
        self.hidden_shape = [int(h) for h in hidden_shape]
        self.num_labels = int(num_labels)
        layers: list[nn.Module] = [nn.Flatten()]
        width = self.input_shape
        # The activation module is shared between layers: it has no state unless it is e.g. PReLU,
        # whose one slope the chapter's model also shares.
        for h in self.hidden_shape:
            layers += [nn.Linear(width, h), self.act_func]
            width = h
        layers.append(nn.Linear(width, self.num_labels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @torch.no_grad()
    def fit_input(self, features: int) -> None:
        """Resizes the first layer to ``features`` inputs, in place and with nn.Linear's default
        initialization (the weight and bias stay the same Parameter objects)."""
        first = self.layers[1]
        if features == first.in_features:
            return
        fresh = nn.Linear(features, first.out_features, device=first.weight.device, dtype=first.weight.dtype)
        first.weight.data = fresh.weight.data
        first.bias.data = fresh.bias.data
        first.in_features = features
        self.input_shape = features

    def config(self) -> dict:
        return dict(act_func=activation_name(self.act_func), input_shape=self.input_shape,
                    hidden_shape=self.hidden_shape, num_labels=self.num_labels)


def fit_to_data(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Sizes a model whose input size comes from the data (``SimpleNetwork()`` without
    ``input_shape``) to ``batch``'s features; any other model is returned as it is."""
    if getattr(model, "input_from_data", False) and batch.dim() >= 2:
        model.fit_input(batch[0].numel())
    return model


class SmallCNN(nn.Module):
    """Three conv blocks (conv 3x3, BatchNorm, activation; max-pool after the first two), global
    average pooling and a linear classifier: ~0.1M parameters at width 32, any image size >= 4."""

    def __init__(self, act_func: nn.Module | None = None, in_channels: int = 3, num_labels: int = 100,
                 width: int = 32):
        super().__init__()
        self.act_func = act_func if act_func is not None else nn.ReLU()
        self.in_channels, self.num_labels, self.width = int(in_channels), int(num_labels), int(width)
        w = self.width
        self.features = nn.Sequential(
            nn.Conv2d(self.in_channels, w, 3, padding=1), nn.BatchNorm2d(w), self.act_func, nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), self.act_func, nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), self.act_func,
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, self.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def config(self) -> dict:
        return dict(act_func=activation_name(self.act_func), in_channels=self.in_channels,
                    num_labels=self.num_labels, width=self.width)


class SmallViT(nn.Module):
    """A ViT-style classifier: non-overlapping patches embedded by a strided conv, a class token,
    learned position embeddings, pre-norm Transformer encoder layers, and a linear head on the class
    token. Defaults (32 x 32 images, 4 x 4 patches, dim 96, depth 4) give ~0.3M parameters."""

    def __init__(self, act_func: nn.Module | None = None, image_size: int = 32, patch_size: int = 4,
                 in_channels: int = 3, num_labels: int = 100, dim: int = 96, depth: int = 4, heads: int = 4,
                 mlp_dim: int = 192, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.act_func = act_func if act_func is not None else nn.GELU()
        self._config = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                            num_labels=num_labels, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim,
                            dropout=dropout)
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout, activation=self.act_func,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(tokens))[:, 0])

    def config(self) -> dict:
        return dict(act_func=activation_name(self.act_func), **self._config)


MODELS = {"SimpleNetwork": SimpleNetwork, "SmallCNN": SmallCNN, "SmallViT": SmallViT}


def build_model(class_name: str, config: dict) -> nn.Module:
    """The model ``MODELS[class_name](**config)``, with the activation given by name."""
    if class_name not in MODELS:
        raise ValueError(f"unknown model class {class_name!r}; have: {', '.join(MODELS)}")
    config = dict(config)
    config["act_func"] = make_activation(config["act_func"])
    return MODELS[class_name](**config)


# Named sizes of the CNN and the Transformer. "small" (the default) trains on a CPU in minutes;
# "chapter" matches the chapter's models in size: its CNN has ~1.19M parameters (SmallCNN at
# width 112: 1.18M with 100 labels), its Transformer ~62M (SmallViT at ViT-Base width, 9 layers:
# 64.0M on 32 x 32 CIFAR-100 images).
MODEL_SIZES = {
    "cnn": {"small": dict(width=32), "chapter": dict(width=112)},
    "transformer": {"small": dict(dim=96, depth=4, heads=4, mlp_dim=192),
                    "chapter": dict(dim=768, depth=9, heads=12, mlp_dim=3072)},
}


def model_for(model_type: str, image_shape: tuple[int, int, int], num_labels: int,
              act_func: nn.Module | None = None, size: str = "small") -> nn.Module:
    """The model of ``model_type`` ("mlp", "cnn", "transformer") for images of ``image_shape``, at
    one of the :data:`MODEL_SIZES` of CNNs and Transformers ("small" or "chapter")."""
    c, h, w = image_shape
    if model_type == "mlp":
        return SimpleNetwork(act_func, input_shape=c * h * w, num_labels=num_labels)
    if model_type not in MODEL_SIZES:
        raise ValueError(f"unknown model type {model_type!r}; have: mlp, cnn, transformer")
    if size not in MODEL_SIZES[model_type]:
        raise ValueError(f"unknown size {size!r} for {model_type}; have: {', '.join(MODEL_SIZES[model_type])}")
    dims = MODEL_SIZES[model_type][size]
    if model_type == "cnn":
        return SmallCNN(act_func, in_channels=c, num_labels=num_labels, **dims)
    patch = 4 if h % 4 == 0 and h >= 16 else 2
    return SmallViT(act_func, image_size=h, patch_size=patch, in_channels=c, num_labels=num_labels, **dims)
