"""RMU: steer forget-token hidden states at block ``rmu_layer`` to a fixed random control vector."""
from ..distributed import unwrap
from ..losses import control_vector, rmu
from .base import ForgetTerm


def num_blocks(model) -> int:
    model = unwrap(model)  # a DDP / DeepSpeed wrapper does not expose the config
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    if n is None:
        raise ValueError("cannot tell the model's number of decoder blocks for RMU's default layer")
    return int(n)


def resolve_layer(model, layer: float) -> int:
    """layer < 0 means the default: the middle block."""
    n = num_blocks(model)
    k = n // 2 if layer < 0 else int(layer)
    if not 0 <= k < n:
        raise ValueError(f"RMU layer {k} out of range for a model with {n} blocks")
    return k


def rmu_term(ctx, batches, hp):
    batch = batches["forget"]
    k = resolve_layer(ctx.model, hp["rmu_layer"])
    h = ctx.forward(batch, hidden_layer=k).hidden_states[k + 1]
    control = control_vector(h.shape[-1], hp["steering_coeff"], int(hp["control_seed"]), dtype=h.dtype,
                             device=h.device)
    return rmu(h, batch["labels"], control, num_items_in_batch=ctx.num_items.get("forget_positions"),
               per_sample=ctx.per_sample), {}


RMU = ForgetTerm("rmu", rmu_term, {"rmu_layer": -1, "steering_coeff": 4.0, "control_seed": 0},
                 "mean over forget positions of mean_d (h_k − c·u)², u ~ U[0,1)^d (seeded)",
                 default_regularizer="rr")
