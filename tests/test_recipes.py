"""Optimizer parameter groups: timm's rule (no decay on norms, biases, position embeddings, class tokens)."""
import timm
import torch

from genrobust import train as tr


def _decay_of(opt, model):
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_vit_position_embedding_class_token_norms_and_biases_get_no_weight_decay():
    model = timm.create_model("test_vit", num_classes=3)
    opt = tr._optimizer(model, tr.TrainConfig(model="test_vit", weight_decay=0.05, optimizer="adamw").resolved())
    decay = _decay_of(opt, model)
    assert len(decay) == len(list(model.parameters()))  # every parameter in exactly one group
    assert decay["pos_embed"] == 0.0 and decay["cls_token"] == 0.0
    for name, p in model.named_parameters():
        if p.ndim <= 1:
            assert decay[name] == 0.0, name  # norms and biases
    weights = [n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")]
    assert weights and all(decay[n] == 0.05 for n in weights)


def test_resnet_convolutions_decay_and_batchnorm_does_not():
    model = timm.create_model("test_resnet", num_classes=3)
    opt = tr._optimizer(model, tr.TrainConfig(model="test_resnet", weight_decay=1e-4).resolved())
    decay = _decay_of(opt, model)
    # the deep stem: conv, BatchNorm, ...
    assert decay["conv1.0.weight"] == 1e-4 and decay["conv1.1.weight"] == 0.0 and decay["conv1.1.bias"] == 0.0
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
