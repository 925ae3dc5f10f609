"""RMU: steer forget-token hidden states at block ``rmu_layer`` to a fixed random control vector."""
from ..losses import control_vector, rmu
from ..model_structure import resolve_layer
from .base import ForgetTerm


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
